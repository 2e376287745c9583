"Loading classifiers of four architectures from folders, freezing, the errors, and the memory estimate against a measured peak."
import math
import re
import shutil
import time
import warnings

import pytest
import torch
from torch import nn
from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from bigmodel_nb import models as M
from bigmodel_nb.assets import model_path

SENTENCES = ["a gripping, beautifully acted film", "dull and far too long", "the plot was thin but the acting good",
             "I loved every minute of it", "boring"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
MINILM_TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]


@pytest.fixture(scope="module")
def minilm():
    return model_path("minilm")


def _trained(kind, special, unk, vocab_size):
    "A tiny BPE (byte level, like RoBERTa's) or Unigram (SentencePiece-like, like DeBERTa's) tokenizer, trained on the sentences."
    if kind == "bpe":
        tok = Tokenizer(tk_models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(tk_models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(); tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token=unk)
    tok.train_from_iterator(SENTENCES * 10, trainer)
    return tok


def _save_tiny(folder, arch, minilm, head=False):
    "A randomly initialised tiny model of `arch` and a tokenizer, saved like a pretrained checkpoint (body only unless `head`)."
    folder.mkdir(parents=True, exist_ok=True)
    if arch in ("bert", "distilbert"):
        for f in MINILM_TOKENIZER: shutil.copy(f"{minilm}/{f}", folder / f)
        extra = dict(vocab_size=30522)
        if arch == "distilbert": extra.update(dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    elif arch == "roberta":
        tok = _trained("bpe", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<unk>", 300)
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                mask_token="<mask>", cls_token="<s>", sep_token="</s>").save_pretrained(folder)
        extra = dict(vocab_size=tok.get_vocab_size(), pad_token_id=1, bos_token_id=0, eos_token_id=2, max_position_embeddings=66)
    else:
        tok = _trained("unigram", ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], "[UNK]", 100)
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                           special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                unk_token="[UNK]", mask_token="[MASK]").save_pretrained(folder)
        extra = dict(vocab_size=tok.get_vocab_size(), relative_attention=True, pos_att_type=["p2c", "c2p"],
                     position_biased_input=False, max_position_embeddings=64)
    config = AutoConfig.for_model(arch, **{**SMALL, **extra})
    torch.manual_seed(0)
    model = (AutoModelForSequenceClassification if head else AutoModel).from_config(config)
    model.save_pretrained(folder)
    return folder


ARCHS = ["bert", "distilbert", "roberta", "deberta-v2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: _save_tiny(root / arch, arch, minilm) for arch in ARCHS}


def _load(*args, **kw):
    "`load_classifier`, returning the NewHeadWarning messages too."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tok = M.load_classifier(*args, **kw)
    return model, tok, [str(w.message) for w in caught if issubclass(w.category, M.NewHeadWarning)]


def _logits(model, tok, n=3):
    batch = tok(SENTENCES[:n], padding=True, truncation=True, return_tensors="pt")
    model.eval()
    with torch.no_grad(): return model(**batch).logits


# --- loading --------------------------------------------------------------------------------------------------------

def test_minilm_through_model_path_with_labels(minilm):
    model, tok, new = _load(minilm, labels=["negative", "neutral", "positive"])
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model.config.label2id == {"negative": 0, "neutral": 1, "positive": 2} and model.config.num_labels == 3
    assert tok.is_fast and tok.model_max_length == 512
    assert _logits(model, tok).shape == (3, 3)
    assert len(new) == 1 and "classifier.weight" in new[0] and "start random" in new[0]   # the head, and only the head
    assert M.count_parameters(model)["total"] == 22_713_986 + 384 * 3 + 3 - (384 * 2 + 2)


def test_asset_name_and_data_object_labels(minilm):
    class Data:   # what a TextClassificationData carries
        label2id = {"ham": 0, "spam": 1}; id2label = {0: "ham", 1: "spam"}
    model, _, _ = _load("minilm", labels=Data())
    assert model.config.id2label == {0: "ham", 1: "spam"} and model.classifier.out_features == 2
    assert model.config._name_or_path == str(minilm)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_architectures_load(tiny, arch):
    model, tok, new = _load(tiny[arch], labels={"b": 1, "a": 0, "c": 2})
    assert model.config.model_type == arch and type(model).__name__.endswith("ForSequenceClassification")
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.config.num_labels == 3
    assert tok.is_fast and tok.model_max_length <= model.config.max_position_embeddings
    assert _logits(model, tok).shape == (3, 3)
    assert len(new) == 1 and "as expected" in new[0]                     # a new head, and no body weight missing
    head = [n for n, _ in model.named_parameters() if M._in_head(model, n)]
    assert head and all(n in new[0] for n in head)


def test_new_head_warning_names_the_callers_line(tiny):
    with pytest.warns(M.NewHeadWarning) as rec:
        M.load_classifier(tiny["bert"], labels=["a", "b"])
    assert [w.filename for w in rec] == [__file__]


def test_placeholder_max_length_falls_back_to_positions(tiny):
    raw = PreTrainedTokenizerFast.from_pretrained(tiny["roberta"])
    assert raw.model_max_length > 1e20                                   # the tokenizer says "no limit"
    model, tok, _ = _load(tiny["roberta"], labels=2)
    assert tok.model_max_length == 64                                    # 66 positions, less RoBERTa's padding offset
    long = tok(" ".join(["boring"] * 200), truncation=True, return_tensors="pt")
    assert long["input_ids"].shape[1] == 64
    with torch.no_grad(): assert model(**long).logits.shape == (1, 2)   # would index past the embeddings untruncated


def test_dropout_override(tiny):
    model, _, _ = _load(tiny["distilbert"], labels=2, dropout=0.0)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.0 for m in drops)
    assert model.config.dropout == model.config.attention_dropout == model.config.seq_classif_dropout == 0.0
    model.train()
    batch = _load(tiny["distilbert"], labels=2)[1](SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad(): assert torch.equal(model(**batch).logits, model(**batch).logits)
    with pytest.raises(ValueError, match="dropout"): M.load_classifier(tiny["bert"], dropout=1.5)


def test_device_argument(tiny):
    model, _, _ = _load(tiny["bert"], labels=2, device="cpu")
    assert next(model.parameters()).device == torch.device("cpu") and next(model.parameters()).dtype == torch.float32


def test_saved_head_is_kept_checked_and_replaceable(tiny, tmp_path):
    model, tok, _ = _load(tiny["roberta"], labels=["neg", "pos"])
    model.save_pretrained(tmp_path / "ft"); tok.save_pretrained(tmp_path / "ft")
    again, _, new = _load(tmp_path / "ft")
    assert new == [] and again.config.id2label == {0: "neg", 1: "pos"}
    assert torch.equal(again.classifier.out_proj.weight, model.classifier.out_proj.weight)
    with pytest.raises(M.LabelMismatchError, match=r"new_head=True"):
        M.load_classifier(tmp_path / "ft", labels=["a", "b", "c"])
    with pytest.raises(M.LabelMismatchError, match="order"):
        M.load_classifier(tmp_path / "ft", labels=["pos", "neg"])
    same, _, new = _load(tmp_path / "ft", labels=["neg", "pos"])
    assert new == [] and torch.equal(same.classifier.out_proj.weight, model.classifier.out_proj.weight)
    fresh, _, new = _load(tmp_path / "ft", labels=["a", "b", "c"], new_head=True)
    assert fresh.classifier.out_proj.weight.shape == (3, 32) and len(new) == 1
    swapped, _, new = _load(tmp_path / "ft", labels=["pos", "neg"], new_head=True)
    assert not torch.equal(swapped.classifier.out_proj.weight, model.classifier.out_proj.weight) and len(new) == 1
    counted, _, new = _load(tmp_path / "ft", labels=2)                     # a count that fits keeps the saved names
    assert new == [] and counted.config.id2label == {0: "neg", 1: "pos"}


def test_missing_body_weights_warn_loudly(tiny, tmp_path):
    shutil.copytree(tiny["bert"], tmp_path / "m")
    config = AutoConfig.from_pretrained(tiny["bert"])
    config.num_hidden_layers = 3
    config.save_pretrained(tmp_path / "m")                    # the config asks for a layer the weights do not have
    _, _, new = _load(tmp_path / "m", labels=2)
    assert any("pretrained body" in w and "encoder.layer.2" in w for w in new)


# --- errors ---------------------------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(M.ModelNotFoundError) as e: M.load_classifier(tmp_path / "nope")
    assert isinstance(e.value, FileNotFoundError) and "'minilm'" in str(e.value) and "config.json" in str(e.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(M.ModelNotFoundError, match=r"no config.json.*notes.txt"): M.load_classifier(tmp_path)


def test_folder_without_weights(tiny, tmp_path):
    shutil.copytree(tiny["bert"], tmp_path / "m"); (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(M.ModelNotFoundError, match="no weights"): M.load_classifier(tmp_path / "m")


def test_folder_without_tokenizer(tiny, tmp_path):
    (tmp_path / "m").mkdir()
    for f in ["config.json", "model.safetensors"]: shutil.copy(tiny["bert"] / f, tmp_path / "m" / f)
    with pytest.raises(M.ModelNotFoundError, match="no tokenizer"): _load(tmp_path / "m")


def test_typo_and_unreachable_hub_id():
    with pytest.raises(M.ModelNotFoundError, match="did you mean 'minilm'"): M.load_classifier("minlm")
    with pytest.raises(M.ModelNotFoundError, match="Hub could not provide it"):
        M.load_classifier("no-such-org/no-such-model", local_files_only=True)


def test_architecture_without_classification_head(tmp_path):
    AutoConfig.for_model("vit", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no sequence-classification head"): M.load_classifier(tmp_path)


def test_bad_labels(minilm):
    for bad, msg in [(1, "at least 2"), ("pos", "string"), (["a", "a"], "repeat"), ({"a": 0, "b": 5}, "0..1"), (2.5, "float")]:
        with pytest.raises(ValueError, match=msg): M.load_classifier(minilm, labels=bad)


# --- parameters and freezing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_table_and_freeze_body(tiny, arch):
    model, _, _ = _load(tiny[arch], labels=2)
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    table = M.parameter_table(model)
    assert table.loc["total", "parameters"] == total == M.count_parameters(model)["total"]
    assert table[table.part == "layers"]["layers"].iloc[0] == 2
    assert len(M.parameter_table(model, per_layer=True).query("part == 'layers'")) == 2
    head = sum(p.numel() for n, p in named.items() if M._in_head(model, n) or "pooler" in n)
    assert M.freeze_body(model) == head
    top = sum(p.numel() for n, p in named.items() if re.search(r"\.layers?\.1\.", n))
    assert M.freeze_body(model, train_top=1) == head + top
    with pytest.raises(ValueError, match="0 to 2"): M.freeze_body(model, train_top=3)


def test_freeze_unfreeze_counts(tiny):
    model, _, _ = _load(tiny["bert"], labels=2)
    named = dict(model.named_parameters())
    size = lambda pred: sum(p.numel() for n, p in named.items() if pred(n))
    total = size(lambda n: True)
    emb = size(lambda n: n.startswith("bert.embeddings."))
    assert M.freeze(model, "bert.embeddings") == emb and M.count_parameters(model)["frozen"] == emb
    assert M.freeze(model, "bert.embeddings.*") == 0                                    # already frozen: no change
    layer_norms = size(lambda n: ".LayerNorm." in n and not n.startswith("bert.embeddings."))
    assert M.freeze(model, "*.LayerNorm.*") == layer_norms                              # the glob crosses dots
    layer0_norms = size(lambda n: ".layer.0." in n and ".LayerNorm." in n)
    assert M.unfreeze(model, re.compile(r"layer\.0\..*LayerNorm")) == layer0_norms
    assert M.unfreeze(model) == emb + layer_norms - layer0_norms and M.count_parameters(model)["frozen"] == 0
    chosen = size(lambda n: ".attention." in n) + size(lambda n: n.startswith("classifier."))
    assert M.freeze(model, "bert.encoder.layer.[01].attention.*", "classifier") == chosen
    assert not model.classifier.weight.requires_grad and model.bert.encoder.layer[0].output.dense.weight.requires_grad
    assert M.freeze(model) == total - chosen and M.count_parameters(model)["trainable"] == 0


def test_pattern_errors_show_real_names(tiny):
    model, _, _ = _load(tiny["bert"], labels=2)
    with pytest.raises(M.PatternError) as e: M.freeze(model, "bert.embedings.*")
    assert "bert.embeddings.word_embeddings.weight" in str(e.value) and isinstance(e.value, ValueError)
    with pytest.raises(M.PatternError, match="re.compile"): M.freeze(model, 3)
    assert M.count_parameters(model)["frozen"] == 0                                     # nothing happened


# --- memory ---------------------------------------------------------------------------------------------------------

MEM = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, vocab_size=2000,
           max_position_embeddings=130)
TOLERANCE = 0.10   # the peak estimate must be within ±10% of the measured peak; activations within ±5%


@pytest.mark.parametrize("arch,precision", [("bert", "fp32"), ("bert", "bf16"), ("distilbert", "fp32"), ("roberta", "fp32")])
def test_memory_estimate_matches_measured_peak(arch, precision):
    extra = dict(dim=128, n_layers=2, n_heads=4, hidden_dim=512) if arch == "distilbert" else {}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(arch, **{**MEM, **extra}))
    for b, s in [(8, 64), (4, 128)]:
        est = M.estimate_training_memory(model, b, s, precision, device="cpu")
        got = M.measure_training_memory(model, b, s, precision)
        activations = got["after forward"] - got["before the step"]
        assert abs((est.activations + est.autocast_copies) / activations - 1) < 0.05, (b, s, est, got)
        assert abs(est.peak / got["peak"] - 1) < TOLERANCE, (b, s, est, got)
        assert got["before the step"] == pytest.approx(est.weights + est.optimizer_state, rel=0.01)


def test_memory_estimate_with_frozen_layers_and_sgd():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model("bert", **MEM))
    for setup, optimizer in [(lambda: M.freeze_body(model, train_top=1), "adamw"), (lambda: M.freeze_body(model), "adamw"),
                             (lambda: M.unfreeze(model), "sgd_momentum")]:
        setup()
        est = M.estimate_training_memory(model, 8, 64, optimizer=optimizer, device="cpu")
        got = M.measure_training_memory(model, 8, 64, optimizer=optimizer)
        assert abs(est.peak / got["peak"] - 1) < TOLERANCE, (optimizer, est, got)


def test_estimate_terms_follow_the_formula():
    config = AutoConfig.for_model("bert", **MEM)
    est = M.estimate_training_memory(config, 8, 64, device="cpu")        # from a config: nothing is allocated
    n = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())
    assert est.gradients == 4 * n and est.optimizer_state == 8 * n
    assert M.estimate_training_memory(config, 8, 64, optimizer="sgd", device="cpu").optimizer_state == 0
    b, s, h, a, i, L = 8, 64, 128, 4, 512, 2
    layers = sum(v for k, v in est.activation_parts.items() if k.startswith("layers"))
    assert layers == L * (4 * (10 * b * s * h + 2 * b * s * i + 3 * b * a * s * s) + 16 * b * s)
    doubled = M.estimate_training_memory(config, 16, 64, device="cpu")
    assert doubled.activations == 2 * est.activations and doubled.weights == est.weights
    cuda = M.estimate_training_memory(config, 8, 64, device="cuda")     # planning for a GPU needs no GPU
    assert cuda.settings["attention"] == "fused" and cuda.activations < est.activations
    assert est.peak < est.sum_of_parts
    with pytest.raises(ValueError, match="optimizer"): M.estimate_training_memory(config, 8, 64, optimizer="lion")


def test_estimate_warns_outside_the_bert_family(tiny):
    model, _, _ = _load(tiny["deberta-v2"], labels=2)
    with pytest.warns(UserWarning, match="approximation"): M.estimate_training_memory(model, 2, 16, device="cpu")


def test_measurement_leaves_the_model_unchanged(tiny):
    model, _, _ = _load(tiny["bert"], labels=2)
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = torch.random.get_rng_state()
    M.measure_training_memory(model, 2, 16)
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.equal(state, torch.random.get_rng_state())


def test_unreachable_hub_fails_fast_with_the_reason(monkeypatch):
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # nothing listens there: connection refused
    t0 = time.perf_counter()
    with pytest.raises(M.ModelNotFoundError, match=r"127\.0\.0\.1:9 cannot be reached"):
        M.load_classifier("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                        # offline mode: the download library decides, at once
    assert M._hub_unreachable("no-such-org/no-such-model") is None


# --- the last layer for the first token alone -----------------------------------------------------------------------

def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_first_token_pass_gives_the_full_logits_and_gradients(tiny, arch):
    model, tok, _ = _load(tiny[arch], labels=["neg", "pos"])
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0                      # some rows are padded
    model.eval()
    full = model(**batch).logits
    full.pow(2).sum().backward()
    expected = _grads(model); model.zero_grad(set_to_none=True)
    layer = model.base_model.encoder.layer[-1]
    with M.first_token_only(model) as on:
        assert on and "forward" in vars(layer)
        short = model(**batch).logits
        assert model.base_model(**batch).last_hidden_state.shape[1] == 1   # the last layer really ran for one position
    short.pow(2).sum().backward()
    got = _grads(model)
    assert "forward" not in vars(layer)                             # the model is whole again
    assert torch.allclose(full, short, atol=1e-5)
    assert got.keys() == expected.keys()
    assert max((got[n] - expected[n]).abs().max().item() for n in got) < 1e-5


def test_first_token_blocker_names_why(tiny):
    body = AutoModel.from_pretrained(tiny["bert"])
    assert M.first_token_blocker(body).startswith("BertModel is not a head")
    distil, _, _ = _load(tiny["distilbert"], labels=["neg", "pos"])
    assert "DistilBertForSequenceClassification is not a head" in M.first_token_blocker(distil)
    with M.first_token_only(distil) as on: assert not on
    model, _, _ = _load(tiny["bert"], labels=["neg", "pos"])
    assert M.first_token_blocker(model) is None
    with M.first_token_only(model, enabled=False) as on: assert not on


class _MeanPooler(nn.Module):
    "A pooler that averages every position: a head the first-token pass would get wrong."
    def __init__(self, dense): super().__init__(); self.dense = dense
    def forward(self, hidden): return torch.tanh(self.dense(hidden.mean(1)))


def test_first_token_self_check_refuses_a_head_that_reads_every_token(tiny):
    model, tok, _ = _load(tiny["bert"], labels=["neg", "pos"])
    model.bert.pooler = _MeanPooler(model.bert.pooler.dense)      # same class name, but the head now reads every token
    why = M.first_token_blocker(model)
    assert why is not None and "differs from the full one" in why
    batch = tok(SENTENCES[:3], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        full = model(**batch).logits
        with M.first_token_only(model) as on: inside = model(**batch).logits
    assert not on and torch.equal(full, inside)                   # refused: the block ran the full model


def test_first_token_check_leaves_the_random_stream_alone(tiny):
    model, _, _ = _load(tiny["bert"], labels=["neg", "pos"])
    torch.manual_seed(5); expected = torch.rand(3)
    torch.manual_seed(5)
    assert M.first_token_blocker(model) is None                   # the first call runs the check
    assert torch.equal(torch.rand(3), expected)


def test_load_tokenizer_takes_an_asset_name(minilm):
    by_name, by_folder = M.load_tokenizer("minilm"), M.load_tokenizer(minilm)
    assert by_name("a quiet film")["input_ids"] == by_folder("a quiet film")["input_ids"] and by_name.is_fast
