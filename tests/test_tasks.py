"""The open engine: tasks (a regression end to end, on the command line and in Python), events that refuse misspelt
names, hyperparameters as specs (a new one reaches HParams, the command line and the dashboard), the schedule registry
checked against transformers, one inference path, the metric registry, the checkpoint registry (a checkpoint of
version 0.1 resumes exactly; a model that saves only its trainable weights resumes exactly)."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import ROOT
from bigmodel_nb.assets import load_sample
from bigmodel_nb.data import DataError, TextData, TextClassificationData
from bigmodel_nb.events import Callback
from bigmodel_nb.learner import (HPARAMS, HParam, HParams, Learner, SCHEDULES, TrainableWeights, register_hparam, schedule_factor)
from bigmodel_nb.metrics import METRICS, metrics_for, register_metric, score
from bigmodel_nb.predict import Predictor
from bigmodel_nb.tasks import ClassificationTask, RegressionTask, infer_task, task_from_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def scores(tiny_bert_dir):
    "300 real movie-review sentences with the readers' mean score (-4..+4) as a regression target, tokenized."
    from transformers import AutoTokenizer
    data = TextData.from_df(load_sample("movie_reviews").sample(300, random_state=1), label_col="score", task="regression")
    data.tokenize(AutoTokenizer.from_pretrained(tiny_bert_dir), max_length=64)
    return data


def regressor(tiny_bert_dir, data, **kw):
    from bigmodel_nb.models import load_classifier
    import warnings
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_classifier(tiny_bert_dir, data, new_head=True)
    return Learner(model, data, HParams(**{**dict(lr=3e-3, batch_size=16, epochs=3, seed=1), **kw}), progress=False, device="cpu")


# ---- tasks ------------------------------------------------------------------------------------------------------

def test_regression_data_checks_targets_by_row():
    with pytest.raises(DataError) as e:
        TextData(["a", "b", "c", "d"], [1.5, "high", None, 2.0], task="regression", valid_pct=0, test_pct=0)
    msg = str(e.value)
    assert "item 2" in msg and "'high'" in msg and "not a finite number" in msg and "missing target" in msg and "item 3" in msg
    with pytest.raises(DataError, match="targets that vary"):
        TextData(["a", "b", "c"], [2.0, 2.0, 2.0], task="regression", valid_pct=0, test_pct=0)
    with pytest.raises(ValueError, match="TextData"):
        TextClassificationData(["a", "b"], [1.0, 2.0], task="regression")


def test_auto_task_and_a_stratified_regression_split():
    df = load_sample("movie_reviews")
    data = TextData.from_df(df.sample(1000, random_state=0), label_col="score", task="auto")
    assert isinstance(data.task, RegressionTask) and "not all whole" in data.task_reason and data.task.target == "score"
    assert data.df.target.dtype == np.float32 and data.config_kwargs == dict(num_labels=1, id2label={0: "score"},
                                                                             label2id={"score": 0}, problem_type="regression")
    by_split = data.df.groupby("split").target.agg(["min", "max", "count"])
    assert (by_split.loc[["valid", "test"], "min"] < -2.5).all() and (by_split.loc[["valid", "test"], "max"] > 2.5).all()
    assert by_split.loc["test", "count"] == 100
    assert infer_task(df.label)[0] == "classification" and infer_task([1, 2, 3, 4, 5] * 10)[0] == "classification"


def test_regression_learner_learns_and_reports_its_metrics(tiny_bert_dir, scores):
    learn = regressor(tiny_bert_dir, scores)
    learn.fit()
    h = learn.history
    assert {"valid_loss", "valid_rmse", "valid_mae", "valid_pearson", "valid_spearman", "valid_r2"} <= set(h[-1])
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["valid_rmse"] == pytest.approx(math.sqrt(h[-1]["valid_loss"]), rel=1e-5)
    outputs, targets = learn.get_preds("test")
    assert outputs.shape == (len(targets), 1) and targets.dtype == torch.float32
    answers = learn.predict(["a gripping film", "a dull mess"])
    assert [set(a) for a in answers] == [{"value"}] * 2
    back = task_from_config(learn.model.config)
    assert isinstance(back, RegressionTask) and back.target == "score"


def test_regression_on_the_command_line(tiny_bert_dir, tmp_path):
    df = load_sample("movie_reviews").sample(150, random_state=4)
    df.rename(columns={"text": "review"})[["review", "score"]].to_csv(tmp_path / "scores.csv", index=False)
    env_run = lambda *a: subprocess.run(["bigmodel-nb", *map(str, a)], capture_output=True, text=True, cwd=tmp_path,
                                        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    res = env_run("finetune", "--data", "scores.csv", "--text-col", "review", "--label-col", "score", "--model", tiny_bert_dir,
                  "--new-head", "--epochs", "2", "--lr", "3e-3", "--batch-size", "16", "--max-length", "48", "--out", "run", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "task: regression (the labels are numbers, not all whole" in res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["task"] == "regression" and {"rmse", "mae", "pearson", "spearman"} <= set(result) and "accuracy" not in result
    ev = env_run("evaluate", "--model", "run", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    ev = json.loads(ev.stdout.strip().splitlines()[-1])
    assert ev["rmse"] == pytest.approx(result["rmse"], rel=1e-5) and set(ev["baselines"]) == {"mean of train", "TF-IDF + ridge"}
    assert ev["baselines"]["mean of train"]["pearson"] is None          # undefined for a constant: null, not NaN, in JSON
    table = env_run("evaluate", "--model", "run")
    assert table.returncode == 0 and "this model" in table.stdout and "TF-IDF + ridge" in table.stdout and "spearman" in table.stdout
    pred = env_run("predict", "--model", "run", "a gripping film", "a dull mess")
    lines = [json.loads(l) for l in pred.stdout.splitlines()]
    assert pred.returncode == 0 and [set(l) for l in lines] == [{"text", "value"}] * 2
    wrong = env_run("evaluate", "--model", "run", "--data", "scores.csv", "--text-col", "review", "--label-col", "review")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr


# ---- events ------------------------------------------------------------------------------------------------------

def test_a_misspelt_event_is_an_error(make_classifier):
    with pytest.raises(TypeError, match="'after_epoch'"):
        class Typo(Callback):
            def after_epcoh(self): pass
    class NotACallback:                      # duck-typed: checked when added
        def before_fitt(self): pass
    with pytest.raises(TypeError, match="'before_fit'"):
        make_classifier().add_cb(NotACallback())


# ---- hyperparameters as specs ---------------------------------------------------------------------------------------

@pytest.fixture
def make_classifier(tiny_bert_dir, movie_data):
    def make(hp=None, **kw):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
        hp = hp if isinstance(hp, HParams) else HParams(**{**dict(lr=1e-3, batch_size=16, epochs=1, seed=3), **(hp or {})})
        return Learner(model, movie_data, hp, progress=False, device="cpu", **kw)
    return make


def test_a_new_hyperparameter_is_one_spec(make_classifier):
    from bigmodel_nb import cli
    from bigmodel_nb.dashboard import Dashboard
    seen = []
    spec = register_hparam(HParam("label_smoothing", 0.0, lambda n, v: float(v), "a made-up live hyperparameter for this test",
                                  live=True, apply=lambda learn, v: seen.append((learn.step, v)), cli=dict(type=float),
                                  widget=("float", 0.0, 0.3, 0.05)))
    try:
        hp = HParams(label_smoothing=0.1)
        assert hp.label_smoothing == 0.1 and "label_smoothing" in hp.to_dict()["values"]
        assert "--label-smoothing" in cli.build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
        class At3(Callback):
            def after_step(self):
                if self.learn.step == 3: self.learn.hp.set(label_smoothing=0.2)
        learn = make_classifier(hp, cbs=[At3()])
        assert "label_smoothing" in Dashboard(learn).controls
        learn.fit()
        assert seen[0] == (0, 0.1) and (3, 0.2) in seen and learn.hp.log[-1].name == "label_smoothing"
    finally:
        del HPARAMS["label_smoothing"]


def test_dropout_is_live_and_replays(make_classifier):
    class Raise(Callback):
        def after_step(self):
            if self.learn.step == 2: self.learn.hp.set(dropout=0.0, source="dashboard")
    class Losses(Callback):
        def before_fit(self): self.losses = []
        def after_step(self): self.losses.append(self.learn.loss.item())
    first = make_classifier(cbs=[Raise(), Losses()])
    first.fit()
    assert [(c.step, c.name, c.new) for c in first.hp.log] == [(2, "dropout", 0.0)]
    assert all(m.p == 0.0 for m in first.model.modules() if isinstance(m, torch.nn.Dropout))
    again = make_classifier(HParams.replay(first.hp), cbs=[Losses()])
    again.fit()
    assert again.cbs[0].losses == first.cbs[1].losses


def test_cosine_with_restarts_matches_transformers_at_a_fixed_batch_size(make_classifier, movie_data):
    from transformers import get_cosine_with_hard_restarts_schedule_with_warmup
    class LRs(Callback):
        def before_fit(self): self.lrs = []
        def after_step(self): self.lrs.append(self.learn.lr_now)
    n = len(movie_data.dataset("train"))                    # 240: 15 steps of 16 per epoch, 2 epochs
    learn = make_classifier(dict(schedule="cosine_restarts", warmup=0.1, epochs=2, lr=1e-3), cbs=[LRs()])
    learn.fit()
    steps = 2 * n // 16
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    hf = get_cosine_with_hard_restarts_schedule_with_warmup(opt, num_warmup_steps=round(0.1 * steps), num_training_steps=steps, num_cycles=3)
    theirs = [1e-3 * hf.lr_lambdas[0](k + 1) for k in range(steps)]        # the loop counts a step's own examples as seen
    assert learn.cbs[0].lrs == pytest.approx(theirs, abs=1e-12)
    assert "cosine_restarts" in SCHEDULES and schedule_factor("cosine_restarts", 1.0, 0.1) == 0.0


# ---- one inference path and the metric registry ------------------------------------------------------------------

def test_one_inference_path(make_classifier, movie_data):
    learn = make_classifier()
    learn.fit()
    outputs, _ = learn.get_preds("test")
    texts = movie_data.df.text[movie_data.split_index("test")].tolist()
    pred = Predictor(learn.model, movie_data.tokenizer, max_length=movie_data.max_length, batch_size=7)
    assert torch.allclose(pred.outputs(texts), outputs, atol=1e-5)
    ours, theirs = learn.predict(texts[:3]), pred(texts[:3])
    assert [a["label"] for a in ours] == [a["label"] for a in theirs]
    assert all(a["probs"] == pytest.approx(b["probs"], abs=1e-5) for a, b in zip(ours, theirs))
    class OOMOnce:
        "A model wrapper that runs out of memory on batches of more than 4 rows."
        def __init__(self, m): self.m = m
        def __call__(self, **b):
            if len(b["input_ids"]) > 4: raise torch.OutOfMemoryError("simulated")
            return self.m(**b)
        training = property(lambda self: self.m.training)
        def parameters(self): return self.m.parameters()
        def eval(self): self.m.eval(); return self
        def train(self, mode=True): self.m.train(mode); return self
    small = Predictor(OOMOnce(learn.model), movie_data.tokenizer, task=movie_data.task, max_length=movie_data.max_length, batch_size=16)
    with pytest.warns(UserWarning, match="out of memory while predicting"):
        again = small.outputs(texts)
    assert small.batch_cap == 4 and torch.allclose(again, outputs, atol=1e-5)


def test_a_new_metric_is_one_entry(make_classifier):
    from bigmodel_nb.metrics import EvalReport, compare
    @register_metric("recall_macro", "classification", True)
    def recall_macro(y, probs):
        "Recall of each class, averaged."
        pred = probs.argmax(1)
        return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))
    try:
        learn = make_classifier()
        learn.fit()
        assert "valid_recall_macro" in learn.history[-1]
        outputs, targets = learn.get_preds("valid")
        rep = EvalReport.from_logits(targets, outputs, learn.data.classes)
        assert rep.summary()["recall_macro"] == pytest.approx(learn.history[-1]["valid_recall_macro"])
        assert "recall_macro" in compare([rep]).columns
    finally:
        del METRICS[("classification", "recall_macro")]
    assert "recall_macro" not in [m.name for m in metrics_for("classification")]


# ---- the checkpoint registry ------------------------------------------------------------------------------------------

def _as_format_1(checkpoint:Path):
    "Rewrite a checkpoint in the layout version 0.1.0 wrote: flat progress keys, labels, Python's and NumPy's random states in state.json, torch's in rng.pt, no model card."
    st = checkpoint / "training_state"
    state = json.loads((st / "state.json").read_text())
    e = state["entries"]
    rng = torch.load(st / e["rng"]["file"], weights_only=True)
    old = dict(format=1, **e["progress"]["json"], hparams=e["hparams"]["json"], sampler=e["sampler"]["json"],
               rng=dict(python=rng["python"], numpy=rng["numpy"]), labels=state["task"]["label2id"])
    torch.save(dict(torch=rng["torch"], cuda=rng["cuda"]), st / "rng.pt")
    (st / "state.json").write_text(json.dumps(old))
    for name in ("metadata.json", "README.md"): (checkpoint / name).unlink()
    return old


def test_a_checkpoint_in_the_layout_of_version_0_1_resumes_exactly(tmp_path):
    sys.path.insert(0, str(FIXTURES))
    from checkpoint_recipe import build, recipe_hparams
    class StopAt(Callback):
        def after_step(self):
            if self.learn.step == 5: self.learn.stop()
    def learner(**kw):
        model, data, tok = build(tmp_path / "tok")
        return Learner(model, data, HParams(**recipe_hparams()), tokenizer=tok, progress=False, device="cpu", **kw)
    learner(out_dir=tmp_path / "cut", cbs=[StopAt()]).fit()
    old = _as_format_1(tmp_path / "cut" / "checkpoint")
    written_by_0_1 = json.loads((FIXTURES / "checkpoint_0_1" / "training_state" / "state.json").read_text())   # kept as 0.1.0 wrote it
    assert set(old) == set(written_by_0_1) and set(old["rng"]) == set(written_by_0_1["rng"]) and old["step"] == 5
    resumed = learner(out_dir=tmp_path / "resumed"); resumed.fit(resume=tmp_path / "cut" / "checkpoint")
    whole = learner(); whole.fit()
    assert resumed.step == whole.step and resumed.samples_seen == whole.samples_seen
    assert torch.allclose(resumed.model.classifier.weight, whole.model.classifier.weight, atol=1e-6)
    assert resumed.train_loss == pytest.approx(whole.train_loss, abs=1e-6)
    assert [h["valid_accuracy"] for h in resumed.history] == [h["valid_accuracy"] for h in whole.history]
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "training_state" / "state.json").read_text())
    assert state["format"] == 2 and {"model", "progress", "hparams", "rng", "optimizer", "sampler"} <= set(state["entries"])


def test_only_the_trainable_weights_are_saved_and_resume_exactly(make_classifier, tmp_path):
    from bigmodel_nb.models import freeze_body
    def frozen(**kw):
        learn = make_classifier(dict(epochs=2), **kw)
        freeze_body(learn.model)
        learn.register_state("model", TrainableWeights(learn))
        return learn
    class StopAt(Callback):
        def after_step(self):
            if self.learn.step == 7: self.learn.stop()
    whole = frozen(); whole.fit()
    cut = frozen(out_dir=tmp_path, cbs=[StopAt()]); cut.fit()
    assert cut.interrupted and not (tmp_path / "checkpoint" / "model.safetensors").exists()
    saved = (tmp_path / "checkpoint" / TrainableWeights.FILE).stat().st_size
    trainable = sum(p.numel() for p in whole.model.parameters() if p.requires_grad)
    assert saved < 4 * trainable + 4096
    again = frozen(out_dir=tmp_path); again.fit(resume=tmp_path / "checkpoint")
    for (n, a), b in zip(again.model.named_parameters(), whole.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    full = make_classifier(out_dir=tmp_path / "full")
    with pytest.raises(ValueError, match="trainable"):                 # named, as every state that cannot be restored
        full.load_checkpoint(tmp_path / "checkpoint")


def test_a_missing_state_is_refused(make_classifier, tmp_path):
    class StopAt(Callback):
        def after_step(self):
            if self.learn.step == 3: self.learn.stop()
    make_classifier(out_dir=tmp_path, cbs=[StopAt()]).fit()
    (tmp_path / "checkpoint" / "training_state" / "optimizer.pt").unlink()
    state = json.loads((tmp_path / "checkpoint" / "training_state" / "state.json").read_text())
    del state["entries"]["optimizer"]
    (tmp_path / "checkpoint" / "training_state" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="holds no optimizer"):
        make_classifier().fit(resume=tmp_path / "checkpoint")


# ---- the house --------------------------------------------------------------------------------------------------------

def _imports(path:Path) -> list:
    "Every `from .x import ...`/`from bigmodel_nb.x import ...` in a module, at any depth: (module, names)."
    import ast
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1: out.append((mod, [a.name for a in node.names]))
            elif mod.startswith("bigmodel_nb."): out.append((mod.split(".", 1)[1], [a.name for a in node.names]))
    return out


def test_no_import_cycles_and_no_private_names_across_modules():
    pkg = ROOT / "bigmodel_nb"
    mods = {p.stem: p for p in pkg.glob("*.py") if p.stem not in ("__init__", "_modidx")}
    graph = {m: {dep for dep, _ in _imports(p) if dep in mods} for m, p in mods.items()}
    private = [(m, dep, n) for m, p in mods.items() for dep, names in _imports(p) for n in names if n.startswith("_")]
    assert not private, private
    state = {}
    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", f"import cycle: {' -> '.join(path + [d])}"
            if d not in state: visit(d, path + [d])
        state[m] = "done"
    for m in graph:
        if m not in state: visit(m, [m])
    assert graph["tasks"] == {"core"} and graph["events"] == set() and graph["metrics"] == {"core"}
    assert "learner" not in graph["callbacks"] and "learner" not in graph["evaluation"]
