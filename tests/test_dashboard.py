"""The dashboard driven programmatically during real training (a small real BERT on real movie reviews):
controls change the live hyperparameters at the right step, buttons pause, resume, stop, save and evaluate,
and an exception in the training thread appears in the panel. Also run against ipywidgets 7 (Colab's)."""
import os
import subprocess
import sys
import time

import pytest
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


@pytest.fixture
def dash_for(tiny_bert_dir, movie_data, tmp_path):
    made = []
    def make(epochs=2, batch_size=16, slow=0.0, **kw):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
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


def test_pause_resume_stop(dash_for):
    d, learn, rec = dash_for(epochs=50, slow=0.01)
    d.start()
    wait_for(lambda: learn.step >= 2)
    d.press("Pause")
    wait_for(lambda: d.waiting)                        # the training thread has reached a step boundary and waits
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
    assert isinstance(learn.error, RuntimeError) and "boom at step 3" in str(learn.error)
    assert "RuntimeError" in d.message.value and "boom at step 3" in d.message.value and "traceback" in d.message.value
    assert d.state == "stopped" and not d.buttons["Start"].disabled


def test_requests_save_and_evaluate_at_a_step_boundary(dash_for):
    d, learn, _ = dash_for(epochs=50, slow=0.01)
    d.start()
    wait_for(lambda: learn.step >= 2)
    d.press("Save checkpoint")
    wait_for(lambda: "checkpoint saved" in d.message.value)
    d.press("Evaluate now")
    wait_for(lambda: "valid accuracy" in d.message.value)
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
learn = Learner(AutoModelForSequenceClassification.from_pretrained({str(tiny_bert_dir)!r}, num_labels=2), data,
                HParams(lr=1e-3, batch_size=16, epochs=2), device="cpu", progress=False)
d = Dashboard(learn)
d.start()
while learn.step < 2: time.sleep(0.01)
d.lr.value = 3e-3
d.thread.join(60)
assert learn.hp.log[0].new == 3e-3 and d.state == "finished", (learn.hp.log, d.state)
print("ok", ipywidgets.__version__)
"""
    env = {**os.environ, "PYTHONPATH": str(target) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok 7."), res.stderr[-3000:]
