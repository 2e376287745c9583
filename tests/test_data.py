"Data: loading, checks and their messages, splits, tokenizing once, and batches whose size changes mid-epoch."
import csv
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader

from bigmodel_nb import data as D
from bigmodel_nb.data import (Collator, DataError, DataWarning, DynamicBatchSampler, SortedBatchSampler,
                              TextClassificationData as TCD, length_buckets, padding_ratio, stable_permutation,
                              stratified_split)
from conftest import run_py


# ---------------------------------------------------------------------------------------------------
# helpers

def tiny_tokenizer(max_len=16):
    "A word-level fast tokenizer: [CLS] words [SEP], one id per known word, [UNK] otherwise."
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = [f"w{i}" for i in range(50)] + "good bad fine dull film plot".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=max_len)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_rows(n_per_class=10, classes=("neg", "pos")):
    "Distinct texts of varying length, `n_per_class` of each class."
    texts, labels = [], []
    for c, name in enumerate(classes):
        for i in range(n_per_class):
            k = c * n_per_class + i
            texts.append(" ".join(f"w{(k + j) % 50}" for j in range(1 + k % 7)) + f" film{k}")
            labels.append(name)
    return texts, labels


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header: w.writerow(header)
        w.writerows(rows)
    return path


def good_rows(n=6):
    "CSV rows that pass every check (3 of each class by default)."
    return [(f"good film number {i}", "pos" if i % 2 else "neg") for i in range(n)]


def raises_data_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


class Sizes:
    """A live batch-size source: a callable returning the next value of `values` (cycling) and logging it.
    Each call consumes a value, so the tests iterate with `epoch()`, not `list()`, which would also call `len()`."""
    def __init__(self, values): self.values, self.k, self.log = list(values), 0, []
    def __call__(self):
        v = self.values[self.k % len(self.values)]; self.k += 1; self.log.append(v)
        return v


def epoch(sampler):
    "The batches of one epoch (iterating without `len()`, which reads the batch size source too)."
    return [b for b in sampler]


def take(sampler, k):
    "The next `k` batches of `sampler`, across epoch ends if need be."
    out = []
    while len(out) < k:
        for b in sampler:
            out.append(b)
            if len(out) == k: break
    return out


# ---------------------------------------------------------------------------------------------------
# DynamicBatchSampler: properties

lengths_st = st.lists(st.integers(1, 300), min_size=1, max_size=300)
sizes_st = st.lists(st.integers(1, 40), min_size=1, max_size=20)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, sizes=sizes_st, seed=st.integers(0, 2**32 - 1), mega=st.integers(1, 8), group=st.integers(1, 40))
def test_every_index_exactly_once_per_epoch_while_batch_size_changes(lengths, sizes, seed, mega, group):
    source = Sizes(sizes)
    s = DynamicBatchSampler(lengths, source, seed=seed, mega_batches=mega, group_size=group)
    for e in range(3):
        source.log.clear()
        batches = epoch(s)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))
        left = len(lengths)
        for b, asked in zip(batches, source.log):   # each batch has the size read for it (the last one may be short)
            assert len(b) == min(asked, left); left -= len(b)
        assert len(source.log) == len(batches) and s.epoch == e + 1 and s.cursor == 0


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, sizes=sizes_st, seed=st.integers(0, 2**32 - 1), stop=st.integers(0, 400),
       mega=st.integers(1, 8), group=st.integers(1, 40))
def test_restored_state_gives_identical_batches(lengths, sizes, seed, stop, mega, group):
    reference = DynamicBatchSampler(lengths, Sizes(sizes), seed=seed, mega_batches=mega, group_size=group)
    expected = epoch(reference) + epoch(reference)                     # two uninterrupted epochs
    source = Sizes(sizes)
    first = DynamicBatchSampler(lengths, source, seed=seed, mega_batches=mega, group_size=group)
    k = min(stop, len(expected))
    done = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))                 # through JSON, as in a checkpoint
    assert all(type(v) in (int, bool) for v in state.values())
    resumed = DynamicBatchSampler(lengths, source, seed=seed + 1, mega_batches=mega + 1, group_size=group + 1)
    resumed.load_state_dict(state)
    rest = []
    while resumed.epoch < 2: rest += epoch(resumed)
    assert done + rest == expected


def test_order_depends_on_seed_and_epoch_only():
    lengths = np.random.default_rng(0).integers(1, 100, 500)
    a, b = DynamicBatchSampler(lengths, 16, seed=7), DynamicBatchSampler(lengths, 16, seed=7)
    assert [list(a) for _ in range(2)] == [list(b) for _ in range(2)]
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), DynamicBatchSampler(lengths, 16, seed=8).epoch_order(0))
    changed = DynamicBatchSampler(lengths, Sizes([16, 5, 40]), seed=7, group_size=16)
    assert np.array_equal(changed.epoch_order(3), a.epoch_order(3))   # the live batch size does not enter the order


def test_pinned_orders_do_not_drift_across_versions_or_machines():
    # If NumPy, Python or the platform changed these, resumed runs and published splits would change.
    assert stable_permutation(10, 0).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    s = DynamicBatchSampler(list(range(1, 13)), 3, seed=5, mega_batches=2)
    assert s.epoch_order(0).tolist() == [7, 8, 11, 6, 9, 10, 0, 1, 2, 3, 4, 5]
    assert stratified_split([0] * 6 + [1] * 4, 0.2, 0.2, seed=42).tolist() == ['train', 'test', 'train', 'train', 'valid', 'train', 'train', 'valid', 'test', 'train']


def test_split_and_order_identical_in_fresh_processes():
    code = ("from bigmodel_nb.data import TextClassificationData as T, DynamicBatchSampler as S\n"
            "t = [f'text {i}' for i in range(60)]; l = ['a', 'b', 'c'] * 20\n"
            "d = T.from_lists(t, l); print(''.join(x[0] for x in d.df.split), S([len(x) for x in t], 4, seed=3).epoch_order(2).tolist())")
    outs = {run_py(code, env={"PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(outs) == 1 and outs.pop().strip()


def test_length_grouping_and_regrouping():
    lengths = np.arange(1, 201)
    s = DynamicBatchSampler(lengths, 10, seed=0, mega_batches=20)
    batches = list(s)
    assert all(lengths[b].max() - lengths[b].min() == 9 for b in batches)   # one chunk: each batch is one sorted group
    s.batch_size = 20                       # larger batches join two unrelated groups ...
    assert max(lengths[b].max() - lengths[b].min() for b in s) > 19
    s.group_size = 20                       # ... until the groups are regrouped to the new size
    assert all(lengths[b].max() - lengths[b].min() == 19 for b in s)
    assert s.state_dict()["group_size"] == 20


def test_len_counts_remaining_batches_and_bad_sources_are_named():
    s = DynamicBatchSampler(range(1, 101), 8)
    assert len(s) == 13
    take(s, 3)
    assert len(s) == 10
    with pytest.raises(ValueError, match="positive integer"):
        list(DynamicBatchSampler([1, 2, 3], lambda: 0, group_size=2))
    with pytest.raises(TypeError, match="batch_size"):
        DynamicBatchSampler([1, 2], "32")
    other = DynamicBatchSampler(range(1, 50), 8)
    with pytest.raises(ValueError, match="same data"):
        other.load_state_dict(s.state_dict())


def test_batch_size_read_from_an_object_attribute_at_every_batch():
    class HP: batch_size = 4
    hp = HP()
    s = DynamicBatchSampler(range(1, 31), hp, seed=1)
    sizes = []
    for k, b in enumerate(s):
        sizes.append(len(b))
        if k == 1: hp.batch_size = 10
        if k == 3: hp.batch_size = 3
    assert sizes == [4, 4, 10, 10, 2]


# ---------------------------------------------------------------------------------------------------
# evaluation batches and collate

@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=100), bs=st.integers(1, 17))
def test_eval_batches_sorted_and_unsorted_back(lengths, bs):
    s = SortedBatchSampler(lengths, bs)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths))) and len(batches) == len(s)
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    outputs = np.array([10 * i for i in flat])                          # "prediction" of example i is 10 i
    assert s.unsort(outputs).tolist() == [10 * i for i in range(len(lengths))]
    assert s.unsort(torch.tensor(outputs)).tolist() == [10 * i for i in range(len(lengths))]
    assert s.unsort(outputs.tolist()) == [10 * i for i in range(len(lengths))]


def test_collate_matches_transformers_padding_collator(tok):
    from transformers import DataCollatorWithPadding
    feats = [{"input_ids": tok(t)["input_ids"], "label": l} for t, l in [("good film", 1), ("w1 w2 w3 w4 w5 w6 w7 w8 w9", 0), ("bad", 0)]]
    ours = Collator(tok.pad_token_id)([{"input_ids": np.array(f["input_ids"], dtype=np.int32), "label": f["label"]} for f in feats])
    theirs = DataCollatorWithPadding(tok, pad_to_multiple_of=8, return_tensors="pt")(feats)
    assert ours["input_ids"].shape == (3, 16)
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours[k], theirs[k].long()), k
    assert ours["labels"].dtype == torch.long


def test_collate_fixed_rows_and_buckets():
    ex = [{"input_ids": np.arange(1, 12), "label": 1}, {"input_ids": np.arange(1, 4), "label": 0}]
    out = Collator(0, pad_rows_to=4, buckets=[8, 16, 32])(ex)
    assert out["input_ids"].shape == (4, 16)
    assert out["labels"].tolist() == [1, 0, -100, -100] and out["attention_mask"][2:].sum() == 0
    assert out["attention_mask"].sum(1).tolist() == [11, 3, 0, 0]
    assert Collator(0, max_length=12).padded_length(11) == 12 and Collator(0, pad_to_multiple_of=None).padded_length(11) == 11
    with pytest.raises(ValueError, match="largest bucket"):
        Collator(0, buckets=[8])(ex)
    with pytest.raises(ValueError, match="pad_rows_to"):
        Collator(0, pad_rows_to=1)(ex)
    logits = torch.randn(4, 3)
    assert torch.isclose(torch.nn.functional.cross_entropy(logits, out["labels"]),
                         torch.nn.functional.cross_entropy(logits[:2], out["labels"][:2]))


def test_length_buckets_minimise_padding():
    lengths = np.random.default_rng(0).integers(1, 200, 3000)
    b = length_buckets(lengths, n_buckets=5)
    assert len(b) == 5 and b[-1] == -(-lengths.max() // 8) * 8 and all(x % 8 == 0 for x in b)
    def padded(bs): return sum(min(x for x in bs if x >= l) for l in lengths)
    rng = np.random.default_rng(1)
    cands = np.unique(-(-lengths // 8) * 8)
    for _ in range(50):   # no random choice of 5 buckets (with the top one) pads less
        other = sorted(set(rng.choice(cands[:-1], 4, replace=False).tolist()) | {int(cands[-1])})
        assert padded(b) <= padded(other)


# ---------------------------------------------------------------------------------------------------
# loading and reading

def test_every_source_gives_the_same_examples(tmp_path):
    texts, labels = make_rows()
    ref = TCD.from_lists(texts, labels)
    write_csv(tmp_path / "d.csv", zip(texts, labels))
    (tmp_path / "d.tsv").write_text("".join(f"{t}\t{l}\n" for t, l in zip(texts, labels)))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in zip(texts, labels)))
    others = [TCD.from_df(pd.DataFrame({"text": texts, "label": labels})),
              TCD.from_records([{"text": t, "label": l} for t, l in zip(texts, labels)]),
              TCD.from_csv(tmp_path / "d.csv"),
              TCD.from_csv(tmp_path / "d.tsv", names=["text", "label"]),
              TCD.load(tmp_path / "d.jsonl"),
              TCD.load(texts, labels=labels)]
    cols = ["text", "label", "target", "split"]
    for o in others: assert o.df[cols].equals(ref.df[cols])
    assert others[2].rows[:2] == [2, 3] and others[3].rows[:2] == [1, 2]   # file line numbers, with and without a header


def test_predefined_splits_by_column_argument_and_carving(tmp_path):
    texts, labels = make_rows(10)
    split = (["train"] * 6 + ["validation"] * 2 + ["test"] * 2) * 2
    by_arg = TCD.from_lists(texts, labels, split)
    assert by_arg.split_origin == "given" and by_arg.df.split.tolist() == [{"validation": "valid"}.get(s, s) for s in split]
    by_col = TCD.from_df(pd.DataFrame({"text": texts, "label": labels, "split": split}))
    assert by_col.df.split.tolist() == by_arg.df.split.tolist()
    fold = TCD.from_df(pd.DataFrame({"text": texts, "label": labels, "fold": ["train"] * 16 + ["test"] * 4}), split="fold")
    assert fold.split_origin.startswith("given; valid carved") and (fold.df.split == "valid").sum() == 2
    assert set(fold.df[fold.df.split == "valid"].label) == {"neg", "pos"}


def test_labels_ints_strings_floats_and_config():
    from transformers import BertConfig
    texts, _ = make_rows(5)
    ints = TCD.from_lists(texts, [0, 1] * 5)
    assert ints.label2id == {0: 0, 1: 1} and ints.config_kwargs["id2label"] == {0: "0", 1: "1"}
    floats = TCD.from_df(pd.DataFrame({"text": texts, "label": [1.0, 0.0] * 5}))
    assert floats.label2id == {0: 0, 1: 1}
    named = TCD.from_lists(texts, ["pos", "neg"] * 5, classes=["pos", "neg"])
    assert named.id2label == {0: "pos", 1: "neg"} and named.df.target.tolist() == [0, 1] * 5
    cfg = BertConfig(**named.config_kwargs)
    assert cfg.id2label == {0: "pos", 1: "neg"} and cfg.label2id == {"pos": 0, "neg": 1} and cfg.num_labels == 2


def test_csv_numeric_labels_become_integers(tmp_path):
    p = write_csv(tmp_path / "n.csv", [(f"text {i}", i % 2) for i in range(10)])
    d = TCD.from_csv(p)
    assert d.label2id == {0: 0, 1: 1} and all(isinstance(x, int) for x in d.df.label)


def test_csv_digit_labels_become_integers_only_when_nothing_is_lost(tmp_path):
    texts, _ = make_rows(5)
    p = write_csv(tmp_path / "signed.csv", [(t, ["-1", "12"][k % 2]) for k, t in enumerate(texts)])
    assert TCD.from_csv(p).classes == [-1, 12]                     # canonical integers: converted
    p = write_csv(tmp_path / "padded.csv", [(t, ["00", "01"][k % 2]) for k, t in enumerate(texts)])
    assert TCD.from_csv(p).classes == ["00", "01"]                 # leading zeros: kept as written, not merged into 0 and 1


@pytest.mark.parametrize("variant", ["01", "+1", " 1"])
def test_csv_labels_that_would_merge_are_reported_not_merged(tmp_path, variant):
    texts, _ = make_rows(6)
    labels = ["0", "1", variant] * 4
    p = write_csv(tmp_path / "ids.csv", zip(texts, labels))
    for how in ("raise", "drop"):                                   # dropping rows cannot fix a spelling
        with pytest.raises(DataError) as info:
            TCD.from_csv(p, on_invalid=how)
        msg = str(info.value)
        assert [i.kind for i in info.value.issues if not i.droppable] == ["label_variants"]
        assert "ids.csv" in msg and "column 'label'" in msg and f"{variant!r} (lines 4, 7, 10 and 13)" in msg
        assert "'1' (lines 3, 6, 9 and 12)" in msg and "spelling" in msg


def test_labels_differing_in_whitespace_or_case_are_reported(tmp_path):
    texts, _ = make_rows(6)
    labels = ["positive", "negative"] * 6
    labels[2], labels[8] = " positive", "Positive"
    p = write_csv(tmp_path / "spelled.csv", zip(texts, labels))
    with pytest.raises(DataError) as info:
        TCD.from_csv(p, on_invalid="drop")
    msg = str(info.value)
    assert "spelled.csv" in msg and "column 'label'" in msg and "'positive' (lines 2, 6, 8 and 12)" in msg
    assert "' positive' (line 4)" in msg and "'Positive' (line 10)" in msg and ".str.strip().str.lower()" in msg
    assert "on_invalid='drop'" not in msg                          # no hint to drop: it would not help
    fixed = pd.read_csv(p, dtype=str)
    fixed["label"] = fixed["label"].str.strip().str.lower()
    assert TCD.from_df(fixed).classes == ["negative", "positive"]   # the fix the message suggests works


def test_stratified_seeded_split():
    texts = [f"t{i}" for i in range(150)]
    labels = ["a"] * 100 + ["b"] * 50
    d = TCD.from_lists(texts, labels)
    counts = d.df.groupby(["split", "label"]).size().to_dict()
    assert counts == {("test", "a"): 10, ("test", "b"): 5, ("train", "a"): 80, ("train", "b"): 40,
                      ("valid", "a"): 10, ("valid", "b"): 5}
    assert d.df.split.tolist() == TCD.from_lists(texts, labels).df.split.tolist()
    assert d.df.split.tolist() != TCD.from_lists(texts, labels, seed=1).df.split.tolist()


# ---------------------------------------------------------------------------------------------------
# each bad input: the error type, and a message naming the file, the rows and the column

def test_empty_and_whitespace_texts(tmp_path):
    p = write_csv(tmp_path / "reviews.csv", good_rows()[:1] + [("", "pos")] + good_rows()[1:3] + [("   ", "neg")] + good_rows()[3:])
    msg = raises_data_error(TCD.from_csv, p)
    assert "reviews.csv" in msg and "lines 3 and 6" in msg and "column 'text'" in msg and "on_invalid='drop'" in msg


def test_missing_labels_in_a_file_and_in_a_frame(tmp_path):
    p = write_csv(tmp_path / "reviews.csv", good_rows()[:2] + [("a labelless text", "")] + good_rows()[2:])
    msg = raises_data_error(TCD.from_csv, p)
    assert "reviews.csv" in msg and "line 4" in msg and "column 'label'" in msg and "missing label" in msg
    texts, labels = make_rows()
    df = pd.DataFrame({"review": texts, "stars": [1.0, np.nan] + [1.0, 0.0] * 9})
    msg = raises_data_error(TCD.from_df, df, text_col="review", label_col="stars")
    assert "row 2" in msg and "column 'stars'" in msg and "df.iloc[0]" in msg


def test_non_string_texts(tmp_path):
    p = tmp_path / "data.jsonl"
    rows = [{"text": t, "label": l} for t, l in good_rows()]
    rows.insert(1, {"text": 12345, "label": "pos"})
    p.write_text("\n".join(json.dumps(r) for r in rows))
    msg = raises_data_error(TCD.from_csv, p)
    assert "data.jsonl" in msg and "line 2" in msg and "column 'text'" in msg and "int 12345" in msg
    texts, labels = make_rows()
    texts[4] = ["a", "list"]
    msg = raises_data_error(TCD.from_lists, texts, labels)
    assert "item 5" in msg and "list" in msg


def test_single_class_always_raises(tmp_path):
    p = write_csv(tmp_path / "one.csv", [(f"text {i}", "pos") for i in range(5)])
    for how in ("raise", "drop"):
        msg = raises_data_error(TCD.from_csv, p, on_invalid=how)
        assert "one.csv" in msg and "column 'label'" in msg and "at least two classes" in msg


def test_classes_too_small_to_stratify(tmp_path):
    p = write_csv(tmp_path / "rare.csv", good_rows() + [("a rare one", "rare"), ("another rare one", "rare")])
    msg = raises_data_error(TCD.from_csv, p)
    assert "rare.csv" in msg and "lines 8 and 9" in msg and "column 'label'" in msg and "'rare': 2" in msg
    with pytest.warns(DataWarning, match="class too small"):
        d = TCD.from_csv(p, on_invalid="drop")
    assert d.classes == ["neg", "pos"] and d.report.dropped.row.tolist() == [8, 9]
    assert TCD.from_csv(p, valid_pct=0, test_pct=0).num_labels == 3   # no split asked for, nothing too small


def test_labels_of_valid_or_test_unseen_in_train(tmp_path):
    rows = [(t, l, "train") for t, l in good_rows()] + [("a text", "pos", "test"), ("a neutral text", "neutral", "test"),
                                                        ("more neutral", "neutral", "valid")]
    p = write_csv(tmp_path / "splits.csv", rows, header=("text", "label", "split"))
    msg = raises_data_error(TCD.from_csv, p)
    assert "splits.csv" in msg and "lines 9 and 10" in msg and "column 'label'" in msg and "never occur" in msg


def test_exact_duplicates(tmp_path):
    p = write_csv(tmp_path / "dups.csv", good_rows() + [(good_rows()[1][0], "pos"), (good_rows()[2][0], "pos")])
    msg = raises_data_error(TCD.from_csv, p)
    assert "dups.csv" in msg and "line 8 repeats line 3" in msg and "line 9 repeats line 4" in msg
    assert "column 'text'" in msg and "1 of them with a different label" in msg


def test_duplicates_kept_with_a_warning_for_a_file_to_score(tmp_path):
    p = write_csv(tmp_path / "to_score.csv", good_rows() + [(good_rows()[1][0], "pos"), (good_rows()[2][0], "pos")])
    assert "duplicates='keep'" in raises_data_error(TCD.from_csv, p)   # the default is unchanged, and the error names the option
    with pytest.warns(DataWarning) as rec:
        d = TCD.from_csv(p, duplicates="keep", valid_pct=0, test_pct=0)
    msg = str(rec[0].message)
    assert len(rec) == 1 and "to_score.csv" in msg and "line 8 repeats line 3" in msg and "line 9 repeats line 4" in msg
    assert len(d) == 8 and d.rows == list(range(2, 10)) and len(d.report.dropped) == 0
    assert "kept 2 rows (duplicate text): lines 8 and 9" in repr(d.report)
    with pytest.warns(DataWarning, match="dropped 2 rows"):
        dropped = TCD.from_csv(p, duplicates="drop", valid_pct=0, test_pct=0)   # on_invalid stays 'raise' for the rest
    assert dropped.report.dropped.row.tolist() == [8, 9]
    assert "missing label" in raises_data_error(TCD.from_csv, write_csv(tmp_path / "both.csv", good_rows() + [(good_rows()[1][0], "pos"),
                                                ("no label", "")]), duplicates="drop", valid_pct=0, test_pct=0)
    with pytest.raises(ValueError, match="duplicates="):
        TCD.from_csv(p, duplicates="warn")


def test_leakage_is_still_reported_when_duplicates_are_kept(tmp_path):
    rows = [(t, l, "train") for t, l in good_rows()] + [(good_rows()[0][0], "neg", "test"), ("a new text", "pos", "valid")]
    p = write_csv(tmp_path / "leak.csv", rows, header=("text", "label", "split"))
    with pytest.raises(DataError) as info:
        TCD.from_csv(p, duplicates="keep")
    assert [i.kind for i in info.value.issues] == ["leakage"] and "line 8 (test) repeats line 2 (train)" in str(info.value)


def test_duplicates_across_splits_are_leakage(tmp_path):
    rows = [(t, l, "train") for t, l in good_rows()] + [(good_rows()[0][0], "neg", "test"), ("a new text", "pos", "valid")]
    p = write_csv(tmp_path / "leak.csv", rows, header=("text", "label", "split"))
    msg = raises_data_error(TCD.from_csv, p)
    assert "leak.csv" in msg and "line 8 (test) repeats line 2 (train)" in msg and "leakage" in msg and "column 'text'" in msg
    with pytest.warns(DataWarning):
        d = TCD.from_csv(p, on_invalid="drop")
    assert d.report.dropped.row.tolist() == [8] and (d.df.split == "test").sum() == 0


def test_unknown_split_names_and_unknown_classes(tmp_path):
    rows = [(t, l, "train") for t, l in good_rows()] + [("a text", "pos", "trian")]
    p = write_csv(tmp_path / "s.csv", rows, header=("text", "label", "split"))
    msg = raises_data_error(TCD.from_csv, p)
    assert "s.csv" in msg and "line 8" in msg and "column 'split'" in msg and "'trian'" in msg
    texts, labels = make_rows()
    msg = raises_data_error(TCD.from_lists, texts, labels, classes=["neg"])
    assert "not among classes" in msg and "items 11, 12" in msg


def test_texts_longer_than_the_model_takes(tmp_path, tok):
    rows = good_rows() + [(" ".join(f"w{i}" for i in range(30)), "pos")]
    p = write_csv(tmp_path / "long.csv", rows)
    d = TCD.from_csv(p, valid_pct=0, test_pct=0)
    msg = raises_data_error(d.tokenize, tok, too_long="raise")
    assert "long.csv" in msg and "line 8" in msg and "column 'text'" in msg and "max_length=16" in msg and "32 tokens" in msg
    with pytest.warns(DataWarning, match="1 text .* longer than 16 tokens was truncated"):
        d.tokenize(tok)
    assert d.report.truncated.row.tolist() == [8] and d.report.truncated.tokens.tolist() == [32]
    assert d.lengths.max() == 16 and d.token_ids(6)[-1] == tok.sep_token_id
    dropped = TCD.from_csv(p, valid_pct=0, test_pct=0)
    with pytest.warns(DataWarning, match="dropped"):
        dropped.tokenize(tok, too_long="drop")
    assert len(dropped) == 6 and dropped.report.dropped.row.tolist() == [8] and len(dropped.dataset("train")) == 6
    with pytest.raises(ValueError, match="more than the model takes"):
        d.tokenize(tok, max_length=100)


def test_bad_encoding_names_byte_offset_and_line(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\nfine film,pos\ndull film,neg\nun film raté,neg\n".encode("latin-1"))
    msg = raises_data_error(TCD.from_csv, p)
    assert "latin.csv" in msg and "byte offset 50" in msg and "line 4" in msg and "encoding=" in msg
    assert "un film raté" in read_texts(p, "latin-1")


def read_texts(p, encoding):
    return D.read_table(p, encoding=encoding).text.tolist()


def test_malformed_files_name_their_lines(tmp_path):
    p = tmp_path / "shifted.csv"
    p.write_text("text,label\nfine,pos\nslow, dull,neg\n")
    assert "line 3 has 3" in raises_data_error(TCD.from_csv, p)
    p = tmp_path / "broken.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b" "label": 0}\n[1, 2]\n')
    msg = raises_data_error(TCD.from_csv, p)
    assert "broken.jsonl" in msg and "line 2" in msg and "line 3" in msg
    msg = raises_data_error(TCD.from_df, pd.DataFrame({"review": ["a"], "y": [1]}))
    assert "'text'" in msg and "'review'" in msg
    with pytest.raises(ValueError, match="format="):
        TCD.from_csv(write_csv(tmp_path / "x.txt", good_rows()))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        TCD.from_csv(tmp_path / "nope.csv")


@pytest.mark.parametrize("ext,sep", [(".csv", ","), (".tsv", "\t")])
def test_repeated_column_names_are_refused(tmp_path, ext, sep):
    p = tmp_path / f"pasted{ext}"
    p.write_text(sep.join(["text", "label", "text", "label", "id"]) + "\n" + sep.join(["a gem", "pos", "un bijou", "1", "7"]) + "\n")
    msg = raises_data_error(TCD.from_csv, p)
    assert f"pasted{ext}" in msg and "line 1" in msg and "'text' (columns 1 and 3)" in msg and "'label' (columns 2 and 4)" in msg
    assert "Rename" in msg
    with pytest.raises(DataError, match="names="):
        D.read_table(p, header=False, names=["text", "label", "text", "x", "y"])


def test_truncated_or_fake_gzip_names_the_file(tmp_path):
    import gzip
    packed = gzip.compress(("text,label\n" + "".join(f"review {i},pos\n" for i in range(500))).encode())
    p = tmp_path / "cut.csv.gz"
    p.write_bytes(packed[:len(packed) // 2])
    msg = raises_data_error(TCD.from_csv, p)
    assert "cut.csv.gz" in msg and "truncated" in msg
    p = tmp_path / "plain.csv.gz"
    p.write_text("text,label\na,pos\n")
    msg = raises_data_error(D.read_table, p)
    assert "plain.csv.gz" in msg and "not valid gzip data" in msg


def test_long_fields_are_read_and_too_long_ones_named(tmp_path, monkeypatch):
    before = csv.field_size_limit()
    long_text = "a long chapter " * 20_000                             # 300,000 characters: over csv's default 131,072
    p = write_csv(tmp_path / "book.csv", [("short", "pos"), (long_text, "neg"), ("another", "pos")])
    df = D.read_table(p)
    assert df.loc[3, "text"] == long_text and csv.field_size_limit() == before   # the module's limit is put back
    monkeypatch.setattr(D, "CSV_FIELD_LIMIT", 100_000)
    msg = raises_data_error(D.read_table, p)
    assert "book.csv" in msg and "line 3" in msg and "longer than 100,000 characters" in msg and "quote" not in msg
    assert csv.field_size_limit() == before


def test_truncation_warning_text_stays_stable(tmp_path, tok):
    "The command line rewrites '`data.report` lists them'; the warning must keep saying exactly that."
    p = write_csv(tmp_path / "long.csv", good_rows() + [(" ".join(f"w{i}" for i in range(30)), "pos")])
    with pytest.warns(DataWarning) as rec:
        TCD.from_csv(p, valid_pct=0, test_pct=0).tokenize(tok)
    assert str(rec[0].message).endswith("longer than 16 tokens was truncated to their first 16 tokens; `data.report` lists them.")


def test_drop_reports_exact_counts_and_rows(tmp_path):
    rows = good_rows(8) + [("", "pos"), ("text without label", ""), (good_rows()[0][0], "neg"), ("   ", "neg")]
    p = write_csv(tmp_path / "messy.csv", rows)
    with pytest.warns(DataWarning) as rec:
        d = TCD.from_csv(p, on_invalid="drop")
    assert "messy.csv: dropped 4 rows" in str(rec[0].message) and "empty text: 2" in str(rec[0].message)
    rep = d.report.dropped
    assert rep.row.tolist() == [10, 11, 12, 13]
    assert rep.reason.tolist() == ["empty text", "missing label", "duplicate text", "empty text"]
    assert len(d) == 8 and d.rows == list(range(2, 10)) and "dropped 2 rows (empty text): lines 10 and 13" in repr(d.report)


def test_asset_name_and_unknown_source():
    from bigmodel_nb.assets import load_sample
    with pytest.raises(DataError, match="row 10341 repeats row 10324"):
        TCD.from_df(load_sample("movie_reviews"))
    with pytest.warns(UserWarning, match="dropped 2 rows"):
        d = TCD.load("movie_reviews")                       # registered assets drop (and report) invalid rows by default
    assert len(d) == 10_603 and d.report.dropped.row.tolist() == [10_341, 10_559]
    with pytest.raises(ValueError, match="movie_reviews"):
        TCD.load("no_such_data")


def test_hugging_face_datasets():
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    texts, _ = make_rows(6)
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": texts[:8], "label": [0, 1] * 4}, features=feats),
        "validation": datasets.Dataset.from_dict({"text": texts[8:10], "label": [0, 1]}, features=feats),
        "test": datasets.Dataset.from_dict({"text": texts[10:], "label": [0, 1]}, features=feats)})
    d = TCD.load(ds)
    assert d.label2id == {"neg": 0, "pos": 1} and d.split_origin == "given"
    assert d.df.groupby("split").size().to_dict() == {"test": 2, "train": 8, "valid": 2}
    unlabelled = datasets.DatasetDict({"train": ds["train"], "test": datasets.Dataset.from_dict(
        {"text": ["x", "y"], "label": [-1, 1]}, features=feats)})
    msg = raises_data_error(TCD.from_hf, unlabelled)
    assert "row 1 of 'test'" in msg and "missing label" in msg
    plain = TCD.from_hf(datasets.Dataset.from_dict({"text": texts, "label": ["a", "b"] * 6}))
    assert plain.split_origin == "stratified"


# ---------------------------------------------------------------------------------------------------
# tokenizing once

def test_second_tokenize_is_served_from_the_cache(monkeypatch, tok):
    calls = []
    real = D.tokenize_texts
    monkeypatch.setattr(D, "tokenize_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    D._TOKEN_CACHE.clear()
    texts, labels = make_rows()
    a = TCD.from_lists(texts, labels).tokenize(tok)
    b = TCD.from_lists(texts, labels).tokenize(tiny_tokenizer())      # another copy of the same tokenizer
    assert len(calls) == 1 and np.array_equal(a.lengths, b.lengths)
    a.tokenize(tok)
    assert len(calls) == 1
    with pytest.warns(DataWarning, match="5 texts"):
        TCD.from_lists(texts, labels).tokenize(tok, max_length=8)
    assert len(calls) == 2
    TCD.from_lists(texts, labels).tokenize(tiny_tokenizer(max_len=20))  # a tokenizer with another limit
    assert len(calls) == 3


def test_disk_cache_survives_the_memory_cache(monkeypatch, tmp_cache, tok):
    calls = []
    real = D.tokenize_texts
    monkeypatch.setattr(D, "tokenize_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    texts, labels = make_rows()
    D._TOKEN_CACHE.clear()
    a = TCD.from_lists(texts, labels).tokenize(tok, cache="disk")
    assert len(list((tmp_cache / "tokens").glob("*.npz"))) == 1
    D._TOKEN_CACHE.clear()
    b = TCD.from_lists(texts, labels).tokenize(tok, cache="disk")
    assert len(calls) == 1 and np.array_equal(a.token_ids(3), b.token_ids(3))


def test_tokens_match_the_tokenizer_and_need_a_tokenizer_first(tok):
    texts, labels = make_rows()
    d = TCD.from_lists(texts, labels)
    with pytest.raises(ValueError, match="tokenize"):
        d.dataset("train")
    d.tokenize(tok)
    for i in range(len(d)):
        assert d.token_ids(i).tolist() == tok(d.df.text[i])["input_ids"]
    item = d.dataset("valid")[0]
    assert set(item) == {"input_ids", "label"} and item["label"] == d.df.target[d.split_index("valid")[0]]


# ---------------------------------------------------------------------------------------------------
# DataLoaders, end to end

def test_dataloaders_follow_a_live_batch_size(tok):
    texts, labels = make_rows(40)
    d = TCD.from_lists(texts, labels).tokenize(tok)
    class HP: batch_size = 8
    hp = HP()
    dls = d.dataloaders(hp)
    assert isinstance(dls.train.batch_sampler, DynamicBatchSampler) and isinstance(dls.valid.batch_sampler, SortedBatchSampler)
    rows, seen = [], 0
    for k, b in enumerate(dls.train):
        rows.append(b["input_ids"].shape[0]); seen += int((b["labels"] >= 0).sum())
        assert b["input_ids"].shape[1] % 8 == 0 and b["labels"].dtype == torch.long
        if k == 2: hp.batch_size = 5
    assert rows[:4] == [8, 8, 8, 5] and seen == len(d.dataset("train")) == 64
    valid = [b for b in dls.valid]
    lens = [int(b["attention_mask"].sum(1).max()) for b in valid]
    assert lens == sorted(lens, reverse=True)
    with pytest.raises(AttributeError, match="splits: train, valid, test"):
        dls.holdout


def test_fixed_shapes_for_cuda_graphs(tok):
    texts, labels = make_rows(40)
    d = TCD.from_lists(texts, labels).tokenize(tok)
    dls = d.dataloaders(12, buckets=[8, 16], pad_rows_to=12)
    shapes = {tuple(b["input_ids"].shape) for name in ("train", "valid", "test") for b in dls[name]}
    assert shapes <= {(12, 8), (12, 16)}


def test_movie_reviews_length_grouping_pads_at_most_15_percent():
    from bigmodel_nb.assets import model_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        d = TCD.from_asset("movie_reviews")
    d.tokenize(model_path("minilm"))
    train = d.dataset("train")
    grouped = padding_ratio(DataLoader(train, batch_sampler=DynamicBatchSampler(train.lengths, 32, seed=0), collate_fn=d.collator()))
    random = padding_ratio(DataLoader(train, batch_size=32, shuffle=True, collate_fn=d.collator()))
    assert grouped <= 1.15 < 1.8 < random
    assert d.max_length == 512 and len(train) == 8483


def test_warnings_name_the_callers_line_whichever_path_reaches_the_check(tmp_path, tok):
    "The same checks are reached through from_csv, from_asset (which calls from_df) and tokenize; each warning names this file."
    p = write_csv(tmp_path / "messy.csv", good_rows(8) + [("", "pos")])
    long = TCD.from_csv(write_csv(tmp_path / "long.csv", good_rows() + [(" ".join(f"w{i}" for i in range(30)), "pos")]),
                        valid_pct=0, test_pct=0)
    for load in (lambda: TCD.from_csv(p, on_invalid="drop"), lambda: TCD.from_asset("movie_reviews"), lambda: long.tokenize(tok)):
        with pytest.warns(DataWarning) as rec:
            load()
        assert [w.filename for w in rec] == [__file__] * len(rec), [w.filename for w in rec]
