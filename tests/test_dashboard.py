"""The dashboard driven programmatically during real training (a small real BERT on real movie reviews):
controls change the live hyperparameters at the right step, buttons pause, resume, stop, save and evaluate,
and an exception in the training thread appears in the panel, in both update modes (thread and ticker).
Also: a Hugging Face Trainer steered the same way, and a run against ipywidgets 7 (Colab's)."""
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from bigmodel_nb.dashboard import Dashboard, batch_size_options
from bigmodel_nb.learner import Callback, HParams, Learner, schedule_factor


class Record(Callback):
    order = 100
    def __init__(self): self.steps, self.batches = [], []
    def before_batch(self): self.batches.append((self.learn.batches, self.learn.batch["input_ids"].shape[0], self.learn.hp.batch_size))
    def after_step(self):
        l = self.learn
        self.steps.append(dict(step=l.step, opt_lr=l.opt.param_groups[0]["lr"].item(), hp_lr=l.hp.lr, progress=l.progress))


@pytest.fixture(params=["thread", "ticker"])
def mode(request): return request.param


@pytest.fixture
def dash_for(tiny_bert_dir, movie_data, tmp_path, mode):
    made = []
    def make(epochs=2, batch_size=16, slow=0.0, adapter=None, **kw):
        kw.setdefault("mode", mode)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        if adapter:
            from bigmodel_nb.peft import with_adapter
            model = with_adapter(model, adapter)
        rec = Record()
        cbs = [rec]
        if slow:
            class Slow(Callback):
                def after_step(self): time.sleep(slow)
            cbs.append(Slow())
        learn = Learner(model, movie_data, HParams(lr=1e-3, batch_size=batch_size, epochs=epochs), device="cpu",
                        progress=False, out_dir=tmp_path / "run", cbs=cbs)
        d = Dashboard(learn, **kw)
        made.append(d)
        return d, learn, rec
    yield make
    for d in made: d.close()


def wait_for(cond, timeout=60):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout: raise AssertionError("timed out")
        time.sleep(0.01)


def test_lr_control_applies_at_the_next_step_as_a_scale(dash_for):
    d, learn, rec = dash_for(slow=0.02)
    d.start()
    wait_for(lambda: learn.step >= 3)
    d.lr.value = 4e-3
    d.thread.join(120)
    changed = [s for s in rec.steps if s["hp_lr"] == 4e-3]
    first = changed[0]
    before = rec.steps[rec.steps.index(first) - 1]
    assert before["hp_lr"] == 1e-3 and before["opt_lr"] == pytest.approx(1e-3 * schedule_factor("linear", before["progress"], 0.06), rel=1e-6)
    assert first["opt_lr"] == pytest.approx(4e-3 * schedule_factor("linear", first["progress"], 0.06), rel=1e-6)
    assert [(c.name, c.new, c.source) for c in learn.hp.log] == [("lr", 4e-3, "dashboard")]
    assert learn.hp.log[0].step == first["step"] - 1              # logged at the step it first affects


def test_batch_size_control_applies_at_the_next_batch(dash_for):
    d, learn, rec = dash_for(slow=0.02)
    d.start()
    wait_for(lambda: learn.step >= 2)
    d.bs.value = 8
    d.thread.join(120)
    change = learn.hp.log[0]
    assert (change.name, change.old, change.new) == ("batch_size", 16, 8)
    rows = [r for _, r, _ in rec.batches]                  # rows of batch 0, 1, 2, ... in the order they were drawn
    assert rows[change.batch - 1] == 16 and rows[change.batch] == 8      # the very next batch has the new size
    assert learn.samples_seen == 2 * len(learn.train_ds)                  # every example still seen once per epoch


@pytest.mark.parametrize("adapter", ["lora", "ia3"])
def test_lr_and_batch_size_steer_an_adapter_run(dash_for, adapter):
    pytest.importorskip("peft")
    d, learn, rec = dash_for(slow=0.02, adapter=adapter)
    frozen = {n: p.detach().clone() for n, p in learn.model.named_parameters() if not p.requires_grad}
    d.start()
    wait_for(lambda: learn.step >= 2)
    d.lr.value = 4e-3
    wait_for(lambda: any(s["hp_lr"] == 4e-3 for s in rec.steps))
    d.bs.value = 8
    d.thread.join(120)
    first = next(s for s in rec.steps if s["hp_lr"] == 4e-3)
    assert first["opt_lr"] == pytest.approx(4e-3 * schedule_factor("linear", first["progress"], 0.06), rel=1e-6)
    change = next(c for c in learn.hp.log if c.name == "batch_size")
    rows = [r for _, r, _ in rec.batches]
    assert rows[change.batch - 1] == 16 and rows[change.batch] == 8
    assert learn.samples_seen == 2 * len(learn.train_ds)
    assert all(torch.equal(p, frozen[n]) for n, p in learn.model.named_parameters() if n in frozen)   # only the adapter moved
    assert (learn.model.peft_config["default"].peft_type.value.lower() == adapter) and learn.step == rec.steps[-1]["step"]


def test_pause_resume_stop(dash_for):
    d, learn, rec = dash_for(epochs=50, slow=0.01)
    d.start()
    wait_for(lambda: learn.step >= 2)
    d.press("Pause")
    wait_for(lambda: d.waiting)                        # the training thread has reached a step boundary and waits
    d.tick()                                           # what the page's timer does in ticker mode (harmless in thread mode)
    assert "paused" in d.status.value
    frozen = learn.step
    time.sleep(0.5)
    assert learn.step == frozen and d.running
    d.press("Resume")
    wait_for(lambda: learn.step > frozen + 2)
    d.press("Stop")
    d.thread.join(60)
    assert not d.running and learn.interrupted and d.state == "stopped"
    assert learn.predict(["a tender, funny film"])[0]["label"] in ("positive", "negative")
    assert (learn.out_dir / "checkpoint" / "training_state" / "state.json").is_file()


def test_second_start_does_nothing_and_close_stops(dash_for):
    d, learn, _ = dash_for(epochs=50, slow=0.01)
    d.start()
    first = d.thread
    d.start()
    assert d.thread is first and d.buttons["Start"].disabled
    wait_for(lambda: learn.step >= 1)
    d.close()
    assert not first.is_alive() and learn.interrupted


def test_exception_in_the_thread_shows_in_the_panel_and_stays_on_the_learner(dash_for):
    d, learn, _ = dash_for()
    class Boom(Callback):
        def after_step(self):
            if self.learn.step == 3: raise RuntimeError("boom at step 3")
    learn.add_cb(Boom())
    d.start()
    d.thread.join(60)
    d.tick()
    assert isinstance(learn.error, RuntimeError) and "boom at step 3" in str(learn.error)
    assert "RuntimeError" in d.message.value and "boom at step 3" in d.message.value and "traceback" in d.message.value
    assert d.state == "stopped" and not d.buttons["Start"].disabled


def test_requests_save_and_evaluate_at_a_step_boundary(dash_for):
    d, learn, _ = dash_for(epochs=50, slow=0.01)
    d.start()
    wait_for(lambda: learn.step >= 2)
    d.press("Save checkpoint")
    wait_for(lambda: d.tick() or "checkpoint saved" in d.message.value)
    d.press("Evaluate now")
    wait_for(lambda: d.tick() or "valid accuracy" in d.message.value)
    d.stop(wait=60)


def test_scale_lr_with_batch_size(dash_for):
    d, learn, _ = dash_for(scale_lr="sqrt")
    d.bs.value = 64                                                  # not training: applies at once
    assert learn.hp.batch_size == 64 and learn.hp.lr == pytest.approx(2e-3)
    assert d.lr.value == pytest.approx(2e-3)
    assert 1 in batch_size_options(learn) and max(batch_size_options(learn)) <= 512


def test_plot_and_replay_script(dash_for, tiny_bert_dir, movie_data):
    d, learn, _ = dash_for(epochs=1)
    d.start(); d.thread.join(60)
    png = d.render_plot()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    script = d.replay_script()
    ns = {}
    exec(script.split("learn = Learner")[0], ns)
    assert ns["hp"].lr == learn.hp.lr and ns["hp"].epochs == 1




def test_plot_drawn_from_two_threads_at_once(dash_for):
    "A control's handler (main thread) and the panel callback (training thread) may draw together: matplotlib's text layout is not thread-safe."
    import threading
    d, learn, _ = dash_for(epochs=1)
    d.start(); d.thread.join(60)
    errors = []
    def draw():
        for _ in range(6):
            try: d.render_plot()
            except Exception as e: errors.append(e)
    threads = [threading.Thread(target=draw) for _ in range(3)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert errors == []
def test_ticker_mode_sends_nothing_from_the_training_thread(dash_for):
    "What Colab needs: in ticker mode every widget update comes from the kernel's main thread (here, the test's)."
    import threading
    d, learn, _ = dash_for(mode="ticker", epochs=1, slow=0.01)
    senders = set()
    for w in [d.bar, d.status, d.plot, d.table, d.changes, d.message, *d.buttons.values(), *d.controls.values()]:
        w.observe(lambda ch: senders.add(threading.current_thread().name))
    d.start()
    wait_for(lambda: learn.step >= 3)
    d.lr.value = 2e-3
    wait_for(lambda: learn.hp.log)
    assert senders <= {"MainThread"}, senders              # the training thread ran three steps and sent nothing
    before = d.bar.value
    d.tick()
    assert d.bar.value > before and "running" in d.status.value and "lr 0.001 → 0.002" in d.changes.value
    d.thread.join(120)
    d.tick()                                                # the last pull: final state, and the page's timer stops
    assert senders <= {"MainThread"} and d.state == "finished" and "valid_accuracy" in d.table.value
    assert not getattr(d.ticker, "playing", getattr(d.ticker, "_playing", None))


def test_thread_mode_updates_from_the_training_thread(dash_for):
    import threading
    d, learn, _ = dash_for(mode="thread", epochs=1, slow=0.01)
    senders = set()
    d.status.observe(lambda ch: senders.add(threading.current_thread().name))
    d.start(); d.thread.join(120)
    assert "bigmodel_nb-dashboard" in senders


def test_widgets_that_work_on_ipywidgets_7_and_8(dash_for):
    import ipywidgets as W
    d, learn, _ = dash_for(epochs=1)
    assert isinstance(d.bs, W.Dropdown) and 16 in d.bs.options           # not a SelectionSlider (TraitError on 7.x when dragged)
    d.start(); d.thread.join(120); d.tick()
    assert isinstance(d.plot, W.HTML) and d.plot.value.startswith('<img src="data:image/png;base64,')
    import base64
    png = base64.b64decode(d.plot.value.split("base64,")[1].split('"')[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_off_and_messages_in_the_panel(dash_for, capsys):
    import warnings
    from bigmodel_nb.callbacks import ProgressCallback
    d, learn, _ = dash_for(epochs=50, slow=0.01)
    learn.show_progress = True
    learn.add_cb(ProgressCallback())
    seen = []
    class Watch(Callback):
        def after_step(self):
            seen.append(any(isinstance(c, ProgressCallback) for c in self.learn.cbs))
            if self.learn.step == 2: warnings.warn("the panel should show this")
    learn.add_cb(Watch())
    d.start()
    wait_for(lambda: learn.step >= 4)
    d.stop(wait=60); d.tick()
    assert seen and not any(seen)                                         # the learner's own bar was off while the panel drove
    assert any(isinstance(c, ProgressCallback) for c in learn.cbs) and learn.show_progress   # and back afterwards
    assert any("the panel should show this" in n for n in d.notes) and any("stopped at step" in n for n in d.notes)
    assert "stopped at step" in d.message.value
    err = capsys.readouterr().err
    assert "the panel should show this" not in err and "stopped at step" not in err


def test_pick_mode(monkeypatch):
    import importlib.metadata, types
    from bigmodel_nb.dashboard import pick_mode
    real = importlib.metadata.version
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "6.29.5" if name == "ipykernel" else real(name))
    assert pick_mode() == "thread" and pick_mode("ticker") == "ticker"
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert pick_mode() == "ticker" and pick_mode("thread") == "thread"
    monkeypatch.delitem(sys.modules, "google.colab")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "7.0.1" if name == "ipykernel" else real(name))
    assert pick_mode() == "ticker"
    with pytest.raises(ValueError, match="ipykernel!=7.0"): pick_mode("thread")
    with pytest.raises(ValueError, match="'auto', 'thread' or 'ticker'"): pick_mode("colab")


@pytest.fixture
def trainer_for(tiny_bert_dir, movie_data, tmp_path):
    "A real Hugging Face Trainer on the tiny BERT and the movie reviews, slowed a little so a test can act mid-run."
    from transformers import Trainer, TrainingArguments, TrainerCallback
    made = []
    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kw): time.sleep(0.02)
    def make(max_steps=40, callbacks=(), **kw):
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, max_steps=max_steps,
                                 learning_rate=1e-3, weight_decay=0.01, logging_steps=1000, save_strategy="no", eval_strategy="no",
                                 report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **kw)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        trainer = Trainer(model=model, args=args, train_dataset=movie_data.dataset("train"), eval_dataset=movie_data.dataset("valid"),
                          data_collator=movie_data.collator(), callbacks=[Slow(), *callbacks])
        d = Dashboard(trainer, mode="thread", sync_every=2)
        made.append(d)
        return d, trainer
    yield make
    for d in made: d.close()


def test_trainer_lr_change_lands_on_the_next_step(trainer_for):
    from transformers import TrainerCallback
    used = []                     # (steps done before this one, the rate each group just used, the schedule's own rates)
    class Used(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):   # after step(), before the schedule moves
            used.append((state.global_step, [g["lr"] for g in optimizer.param_groups], list(lr_scheduler.get_last_lr())))
    d, trainer = trainer_for(callbacks=[Used()])
    d.start()
    wait_for(lambda: trainer.state.global_step >= 5)
    d.lr.value = 4e-3
    d.thread.join(180)
    change = d.hp.log[0]
    assert (change.name, change.old, change.new, change.source) == ("lr", 1e-3, 4e-3, "dashboard")
    assert trainer.state.global_step == 40 and d.state == "finished"
    before = [u for u in used if u[0] < change.step]
    after = [u for u in used if u[0] >= change.step]
    assert before and after and after[0][0] == change.step          # the first step after the change ...
    for _, lrs, sched in before: assert lrs == pytest.approx(sched)     # ... the schedule as it was before it
    for _, lrs, sched in after: assert lrs == pytest.approx([4 * x for x in sched])    # ... and 4x the schedule from it on
    assert [r["step"] for r in d.learn.log][:3] == [2, 4, 6] and d.learn.log[-1]["lr"] == pytest.approx(after[-1][1][0])
    assert d.bs.disabled and d.accum.disabled and "fixed" in d.widget.children[2].value


def test_trainer_pause_save_evaluate_stop_and_continue(trainer_for):
    d, trainer = trainer_for(max_steps=400)
    d.start()
    wait_for(lambda: trainer.state.global_step >= 3)
    d.press("Pause")
    wait_for(lambda: d.waiting)
    frozen = trainer.state.global_step
    time.sleep(0.4)
    assert trainer.state.global_step == frozen
    d.press("Save checkpoint")                       # served while paused, at this step boundary
    d.press("Evaluate now")
    d.press("Resume")
    wait_for(lambda: d.learn.history)
    assert d.learn.history[0]["step"] == frozen and "valid_loss" in d.learn.history[0]
    wait_for(lambda: (d.learn.out_dir / f"checkpoint-{frozen}" / "trainer_state.json").is_file())   # written after the evaluation
    d.press("Stop"); d.thread.join(120)
    stopped = trainer.state.global_step
    assert d.state == "stopped" and d.learn.interrupted and stopped < 400
    assert (d.learn.out_dir / f"checkpoint-{stopped}" / "trainer_state.json").is_file()    # a stop saves where it stopped
    d.start()                                         # Start again: continues from that checkpoint
    wait_for(lambda: trainer.state.global_step >= stopped + 3)
    d.stop(wait=120)
    assert trainer.state.global_step > stopped


def test_trainer_refuses_a_batch_size_change_and_says_why(trainer_for):
    d, trainer = trainer_for(max_steps=20)
    class Change(Callback):
        def after_step(self):
            if self.learn.step == 3: self.learn.hp.set(batch_size=4)
    d.learn.add_cb(Change())
    d.start(); d.thread.join(120)
    assert d.learn.hp.batch_size == 8 and any("batch size is fixed" in n for n in d.notes)


def test_dashboard_refuses_other_objects():
    with pytest.raises(TypeError, match="Learner or a transformers Trainer"): Dashboard(object())


def test_dashboard_under_ipywidgets_7(tmp_path, tiny_bert_dir):
    "Colab ships ipywidgets 7: run a short steered training with the 7.x package first on the path."
    target = tmp_path / "ipyw7"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          "ipywidgets==7.8.5", "ipython_genutils"], capture_output=True, text=True)
    if res.returncode != 0: pytest.skip(f"could not fetch ipywidgets 7 from the package index: {res.stderr[-300:]}")
    code = f"""
import time, ipywidgets
assert ipywidgets.__version__.startswith("7."), ipywidgets.__version__
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from bigmodel_nb.assets import load_sample
from bigmodel_nb.data import TextClassificationData
from bigmodel_nb.dashboard import Dashboard
from bigmodel_nb.learner import HParams, Learner
data = TextClassificationData.from_df(load_sample("movie_reviews").sample(200, random_state=2))
data.tokenize(AutoTokenizer.from_pretrained({str(tiny_bert_dir)!r}), max_length=48)
for mode in ("thread", "ticker"):
    learn = Learner(AutoModelForSequenceClassification.from_pretrained({str(tiny_bert_dir)!r}, num_labels=2), data,
                    HParams(lr=1e-3, batch_size=16, epochs=2), device="cpu", progress=False)
    d = Dashboard(learn, mode=mode)
    assert type(d.bs).__name__ == "Dropdown" and type(d.plot).__name__ == "HTML"
    d.start()
    assert d.ticker._playing == (mode == "ticker")            # ipywidgets 7 names the Play's state _playing
    while learn.step < 2: time.sleep(0.01); d.tick()
    d.lr.value = 3e-3
    d.bs.value = 8
    d.thread.join(60); d.tick()
    assert [(c.name, c.new) for c in learn.hp.log] == [("lr", 3e-3), ("batch_size", 8)] and d.state == "finished", (learn.hp.log, d.state)
    assert d.plot.value.startswith("<img") and "finished" in d.status.value and not d.ticker._playing
print("ok", ipywidgets.__version__)
"""
    env = {**os.environ, "PYTHONPATH": str(target) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok 7."), res.stderr[-3000:]
