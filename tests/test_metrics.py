"""bigmodel_nb.metrics against scikit-learn on the same predictions, ECE by hand, thresholds by brute force,
error analysis ordering, clear errors, the TF-IDF baseline on the real movie reviews, and cross-validation /
multi-seed runs with real Learners on the tiny BERT."""
import math

import matplotlib
matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm
from transformers import AutoModelForSequenceClassification

from bigmodel_nb.evaluation import (RunScores, TfidfClassifier, cross_validate, evaluate, multi_seed, stratified_folds,
                                    tfidf_baseline)
from bigmodel_nb.learner import HParams, Learner
from bigmodel_nb.metrics import (EvalReport, MetricsError, at_confidence, best_threshold, compare, confidence_threshold,
                                 coverage_curve, expected_calibration_error, plot_history, pr_curve)


def dirichlet_case(n=400, k=4, seed=0, drop_class=3):
    "Random but well-formed multi-class predictions; class `drop_class` is never true and never predicted (zero divisions)."
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, 0.7), size=n)
    probs[:, drop_class] *= 1e-3
    probs /= probs.sum(1, keepdims=True)
    y = np.where(rng.random(n) < 0.7, probs.argmax(1), rng.integers(0, k - 1, n))   # mostly right, sometimes not
    return y, probs, [f"class_{i}" for i in range(k)]


@pytest.fixture(scope="module")
def real_case(movie_data):
    "Real predictions: the TF-IDF baseline on the 300 movie-review sentences, scored on train+valid+test together."
    clf = TfidfClassifier(movie_data, min_df=1).fit()
    logits = torch.cat([clf.get_preds(s)[0] for s in ("valid", "test", "train")])
    y = torch.cat([clf.get_preds(s)[1] for s in ("valid", "test", "train")]).numpy()
    return y, torch.softmax(logits, -1).numpy(), movie_data.classes


@pytest.fixture(params=["dirichlet", "real"])
def case(request, real_case):
    return dirichlet_case() if request.param == "dirichlet" else real_case


def test_metrics_equal_sklearn(case):
    y, probs, labels = case
    r = EvalReport(y, probs, labels)
    pred = probs.argmax(1)
    k = len(labels)
    assert r.accuracy == pytest.approx(skm.accuracy_score(y, pred))
    np.testing.assert_array_equal(r.confusion, skm.confusion_matrix(y, pred, labels=range(k)))
    p, rec, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(k), zero_division=0)
    np.testing.assert_allclose(r.per_class.precision, p); np.testing.assert_allclose(r.per_class.recall, rec)
    np.testing.assert_allclose(r.per_class.f1, f); np.testing.assert_array_equal(r.per_class.support, s)
    for how in ("macro", "weighted"):
        np.testing.assert_allclose(r.averages.loc[how], skm.precision_recall_fscore_support(y, pred, labels=range(k), average=how, zero_division=0)[:3])
    assert r.f1_macro == pytest.approx(skm.f1_score(y, pred, labels=range(k), average="macro", zero_division=0))
    assert r.f1_weighted == pytest.approx(skm.f1_score(y, pred, labels=range(k), average="weighted", zero_division=0))
    assert r.log_loss == pytest.approx(skm.log_loss(y, probs, labels=range(k)))
    assert r.report == skm.classification_report(y, pred, labels=range(k), target_names=labels, digits=3, zero_division=0)
    f2 = skm.fbeta_score(y, pred, beta=2, labels=range(k), average="macro", zero_division=0)
    assert r.summary() == pytest.approx(dict(loss=r.log_loss, accuracy=r.accuracy, f1_macro=r.f1_macro, f1_weighted=r.f1_weighted,
                                             f2_macro=f2, ece=r.ece, n=len(y)))


def test_labels_as_names_and_from_logits(real_case):
    y, probs, labels = real_case
    by_id = EvalReport(y, probs, labels)
    by_name = EvalReport([labels[i] for i in y], probs, labels)
    np.testing.assert_array_equal(by_id.y_true, by_name.y_true)
    logits = torch.log(torch.as_tensor(probs)) + 3.0                      # a softmax ignores a constant shift
    assert EvalReport.from_logits(torch.as_tensor(y), logits, labels).log_loss == pytest.approx(by_id.log_loss)


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.45, 0.55]])   # confidences .9 right, .8 wrong, .7 right, .55 wrong
    y = [0, 0, 0, 0]
    assert expected_calibration_error(y, probs, bins=10) == pytest.approx((0.1 + 0.8 + 0.3 + 0.55) / 4)
    assert expected_calibration_error(y, probs, bins=2) == pytest.approx(abs(0.5 - (0.9 + 0.8 + 0.7 + 0.55) / 4))
    t = EvalReport(y, probs, ["a", "b"]).calibration(10)
    assert t.n.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0] and t.accuracy.isna().sum() == 6


def test_ece_matches_a_plain_loop(case):
    y, probs, labels = case
    conf, right = probs.max(1), probs.argmax(1) == y
    for bins in (5, 10, 15):
        total = 0.0
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            m = (conf > lo) & (conf <= hi) if b else (conf <= hi)
            if m.any(): total += m.sum() / len(y) * abs(right[m].mean() - conf[m].mean())
        assert EvalReport(y, probs, labels).calibration(bins).n.sum() == len(y)
        assert expected_calibration_error(y, probs, bins) == pytest.approx(total)


def test_pr_curve_and_best_threshold_brute_force(real_case):
    y, probs, labels = real_case
    s = probs[:, 1]
    curve = pr_curve(y, s)
    sk_p, sk_r, sk_t = skm.precision_recall_curve(y, s)
    np.testing.assert_allclose(curve.threshold[::-1], sk_t)
    np.testing.assert_allclose(curve.precision[::-1], sk_p[:-1]); np.testing.assert_allclose(curve.recall[::-1], sk_r[:-1])
    candidates = []
    for t in np.unique(s):
        pred = (s >= t).astype(int)
        candidates.append((t, skm.precision_score(y, pred, zero_division=0), skm.recall_score(y, pred), skm.f1_score(y, pred)))
    best = best_threshold(y, s)
    assert best.f1 == pytest.approx(max(c[3] for c in candidates))
    assert skm.f1_score(y, (s >= best.threshold).astype(int)) == pytest.approx(best.f1)
    for target in (0.7, 0.8, 0.9):
        ok = [c for c in candidates if c[1] >= target]
        got = EvalReport(y, probs, labels).best_threshold(target_precision=target)
        assert got.precision >= target and got.recall == pytest.approx(max(c[2] for c in ok))
    with pytest.raises(MetricsError, match="no threshold reaches precision 1.01"):
        best_threshold(y, s, target_precision=1.01)


@pytest.mark.parametrize("which", ["dirichlet", "real"])
def test_coverage_curve_and_confidence_threshold_brute_force(which, real_case):
    y, probs, labels = dirichlet_case() if which == "dirichlet" else real_case
    probs = probs.round(3) / probs.round(3).sum(1, keepdims=True)      # ties in the confidences
    conf, right = probs.max(1), probs.argmax(1) == y
    curve = coverage_curve(y, probs)
    assert list(curve.threshold) == sorted(np.unique(conf), reverse=True)
    for t, cov, acc, n in curve.itertuples(index=False):
        kept = conf >= t
        assert n == kept.sum() and cov == pytest.approx(kept.mean()) and acc == pytest.approx(right[kept].mean())
    for target in (0.7, 0.8, 0.9):
        ok = [t for t in np.unique(conf) if right[conf >= t].mean() >= target]
        got = EvalReport(y, probs, labels).confidence_threshold(target)
        assert got.threshold == pytest.approx(min(ok)) and got.accuracy >= target
        assert at_confidence(y, probs, got.threshold) == got
    assert np.isnan(at_confidence(y, probs, 1.1).accuracy) and at_confidence(y, probs, 1.1).answered == 0
    with pytest.raises(MetricsError, match="no threshold reaches accuracy"):
        confidence_threshold((probs.argmax(1) + 1) % probs.shape[1], probs, 0.5)
    with pytest.raises(MetricsError, match="target_accuracy=95"):
        confidence_threshold(y, probs, 95)
    with pytest.raises(MetricsError, match="mismatched lengths"):
        coverage_curve(y[:-1], probs)


def test_threshold_needs_two_classes():
    y, probs, labels = dirichlet_case()
    with pytest.raises(MetricsError, match="two classes; this report has 4"):
        EvalReport(y, probs, labels).best_threshold()


def test_top_mistakes_and_highest_loss_ordering(real_case):
    y, probs, labels = real_case
    texts = [f"text {i}" for i in range(len(y))]
    r = EvalReport(y, probs, labels, texts=texts)
    wrong = np.flatnonzero(probs.argmax(1) != y)
    m = r.top_mistakes(len(y))
    assert len(m) == len(wrong) and list(m.columns) == ["text", "true", "pred", "prob"]
    assert (m.true != m.pred).all() and m.prob.is_monotonic_decreasing
    assert set(m.index) == set(wrong)
    assert m.prob.iloc[0] == pytest.approx(probs[wrong].max())
    assert m.text.tolist() == [texts[i] for i in m.index]
    assert len(r.top_mistakes(3)) == 3 and r.top_mistakes(3).index.tolist() == m.index[:3].tolist()
    h = r.highest_loss(10)
    assert list(h.columns) == ["text", "true", "pred", "prob_true", "loss"] and h.loss.is_monotonic_decreasing
    assert h.loss.iloc[0] == pytest.approx((-np.log(probs[np.arange(len(y)), y])).max())
    np.testing.assert_allclose(h.loss, -np.log(h.prob_true))


def test_clear_errors():
    probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    with pytest.raises(MetricsError, match="mismatched lengths: 3 true labels but 2 rows"):
        EvalReport([0, 1, 1], probs, ["neg", "pos"])
    with pytest.raises(MetricsError, match="mismatched lengths: 1 texts for 2"):
        EvalReport([0, 1], probs, ["neg", "pos"], texts=["only one"])
    with pytest.raises(MetricsError, match="no examples"):
        EvalReport([], np.zeros((0, 2)), ["neg", "pos"])
    with pytest.raises(MetricsError, match=r"not in the label set \['neg', 'pos'\]: 'neutral' at position 1"):
        EvalReport(["neg", "neutral"], probs, ["neg", "pos"])
    with pytest.raises(MetricsError, match=r"outside 0..1 \(values \[2, 5\]"):
        EvalReport([2, 5], probs, ["neg", "pos"])
    with pytest.raises(MetricsError, match="2 columns but there are 3 labels"):
        EvalReport([0, 1], probs, ["neg", "pos", "mixed"])
    with pytest.raises(MetricsError, match="logits"):
        EvalReport([0, 1], np.array([[2.0, -1.0], [0.3, 0.7]]), ["neg", "pos"])
    with pytest.raises(MetricsError, match="NaN"):
        EvalReport([0, 1], np.array([[np.nan, 0.5], [0.3, 0.7]]), ["neg", "pos"])


def test_empty_split_and_unknown_split(movie_data):
    from bigmodel_nb.assets import load_sample
    from bigmodel_nb.data import TextClassificationData
    no_test = TextClassificationData.from_df(load_sample("movie_reviews").sample(80, random_state=3), test_pct=0)
    clf = TfidfClassifier(no_test, min_df=1).fit()
    with pytest.raises(MetricsError, match=r"the 'test' split of the DataFrame is empty \(its splits: train 72, valid 8\)"):
        evaluate(clf, split="test")
    with pytest.raises(MetricsError, match="empty"):
        tfidf_baseline(no_test)
    with pytest.raises(MetricsError, match="not a split name"):
        evaluate(TfidfClassifier(movie_data).fit(), split="holdout")
    assert evaluate(clf, split="validation").split == "valid"


@pytest.fixture
def make(tiny_bert_dir):
    def make(data, seed=None, lr=2e-3):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=data.num_labels)
        return Learner(model, data, HParams(lr=lr, batch_size=16, epochs=1), device="cpu", progress=False)
    return make


def test_evaluate_learner_and_model(make, movie_data, tiny_bert_dir):
    from transformers import AutoTokenizer
    learn = make(movie_data)
    learn.fit(epochs=2)
    r = evaluate(learn, split="test")
    logits, labels = learn.get_preds("test")
    own = learn.evaluate("test")
    assert r.n == len(movie_data.dataset("test")) and r.split == "test" and r.learner is learn
    assert r.accuracy == pytest.approx(own["accuracy"]) and r.f1_macro == pytest.approx(own["f1_macro"])
    assert r.log_loss == pytest.approx(own["loss"], rel=1e-4)
    np.testing.assert_allclose(r.probs, torch.softmax(logits.double(), -1).numpy(), atol=1e-6)
    idx = movie_data.split_index("test")
    assert r.texts == movie_data.df.text.to_numpy()[idx].tolist() and r.rows == movie_data.df.row.to_numpy()[idx].tolist()
    np.testing.assert_array_equal(r.lengths, movie_data.full_lengths[idx])
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    np.testing.assert_allclose(evaluate((learn.model, tok), movie_data).probs, r.probs, atol=1e-6)
    np.testing.assert_allclose(evaluate(learn.model, movie_data, tokenizer=tok, batch_size=7).probs, r.probs, atol=1e-5)
    assert r.length_table(3).n.sum() == r.n
    learn.model.config.id2label, learn.model.config.label2id = {0: "bad", 1: "good"}, {"bad": 0, "good": 1}
    with pytest.raises(MetricsError, match=r"head predicts \['bad', 'good'\] but the data's classes are \['negative', 'positive'\]"):
        evaluate(learn.model, movie_data)


def test_tfidf_baseline_on_movie_reviews():
    from bigmodel_nb.data import TextClassificationData
    data = TextClassificationData.from_asset("movie_reviews")
    r = tfidf_baseline(data)
    assert r.n == (data.df.split == "test").sum() > 1000
    assert r.accuracy >= 0.74, r
    assert r.length_unit == "words" and r.learner.predict("a dull, lifeless film")[0]["label"] == "negative"


def test_cross_validate_tiny_bert(make, movie_data):
    res = cross_validate(make, movie_data, k=3, epochs=1, verbose=False)
    assert isinstance(res, RunScores) and len(res.scores) == 3 and len(res.reports) == 3
    assert res.mean == pytest.approx(np.mean(res.scores)) and res.std == pytest.approx(np.std(res.scores, ddof=1))
    assert res.scores.tolist() == [r.accuracy for r in res.reports]
    held_out = [row for r in res.reports for row in r.rows]
    dev = movie_data.df.row[movie_data.df.split != "test"].tolist()
    assert sorted(held_out) == sorted(dev)                                   # every development row scored once, test rows never
    assert all(r.learner.data is not movie_data for r in res.reports) and set(movie_data.df.split) == {"train", "valid", "test"}
    assert res.table.shape[0] == 3 and set(res.summary().index) == {"loss", "accuracy", "f1_macro", "f1_weighted", "f2_macro", "ece"}
    assert f"{res.mean:.4f} ± {res.std:.4f}" in repr(res)


def test_stratified_folds():
    labels = np.array([0] * 50 + [1] * 31 + [2] * 7)
    f = stratified_folds(labels, 5, seed=1)
    sizes = np.bincount(f)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3): assert np.ptp(np.bincount(f[labels == c], minlength=5)) <= 1
    np.testing.assert_array_equal(f, stratified_folds(labels, 5, seed=1))
    assert not np.array_equal(f, stratified_folds(labels, 5, seed=2))


def test_multi_seed_tiny_bert(make, movie_data):
    res = multi_seed(make, movie_data, seeds=(0, 1, 0), epochs=1, verbose=False)
    assert len(res.scores) == 3 and res.mean == pytest.approx(np.mean(res.scores)) and res.std == pytest.approx(np.std(res.scores, ddof=1))
    np.testing.assert_allclose(res.reports[0].probs, res.reports[2].probs, atol=1e-6)      # the same seed, the same run
    assert not np.allclose(res.reports[0].probs, res.reports[1].probs)                      # another seed, another run
    with pytest.raises(MetricsError, match="metric='f2'"):
        RunScores("seed", res.names, res.reports, metric="f2")


def test_compare_and_plots(make, movie_data, tmp_path):
    from bigmodel_nb.callbacks import CSVLogger
    learn = make(movie_data)
    learn.add_cb(CSVLogger(tmp_path))
    learn.fit(epochs=2)
    model, base = evaluate(learn, name="tiny"), tfidf_baseline(movie_data, name="tfidf")
    table = compare([base, model])
    assert table.index.tolist() == ["tfidf", "tiny"] and table.loc["tiny", "accuracy"] == pytest.approx(model.accuracy)
    with pytest.warns(UserWarning, match="other examples"):
        compare({"a": model, "b": evaluate(learn, split="valid")})
    img = model.plot_confusion(normalize=False).images[0].get_array()
    np.testing.assert_array_equal(np.asarray(img), model.confusion)
    bars = [p.get_height() for p in model.plot_reliability(bins=10).patches]
    assert bars == pytest.approx(model.calibration(10).dropna().accuracy.tolist())
    ax = plot_history(tmp_path)                                              # the folder CSVLogger wrote
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert list(lines["valid loss"].get_ydata()) == pytest.approx([r["valid_loss"] for r in learn.history])
    assert list(plot_history(learn).get_lines()[0].get_xdata()) == [r["step"] for r in learn.log]
    assert len(model.plot().axes) >= 4
    pts = {l.get_label().split(" ")[0]: (l.get_xdata()[0], l.get_ydata()[0]) for l in model.plot_pr_curve().get_lines()[1:]}
    best = model.best_threshold()
    assert pts["best"] == pytest.approx((best.recall, best.precision))
    given = model.at_threshold(0.7)                                           # a threshold chosen elsewhere is marked as given
    pts = {l.get_label().split(" ")[0]: (l.get_xdata()[0], l.get_ydata()[0]) for l in model.plot_pr_curve(threshold=0.7).get_lines()[1:]}
    assert pts["given"] == pytest.approx((given.recall, given.precision)) and "best" not in pts
    with pytest.raises(MetricsError, match="no history"):
        plot_history([])
