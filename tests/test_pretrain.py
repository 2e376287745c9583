"Pretraining: masking statistics against transformers' collator, NSP pairs, the losses against BertForPreTraining, the tokenizer, the Learner."
import json
import math

import numpy as np
import pytest
import torch

from bigmodel_nb.pretrain import (BertForPreTrainingPacked, MaskedLMTask, MaskingCollator, PretrainError, PretrainingData,
                                  PretrainingTask, document_lines, mask_tokens, masking_shares, nsp_pairs, small_bert_config,
                                  train_wordpiece)
from bigmodel_nb.tasks import IGNORE_INDEX, TASKS, get_task


@pytest.fixture(scope="module")
def docs():
    "The 42 Shakespeare works as lists of lines."
    from bigmodel_nb.assets import load_sample
    return [document_lines(t) for t in load_sample("shakespeare").text]


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer
    from bigmodel_nb.assets import model_path
    return AutoTokenizer.from_pretrained(model_path("minilm"))


@pytest.fixture(scope="module")
def wordpiece(docs, tmp_path_factory):
    "A 3,000-entry WordPiece tokenizer trained on four plays, saved, and the folder."
    folder = tmp_path_factory.mktemp("wordpiece")
    tok = train_wordpiece([l for d in docs[:4] for l in d], vocab_size=3000, folder=folder)
    return tok, folder


def _passages(docs, n_docs, k=4):
    return [" ".join(d[i:i + k]) for d in docs[:n_docs] for i in range(0, len(d) - k + 1, k)]


# ---- masking ------------------------------------------------------------------------------------------------
def test_mask_tokens_statistics_match_transformers_collator(docs, minilm_tok):
    from transformers import DataCollatorForLanguageModeling
    examples = [{"input_ids": x} for x in minilm_tok(_passages(docs, 3), truncation=True, max_length=128)["input_ids"]]
    original = minilm_tok.pad({"input_ids": [e["input_ids"] for e in examples]}, return_tensors="pt")["input_ids"]
    eligible = ~torch.isin(original, torch.tensor(minilm_tok.all_special_ids))
    torch.manual_seed(0)
    hf = DataCollatorForLanguageModeling(minilm_tok, mlm_probability=0.15, seed=0)(examples)
    ours = mask_tokens(original, ~eligible, len(minilm_tok), minilm_tok.mask_token_id, 0.15, torch.Generator().manual_seed(0))
    a = masking_shares(*ours, original, minilm_tok.mask_token_id, eligible)
    b = masking_shares(hf["input_ids"], hf["labels"], original, minilm_tok.mask_token_id, eligible)
    n = a["tokens"]
    assert n >= 100_000 and b["tokens"] == n
    for key, p in dict(chosen=0.15, mask=0.12, random=0.015, unchanged=0.015).items():
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(a[key] - p) < 5 * sd, (key, a[key])
        assert abs(b[key] - p) < 5 * sd, (key, b[key])
        assert abs(a[key] - b[key]) < 5 * math.sqrt(2) * sd, (key, a[key], b[key])
    # share of *all* tokens (padding and specials included) is lower, but nothing outside `eligible` is ever chosen
    assert not ((ours[1] != IGNORE_INDEX) & ~eligible).any() and not ((hf["labels"] != IGNORE_INDEX) & ~eligible).any()


def test_mask_tokens_labels_seed_and_errors():
    ids = torch.randint(5, 1000, (64, 50))
    special = torch.zeros_like(ids, dtype=torch.bool); special[:, 0] = special[:, -1] = True
    inputs, labels = mask_tokens(ids, special, 1000, 4, generator=torch.Generator().manual_seed(3))
    assert ((labels == IGNORE_INDEX) | (labels == ids)).all() and ((inputs == ids) | (labels != IGNORE_INDEX)).all()
    assert (labels[special] == IGNORE_INDEX).all() and (labels != IGNORE_INDEX).any()
    again = mask_tokens(ids, special, 1000, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    with pytest.raises(PretrainError, match="special_tokens_mask"): mask_tokens(ids, special[:, 1:], 1000, 4)
    with pytest.raises(PretrainError, match="probability"): mask_tokens(ids, special, 1000, 4, probability=1.5)
    with pytest.raises(PretrainError, match="mask_id"): mask_tokens(ids, special, 1000, 1000)
    assert issubclass(PretrainError, ValueError)


# ---- NSP pairs ------------------------------------------------------------------------------------------------
def test_nsp_pairs_balanced_never_same_document(docs):
    pairs = nsp_pairs(docs, seed=1)
    assert len(pairs) == sum(len(d) - 1 for d in docs)
    assert pairs.label.sum() == len(pairs) // 2                                   # exactly balanced
    false, true = pairs[pairs.label == 1], pairs[pairs.label == 0]
    assert (false.other_doc != false.doc).all() and (true.other_doc == true.doc).all()
    assert all(docs[d][i] == a and docs[d][i + 1] == b for d, i, a, b in zip(true.doc, true.line, true["first"], true.second))
    assert all(docs[d][i] == a for d, i, a in zip(false.doc, false.line, false["first"]))
    assert all(b in set(docs[o]) for o, b in zip(false.other_doc[:500], false.second[:500]))
    assert nsp_pairs(docs, seed=1).equals(pairs) and not nsp_pairs(docs, seed=2).equals(pairs)
    small = nsp_pairs([["a", "b", "c"], ["x"], ["y", "z"]], seed=0)                # a one-line document still gives negatives
    assert len(small) == 3 and (small.other_doc[small.label == 1] != small.doc[small.label == 1]).all()
    with pytest.raises(PretrainError, match="two documents"): nsp_pairs([docs[0]])
    with pytest.raises(PretrainError, match="document_lines"): nsp_pairs("one text")


def test_pair_data_token_types_and_labels(docs, wordpiece):
    tok, _ = wordpiece
    pairs = nsp_pairs(docs[:4], seed=0).head(40)
    data = PretrainingData.from_pairs(pairs, tok, max_length=48)
    for i in range(len(data)):
        ex = data.dataset()[i]
        seps = np.flatnonzero(ex["input_ids"] == tok.sep_token_id)
        assert len(seps) == 2 and ex["input_ids"][0] == tok.cls_token_id and len(ex["input_ids"]) <= 48
        assert (ex["token_type_ids"][:seps[0] + 1] == 0).all() and (ex["token_type_ids"][seps[0] + 1:] == 1).all()
        assert ex["label"] == pairs.label.iloc[i]
    batch = data.collator()([data.dataset()[i] for i in range(len(data))])
    assert batch["labels"].shape == (40, batch["input_ids"].shape[1] + 1)
    assert batch["labels"][:, -1].tolist() == pairs.label.tolist()
    assert (batch["labels"][:, :-1][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["token_type_ids"][batch["attention_mask"] == 0] == 0).all()
    with pytest.raises(PretrainError, match="columns"): PretrainingData.from_pairs(pairs[["first"]], tok)


# ---- tokenizer ----------------------------------------------------------------------------------------------
def test_train_wordpiece_round_trip_through_transformers(wordpiece):
    from transformers import AutoTokenizer
    tok, folder = wordpiece
    again = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == len(again) == 3000
    assert [again.convert_ids_to_tokens(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    line = "What light through yonder window breaks"
    assert again(line)["input_ids"] == tok(line)["input_ids"]
    assert again.decode(again(line)["input_ids"], skip_special_tokens=True) == line.lower()
    pair = again("to be", "or not")
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1] and pair["input_ids"][0] == again.cls_token_id
    assert again.pad_token_id == 0 and again.mask_token_id == 4
    assert any(t.startswith("##") for t in again.tokenize("unfathomably"))                # word pieces
    with pytest.raises(PretrainError, match="vocab_size"): train_wordpiece(["a b"], vocab_size=3)
    with pytest.raises(PretrainError, match="one string"): train_wordpiece("a b c", vocab_size=100)


def test_small_bert_config():
    cfg = small_bert_config(3000, hidden=128, layers=3)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (128, 3, 2, 512)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 3000
    with pytest.raises(PretrainError, match="heads"): small_bert_config(100, hidden=100, heads=3)


# ---- the tasks and their losses ---------------------------------------------------------------------------------
def test_losses_equal_bert_for_pretraining_tied_and_near_ln_v(docs, wordpiece):
    from transformers import BertForMaskedLM, BertForPreTraining
    tok, _ = wordpiece
    cfg = small_bert_config(len(tok), hidden=64, layers=2, max_length=64)
    torch.manual_seed(0)
    ref = BertForPreTraining(cfg).eval()
    ours = BertForPreTrainingPacked(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight     # tied
    assert ours.cls.predictions.decoder.weight.data_ptr() == ours.bert.embeddings.word_embeddings.weight.data_ptr()
    data = PretrainingData.from_pairs(nsp_pairs(docs[:4], seed=0).head(32), tok, max_length=64)
    torch.manual_seed(1)
    batch = data.collator()([data.dataset()[i] for i in range(32)])
    targets = batch.pop("labels")
    with torch.no_grad():
        theirs = ref(**batch, labels=targets[:, :-1].contiguous(), next_sentence_label=targets[:, -1].contiguous())
        out = ours(**batch)
    task = PretrainingTask()
    total, n = task.loss(out.logits, targets)
    assert abs(float(total / n) - float(theirs.loss)) < 1e-6
    assert torch.equal(out.logits[:, :-1], theirs.prediction_logits) and torch.equal(out.logits[:, -1, :2], theirs.seq_relationship_logits)
    mlm = float(task.mlm_loss(out.logits[:, :-1], targets[:, :-1]))
    assert abs(mlm - math.log(len(tok))) < 0.03 * math.log(len(tok))               # ≈ ln V at initialisation
    assert abs(float(task.nsp_loss(out.logits[:, -1, :2], targets[:, -1])) - math.log(2)) < 0.1
    # masked LM alone against BertForMaskedLM, same weights
    mlm_ref = BertForMaskedLM(cfg).eval()
    mlm_ref.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("cls.seq_relationship")}, strict=False)
    mlm_ref.tie_weights()
    assert mlm_ref.cls.predictions.decoder.weight is mlm_ref.bert.embeddings.word_embeddings.weight
    with torch.no_grad(): r = mlm_ref(**batch, labels=targets[:, :-1].contiguous())
    t, k = MaskedLMTask().loss(r.logits, targets[:, :-1])
    assert abs(float(t / k) - float(r.loss)) < 1e-6


def test_tasks_registered_and_reject_text_data():
    assert TASKS["masked_lm"] is MaskedLMTask and TASKS["pretraining"] is PretrainingTask
    assert isinstance(get_task("pretraining"), PretrainingTask)
    from bigmodel_nb.data import TextData
    with pytest.raises(ValueError, match="PretrainingData.from_texts"): TextData(["a", "b"], ["x", "y"], task="masked_lm")
    with pytest.raises(PretrainError, match="probability"): MaskedLMTask(0)


# ---- the Learner ----------------------------------------------------------------------------------------------
def _losses(learn):
    return [r["train_loss"] for r in learn.log]


def test_learner_trains_masked_lm_and_checkpoints(docs, wordpiece, tmp_path):
    from transformers import BertForMaskedLM
    from bigmodel_nb.learner import Learner
    tok, _ = wordpiece
    data = PretrainingData.from_texts(_passages(docs, 3)[:960], tok, max_length=64)
    torch.manual_seed(0)
    model = BertForMaskedLM(small_bert_config(len(tok), hidden=64, layers=2, max_length=64))
    learn = Learner(model, data, dict(lr=2e-3, batch_size=32, epochs=1, warmup=0.1, seed=0), device="cpu", sync_every=5,
                    progress=False, out_dir=tmp_path / "run")
    learn.fit()
    losses = _losses(learn)
    assert learn.step == 30 and len(losses) == 6
    assert abs(losses[0] - math.log(len(tok))) < 0.1 * math.log(len(tok))
    assert losses[-1] < losses[0] - 0.7 and losses[-1] < losses[2] < losses[0]
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight    # still tied after training
    # the checkpoint callback wrote a folder that transformers loads, with the same weights
    ckpt = tmp_path / "run" / "checkpoint"
    assert ckpt.is_dir() and json.loads((ckpt / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    again = BertForMaskedLM.from_pretrained(ckpt)
    assert torch.equal(again.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight.cpu())
    learn2 = Learner(BertForMaskedLM(model.config), data, dict(lr=2e-3, batch_size=32, epochs=1, seed=0), device="cpu", progress=False)
    learn2.load_checkpoint(ckpt)
    assert learn2.step == 30


def test_learner_trains_pretraining_task(docs, wordpiece):
    from bigmodel_nb.learner import Learner
    tok, _ = wordpiece
    data = PretrainingData.from_pairs(nsp_pairs(docs[:4], seed=0).sample(960, random_state=0), tok, max_length=64)
    torch.manual_seed(0)
    model = BertForPreTrainingPacked(small_bert_config(len(tok), hidden=64, layers=2, max_length=64))
    learn = Learner(model, data, dict(lr=2e-3, batch_size=32, epochs=1, warmup=0.1, seed=0), device="cpu", sync_every=5, progress=False)
    learn.fit()
    losses = _losses(learn)
    assert learn.step == 30 and abs(losses[0] - (math.log(len(tok)) + math.log(2))) < 0.1 * math.log(len(tok))
    assert losses[-1] < losses[0] - 0.7
    assert model.config.id2label == {0: "is_next", 1: "random_next"}


def test_collator_needs_mask_token(minilm_tok):
    class NoMask: pad_token_id, mask_token_id = 0, None
    with pytest.raises(PretrainError, match="mask"): MaskingCollator(NoMask())


def test_valid_split_fixed_masks_and_perplexity_equal_transformers(docs, wordpiece):
    "Held-out texts are masked once; the Learner's valid loss is the token mean that BertForMaskedLM computes on them as one batch."
    from transformers import BertForMaskedLM
    from bigmodel_nb.learner import Learner
    tok, _ = wordpiece
    texts = _passages(docs, 2)[:400]
    data = PretrainingData.from_texts(texts, tok, max_length=64, valid_pct=0.1, seed=3)
    assert data.splits == ["train", "valid"] and len(data) == 360 and len(data.dataset("valid")) == 40
    held = {tuple(x) for x in data.dataset("valid").ids}
    assert not held & {tuple(x) for x in data.dataset("train").ids}          # no text in both splits
    coll = data.collator()
    v = data.dataset("valid")
    rng_before = torch.get_rng_state()
    b1, b2 = coll([v[i] for i in range(8)]), coll([v[i] for i in range(8)])
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["labels"], b2["labels"])
    assert torch.equal(torch.get_rng_state(), rng_before)                     # validation draws nothing from the global generator
    assert (b1["labels"] != IGNORE_INDEX).any() and (b1["input_ids"] == tok.mask_token_id).any()
    again = PretrainingData.from_texts(texts, tok, max_length=64, valid_pct=0.1, seed=3).dataset("valid")
    assert all(np.array_equal(a, b) for a, b in zip(again.masked, v.masked))  # the seed fixes the masks
    torch.manual_seed(0)
    model = BertForMaskedLM(small_bert_config(len(tok), hidden=64, layers=1, max_length=64))
    learn = Learner(model, data, dict(lr=2e-3, batch_size=32, epochs=1, seed=0), device="cpu", progress=False)
    learn.fit()
    row = learn.history[-1]
    whole = coll([v[i] for i in range(len(v))])
    with torch.no_grad(): theirs = float(model.eval()(**whole).loss)
    assert abs(row["valid_loss"] - theirs) < 1e-4
    # the two come from float32 sums taken in different orders: they agree to about 1e-6 of the loss, so to ~1e-5 of the perplexity
    assert abs(row["valid_perplexity"] - math.exp(row["valid_loss"])) < 1e-5 * row["valid_perplexity"]
    with torch.no_grad(): logits = model(**{k: t for k, t in whole.items() if k != "labels"}).logits
    keep = whole["labels"] != IGNORE_INDEX
    assert abs(row["valid_masked_accuracy"] - float((logits.argmax(-1)[keep] == whole["labels"][keep]).double().mean())) < 1e-9
    # the summary per row and the full logits give the same metrics
    from bigmodel_nb.metrics import score
    full = score(data.task, logits, whole["labels"])
    assert abs(full["loss"] - theirs) < 1e-4 and abs(full["masked_accuracy"] - row["valid_masked_accuracy"]) < 1e-9


def test_pair_data_holds_out_whole_documents_and_scores_nsp(docs, wordpiece):
    from bigmodel_nb.learner import Learner
    tok, _ = wordpiece
    pairs = nsp_pairs(docs[:10], seed=0)
    pairs = pairs.groupby("doc").head(40).reset_index(drop=True)
    data = PretrainingData.from_pairs(pairs, tok, max_length=64, valid_pct=0.2, seed=1)
    valid_docs = set(pairs.doc.iloc[data.valid_rows])
    assert len(valid_docs) == 2 and len(data.dataset("valid")) == 80 and len(data) == 320
    assert not valid_docs & set(pairs.doc.drop(index=data.valid_rows))
    torch.manual_seed(0)
    model = BertForPreTrainingPacked(small_bert_config(len(tok), hidden=64, layers=1, max_length=64))
    learn = Learner(model, data, dict(lr=2e-3, batch_size=32, epochs=1, seed=0), device="cpu", progress=False)
    m = learn.validate()
    assert set(m) == {"valid_loss", "valid_perplexity", "valid_masked_accuracy", "valid_nsp_accuracy"}
    v = data.dataset("valid")
    whole = data.collator()([v[i] for i in range(len(v))])
    with torch.no_grad(): out = model.eval()(**{k: t for k, t in whole.items() if k != "labels"})
    nsp = whole["labels"][:, -1]
    assert abs(m["valid_nsp_accuracy"] - float((out.seq_relationship_logits.argmax(-1) == nsp).double().mean())) < 1e-9
    mlm = float(torch.nn.functional.cross_entropy(out.prediction_logits.reshape(-1, len(tok)), whole["labels"][:, :-1].reshape(-1)))
    nsp_loss = float(torch.nn.functional.cross_entropy(out.seq_relationship_logits, nsp))
    assert abs(m["valid_loss"] - (mlm + nsp_loss)) < 1e-4
    with pytest.raises(PretrainError, match="valid_pct"): PretrainingData.from_pairs(pairs, tok, valid_pct=1.5)
    with pytest.raises(PretrainError, match="'test'"): data.dataset("test")


def test_fill_mask_ranks_the_models_own_probabilities(wordpiece):
    from transformers import BertForMaskedLM
    from bigmodel_nb.pretrain import fill_mask
    tok, _ = wordpiece
    torch.manual_seed(0)
    model = BertForMaskedLM(small_bert_config(len(tok), hidden=32, layers=1, max_length=64))
    text = "my lord , the [MASK] is come and the [MASK] too ."
    out = fill_mask(model, tok, text, top_k=3)
    assert len(out) == 2 and all(len(g) == 3 for g in out)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad(): probs = model.eval()(**enc).logits[0].softmax(-1)
    where = (enc["input_ids"][0] == tok.mask_token_id).nonzero()[:, 0]
    for g, pos in zip(out, where):
        top = probs[pos].topk(3)
        assert [t for t, _ in g] == tok.convert_ids_to_tokens(top.indices.tolist())
        assert np.allclose([p for _, p in g], top.values.numpy(), atol=1e-6)
    with pytest.raises(PretrainError, match=r"\[MASK\]"): fill_mask(model, tok, "no mask here")
