"""The Learner on real data with a small real BERT: resume exactness, interrupts, NaN steps, out-of-memory
recovery (simulated: no GPU here), live hyperparameters and their replay, the LR finder, callbacks, checkpoints."""
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from bigmodel_nb.callbacks import EarlyStopping, KeepBest, lr_find
from bigmodel_nb.learner import Callback, HParams, Learner, NonFiniteLossError, find_checkpoint


class StepLosses(Callback):
    "Record the loss of every optimizer step (one host sync per step: fine in a test)."
    def __init__(self): self.losses = []
    def after_step(self): self.losses.append(self.learn.loss.item())


class Steer(Callback):
    "Change hyperparameters at given steps, the way a dashboard would."
    def __init__(self, changes): self.changes = changes
    def after_step(self):
        for name, value in self.changes.get(self.learn.step, {}).items(): self.learn.hp.set(**{name: value}, source="dashboard")


@pytest.fixture
def make(tiny_bert_dir, movie_data):
    def make(hp=None, dropout=0.1, num_labels=2, **kw):
        model = AutoModelForSequenceClassification.from_pretrained(
            tiny_bert_dir, num_labels=num_labels, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            ignore_mismatched_sizes=num_labels != 2)
        hp = hp if isinstance(hp, HParams) else HParams(**{**dict(lr=1e-3, batch_size=16, epochs=2, seed=3), **(hp or {})})
        kw.setdefault("progress", False)
        return Learner(model, movie_data, hp, device="cpu", **kw)
    return make


def params(learn): return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


def same(a, b): return all(torch.equal(a[k], b[k]) for k in a)


def test_auto_precision_trains_in_bf16_and_validates_in_fp32_where_the_cpu_runs_bf16(make, monkeypatch):
    import bigmodel_nb.core as core
    monkeypatch.setattr(core, "bf16_supported", lambda device=None: True)   # the same answer this CPU may give
    seen = {}
    class Dtypes(Callback):
        def after_loss(self): seen.setdefault("train", self.learn.pred.dtype)
    learn = make(dict(epochs=1), cbs=[Dtypes()])
    def record(module, inputs, output): seen.setdefault("train_head" if module.training else "eval", output.dtype)
    hook = learn.model.classifier.register_forward_hook(record)
    learn.fit()
    hook.remove()
    assert learn.dtype is torch.bfloat16 and "in bf16" in repr(learn)
    assert seen["train"] is torch.bfloat16 and seen["eval"] is torch.float32
    assert all(p.dtype is torch.float32 for p in learn.model.parameters())     # fp32 master weights
    assert math.isfinite(learn.history[-1]["train_loss"]) and "valid_loss" in learn.history[-1]
    fp32 = make(dict(epochs=1, precision="fp32"))
    assert fp32.dtype is torch.float32


def test_fit_learns_and_records(make):
    learn = make(dict(epochs=3, lr=2e-3))
    learn.fit()
    h = learn.history
    assert [r["epoch"] for r in h] == [1, 2, 3] and learn.step == h[-1]["step"] > 0
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert learn.samples_seen == 3 * len(learn.train_ds)
    assert learn.log and all(math.isfinite(r["train_loss"]) for r in learn.log)


def test_resume_continues_exactly(make, tmp_path):
    steer = {3: dict(lr=5e-4), 5: dict(batch_size=24)}
    full = StepLosses()
    make(cbs=[full, Steer(steer)]).fit()

    first = StepLosses()
    class StopAt(Callback):
        def after_step(self):
            if self.learn.step == 7: self.learn.stop()
    a = make(cbs=[first, Steer(steer), StopAt()], out_dir=tmp_path)
    a.fit()
    assert a.interrupted and a.step == 7 and first.losses == full.losses[:7]

    rest = StepLosses()
    b = make(cbs=[rest, Steer(steer)], out_dir=tmp_path)
    b.fit(resume=tmp_path / "checkpoint")
    assert b.step == len(full.losses) and b.hp.batch_size == 24 and b.hp.lr == 5e-4
    assert len(rest.losses) == len(full.losses) - 7
    assert max(abs(x - y) for x, y in zip(rest.losses, full.losses[7:])) <= 1e-6
    assert [(c.step, c.name) for c in b.hp.log] == [(3, "lr"), (5, "batch_size")]


def test_replayed_log_reproduces_an_interactive_run(make):
    live = StepLosses()
    a = make(cbs=[live, Steer({2: dict(lr=3e-3), 4: dict(batch_size=8), 9: dict(lr=1e-4, weight_decay=0.1)})])
    a.fit()
    replayed = StepLosses()
    b = make(HParams.replay(a.hp), cbs=[replayed])
    b.fit()
    assert len(replayed.losses) == len(live.losses)
    assert max(abs(x - y) for x, y in zip(replayed.losses, live.losses)) <= 1e-6
    assert [str(c).split(" (")[0] for c in b.hp.log] == [str(c).split(" (")[0] for c in a.hp.log]


def test_live_lr_is_a_scale_over_the_schedule(make):
    seen = []
    class Watch(Callback):
        order = 100
        def after_step(self):
            seen.append((self.learn.step, self.learn.opt.param_groups[0]["lr"].item(), self.learn.hp.lr, self.learn.progress))
    learn = make(dict(epochs=1, warmup=0.1), cbs=[Watch(), Steer({4: dict(lr=4e-3)})])
    learn.fit()
    from bigmodel_nb.learner import schedule_factor
    step5 = [s for s in seen if s[0] == 5][0]
    assert step5[2] == 4e-3
    # the optimizer's lr at the step after the change = new lr x the schedule's factor at that step's progress
    assert step5[1] == pytest.approx(4e-3 * schedule_factor("linear", step5[3], 0.1), rel=1e-6)
    step4 = [s for s in seen if s[0] == 4][0]
    assert step4[1] == pytest.approx(1e-3 * schedule_factor("linear", step4[3], 0.1), rel=1e-6)


def test_stop_from_another_thread_leaves_a_usable_model(make):
    learn = make(dict(epochs=50))
    t = threading.Thread(target=learn.fit)
    t.start()
    while learn.step < 3 and t.is_alive(): time.sleep(0.01)
    learn.stop()
    t.join(timeout=60)
    assert not t.is_alive() and learn.interrupted and learn.step < 50 * 12
    pred = learn.predict(["a warm, funny and moving film"])
    assert pred[0]["label"] in ("positive", "negative") and abs(sum(pred[0]["probs"].values()) - 1) < 1e-5


def test_ctrl_c_stops_at_a_step_boundary_and_saves(tiny_bert_dir, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging
        from bigmodel_nb.assets import load_sample
        from bigmodel_nb.data import TextClassificationData
        from bigmodel_nb.learner import Callback, HParams, Learner
        data = TextClassificationData.from_df(load_sample("movie_reviews").sample(300, random_state=1))
        data.tokenize(AutoTokenizer.from_pretrained({str(tiny_bert_dir)!r}), max_length=64)
        model = AutoModelForSequenceClassification.from_pretrained({str(tiny_bert_dir)!r}, num_labels=2)
        class Report(Callback):
            def after_step(self): print("step", self.learn.step, flush=True)
        learn = Learner(model, data, HParams(epochs=200, batch_size=16), device="cpu", progress=False,
                        out_dir={str(tmp_path / "run")!r}, cbs=[Report()])
        learn.fit()
        print("done", learn.step, learn.interrupted, flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step") and int(line.split()[1]) >= 3:
            proc.send_signal(signal.SIGINT); break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    done = [l for l in out.splitlines() if l.startswith("done")][0].split()
    assert done[2] == "True" and "checkpoint saved to" in err and "resume=" in err          # messages go to stderr
    import json
    from bigmodel_nb.learner import checkpoint_progress
    state = checkpoint_progress(tmp_path / "run" / "checkpoint")
    assert state["step"] == int(done[1])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "checkpoint")
    assert set(model.config.label2id) == {"positive", "negative"}


def test_nan_steps_are_skipped_without_touching_weights(make):
    snapshots = {}
    class Poison(Callback):
        def after_loss(self):
            if self.learn.step in (2, 3): self.learn.loss = self.learn.loss * float("nan")
        def after_step(self): snapshots[self.learn.step] = params(self.learn)
    learn = make(dict(epochs=1), cbs=[Poison()])
    learn.fit()
    assert learn.skipped_steps == 2
    assert same(snapshots[2], snapshots[3]) and same(snapshots[3], snapshots[4])
    assert not same(snapshots[4], snapshots[5])


def test_many_nan_steps_stop_with_a_clear_error(make):
    class Poison(Callback):
        def after_loss(self):
            if self.learn.step >= 2: self.learn.loss = self.learn.loss * float("inf")
        def after_step(self):
            if self.learn.step == 2: self.good = params(self.learn)
    poison = Poison()
    learn = make(dict(epochs=3), cbs=[poison], max_bad_steps=3, sync_every=1)
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row.*learning rate"):
        learn.fit()
    assert learn.step == 5 and same(poison.good, params(learn)) and learn.error is not None


def limit_rows(learn, rows):
    "Simulate a GPU that runs out of memory on any forward pass with more than `rows` rows (no GPU here)."
    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > rows: raise torch.OutOfMemoryError("CUDA out of memory (simulated: no GPU here)")
    learn.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_out_of_memory_halves_the_batch_and_loses_nothing(make):
    learn = make(dict(epochs=1, batch_size=16))
    limit_rows(learn, 8)
    with pytest.warns(UserWarning, match="out of memory"):
        learn.fit()
    assert learn.hp.batch_size == 8
    assert [(c.name, c.old, c.new, c.source) for c in learn.hp.log] == [("batch_size", 16, 8, "out of memory")]
    assert learn.samples_seen == len(learn.train_ds) and learn.history


def test_lr_finder_suggests_and_leaves_no_trace(make):
    learn = make()
    before, opt_before = params(learn), None
    res = lr_find(learn, num_steps=30, plot=False)
    assert res.lrs == sorted(res.lrs) and res.lrs[0] <= res.suggestion <= res.lrs[-1]
    assert same(before, params(learn)) and learn.step == 0 and learn.samples_seen == 0 and not learn.history
    assert learn.hp.log == [] and learn.lr_range[0] == res.lrs[0]
    learn.fit(epochs=1)                      # and training works normally afterwards
    assert learn.history


def test_lr_finder_plot_keeps_the_divergence_off_the_scale():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bigmodel_nb.callbacks import LRFindResult
    res = LRFindResult(lrs=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2], losses=[0.69, 0.68, 0.55, 0.50, 11.0],
                       smoothed=[0.69, 0.685, 0.62, 0.57, 4.0], steepest=1e-4, minimum=1e-3)
    lo, hi = res.ylim()
    assert lo < 0.57 and 0.69 < hi < 1.0                    # the descent fills the axis, the spike to 11 does not
    ax = res.plot()
    assert ax.get_ylim() == (lo, hi) and ax.get_title().startswith("1 of 5 losses")
    plt.close(ax.figure)
    stopped = LRFindResult(lrs=[1e-6, 1e-5, 1e-4, 1e-3], losses=[0.7, 0.6, float("nan")], smoothed=[0.7, 0.65, float("nan")],
                           steepest=1e-5, minimum=1e-5)   # a sweep cut short by NaN: the plot uses the steps it has
    ax = stopped.plot(); assert ax.get_title().startswith("1 of 3 losses"); plt.close(ax.figure)


def test_early_stopping_and_keep_best(make):
    script = iter([1.0, 0.8, 0.9, 0.95, 0.7])
    kept = {}
    class Fake(Callback):
        order = 0                            # before KeepBest (60) and EarlyStopping (70)
        def after_validate(self):
            self.learn.metrics["valid_loss"] = next(script)
            kept[self.learn.epoch + 1] = params(self.learn)
    learn = make(dict(epochs=5), cbs=[Fake(), KeepBest(), EarlyStopping(patience=2)])
    learn.fit()
    assert learn.epoch == 3 and len(learn.history) == 4          # stopped after epoch 4
    assert same(params(learn), kept[2])


def test_checkpoint_is_a_transformers_folder_and_survives_a_cut_save(make, tmp_path):
    learn = make(dict(epochs=1), out_dir=tmp_path)
    learn.fit()
    ckpt = tmp_path / "checkpoint"
    m = AutoModelForSequenceClassification.from_pretrained(ckpt)
    assert m.config.id2label == {0: "negative", 1: "positive"} or m.config.id2label == {0: "positive", 1: "negative"}
    assert (tmp_path / "history.csv").read_text().startswith("epoch,")
    os.replace(ckpt, tmp_path / ".checkpoint.old-999")            # as if the save died between its two renames
    with pytest.warns(UserWarning, match="cut short"):
        assert find_checkpoint(ckpt) == tmp_path / ".checkpoint.old-999"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path / "nowhere")


def test_label_count_mismatch_is_explained(make):
    with pytest.raises(ValueError, match="3 outputs but the data needs 2 classes"):
        make(num_labels=3)


def test_hparams_validate_and_refuse_frozen_changes_while_live():
    hp = HParams()
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        hp.batch_size = 0
    hp._live = True
    with pytest.raises(ValueError, match="epochs cannot change while training runs"):
        hp.epochs = 5
    hp.lr = 1e-3
    assert hp.lr == 5e-5 and hp.pending == {"lr": 1e-3}


def test_out_of_memory_twice_keeps_halving_until_the_pieces_fit(make):
    learn = make(dict(epochs=1, batch_size=16))
    limit_rows(learn, 4)
    with pytest.warns(UserWarning, match="redone in 4 pieces"):
        learn.fit()
    assert [(c.old, c.new, c.source) for c in learn.hp.log] == [(16, 8, "out of memory"), (8, 4, "out of memory")]
    assert learn.samples_seen == len(learn.train_ds) and math.isfinite(learn.history[-1]["train_loss"])


def test_out_of_memory_with_one_row_is_a_clear_error(make):
    learn = make(dict(epochs=1, batch_size=1))
    limit_rows(learn, 0)
    with pytest.raises(torch.OutOfMemoryError, match="even with one example"):
        learn.fit()


def test_progress_in_a_saved_notebook_ends_at_its_final_state(tiny_bert_dir, tmp_path):
    """Run `fit` in a real Jupyter kernel and keep the outputs as a saved notebook does: the progress bar's text form is
    its last state (100%, not the 0% it started at) and the epoch table is one HTML table, updated in place."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    code = textwrap.dedent(f"""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging
        from bigmodel_nb.assets import load_sample
        from bigmodel_nb.data import TextData
        from bigmodel_nb.learner import HParams, Learner
        data = TextData.from_df(load_sample("movie_reviews").sample(120, random_state=0))
        data.tokenize(AutoTokenizer.from_pretrained({str(tiny_bert_dir)!r}), max_length=32)
        logging.disable_progress_bar()           # transformers' own bar for loading the weights
        model = AutoModelForSequenceClassification.from_pretrained({str(tiny_bert_dir)!r}, num_labels=2)
        learn = Learner(model, data, HParams(lr=1e-3, batch_size=16, epochs=2), device="cpu", out_dir={str(tmp_path / "run")!r})
        learn.fit()""")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = nb.cells[0].outputs
    bars = [o for o in outs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    tables = [o for o in outs if "text/html" in o.get("data", {}) and "<table" in o["data"]["text/html"]]
    assert len(bars) == 1 and "100%" in bars[0]["data"]["text/plain"] and "epoch 2/2" in bars[0]["data"]["text/plain"], bars
    assert len(tables) == 1 and tables[0]["data"]["text/html"].count("<tr>") == 3      # header and one row per epoch
    assert not [o for o in outs if o.get("name") == "stdout" and "train_loss" in o.get("text", "")]    # no text rows besides


# ---- CUDA graphs: what a CPU can check (the replays themselves are in test_gpu.py) -------------------------------
def test_cuda_graphs_setting_accepts_on_off_auto_and_explains_the_rest():
    assert [HParams(cuda_graphs=v).cuda_graphs for v in (True, False, "auto", "ON", "off")] == ["on", "off", "auto", "on", "off"]
    assert HParams().cuda_graphs == "off"
    with pytest.raises(ValueError, match="cuda_graphs must be 'on', 'off' or 'auto'"): HParams(cuda_graphs="fast")


def test_cuda_graphs_on_a_cpu_say_why_and_train_exactly_as_eager(make):
    eager = make(dict(epochs=1)); eager.fit()
    asked = make(dict(epochs=1, cuda_graphs="on"))
    with pytest.warns(UserWarning, match="cuda_graphs='on', but the step runs eagerly: CUDA graphs need a CUDA device"):
        asked.fit()
    assert asked.graph_status.startswith("eager: CUDA graphs need a CUDA device") and asked._graphs is None
    assert same(params(eager), params(asked))
    quiet = make(dict(epochs=1, cuda_graphs="auto"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # 'auto' falls back without a word
        quiet.fit()
    assert quiet.graph_status.startswith("eager:")


def test_graph_blockers_name_every_reason(make):
    class Distill(Callback):
        def after_loss(self): pass
    learn = make(dict(precision="fp16"), cbs=[Distill()])
    why = learn.graph_blockers()
    assert any("cpu" in w for w in why) and any("fp16" in w for w in why) and any("Distill.after_loss" in w for w in why)


def test_graph_batches_have_fixed_shapes_and_the_same_loss_and_gradients(make):
    "Bucketed lengths and rows padded to the batch size: the loss and every gradient equal the plain batch's."
    from bigmodel_nb.data import DynamicBatchSampler
    learn = make(dict(batch_size=16), dropout=0.0)
    ds = learn.train_ds
    def loss_and_grads(batch):
        learn.model.zero_grad()
        out = learn.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, n = learn.task.loss(out, batch["labels"])
        (total / n).backward()
        return float((total / n).detach()), [p.grad.clone() for p in learn.model.parameters() if p.grad is not None]
    examples = [ds[i] for i in range(11)]                  # a short batch: 5 padding rows
    plain, fixed = learn.collate(examples), learn.graph_collate(examples)
    assert fixed["input_ids"].shape == (16, learn._graph_buckets[next(i for i, b in enumerate(learn._graph_buckets) if b >= plain["input_ids"].shape[1])])
    assert (fixed["labels"][11:] == -100).all() and fixed["attention_mask"][11:].sum() == 0
    (lp, gp), (lf, gf) = loss_and_grads(plain), loss_and_grads(fixed)
    assert abs(lp - lf) < 1e-5 and all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(gp, gf))
    batches = list(DynamicBatchSampler(ds.lengths, batch_size=16, seed=0))
    shapes = {tuple(learn.graph_collate([ds[i] for i in b])["input_ids"].shape) for b in batches}
    assert all(b % 16 == 0 or b == ds.lengths.max() for b in learn._graph_buckets) and len(learn._graph_buckets) <= 8
    assert {r for r, _ in shapes} == {16} and {w for _, w in shapes} <= set(learn._graph_buckets)



# ---- the last layer for the first token alone (models.first_token_only) --------------------------------------------
def test_first_token_training_reaches_the_full_models_weights(make):
    "Without dropout, training with the first-token pass (the default) follows the full model step for step."
    full = make(dict(epochs=1, first_token=False), dropout=0.0); full.fit()
    short = make(dict(epochs=1), dropout=0.0); short.fit()
    assert full.first_token_status == "off" and short.first_token_status == "on"
    a, b = params(full), params(short)
    assert not same(a, params(make(dict(epochs=1), dropout=0.0)))             # training moved the weights ...
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4            # ... the same way in both
    assert abs(full.history[-1]["valid_loss"] - short.history[-1]["valid_loss"]) < 1e-4
    assert [HParams(first_token=v).first_token for v in ("on", "off", True, False)] == [True, False, True, False]
    with pytest.raises(ValueError, match="first_token must be True or False"): HParams(first_token="sometimes")


class MeanPooler(torch.nn.Module):
    "A pooler over every position: a head that the first-token pass would get wrong."
    def __init__(self, dense): super().__init__(); self.dense = dense
    def forward(self, hidden): return torch.tanh(self.dense(hidden.mean(1)))


def test_first_token_falls_back_to_the_full_model_with_the_reason(make):
    runs = []
    for first_token in (True, False):
        learn = make(dict(epochs=1, first_token=first_token))
        learn.model.bert.pooler = MeanPooler(learn.model.bert.pooler.dense)
        learn.fit()
        runs.append(learn)
    assert runs[0].first_token_status.startswith("full: the first-token pass differs from the full one")
    assert same(params(runs[0]), params(runs[1]))                                 # the refused pass trained the full model


def test_lr_suggestion_stays_inside_the_sweep():
    from bigmodel_nb.callbacks import LRFindResult
    lrs = [1e-6, 1e-5, 1e-4, 1e-3]
    early = LRFindResult(lrs, [0.7] * 4, [0.7] * 4, steepest=1e-5, minimum=2e-6)      # the lowest loss at the sweep's start
    assert early.suggestion == 1e-6
    later = LRFindResult(lrs, [0.7] * 4, [0.7] * 4, steepest=1e-4, minimum=1e-3)
    assert later.suggestion == pytest.approx(1e-4)                                    # min(steepest, minimum / 10)


# ---- CUDA graphs for prediction: what a CPU can check (the replays are in test_gpu.py) ------------------------------
def test_prediction_graph_shapes_padding_and_fallback(make):
    from bigmodel_nb.predict import Predictor, graph_shape, pad_to_shape
    assert graph_shape(5, 21, 64) == (8, 32) and graph_shape(64, 128, 64) == (64, 128)
    assert graph_shape(40, 17, 48) == (48, 32)                      # rows: a power of two, at most the batch size
    assert graph_shape(3, 600, 64) == (4, 600)                      # longer than every graph length: kept
    learn = make(dropout=0.0)
    batch = learn.collate([learn.train_ds[i] for i in range(5)])
    rows, length = graph_shape(5, batch["input_ids"].shape[1], 64)
    grown = pad_to_shape(batch, rows, length, pad_id=0)
    assert grown["input_ids"].shape == (rows, length) == (8, length) and "labels" not in grown
    assert grown["attention_mask"][5:].sum() == 0 and grown["attention_mask"][:, batch["input_ids"].shape[1]:].sum() == 0
    learn.model.eval()
    with torch.no_grad(): padded, plain = learn.model(**grown).logits[:5], learn.predictor.forward(batch)
    assert torch.allclose(padded, plain, atol=1e-5)
    texts = ["a fine film", "dull and far too long"]
    asked = Predictor(learn.model, learn.tokenizer, cuda_graphs="on")
    with pytest.warns(UserWarning, match="predictions run eagerly: CUDA graphs need a CUDA device"): on = asked.outputs(texts)
    assert asked.graph_status == "eager" and torch.equal(on, Predictor(learn.model, learn.tokenizer).outputs(texts))
    with pytest.raises(ValueError, match="cuda_graphs must be 'on', 'off' or 'auto'"): Predictor(learn.model, learn.tokenizer, cuda_graphs="fast")
