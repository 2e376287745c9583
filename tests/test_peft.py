"LoRA by hand against peft: logits at the start and after one optimizer step, trainable counts, merged weights; the adapters through peft."
import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigmodel_nb.peft import (LoRALinear, PeftError, adapter_config, apply_lora, linear_names, lora_layers, lora_state_dict,
                              merge_lora, with_adapter)
from bigmodel_nb.models import count_parameters

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny():
    "A 2-layer BERT classifier, hidden 32, without dropout, and a batch of random token ids."
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).eval()
    batch = dict(input_ids=torch.randint(5, 120, (6, 12)), attention_mask=torch.ones(6, 12, dtype=torch.long))
    batch["attention_mask"][:2, 9:] = 0
    return model, batch, torch.tensor([0, 1, 1, 0, 1, 0])


def _peft_lora(model, r=4, alpha=8, targets=("query", "value"), rslora=False):
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                                      target_modules=list(targets), modules_to_save=["classifier"],
                                                                      use_rslora=rslora))


def _copy_into_peft(ours, theirs):
    "Our A, B and head into peft's layers."
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            target = theirs.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
        for n, p in theirs.base_model.model.classifier.modules_to_save["default"].named_parameters(): p.copy_(mine[f"classifier.{n}"])


def _step(model, batch, y, opt_name):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1) if opt_name == "sgd" else torch.optim.AdamW(params, lr=1e-2)
    F.cross_entropy(model(**batch).logits, y).backward()
    opt.step()


def test_layer_starts_at_base_and_computes_the_formula():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    layer = LoRALinear(copy.deepcopy(lin), r=3, alpha=6)
    x = torch.randn(5, 20)
    assert torch.equal(layer(x), lin(x))
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert layer.lora_A.shape == (3, 20) and layer.lora_B.shape == (12, 3) and layer.lora_A.abs().max() <= 1 / math.sqrt(20)
    with torch.no_grad(): layer.lora_B.normal_()
    assert torch.allclose(layer(x), lin(x) + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T, atol=1e-5)
    assert LoRALinear(nn.Linear(4, 4), r=16, alpha=16, rslora=True).scale == 4.0
    assert LoRALinear(nn.Linear(4, 4), r=16, alpha=16).scale == 1.0


def test_dropout_acts_on_the_update_only():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    layer = LoRALinear(copy.deepcopy(lin), r=4, alpha=4, dropout=0.5).train()
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), lin(x))                        # B = 0: dropout there changes nothing
    with torch.no_grad(): layer.lora_B.normal_()
    assert not torch.allclose(layer(x), layer.eval()(x))
    assert torch.allclose(layer.eval()(x), lin(x) + x @ layer.lora_A.T @ layer.lora_B.T, atol=1e-5)


def test_merge_and_unmerge_round_trip():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24), r=4, alpha=8, rslora=True)
    with torch.no_grad(): layer.lora_B.normal_()
    x, w0 = torch.randn(7, 32), layer.base.weight.detach().clone()
    before = layer(x)
    layer.merge(); layer.merge()                                # the second merge adds nothing
    assert layer.merged and torch.allclose(layer(x), before, atol=1e-5)
    assert torch.equal(layer.base.weight, w0 + layer.delta())
    layer.unmerge(); layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base.weight, w0, atol=1e-6) and torch.allclose(layer(x), before, atol=1e-5)


def test_apply_lora_wraps_targets_and_freezes_the_rest(tiny):
    model, batch, _ = tiny
    ours = apply_lora(copy.deepcopy(model), targets=("query", "value"), r=4, alpha=8)
    assert sorted(lora_layers(ours)) == sorted(f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value"))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n or n.startswith("classifier.")} and "classifier.weight" in trainable
    assert count_parameters(ours)["trainable"] == 4 * 4 * (32 + 32) + 32 * 2 + 2
    with torch.no_grad(): assert torch.equal(ours(**batch).logits, model(**batch).logits)
    dotted = apply_lora(copy.deepcopy(model), targets=("attention.output.dense",), train_head=False)
    assert sorted(lora_layers(dotted)) == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]
    assert count_parameters(dotted)["trainable"] == 2 * 8 * 64


@pytest.mark.parametrize("bad, words", [
    (dict(r=0), ["r=0"]), (dict(r=2.5), ["r=2.5"]), (dict(r=True), ["r=True"]), (dict(alpha=0), ["alpha"]),
    (dict(dropout=1.0), ["dropout"]), (dict(targets=("qeury",)), ["qeury", "query", "key", "value", "intermediate.dense", "pooler.dense", "classifier"]),
    (dict(targets=()), ["match no nn.Linear"]),
])
def test_bad_arguments_are_named(tiny, bad, words):
    with pytest.raises(PeftError) as e: apply_lora(copy.deepcopy(tiny[0]), **bad)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_other_misuse(tiny):
    model = tiny[0]
    ours = apply_lora(copy.deepcopy(model))
    with pytest.raises(PeftError, match="already has LoRA"): apply_lora(ours)
    with pytest.raises(PeftError, match="train_head=False"): apply_lora(copy.deepcopy(model.bert))
    with pytest.raises(PeftError, match="apply_lora"): lora_state_dict(model)
    with pytest.raises(PeftError, match="apply_lora"): merge_lora(copy.deepcopy(model))
    with pytest.raises(PeftError, match="nn.Linear"): LoRALinear(nn.Conv1d(3, 3, 1))
    assert linear_names(model)[:3] == ["query", "key", "value"]


@pytest.mark.parametrize("opt_name, rslora", [("sgd", False), ("adamw", False), ("adamw", True)])
def test_same_as_peft_at_start_and_after_one_step(tiny, opt_name, rslora):
    model, batch, y = tiny
    theirs = _peft_lora(model, r=4, alpha=8, rslora=rslora)
    ours = apply_lora(copy.deepcopy(model), r=4, alpha=8, rslora=rslora)
    with torch.no_grad(): assert torch.equal(ours(**batch).logits, theirs(**batch).logits)
    assert count_parameters(ours)["trainable"] == count_parameters(theirs)["trainable"]
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(ours).values(): layer.lora_B.normal_(0, 0.1)   # both factors then get a gradient
    _copy_into_peft(ours, theirs)
    for m in (ours, theirs): _step(m, batch, y, opt_name)
    with torch.no_grad(): a, b = ours(**batch).logits, theirs(**batch).logits
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert not torch.allclose(a, model(**batch).logits, atol=1e-3)              # the step did change the model
    merged_theirs, merged_ours = theirs.merge_and_unload(), merge_lora(ours)
    ours_sd, theirs_sd = merged_ours.state_dict(), merged_theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert max((ours_sd[k] - theirs_sd[k]).abs().max().item() for k in ours_sd) < 1e-6


def test_merged_model_saves_and_reloads_as_a_plain_model(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification
    model, batch, y = tiny
    ours = apply_lora(copy.deepcopy(model), r=2, alpha=4)
    for _ in range(2): _step(ours, batch, y, "adamw")
    with torch.no_grad(): trained = ours.eval()(**batch).logits
    state = lora_state_dict(ours)
    assert all("lora_" in k or k.startswith("classifier.") for k in state) and len(state) == 4 * 2 + 2
    again = apply_lora(copy.deepcopy(model), r=2, alpha=4)
    missing, unexpected = again.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k or k.startswith("classifier.")]
    with torch.no_grad(): assert torch.equal(again(**batch).logits, trained)
    plain = merge_lora(ours)
    assert not lora_layers(plain) and all(type(m) is not LoRALinear for m in plain.modules())
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad(): assert torch.allclose(reloaded(**batch).logits, trained, atol=1e-5)


def test_with_adapter_methods(tiny):
    model, batch, _ = tiny
    with torch.no_grad(): base = model(**batch).logits
    got = {}
    for method, kw in [("lora", {}), ("adalora", dict(total_step=10)), ("prefix", dict(num_virtual_tokens=4)), ("ia3", {})]:
        m = with_adapter(copy.deepcopy(model), method, **kw).eval()
        with torch.no_grad(): got[method] = m(**batch).logits
        assert got[method].shape == (6, 2)
        head = [n for n, p in m.named_parameters() if p.requires_grad and "classifier" in n]
        assert head, method                                                      # the head trains with every method
    assert torch.equal(got["lora"], base) and torch.allclose(got["ia3"], base, atol=1e-6)
    lora = with_adapter(copy.deepcopy(model), "lora", r=4, lora_alpha=8)
    assert count_parameters(lora)["trainable"] == count_parameters(apply_lora(copy.deepcopy(model), r=4, alpha=8))["trainable"]
    ia3 = with_adapter(copy.deepcopy(model), "ia3")
    assert count_parameters(ia3)["trainable"] == 2 * (32 + 32 + 64) + 32 * 2 + 2     # key, value, the FFN output's input; head


def test_with_adapter_errors(tiny):
    model = tiny[0]
    with pytest.raises(PeftError, match="total_step"): with_adapter(copy.deepcopy(model), "adalora")
    with pytest.raises(PeftError, match="'lora', 'adalora', 'prefix', 'ia3'"): with_adapter(copy.deepcopy(model), "loraa")
    with pytest.raises(PeftError, match="rank.*LoraConfig"): adapter_config(model, "lora", rank=4)
    assert adapter_config(model, "lora", r=2).r == 2


def test_missing_peft_says_what_to_install(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r'pip install "bigmodel_nb\[peft\]"'): with_adapter(copy.deepcopy(tiny[0]))


def test_minilm_same_as_peft():
    import warnings
    from bigmodel_nb.models import load_classifier
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model, tok = load_classifier("minilm", labels=2)
    batch = tok(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    ours, theirs = apply_lora(copy.deepcopy(model).eval()), _peft_lora(model.eval(), r=8, alpha=16)
    with torch.no_grad(): assert torch.equal(ours(**batch).logits, theirs(**batch).logits)
    assert count_parameters(ours)["trainable"] == count_parameters(theirs)["trainable"] == 74_498


def test_prefix_tuning_trains_its_prefixes(tiny):
    "peft looks for `past_key_values`; BERT on transformers 5 takes `cache`: with_adapter bridges the name, and the prefixes learn."
    model, batch, y = tiny
    pm = with_adapter(copy.deepcopy(model), "prefix", num_virtual_tokens=4)
    twin = copy.deepcopy(pm)                                                     # the bridge is bound to each copy, not shared
    F.cross_entropy(pm(**batch).logits, y).backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert any("prompt_encoder" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)
    with torch.no_grad(): assert torch.equal(twin(**batch).logits, pm(**batch).logits)
    with torch.no_grad(): assert not torch.allclose(pm(**batch).logits, model(**batch).logits, atol=1e-4)
