"""Text augmentation: the EDA edits on real WordNet synonyms, masked-LM replacement on a tiny BERT with the real
MiniLM tokenizer, the augmented table, and label preservation on inputs whose answer is known by construction."""
import collections
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from bigmodel_nb.assets import load_sample, model_path
from bigmodel_nb.augment import (EDA, EDA_OPERATIONS, STOP_WORDS, MaskedLMReplacement, Synonyms, UntrainedHeadWarning,
                                 augment_frame, judged_class, label_preservation, n_changes, random_deletion,
                                 random_insertion, random_swap, synonym_replacement)

SENTENCES = ["a gentle , funny and surprisingly moving film about a lonely old man and his dog .",
             "the acting is wooden and the plot makes no sense at all",
             "an ambitious , beautifully shot drama that never quite finds its heart"]


@pytest.fixture(scope="module")
def wordnet():
    return load_sample("wordnet")


@pytest.fixture(scope="module")
def single(wordnet):
    "WordNet synonyms without compounds: a replacement is always one word."
    return Synonyms.from_frame(wordnet, multiword=False)


@pytest.fixture(scope="module")
def senses(wordnet):
    "Lower-cased word -> its synsets, read from the frame directly (not through Synonyms)."
    out = collections.defaultdict(set)
    for lemma, s in zip(wordnet.lemma.str.lower(), wordnet.synset): out[lemma].add(s)
    return out


def cores(text):
    return [w.strip(",.!?;:()\"'") for w in text.split()]


def is_subsequence(short, long):
    it = iter(long)
    return all(w in it for w in short)


# ---- the EDA edits --------------------------------------------------------------------------------------------------

def test_each_edit_is_reproducible_with_a_seed(single):
    for text in SENTENCES:
        for op, kw in [(synonym_replacement, dict(synonyms=single)), (random_insertion, dict(synonyms=single)), (random_swap, {})]:
            assert op(text, 3, rng=5, **kw) == op(text, 3, rng=np.random.default_rng(5), **kw)
            assert len({op(text, 3, rng=s, **kw) for s in range(8)}) > 1, op.__name__      # seeds differ, so do the texts
        assert random_deletion(text, 0.3, rng=5) == random_deletion(text, 0.3, rng=5)
    assert EDA(n_aug=4, seed=3, synonyms=single)(SENTENCES[0]) == EDA(n_aug=4, seed=3, synonyms=single)(SENTENCES[0])


def test_swap_keeps_the_multiset_of_words():
    rng = np.random.default_rng(0)
    for text in SENTENCES:
        for n in (1, 3, 10):
            out = random_swap(text, n, rng)
            assert sorted(out.split()) == sorted(text.split())
    assert random_swap("alone", 5, rng) == "alone"
    assert random_swap(SENTENCES[1], 0, rng) == SENTENCES[1]


def test_deletion_never_empties_and_p0_keeps_the_text():
    rng = np.random.default_rng(0)
    for text in SENTENCES + ["two words", "one"]:
        assert random_deletion(text, 0.0, rng) == text
        for _ in range(20):
            assert len(random_deletion(text, 1.0, rng).split()) == 1          # every word drawn: one stays
            out = random_deletion(text, 0.5, rng).split()
            assert 1 <= len(out) <= len(text.split()) and is_subsequence(out, text.split())
    kept = np.mean([len(random_deletion(SENTENCES[0], 0.25, rng).split()) for _ in range(2000)])
    assert abs(kept - 0.75 * len(SENTENCES[0].split())) < 0.2                # each word kept with probability 1 - p


def test_synonym_replacement_only_uses_wordnet_synonyms(single, senses):
    rng = np.random.default_rng(1)
    for text in SENTENCES:
        words = text.split()
        replaceable = [w for w in cores(text) if w and w.lower() not in STOP_WORDS and single.syn(w)]
        for n in (1, 2, 4, 50):
            out = synonym_replacement(text, n, rng, synonyms=single).split()
            assert len(out) == len(words)
            changed = [(a, b) for a, b in zip(cores(text), cores(" ".join(out))) if a != b]
            assert len(changed) == min(n, len(replaceable))
            for old, new in changed:
                assert old.lower() not in STOP_WORDS and old.lower() != new.lower()
                assert senses[old.lower()] & senses[new.lower().replace(" ", "_")], (old, new)   # they share a synset
    assert synonym_replacement("the of and", 3, rng, synonyms=single) == "the of and"              # stop words only


def test_synonyms_match_wordnet_lines(single, wordnet):
    car = wordnet[wordnet.synset == "02958343-n"].lemma.tolist()
    assert car == ["car", "auto", "automobile", "machine", "motorcar"]
    full = Synonyms.from_frame(wordnet)
    assert set(car[1:]) <= set(full.syn("Car")) and "car" not in full.syn("car")
    assert full.syn("car") == sorted(full.syn("car")) and all(" " not in w for w in single.syn("car"))
    assert "cable car" in full.syn("car") and "cable car" not in single.syn("car")
    assert full.syn("no-such-word-here") == []
    with pytest.raises(KeyError, match="lemma_col='word' is not a column"):
        Synonyms.from_frame(wordnet, lemma_col="word")


def test_insertion_adds_n_synonyms_of_the_text(single):
    rng = np.random.default_rng(2)
    for text in SENTENCES:
        sources = {w.lower() for w in cores(text) if w and w.lower() not in STOP_WORDS}
        allowed = set().union(*(single.syn(w) for w in sources))
        for n in (1, 3, 6):
            out = random_insertion(text, n, rng, synonyms=single).split()
            assert len(out) == len(text.split()) + n and is_subsequence(text.split(), out)
            added = collections.Counter(out) - collections.Counter(text.split())
            assert sum(added.values()) == n and set(added) <= allowed
    assert random_insertion("of the and", 2, rng, synonyms=single) == "of the and"      # nothing to insert for


def test_eda_gives_n_aug_distinct_outputs_with_the_right_number_of_changes(single):
    eda = EDA(n_aug=8, seed=0, synonyms=single)
    for text in SENTENCES:
        out = eda(text)
        assert len(out) == 8 and len(set(out)) == 8 and text not in out
    assert [n_changes(0.1, n) for n in (4, 14, 15, 24, 25, 35)] == [1, 1, 2, 2, 3, 4]     # max(1, round half up)
    swap_only = EDA(alpha_sr=0, alpha_ri=0, alpha_rs=0.2, p_rd=0, n_aug=3, seed=0)
    for out in swap_only(SENTENCES[1]):                                                     # 11 words: round(2.2) = 2 swaps
        assert sorted(out.split()) == sorted(SENTENCES[1].split())
        assert sum(a != b for a, b in zip(out.split(), SENTENCES[1].split())) <= 4
    assert EDA_OPERATIONS["rs"] is random_swap
    with pytest.raises(ValueError, match="all 0"):
        EDA(0, 0, 0, 0)
    with pytest.raises(TypeError, match="one string"):
        eda.augment("a text")


# ---- the augmented table --------------------------------------------------------------------------------------------

def frame():
    return pd.DataFrame({"text": SENTENCES, "label": ["positive", "negative", "negative"], "score": [2.5, -2.0, -0.5]},
                        index=["r1", "r2", "r3"])


def test_augment_frame_keeps_originals_and_links_each_copy(single):
    df = frame()
    out = augment_frame(df, EDA(n_aug=2, seed=0, synonyms=single), n_aug=2)
    assert len(out) == 9 and list(out.columns) == ["text", "label", "score", "source", "augmented"]
    originals, copies = out[~out.augmented], out[out.augmented]
    assert originals[["text", "label", "score"]].to_numpy().tolist() == df.to_numpy().tolist()
    assert originals.source.tolist() == ["r1", "r2", "r3"]
    assert copies.source.tolist() == ["r1", "r1", "r2", "r2", "r3", "r3"]
    for _, row in copies.iterrows():
        src = df.loc[row.source]
        assert row.label == src.label and row.score == src.score and row.text != src.text
    plain = augment_frame(df, lambda t: t.upper(), label_col=None, n_aug=3)                  # a plain function: called n_aug times
    assert plain[plain.augmented].text.tolist() == [t.upper() for t in SENTENCES for _ in range(3)]


def test_augment_frame_errors_name_the_column_and_the_row():
    df = frame()
    with pytest.raises(KeyError, match=r"text_col='sentence' is not a column.*\['text', 'label', 'score'\]"):
        augment_frame(df, random_swap, text_col="sentence")
    with pytest.raises(KeyError, match="label_col='target' is not a column"):
        augment_frame(df, random_swap, label_col="target")
    bad = df.copy()
    bad.loc["r2", "text"] = "   "
    with pytest.raises(ValueError, match=r"column 'text': row 'r2' \(index label; position 1\) is empty or not a string"):
        augment_frame(bad, random_swap)
    with pytest.raises(ValueError, match=r"row 1 \(index label; position 1\)"):       # an integer label reads as one
        augment_frame(bad.reset_index(drop=True), random_swap)
    bad.loc["r3", "text"] = None
    with pytest.raises(ValueError, match=r"rows 'r2' and 'r3' .*position 1, 2\) are empty or not a string"):
        augment_frame(bad, random_swap)
    with pytest.raises(ValueError, match="reset_index"):
        augment_frame(pd.concat([df, df]), random_swap)
    with pytest.raises(ValueError, match="for row 'r1' the augmenter returned"):
        augment_frame(df, lambda t: 42)


# ---- masked-LM replacement ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_mlm_dirs(tmp_path_factory):
    "A tiny BertForMaskedLM (head included) and the same body saved without a head, each with the MiniLM tokenizer."
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
    tok = AutoTokenizer.from_pretrained(model_path("minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg)
    with_head, body_only = tmp_path_factory.mktemp("tiny-mlm"), tmp_path_factory.mktemp("tiny-body")
    model.save_pretrained(with_head); tok.save_pretrained(with_head)
    model.bert.save_pretrained(body_only); tok.save_pretrained(body_only)
    return with_head, body_only


@pytest.fixture(scope="module")
def tiny_mlm(tiny_mlm_dirs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedHeadWarning)         # a saved head must load without the warning
        return MaskedLMReplacement.from_pretrained(str(tiny_mlm_dirs[0]), fraction=0.3, top_k=5, n_aug=3, seed=0)


def test_masked_lm_changes_only_the_masked_words(tiny_mlm):
    texts = SENTENCES + ["Wonderful!", "The (quiet) ending doesn't work."]
    got = tiny_mlm.augment(texts, return_spans=True)
    assert tiny_mlm.new_weights == []
    vocab = set(tiny_mlm.tokenizer.get_vocab())
    for text, made in zip(texts, got):
        enc = tiny_mlm.tokenizer([text], return_offsets_mapping=True)
        eligible = tiny_mlm._eligible(text, enc, 0)
        assert len(made) == 3
        for new, spans in made:
            assert len(spans) == min(len(eligible), max(1, math.floor(0.3 * len(eligible) + 0.5)))
            pieces, pos = [], 0
            for s, e, old, fill in spans:
                assert text[s:e] == old and old.isalpha() and old.lower() not in STOP_WORDS
                assert fill.lower() in vocab and fill.isalpha() and fill.lower() != old.lower()
                pieces += [text[pos:s], fill]
                pos = e
            assert new == "".join(pieces) + text[pos:]                         # everything between the fills is the original
            diff = [(a, b) for a, b in zip(text.split(), new.split()) if a != b]
            assert len(new.split()) == len(text.split()) and len(diff) == len(spans)
    assert all(old != "doesn" for _, spans in got[-1] for *_, old, _ in spans)     # a piece of "doesn't" is not a word


def test_masked_lm_is_seeded_and_independent_of_batch_size(tiny_mlm):
    make = lambda **kw: MaskedLMReplacement(tiny_mlm.model, tiny_mlm.tokenizer, fraction=0.3, top_k=5, n_aug=3, **kw)
    first = make(seed=0)
    a = first.augment(SENTENCES)
    assert make(seed=0, batch_size=1).augment(SENTENCES) == a and make(seed=1).augment(SENTENCES) != a
    assert first.augment(SENTENCES) != a                     # the draws go on from call to call ...
    again = make(seed=0)
    assert [again.augment(SENTENCES) for _ in range(2)][0] == a  # ... and a new object with the same seed repeats them
    assert all(t != s for s, made in zip(SENTENCES, a) for t in made)


def test_masked_lm_logits_at_the_masks_equal_a_full_forward(tiny_mlm):
    enc = tiny_mlm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    rows, cols = [0, 1, 2, 2], [1, 4, 2, 7]
    with torch.no_grad():
        full = tiny_mlm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[rows, cols]
        part = tiny_mlm._logits_at(enc["input_ids"], enc["attention_mask"], rows, cols)
    assert torch.allclose(full, part, atol=1e-5)


def test_untrained_head_warns_and_points_to_pretraining(tiny_mlm_dirs):
    with pytest.warns(UntrainedHeadWarning, match=r"head is untrained.*PretrainingData\.from_texts.*08_pretrain") as caught:
        mlm = MaskedLMReplacement.from_pretrained(str(tiny_mlm_dirs[1]), seed=0)
    assert mlm.new_weights and all(k.startswith("cls.") for k in mlm.new_weights)
    assert "cls.predictions.transform.dense.weight" in mlm.new_weights
    assert sum(issubclass(w.category, UntrainedHeadWarning) for w in caught) == 1
    assert "head untrained" in repr(mlm)
    state = torch.random.get_rng_state()
    with pytest.warns(UntrainedHeadWarning):
        again = MaskedLMReplacement.from_pretrained(str(tiny_mlm_dirs[1]), seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)                 # the caller's random state is untouched
    head = lambda m: m.model.cls.predictions.transform.dense.weight
    assert torch.equal(head(mlm), head(again)) and again.augment(SENTENCES) == mlm.augment(SENTENCES)


def test_masked_lm_refuses_a_slow_tokenizer_and_empty_texts(tiny_mlm):
    class SlowTokenizer:                                      # what a Python-only tokenizer looks like to it: no offsets
        is_fast = False
    with pytest.raises(TypeError, match="SlowTokenizer, a slow one; pass a fast tokenizer"):
        MaskedLMReplacement(tiny_mlm.model, SlowTokenizer())
    class PiecelessTokenizer(SlowTokenizer):                 # fast, but no '##' continuation pieces: not WordPiece
        is_fast, mask_token_id = True, 1
        def __len__(self): return 3
        def convert_ids_to_tokens(self, ids): return ["[PAD]", "[MASK]", "word"]
    with pytest.raises(ValueError, match="WordPiece vocabulary"):
        MaskedLMReplacement(tiny_mlm.model, PiecelessTokenizer())
    with pytest.raises(ValueError, match="text 1 is ''"):
        tiny_mlm.augment(["fine", ""])


# ---- label preservation ---------------------------------------------------------------------------------------------

def test_label_preservation_on_inputs_with_a_known_answer():
    rng = np.random.default_rng(0)
    n, k = 400, 3
    logits = rng.normal(0, 2, (n, 3))                                   # a 3-class judge's scores of the originals
    src = np.repeat(np.arange(n), k)
    aug = logits[src].copy()
    flip = rng.random(len(src)) < 0.2                                   # these copies get another class's scores on top
    cls = logits.argmax(1)[src]
    other = (cls + 1) % 3
    aug[flip, other[flip]] = aug[flip].max(1) + 1.0                     # now `other` wins: the class changed
    out = label_preservation(logits, aug, source=src)
    assert out["originals"] == n and out["augmented"] == n * k
    assert out["agreement"] == pytest.approx(1 - flip.mean(), abs=1e-12)
    assert out["mean_shift"] == pytest.approx(0.0, abs=1e-12)           # the original class's own score never moved
    # one score per text: the shift is the mean of what was added, and the class changes exactly where 0.5 is crossed
    p = rng.uniform(0, 1, n)
    delta = rng.uniform(-0.3, 0.3, n)
    q = p + delta
    truth = (p > 0.5).astype(int)
    truth[:40] = 1 - truth[:40]                                          # the judge is wrong on exactly 40 originals
    res = label_preservation(p, q, reference=truth)
    assert res["mean_shift"] == pytest.approx(delta.mean()) and res["mean_abs_shift"] == pytest.approx(np.abs(delta).mean())
    assert res["agreement"] == pytest.approx(np.mean((p > 0.5) == (q > 0.5)))
    assert res["accuracy_original"] == pytest.approx(1 - 40 / n)
    assert res["accuracy_augmented"] == pytest.approx(np.mean((q > 0.5) == truth))
    rows = label_preservation(p, q, reference=truth, per_row=True)
    assert len(rows) == n and (rows.agree == ((p > 0.5) == (q > 0.5))).all() and (rows.reference == truth).all()
    assert judged_class(np.array([-1.0, 0.5, 2.0]), threshold=0.0).tolist() == [0, 1, 1]


def test_label_preservation_checks_its_inputs():
    p = np.array([0.2, 0.8, 0.6])
    with pytest.raises(ValueError, match="pass source"):
        label_preservation(p, np.r_[p, p])
    with pytest.raises(ValueError, match=r"position \(0..2\)"):
        label_preservation(p, p, source=[0, 1, 3])
    with pytest.raises(ValueError, match="both one score per text"):
        label_preservation(p, np.c_[1 - p, p])
    with pytest.raises(ValueError, match="class number"):
        label_preservation(p, p, reference=np.array(["neg", "pos", "pos"]))
    with pytest.raises(ValueError, match="NaN"):
        label_preservation(p, np.array([0.1, np.nan, 0.3]))
