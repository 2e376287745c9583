"""Adapter runs in the Learner, on a small real BERT and real movie reviews: checkpoints hold only what trains and resume
exactly (LoRA, AdaLoRA with its rank budget, IA3, prefix tuning, and LoRA by hand); the saved adapter loads back on its
base model and predicts the same; merging gives a plain model with the same outputs."""
import json
import math

import pytest
import torch

from bigmodel_nb.core import set_seed
from bigmodel_nb.events import Callback
from bigmodel_nb.learner import HParams, Learner, ModelWeights, TrainableWeights
from bigmodel_nb.models import load_classifier
from bigmodel_nb.peft import (ADAPTER_FILE, AdaLoRABudget, PeftError, adapter_kind, apply_lora, load_adapter, merged_model,
                              read_adapter_head, save_adapter, with_adapter)
from bigmodel_nb.predict import Predictor

peft = pytest.importorskip("peft")

EPOCHS, BS = 2, 16


def _total_steps(data): return EPOCHS * math.ceil(len(data.dataset("train")) / BS)


def _config(method, data):
    if method == "adalora":   # ranks are cut from step 4 on, every 2 steps, and fixed 6 steps before the end
        return dict(total_step=_total_steps(data), init_r=6, target_r=2, tinit=4, tfinal=6, deltaT=2)
    return dict(r=4) if method == "lora" else {}


def _model(tiny_bert_dir, data, method):
    set_seed(0)
    model, _ = load_classifier(tiny_bert_dir, data)
    if method == "by_hand": return apply_lora(model, r=4, alpha=8)
    return with_adapter(model, method, **_config(method, data))


class StopAt(Callback):
    def __init__(self, step): self.at = step
    def after_step(self):
        if self.learn.step == self.at: self.learn.stop()


def _learner(tiny_bert_dir, data, method, **kw):
    return Learner(_model(tiny_bert_dir, data, method), data, HParams(lr=5e-3, batch_size=BS, epochs=EPOCHS, seed=0),
                   progress=False, device="cpu", **kw)


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "prefix", "by_hand"])
def test_adapter_run_checkpoints_only_what_trains_and_resumes_exactly(tiny_bert_dir, movie_data, tmp_path, method):
    whole = _learner(tiny_bert_dir, movie_data, method)
    assert isinstance(whole.states["model"]["obj"], TrainableWeights)
    base_before = {n: p.detach().clone() for n, p in whole.model.named_parameters() if not p.requires_grad}
    whole.fit()
    # the last layer runs for the first token alone, except under prefix tuning (its layers get cached keys and values)
    assert (whole.first_token_status == "on") == (method != "prefix"), whole.first_token_status
    assert method != "prefix" or "prefix tuning" in whole.first_token_status
    cut = _learner(tiny_bert_dir, movie_data, method, out_dir=tmp_path, cbs=[StopAt(7)])
    cut.fit()
    ckpt = tmp_path / "checkpoint"
    assert cut.interrupted and cut.step == 7 and not (ckpt / "model.safetensors").exists()
    trainable = sum(p.numel() for p in cut.model.parameters() if p.requires_grad)
    assert (ckpt / TrainableWeights.FILE).stat().st_size < 4 * trainable + 8192
    entries = json.loads((ckpt / "training_state" / "state.json").read_text())["entries"]
    assert ("adalora" in entries) == (method == "adalora")
    again = _learner(tiny_bert_dir, movie_data, method, out_dir=tmp_path)
    again.fit(resume=ckpt)
    assert again.step == whole.step == _total_steps(movie_data)
    for (n, a), b in zip(again.model.named_parameters(), whole.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert [h["valid_loss"] for h in again.history] == pytest.approx([h["valid_loss"] for h in whole.history], abs=1e-6)
    for n, p in whole.model.named_parameters():            # the frozen weights did not move
        if n in base_before: assert torch.equal(p, base_before[n]), n
    if method == "adalora":
        pattern = whole.model.peft_config["default"].rank_pattern
        assert pattern and pattern == again.model.peft_config["default"].rank_pattern
        kept = sum(sum(v) for v in pattern.values())
        assert kept == 2 * len(pattern)                    # the final budget: target_r per matrix on average


def test_a_plain_checkpoint_does_not_resume_an_adapter_run(tiny_bert_dir, movie_data, tmp_path):
    set_seed(0)
    model, _ = load_classifier(tiny_bert_dir, movie_data)
    plain = Learner(model, movie_data, HParams(batch_size=BS, epochs=1), progress=False, device="cpu", out_dir=tmp_path,
                    cbs=[StopAt(2)])
    assert isinstance(plain.states["model"]["obj"], ModelWeights) and not isinstance(plain.states["model"]["obj"], TrainableWeights)
    plain.fit()
    lora = _learner(tiny_bert_dir, movie_data, "lora", out_dir=tmp_path)
    with pytest.raises(ValueError, match="'model' state"):
        lora.fit(resume=tmp_path / "checkpoint")


def test_adalora_budget_follows_progress_when_the_batch_size_changes(tiny_bert_dir, movie_data):
    class Double(Callback):
        def after_step(self):
            if self.learn.step == 3: self.learn.hp.batch_size = 2 * BS
    learn = _learner(tiny_bert_dir, movie_data, "adalora", cbs=[Double()])
    budget = next(c for c in learn.cbs if isinstance(c, AdaLoRABudget))
    learn.fit()
    cfg = learn.model.peft_config["default"]
    assert learn.step < cfg.total_step                       # fewer, larger steps than the config planned
    assert budget.last == cfg.total_step                     # ... and the schedule still reached its end
    assert cfg.rank_pattern and sum(sum(v) for v in cfg.rank_pattern.values()) == 2 * len(cfg.rank_pattern)


@pytest.fixture(scope="module")
def lora_run(tiny_bert_dir, movie_data, tmp_path_factory):
    learn = _learner(tiny_bert_dir, movie_data, "lora")
    learn.fit()
    from transformers import AutoTokenizer
    learn.tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    return learn, learn.save_model(tmp_path_factory.mktemp("adapter") / "out")


def test_saved_adapter_loads_on_its_base_and_predicts_the_same(lora_run, movie_data):
    learn, folder = lora_run
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", ADAPTER_FILE, "tokenizer.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    head = read_adapter_head(folder)
    assert head["method"] == "lora" and head["head"]["id2label"] == {"0": "negative", "1": "positive"}
    texts = list(movie_data.df.text[:20])
    mine = learn.predictor.outputs(texts)
    pred = Predictor.from_pretrained(folder, device="cpu")
    assert adapter_kind(pred.model) == "peft"
    assert torch.allclose(pred.outputs(texts), mine, atol=1e-5)
    plain, _ = load_adapter(folder, merge=True)
    assert adapter_kind(plain) is None and torch.allclose(Predictor(plain, pred.tokenizer, device="cpu").outputs(texts), mine, atol=1e-5)


def test_adapter_on_another_base_path_and_bad_folders(lora_run, tiny_bert_dir, tmp_path):
    _, folder = lora_run
    info = json.loads((folder / ADAPTER_FILE).read_text())
    moved = tmp_path / "moved"
    import shutil
    shutil.copytree(folder, moved)
    (moved / ADAPTER_FILE).write_text(json.dumps(dict(info, base_model=str(tmp_path / "gone"))))
    with pytest.raises(PeftError, match="base=") as e:
        load_adapter(moved)
    assert "gone" in str(e.value)
    model, _ = load_adapter(moved, base=str(tiny_bert_dir))                 # the base named by the caller
    assert adapter_kind(model) == "peft"
    (moved / ADAPTER_FILE).write_text("{not json")
    with pytest.raises(PeftError, match="damaged"):
        load_adapter(moved)
    (moved / ADAPTER_FILE).unlink()
    with pytest.raises(PeftError, match="PeftModel.from_pretrained"):
        load_adapter(moved)
    with pytest.raises(PeftError, match="no adapter"):
        load_adapter(tiny_bert_dir)


def test_lora_by_hand_saves_a_plain_merged_model(tiny_bert_dir, movie_data, tmp_path):
    learn = _learner(tiny_bert_dir, movie_data, "by_hand")
    learn.fit(epochs=1)
    out = learn.save_model(tmp_path / "model")
    assert adapter_kind(learn.model) == "lora"                               # the run's model keeps its LoRA layers
    reloaded, _ = load_classifier(out)
    texts = list(movie_data.df.text[:10])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    assert torch.allclose(Predictor(reloaded, tok, device="cpu").outputs(texts), learn.predictor.outputs(texts), atol=1e-5)


def test_merge_and_save_refusals(tiny_bert_dir, movie_data, tmp_path):
    prefix = _model(tiny_bert_dir, movie_data, "prefix")
    with pytest.raises(PeftError, match="cannot be\\s+merged"):
        merged_model(prefix)
    plain, _ = load_classifier(tiny_bert_dir, movie_data)
    with pytest.raises(PeftError, match="no adapter"):
        merged_model(plain)
    with pytest.raises(PeftError, match="with_adapter"):
        save_adapter(plain, tmp_path / "x")
