"""Nothing lost, nothing silently wrong: an --out folder is one run's (a finished run is never overwritten, two runs
never share one), SIGTERM and SIGHUP stop like Ctrl-C with a checkpoint, leftovers of killed saves are cleaned up, a
full disk is named, a damaged or incomplete checkpoint is refused naming what is wrong, a hard interrupt mid-step
resumes exactly, and the command line names its own flags in its advice."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from bigmodel_nb import cli
from bigmodel_nb.assets import load_sample
from bigmodel_nb.learner import Callback, HParams, Learner, checkpoint_progress, remove_stale_saves

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FAST = ["--lr", "1e-3", "--batch-size", "16", "--max-length", "32"]


def run_main(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening-data")
    df = load_sample("movie_reviews").sample(160, random_state=3)
    df[["text", "label"]].to_csv(folder / "reviews.csv", index=False)
    return folder / "reviews.csv"


@pytest.fixture
def make(tiny_bert_dir, movie_data):
    def make(hp=None, **kw):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
        hp = HParams(**{**dict(lr=1e-3, batch_size=16, epochs=2, seed=3), **(hp or {})})
        return Learner(model, movie_data, hp, progress=False, device="cpu", **kw)
    return make


def finished_run(capsys, csv, tiny_bert_dir, out):
    code, _, err = run_main(capsys, "finetune", "--data", csv, "--model", tiny_bert_dir, "--epochs", "1", *FAST, "--out", out, "--no-progress")
    assert code == 0, err[-2000:]
    return out


def start(*args, cwd=None):
    return subprocess.Popen(["bigmodel-nb", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd)


def wait_for(path:Path, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


# ---- data loss ---------------------------------------------------------------------------------------------------

def test_resume_into_a_folder_that_holds_a_finished_run_is_refused(capsys, csv, tiny_bert_dir, tmp_path):
    done = finished_run(capsys, csv, tiny_bert_dir, tmp_path / "done")
    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    part = tmp_path / "stopped"                             # a stopped run, resumed into the finished run's folder
    proc = start("finetune", "--data", csv, "--model", tiny_bert_dir, "--epochs", "50", *FAST, "--out", part, "--save-every", "2", "--no-progress")
    wait_for(part / "checkpoint", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    code, _, err = run_main(capsys, "finetune", "--resume", part / "checkpoint", "--out", done)
    assert code == 2 and "already holds files" in err and str(done) in err
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == before          # nothing of the finished run was touched


def test_two_runs_on_one_out_folder_and_sigterm(csv, tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    first = start("finetune", "--data", csv, "--model", tiny_bert_dir, "--epochs", "50", *FAST, "--out", out, "--save-every", "2", "--no-progress")
    wait_for(out / cli.RUN_FILE, first)
    second = subprocess.run(["bigmodel-nb", "finetune", "--data", str(csv), "--model", str(tiny_bert_dir), "--out", str(out)],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert second.returncode == 2 and f"process {first.pid}" in second.stderr and "Traceback" not in second.stderr
    wait_for(out / "checkpoint", first)                     # --save-every 2: a checkpoint long before the first epoch ends
    assert checkpoint_progress(out / "checkpoint")["step"] % 2 == 0
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 143 and stdout == "" and "SIGTERM" in stderr and f"--resume {out / 'checkpoint'}" in stderr
    assert not (out / cli.LOCK_FILE).exists() and cli.read_run(out)["status"] == "interrupted"
    third = subprocess.run(["bigmodel-nb", "finetune", "--resume", str(out / "checkpoint"), "--epochs", "1", "--no-progress"],
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert third.returncode == 2 and "--epochs 1 (the run used 50)" in third.stderr     # a resumed run keeps its settings


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_stops_with_a_checkpoint(csv, tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    proc = start("finetune", "--data", csv, "--model", tiny_bert_dir, "--epochs", "50", *FAST, "--out", out, "--save-every", "3", "--no-progress")
    wait_for(out / "checkpoint", proc)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 129 and "SIGHUP" in err and checkpoint_progress(out / "checkpoint")["step"] >= 3


def test_a_lock_of_a_dead_run_is_taken_over(tmp_path):
    out = tmp_path / "run"; out.mkdir()
    (out / cli.LOCK_FILE).write_text(json.dumps(dict(pid=2**22 + 4321, started="yesterday", command="bigmodel-nb finetune")))
    lock = cli.claim_out(out, "this run")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(cli.UsageError, match=f"process {os.getpid()}"):
        cli.claim_out(out, "a second run")


def test_leftovers_of_killed_saves_are_removed_and_said(make, tmp_path):
    learn = make(out_dir=tmp_path)
    learn.save_checkpoint()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead, alive = tmp_path / ".checkpoint.tmp-4194999", tmp_path / f".checkpoint.tmp-{sleeper.pid}"
        old = tmp_path / ".checkpoint.old-4194998"
        for d in (dead, alive, old): (d / "training_state").mkdir(parents=True); (d / "weights.bin").write_bytes(b"x" * 1000)
        with pytest.warns(UserWarning, match=r"\.checkpoint\.tmp-4194999"):
            learn.save_checkpoint()
        assert not dead.exists() and not old.exists() and alive.exists()
    finally: sleeper.kill()
    # an .old copy that is the only complete checkpoint left stays: find_checkpoint resumes from it
    only = tmp_path / "b" / ".checkpoint.old-4194997"
    (only / "training_state").mkdir(parents=True); (only / "training_state" / "state.json").write_text("{}")
    assert remove_stale_saves(tmp_path / "b" / "checkpoint") == [] and only.exists()


def test_a_full_disk_during_a_save_names_what_was_written(make, tmp_path, monkeypatch):
    learn = make(out_dir=tmp_path)
    learn.fit(epochs=1)
    good = checkpoint_progress(tmp_path / "checkpoint")["step"]
    def full(*a, **k): raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as e:
        learn.save_checkpoint()
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "disk is full" in msg and "'rng' state" in msg and "previous checkpoint there is intact" in msg
    assert checkpoint_progress(tmp_path / "checkpoint")["step"] == good and not list(tmp_path.glob(".checkpoint.tmp-*"))


# ---- a checkpoint that cannot be trusted is refused, by name ---------------------------------------------------------

@pytest.fixture
def stopped(make, tmp_path):
    class StopAt(Callback):
        def after_step(self):
            if self.learn.step == 4: self.learn.stop()
    make(out_dir=tmp_path, cbs=[StopAt()]).fit()
    return tmp_path / "checkpoint"


@pytest.mark.parametrize("damage,expected", [
    ("truncate optimizer.pt", "optimizer.pt"),
    ("delete rng.pt", "rng.pt is missing"),
    ("garbage state.json", "state.json is damaged"),
    ("negative step", "step is -3"),
    ("cursor past the end", "cursor"),
    ("truncate model.safetensors", "'model' state"),
])
def test_a_damaged_checkpoint_is_refused_by_name(make, stopped, damage, expected):
    st = stopped / "training_state"
    if damage == "truncate optimizer.pt": (st / "optimizer.pt").write_bytes((st / "optimizer.pt").read_bytes()[:100])
    elif damage == "delete rng.pt": (st / "rng.pt").unlink()
    elif damage == "garbage state.json": (st / "state.json").write_text('{"format": 2, "entr')
    elif damage == "truncate model.safetensors": (stopped / "model.safetensors").write_bytes((stopped / "model.safetensors").read_bytes()[:500])
    else:
        state = json.loads((st / "state.json").read_text())
        if damage == "negative step": state["entries"]["progress"]["json"]["step"] = -3
        else: state["entries"]["sampler"]["json"]["cursor"] = 10**6
        (st / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=expected):
        make().fit(resume=stopped)


def test_a_hard_interrupt_mid_step_resumes_exactly(make, tmp_path):
    "A second Ctrl-C inside a step (here in the middle of a two-batch accumulation, with dropout on): resuming gives the unbroken run."
    class Losses(Callback):
        def before_fit(self): self.losses = getattr(self, "losses", [])
        def after_step(self): self.losses.append(self.learn.loss.item())
    class HardStop(Callback):
        def __init__(self): self.fired = False
        def after_backward(self):
            if self.learn.step == 5 and self.learn._micro == 0 and not self.fired:
                self.fired = True; self.learn.stop(); raise KeyboardInterrupt
    whole = Losses(); make(dict(grad_accum=2), cbs=[whole]).fit()
    first = Losses(); a = make(dict(grad_accum=2), cbs=[first, HardStop()], out_dir=tmp_path); a.fit()
    assert a.interrupted and a.step == 5 and first.losses == whole.losses[:5]
    rest = Losses(); b = make(dict(grad_accum=2), cbs=[rest], out_dir=tmp_path); b.fit(resume=tmp_path / "checkpoint")
    assert len(rest.losses) == len(whole.losses) - 5 and rest.losses == pytest.approx(whole.losses[5:], abs=1e-6)


# ---- the command line says what it means ------------------------------------------------------------------------------

def test_a_missing_or_damaged_run_json_is_never_replaced_by_the_defaults(capsys, csv, tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    proc = start("finetune", "--data", csv, "--model", tiny_bert_dir, "--epochs", "50", *FAST, "--out", out, "--save-every", "2", "--no-progress")
    wait_for(out / "checkpoint", proc)
    proc.send_signal(signal.SIGINT); proc.communicate(timeout=120)
    (out / cli.RUN_FILE).write_text("[1, 2")
    code, _, err = run_main(capsys, "finetune", "--resume", out / "checkpoint")
    assert code == 2 and "run.json is damaged" in err
    (out / cli.RUN_FILE).unlink()
    code, _, err = run_main(capsys, "finetune", "--resume", out / "checkpoint")
    assert code == 2 and "pass --data" in err


@pytest.mark.parametrize("argv,expected", [
    (["finetune", "--lr", "-1e-4"], "must be a positive number, got -0.0001"),
    (["finetune", "--seed", "-5"], "is not a seed"),
    (["finetune", "--valid-pct", "1.5"], "is not a fraction"),
    (["finetune", "--data", "{tmp}/notes.txt"], "pass --sep"),
    (["finetune", "--data", "{tmp}/tiny.csv"], "--valid-pct 0 / --test-pct 0"),
    (["predict", "--model", "{model}", "--max-length", "100000", "a text"], "is more than the model takes"),
])
def test_cli_advice_names_cli_flags(capsys, tmp_path, tiny_bert_dir, argv, expected, monkeypatch):
    monkeypatch.chdir(tmp_path)                                # a default --out folder would go here
    (tmp_path / "notes.txt").write_text("a,b\n")
    (tmp_path / "tiny.csv").write_text("text,label\n" + "".join(f"text {i},{'a' if i < 5 else 'b'}\n" for i in range(7)))
    code, out, err = run_main(capsys, *[a.format(tmp=tmp_path, model=tiny_bert_dir) for a in argv])
    assert code == 2 and expected in err and "Traceback" not in err and not out, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())   # a refused run leaves no empty folder


def test_evaluate_on_other_data_scores_every_row(capsys, csv, tiny_bert_dir, tmp_path):
    run = finished_run(capsys, csv, tiny_bert_dir, tmp_path / "run")
    other = tmp_path / "other.csv"
    rows = load_sample("movie_reviews").sample(50, random_state=9)[["text", "label"]]
    rows = __import__("pandas").concat([rows, rows.iloc[:2]])   # a file only scored may repeat texts: kept, and said
    rows.to_csv(other, index=False)
    code, out, err = run_main(capsys, "evaluate", "--model", run, "--data", other, "--json")
    assert code == 0 and json.loads(out)["n_test"] == 52 and json.loads(out)["split"] == "all"
    assert "kept 2 rows (duplicate text)" in err and "every row is scored" not in err     # --json: only the data report on stderr
    code, out, err = run_main(capsys, "evaluate", "--model", run, "--data", other)
    assert code == 0 and "every row is scored" in err
    code, out, err = run_main(capsys, "evaluate", "--model", run, "--json")
    assert code == 0 and json.loads(out)["split"] == "test" and json.loads(out)["n_test"] < 50


@pytest.mark.parametrize("damage, expected", [
    ("garbage", "model.safetensors cannot be read"),
    ("truncated", "model.safetensors cannot be read"),
    ("labels", "config.json names 3 labels"),
])
def test_a_damaged_model_folder_is_named(capsys, csv, tiny_bert_dir, tmp_path, damage, expected):
    run = finished_run(capsys, csv, tiny_bert_dir, tmp_path / "run")
    weights, config = run / "model.safetensors", run / "config.json"
    if damage == "garbage": weights.write_text("this is not a model\n")
    elif damage == "truncated": weights.write_bytes(weights.read_bytes()[:-1000])
    else:
        cfg = json.loads(config.read_text())
        cfg["id2label"] = {"0": "a", "1": "b", "2": "c"}; cfg["label2id"] = {"a": 0, "b": 1, "c": 2}
        config.write_text(json.dumps(cfg))
    for argv in (["predict", "--model", run, "a fine film"], ["evaluate", "--model", run]):
        code, out, err = run_main(capsys, *argv)
        assert code == 2 and expected in err and "Traceback" not in err and out == "", (argv, err[-1500:])
    if damage == "labels":
        assert "--new-head" in err and "new_head=True" not in err


# ---- every bad file of the issue, through the command line: exit 2, the file named, no traceback ----------------------

@pytest.fixture(scope="module")
def stopped_cli_run(csv, tiny_bert_dir, tmp_path_factory):
    "A `finetune` run stopped by Ctrl-C after its first checkpoints (the folder is copied before each test damages it)."
    out = tmp_path_factory.mktemp("stopped-cli") / "run"
    proc = start("finetune", "--data", csv, "--model", tiny_bert_dir, "--epochs", "50", *FAST, "--out", out, "--save-every", "2", "--no-progress")
    wait_for(out / "checkpoint", proc)
    proc.send_signal(signal.SIGINT); proc.communicate(timeout=120)
    assert proc.returncode == 130 and cli.read_run(out)["status"] == "interrupted"
    return out


def _damage_checkpoint(run:Path, what:str):
    st = run / "checkpoint" / "training_state"
    state = json.loads((st / "state.json").read_text())
    if what == "optimizer.pt": (st / "optimizer.pt").write_bytes((st / "optimizer.pt").read_bytes()[:200])
    elif what == "rng.pt": (st / "rng.pt").write_bytes(b"not a tensor file")
    elif what == "model.safetensors": (run / "checkpoint" / "model.safetensors").write_bytes(b"\x00" * 64)
    elif what == "state.json": del state["entries"]["progress"]
    elif what == "step": state["entries"]["progress"]["json"]["step"] = "three"
    if what in ("state.json", "step"): (st / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("what, expected", [
    ("optimizer.pt", "optimizer.pt"), ("rng.pt", "rng.pt"), ("model.safetensors", "model.safetensors"),
    ("state.json", "'progress'"), ("step", "step"),
])
def test_a_damaged_checkpoint_on_the_command_line(capsys, stopped_cli_run, tmp_path, what, expected):
    import shutil
    run = tmp_path / "run"; shutil.copytree(stopped_cli_run, run)
    _damage_checkpoint(run, what)
    code, out, err = run_main(capsys, "finetune", "--resume", run / "checkpoint", "--no-progress")
    assert code == 2 and expected in err and "Traceback" not in err and out == "", err[-2000:]
    assert cli.read_run(run)["status"] == "interrupted"                 # the refused resume changed nothing


def test_bad_data_files_on_the_command_line(capsys, csv, tiny_bert_dir, stopped_cli_run, tmp_path, monkeypatch):
    import gzip
    monkeypatch.chdir(tmp_path)
    run = finished_run(capsys, csv, tiny_bert_dir, tmp_path / "run")
    (tmp_path / "pasted.csv").write_text("text,label,text\na gem,pos,x\na dud,neg,y\n")
    packed = gzip.compress(csv.read_bytes())
    (tmp_path / "cut.csv.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "long.csv").write_text("text,label\n" + "".join(f"review {i},{'ab'[i % 2]}\n" for i in range(20)) + '"' + "x" * 200_000 + "\n")
    cases = [
        (["predict", "--model", run, "--file", tmp_path / "pasted.csv"], "'text' (columns 1 and 3)"),
        (["finetune", "--data", tmp_path / "pasted.csv", "--model", tiny_bert_dir], "'text' (columns 1 and 3)"),
        (["finetune", "--data", tmp_path / "cut.csv.gz", "--model", tiny_bert_dir], "cut.csv.gz"),
        (["evaluate", "--model", run, "--data", tmp_path / "cut.csv.gz"], "truncated"),
        (["finetune", "--data", tmp_path / "long.csv", "--model", tiny_bert_dir], "long.csv"),
        (["predict", "--model", run, ""], "argument 1"),
        (["evaluate", "--model", stopped_cli_run], "stopped before it finished"),
        (["predict", "--model", stopped_cli_run, "a text"], f"--resume {stopped_cli_run / 'checkpoint'}"),
    ]
    for argv, expected in cases:
        code, out, err = run_main(capsys, *argv)
        assert code == 2 and expected in err and "Traceback" not in err and out == "", (argv, err[-2000:])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_run_json_that_is_not_an_object(capsys, stopped_cli_run, tmp_path):
    import shutil
    run = tmp_path / "run"; shutil.copytree(stopped_cli_run, run)
    (run / cli.RUN_FILE).write_text("[1, 2, 3]")
    for argv in (["evaluate", "--model", run], ["finetune", "--resume", run / "checkpoint"]):
        code, out, err = run_main(capsys, *argv)
        assert code == 2 and "run.json is not a run record" in err and "Traceback" not in err, (argv, err[-2000:])


def test_a_corrupt_archive_in_the_downloads_folder_on_the_command_line(capsys, tmp_cache):
    from bigmodel_nb import assets
    bad = assets.downloads_dir() / "vaderSentiment-3.3.2.tar.gz"
    bad.parent.mkdir(parents=True, exist_ok=True); bad.write_bytes(b"\x1f\x8b\x08" + bytes(3000))
    code, out, err = run_main(capsys, "assets", "fetch", "movie_reviews")
    assert code == 2 and str(bad) in err and "delete it" in err and "Traceback" not in err, err[-2000:]
