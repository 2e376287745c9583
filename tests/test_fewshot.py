"""Few-shot classification (`bigmodel_nb.fewshot`): the per-class draw, SetFit's pairs and loss against their definitions,
the linear probe on embeddings it can separate, and SetFit tuning a copy of a tiny BERT (the original untouched)."""
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from bigmodel_nb.assets import load_sample
from bigmodel_nb.fewshot import LinearProbe, SetFitClassifier, contrastive_pairs, cosine_pair_loss, per_class
from bigmodel_nb.models import NewHeadWarning, load_classifier, mean_pool
from bigmodel_nb.predict import Predictor


pytestmark = pytest.mark.usefixtures("one_thread")


def test_per_class_draws_n_of_each_class_seeded_and_names_a_short_class():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": ["a"] * 12 + ["b"] * 10 + ["c"] * 8})
    got = per_class(df, 5, seed=3)
    assert got.label.value_counts().to_dict() == {"a": 5, "b": 5, "c": 5} and got.index.is_unique
    assert (got.text == df.loc[got.index, "text"]).all()                                   # rows kept whole, index kept
    assert got.index.tolist() == per_class(df, 5, seed=3).index.tolist()
    assert any(set(per_class(df, 5, seed=s).index) != set(got.index) for s in range(4, 8))
    assert per_class(df.rename(columns={"label": "y"}), 2, label_col="y").y.value_counts().to_dict() == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ValueError, match="class 'c' has 8 rows, fewer than n=9"): per_class(df, 9)
    with pytest.raises(KeyError, match="'y' is not a column"): per_class(df, 2, label_col="y")
    with pytest.raises(ValueError, match="n=0"): per_class(df, 0)
    with pytest.raises(ValueError, match="no 'label'"): per_class(df.assign(label=df.label.where(df.index != 4)), 2)


def test_pairs_are_balanced_labelled_by_class_and_never_a_text_with_itself():
    labels = ["a"] * 3 + ["b"] * 6 + ["c"] * 11
    texts = [f"text {i}" for i in range(len(labels))]
    pairs = contrastive_pairs(texts, labels, iterations=7, seed=2)
    lab = np.array(labels)
    assert len(pairs) == 2 * 20 * 7 and pairs.target.sum() == 20 * 7                       # half positive, whatever the class sizes
    assert (pairs.target.to_numpy() == (lab[pairs.i] == lab[pairs.j])).all()
    assert (pairs.i != pairs.j).all() and (pairs.i.value_counts() == 14).all()
    assert (pairs.a == [texts[k] for k in pairs.i]).all() and (pairs.b == [texts[k] for k in pairs.j]).all()
    positives = pairs[pairs.target == 1]
    assert set(zip(positives.i, positives.j)) <= {(i, j) for i in range(3) for j in range(3) if i != j} | \
        {(i, j) for i in range(3, 9) for j in range(3, 9) if i != j} | {(i, j) for i in range(9, 20) for j in range(9, 20) if i != j}
    small = pairs[(pairs.i < 3) & (pairs.target == 1)]
    assert set(small.j) == {0, 1, 2}                                                       # both partners of class 'a' are drawn
    pd.testing.assert_frame_equal(pairs, contrastive_pairs(texts, labels, iterations=7, seed=2))
    assert not pairs.equals(contrastive_pairs(texts, labels, iterations=7, seed=3))


def test_pairs_refuse_what_cannot_make_them():
    with pytest.raises(ValueError, match="class 'b' has a single text"): contrastive_pairs(["x", "y", "z"], ["a", "a", "b"])
    with pytest.raises(ValueError, match="at least two classes"): contrastive_pairs(["x", "y"], ["a", "a"])
    with pytest.raises(ValueError, match="mismatched lengths"): contrastive_pairs(["x", "y", "z"], ["a", "b"])
    with pytest.raises(ValueError, match="iterations=0"): contrastive_pairs(["x", "y", "z", "w"], ["a", "b", "a", "b"], iterations=0)
    with pytest.raises(ValueError, match="position 1"): contrastive_pairs(["x", " ", "z", "w"], ["a", "b", "a", "b"])


def test_cosine_pair_loss_is_the_mean_squared_gap_between_cosine_and_target():
    rng = np.random.default_rng(0)
    a, b, t = rng.normal(size=(9, 5)), rng.normal(size=(9, 5)), rng.integers(0, 2, 9).astype(float)
    by_hand = np.mean([(a[k] @ b[k] / np.sqrt((a[k] @ a[k]) * (b[k] @ b[k])) - t[k]) ** 2 for k in range(9)])
    got = cosine_pair_loss(torch.tensor(a), torch.tensor(b), torch.tensor(t))
    assert got.item() == pytest.approx(by_hand, rel=1e-10)
    assert cosine_pair_loss(torch.tensor(a), torch.tensor(3 * a), torch.ones(9)).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="one shape"): cosine_pair_loss(torch.tensor(a), torch.tensor(b[:, :4]), torch.tensor(t))
    with pytest.raises(ValueError, match="one target per pair"): cosine_pair_loss(torch.tensor(a), torch.tensor(b), torch.tensor(t[:3]))


def test_mean_pool_ignores_padding_and_keeps_the_gradient():
    hidden = torch.randn(2, 5, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled[0], hidden[0, :3].mean(0)) and torch.allclose(pooled[1], hidden[1].mean(0))
    pooled.sum().backward()
    assert torch.allclose(hidden.grad[0, :, 0], torch.tensor([1 / 3] * 3 + [0.0] * 2))


class _Lookup:
    "Stands in for a Predictor: each text's embedding is read from a table."
    def __init__(self, table): self.table = table
    def embed(self, texts): return torch.tensor(np.stack([self.table[t] for t in texts]))


def test_linear_probe_separates_embeddings_that_are_separable():
    rng = np.random.default_rng(1)
    centres = {"cat": np.r_[3.0, 0, 0, 0], "dog": np.r_[0, 3.0, 0, 0], "eel": np.r_[0, 0, 3.0, 0]}
    rows = [(f"{c} {k}", c, centres[c] + rng.normal(0, 0.5, 4)) for c in centres for k in range(12)]
    probe = LinearProbe(_Lookup({t: v for t, _, v in rows}), C=10.0)
    train, test = rows[0::2], rows[1::2]
    with pytest.raises(RuntimeError, match="call `fit`"): probe.predict([train[0][0]])
    probe.fit([t for t, _, _ in train], [c for _, c, _ in train])
    assert list(probe.classes_) == ["cat", "dog", "eel"]
    assert probe.score([t for t, _, _ in test], [c for _, c, _ in test]) == 1.0
    p = probe.predict_proba([t for t, _, _ in test])
    assert p.shape == (18, 3) and np.allclose(p.sum(1), 1) and (probe.classes_[p.argmax(1)] == [c for _, c, _ in test]).all()
    with pytest.raises(ValueError, match="at least two classes"): probe.fit(["cat 0", "cat 1"], ["cat", "cat"])
    with pytest.raises(TypeError, match="not one string"): probe.predict("cat 0")


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NewHeadWarning)
        return load_classifier(tiny_bert_dir)


@pytest.fixture(scope="module")
def shots():
    df = per_class(load_sample("movie_reviews"), 8, seed=0)
    return df.text.tolist(), df.label.tolist()


def test_setfit_tunes_a_copy_lowers_its_pair_loss_and_predicts(tiny, shots):
    model, tok = tiny
    texts, labels = shots
    original = {k: v.clone() for k, v in model.state_dict().items()}
    clf = SetFitClassifier(Predictor(model, tok), device="cpu", max_length=32)
    assert clf.encoder is not model.bert and type(clf.encoder).__name__ == "BertModel"
    pairs = contrastive_pairs(texts, labels, iterations=4, seed=0)
    pair_loss = lambda: cosine_pair_loss(*(torch.tensor(clf.embed(pairs[c])) for c in ("a", "b")), torch.tensor(pairs.target.to_numpy())).item()
    before = pair_loss()
    clf.tune(texts, labels, epochs=3, lr=1e-3, batch_size=16, iterations=4, seed=0)
    after = pair_loss()
    pd.testing.assert_frame_equal(clf.pairs, pairs)                                         # it trained on these pairs
    assert after < 0.7 * before, (before, after)
    assert len(clf.losses) == 3 * len(pairs) // 16 and np.isfinite(clf.losses).all()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())          # the model it was given: untouched
    tuned = clf.encoder.state_dict()
    assert all(not torch.equal(tuned[k], original[f"bert.{k}"]) for k in tuned if k.endswith(".weight") and "pooler" not in k)
    pred = clf.predict(texts)
    assert set(pred) <= {"negative", "positive"} and clf.score(texts, labels) == np.mean(pred == np.array(labels))
    assert clf.predict_proba(texts[:3]).shape == (3, 2) and clf.embed(texts[:3]).shape == (3, 32)
    assert "tuned for" in repr(clf)


def test_setfit_is_reproducible_and_checks_its_arguments(tiny_bert_dir, shots):
    texts, labels = shots
    runs = [SetFitClassifier.from_pretrained(tiny_bert_dir, device="cpu", max_length=16)
            .tune(texts, labels, lr=1e-3, iterations=1, batch_size=8, seed=5) for _ in range(2)]
    assert np.array_equal(runs[0].losses, runs[1].losses)
    assert np.allclose(runs[0].predict_proba(texts), runs[1].predict_proba(texts))
    clf = runs[0]
    with pytest.raises(ValueError, match="batch_size=0"): clf.tune(texts, labels, batch_size=0)
    with pytest.raises(ValueError, match="mismatched lengths"): clf.tune(texts, labels[:-1])
    with pytest.raises(ValueError, match="tokenizer"): SetFitClassifier(torch.nn.Linear(2, 2))
