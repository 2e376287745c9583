"""What only a CUDA GPU can show: bf16 and fp16 training of the real model, the device-side skip of bad steps
with the fused optimizer on CUDA, the memory estimate against CUDA's own allocator, and a real out-of-memory
recovery. Skipped where no GPU is present (as in CI). `BIGMODEL_NB_GPU_TESTS=cpu` runs the tests that make sense
without a GPU on the CPU, to check the test code itself before a GPU is at hand."""
import gc
import math
import os
import time
import warnings

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from bigmodel_nb import models as M
from bigmodel_nb.assets import load_sample
from bigmodel_nb.core import autocast_dtype, get_device
from bigmodel_nb.data import TextClassificationData
from bigmodel_nb.learner import Callback, HParams, Learner

DEV = os.environ.get("BIGMODEL_NB_GPU_TESTS", "cuda")
ON_CUDA = DEV.startswith("cuda")
pytestmark = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="measures CUDA itself")


def report(name, **values):
    "Print measurements (shown with `pytest -s`) so a GPU run leaves numbers behind, not only a pass."
    print(f"\n[gpu] {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))


def params(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_device_and_precision():
    dev = get_device(DEV)
    assert dev.type == DEV.split(":")[0]
    if ON_CUDA:
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert autocast_dtype(dev, "auto") == want
        report("device", gpu=torch.cuda.get_device_name(dev), capability=str(torch.cuda.get_device_capability(dev)),
               torch=torch.__version__, auto_precision=str(want))


def test_minilm_fine_tunes_on_movie_reviews_in_auto_precision():
    "The library defaults (2 epochs, lr 1e-4, batch 32, max length 128) on the full data set reach >= 0.78 on test."
    n = None if ON_CUDA else 300                   # on a CPU only the plumbing is checked
    df = load_sample("movie_reviews")
    data = TextClassificationData.from_df(df if n is None else df.sample(n, random_state=0), on_invalid="drop")
    model, tok = M.load_classifier("minilm", data)
    data.tokenize(tok, max_length=128)
    learn = Learner(model, data, HParams(epochs=2 if ON_CUDA else 1, lr=1e-4, batch_size=32), device=DEV, progress=False)
    t0 = time.perf_counter(); learn.fit(); secs = time.perf_counter() - t0
    test = learn.evaluate("test")
    assert learn.dtype == autocast_dtype(learn.device, "auto")
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())      # autocast keeps fp32 master weights
    assert learn.skipped_steps == 0 and math.isfinite(learn.history[-1]["train_loss"])
    assert learn.samples_seen == learn.hp.epochs * len(learn.train_ds)
    report("minilm movie_reviews", precision=str(learn.dtype), n_train=len(learn.train_ds), fit_s=secs,
           samples_per_s=learn.samples_seen / secs, **{k: float(v) for k, v in test.items() if isinstance(v, float)})
    if n is None: assert test["accuracy"] >= 0.78


def test_fp16_uses_a_grad_scaler_and_learns(tiny_bert_dir, movie_data):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    learn = Learner(model, movie_data, HParams(epochs=4, lr=2e-3, batch_size=16, precision="fp16", seed=1), device=DEV, progress=False)
    learn.fit()
    assert (learn.scaler is not None) == ON_CUDA and learn.dtype == torch.float16
    h = learn.history
    assert h[-1]["train_loss"] < h[0]["train_loss"] and all(torch.isfinite(p).all() for p in learn.model.parameters())
    if ON_CUDA: report("fp16 grad scaler", scale=float(learn.scaler.get_scale()), loss_first=h[0]["train_loss"], loss_last=h[-1]["train_loss"])


def test_non_finite_steps_are_skipped_on_the_device(tiny_bert_dir, movie_data):
    "The first two steps get a NaN loss: the fused optimizer must leave the weights exactly as they were."
    class Poison(Callback):
        def after_loss(self):
            if self.learn.step < 2: self.learn.loss = self.learn.loss * float("nan")
        def before_fit(self): self.start = params(self.learn.model)
        def after_step(self):
            if self.learn.step == 2: self.after_two = params(self.learn.model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    poison = Poison()
    learn = Learner(model, movie_data, HParams(epochs=1, lr=1e-3, batch_size=16), cbs=[poison], device=DEV, progress=False, sync_every=1)
    learn.fit()
    assert learn.opt.defaults.get("fused") == ON_CUDA or not ON_CUDA
    assert all(torch.equal(poison.start[k], poison.after_two[k]) for k in poison.start)
    assert learn.skipped_steps == 2 and not all(torch.equal(poison.start[k], v) for k, v in params(learn.model).items())


@cuda_only
@pytest.mark.parametrize("batch,seq,precision", [(32, 128, "bf16"), (64, 256, "bf16"), (32, 128, "fp32"), (16, 512, "fp16")])
def test_memory_estimate_matches_cuda(batch, seq, precision):
    model, _ = M.load_classifier("minilm", 2, device=DEV)
    try:
        est = M.estimate_training_memory(model, batch, seq, precision, device=DEV)
        got = M.measure_training_memory(model, batch, seq, precision)
    finally:
        del model; gc.collect(); torch.cuda.empty_cache()
    ratio = est.peak / got["peak"]
    report("memory estimate", batch=batch, seq=seq, precision=precision, estimated_MiB=est.peak / 2**20,
           measured_MiB=got["peak"] / 2**20, ratio=ratio)
    assert abs(ratio - 1) < 0.15, (est, got)


@cuda_only
def test_real_out_of_memory_halves_the_batch_and_loses_nothing():
    """Cap this process's CUDA memory between what a batch of 64 and one of 128 need (both measured here), then train
    with batch 128: the first step runs out of memory for real, the Learner frees it, and trains on in batches of 64."""
    df = load_sample("movie_reviews").sample(480, random_state=0)
    df["text"] = (df["text"] + " ") * 60                              # every example fills max_length: fixed shapes
    data = TextClassificationData.from_df(df, on_invalid="drop")
    model, tok = M.load_classifier("minilm", data, device=DEV)
    data.tokenize(tok, max_length=256)
    small = M.measure_training_memory(model, 64, 256, "bf16")["peak"]
    big = M.measure_training_memory(model, 128, 256, "bf16")["peak"]
    gc.collect(); torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = (small + big) / 2
    report("oom calibration", peak64_MiB=small / 2**20, peak128_MiB=big / 2**20, cap_MiB=cap / 2**20)
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        learn = Learner(model, data, HParams(epochs=1, lr=1e-4, batch_size=128, precision="bf16"), device=DEV, progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            learn.fit()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    msgs = [str(w.message) for w in caught if "out of memory" in str(w.message)]
    report("oom recovery", warnings=len(msgs), batch_size=learn.hp.batch_size, max_reserved_MiB=torch.cuda.max_memory_reserved() / 2**20)
    assert msgs, "the cap did not cause an out-of-memory error: the calibration is off"
    assert [(c.old, c.new, c.source) for c in learn.hp.log][0] == (128, 64, "out of memory")
    assert learn.samples_seen == len(learn.train_ds) and math.isfinite(learn.history[-1]["train_loss"])


class StopAt7(Callback):
    def after_step(self):
        if self.learn.step == 7: self.learn.stop()


def stop_and_resume(tmp_path, tiny_bert_dir, data, **hp):
    "An unbroken run; the same run stopped at step 7 (a checkpoint is written); a fresh Learner resumed from it. And the largest weight difference."
    def make(cbs=(), out=None):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
        return Learner(model, data, HParams(epochs=2, lr=1e-3, batch_size=16, seed=5, **hp), cbs=list(cbs), device=DEV,
                       progress=False, out_dir=out)
    full = make(); full.fit(); want = params(full.model)
    part = make([StopAt7()], tmp_path); part.fit()
    again = make(out=tmp_path); again.fit(resume=tmp_path / "checkpoint")
    diff = max((want[k].float() - v.float()).abs().max().item() for k, v in params(again.model).items())
    return full, part, again, diff


@cuda_only
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_checkpoint_resume_on_cuda_continues_the_run(tmp_path, tiny_bert_dir, movie_data, precision):
    "Stop at step 7 (a checkpoint is written), resume in a fresh Learner: the weights match an unbroken run (fp16: the loss scaler's state too)."
    torch.use_deterministic_algorithms(True, warn_only=True)
    try: full, part, again, diff = stop_and_resume(tmp_path, tiny_bert_dir, movie_data, precision=precision)
    finally: torch.use_deterministic_algorithms(False)
    report("resume on cuda", precision=precision, max_abs_diff=diff)
    assert part.interrupted and part.step == 7 and again.step == full.step and diff < 1e-4
    if precision == "fp16": assert again.scaler.get_scale() == full.scaler.get_scale() and "scaler" in again.states


# ---- CUDA graphs (HParams(cuda_graphs="on")) -------------------------------------------------------------------
class LossLog(Callback):
    "Every batch's loss, read after the batch (a host sync per batch: fine in a test)."
    order = 50
    def before_fit(self): self.losses = []
    def after_batch(self): self.losses.append(float(self.learn.loss))


class Steer(Callback):
    "A live learning-rate change at step 3 and a batch-size change at step 5, as the dashboard would make them."
    def after_step(self):
        if self.learn.step == 3: self.learn.hp.set(lr=3e-4, source="dashboard")
        if self.learn.step == 5: self.learn.hp.set(batch_size=8, source="dashboard")


def graph_pair(tiny_bert_dir, data, precision, cbs=()):
    "The same run twice: captured as CUDA graphs, then eagerly on the very same padded batches."
    from bigmodel_nb.data import Collator
    def make(mode, collate=None):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
        log = LossLog()
        learn = Learner(model, data, HParams(epochs=2, lr=1e-3, batch_size=16, precision=precision, seed=3, cuda_graphs=mode),
                        cbs=[log, *[type(c)() for c in cbs]], device=DEV, progress=False, collate=collate)
        learn.fit()
        return learn, log.losses
    graphed, g_losses = make("on")
    c = graphed.collate
    # eager with the graphs' padding: rows up to the batch size in effect, lengths up to the same buckets
    class Padded:
        def __init__(self, learn): self.learn = learn
        def __call__(self, ex):
            rows = max(len(ex), self.learn.hp.batch_size)
            return Collator(c.pad_token_id, c.multiple, rows, graphed._graph_buckets, c.max_length, c.task)(ex)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    log = LossLog()
    eager = Learner(model, data, HParams(epochs=2, lr=1e-3, batch_size=16, precision=precision, seed=3),
                    cbs=[log, *[type(cb)() for cb in cbs]], device=DEV, progress=False)
    eager.collate = Padded(eager)
    eager.fit()
    return graphed, g_losses, eager, log.losses


@cuda_only
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_cuda_graphs_give_the_eager_losses(tiny_bert_dir, movie_data, precision, tol):
    graphed, g, eager, e = graph_pair(tiny_bert_dir, movie_data, precision)
    worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(g, e))
    wdiff = max((p - q).abs().max().item() for p, q in zip(graphed.model.parameters(), eager.model.parameters()))
    report("cuda graphs vs eager", precision=precision, steps=graphed.step, captures=graphed._graphs.captures,
           shapes=len(graphed._graphs.micro), worst_rel_loss=worst, max_weight_diff=wdiff)
    assert graphed.graph_status == "graphs" and graphed._graphs.captures >= 2
    assert len(g) == len(e) == graphed.batches and worst < tol
    assert graphed.samples_seen == eager.samples_seen == 2 * len(graphed.train_ds)


@cuda_only
def test_cuda_graphs_follow_live_lr_and_batch_size_changes(tiny_bert_dir, movie_data):
    graphed, g, eager, e = graph_pair(tiny_bert_dir, movie_data, "fp32", cbs=[Steer()])
    rows = {k[0][1][0] for k in graphed._graphs.micro}                # the row counts of the captured shapes
    worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(g, e))
    report("cuda graphs, live changes", captures=graphed._graphs.captures, rows=str(sorted(rows)), worst_rel_loss=worst)
    assert [(c.name, c.new) for c in graphed.hp.log] == [("lr", 3e-4), ("batch_size", 8)]
    assert rows == {16, 8} and len(g) == len(e) and worst < 1e-4


@cuda_only
def test_cuda_graphs_resume_exactly(tmp_path, tiny_bert_dir, movie_data):
    "Stop at step 7, resume in a fresh Learner, both with graphs: the weights equal those of an unbroken graph run."
    full, part, again, diff = stop_and_resume(tmp_path, tiny_bert_dir, movie_data, precision="bf16", cuda_graphs="on")
    report("cuda graphs resume", max_abs_diff=diff, status=again.graph_status)
    assert part.interrupted and part.step == 7 and again.step == full.step and again.graph_status == "graphs" and diff < 1e-4


@cuda_only
def test_cuda_graphs_fall_back_with_a_reason_in_fp16(tiny_bert_dir, movie_data):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    learn = Learner(model, movie_data, HParams(epochs=1, batch_size=16, precision="fp16", cuda_graphs="on"), device=DEV, progress=False)
    with pytest.warns(UserWarning, match="fp16 needs a loss scaler"): learn.fit()
    assert learn.graph_status.startswith("eager: fp16") and learn.samples_seen == len(learn.train_ds)


# ---- CUDA graphs for prediction (Predictor(cuda_graphs="on")) -------------------------------------------------
@cuda_only
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_prediction_graphs_give_the_eager_outputs(tiny_bert_dir, precision, tol):
    from bigmodel_nb.predict import GRAPH_LENGTHS, Predictor
    from transformers import AutoTokenizer
    model, tok = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).to(DEV), AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = load_sample("movie_reviews").text.iloc[:300].tolist()
    eager = Predictor(model, tok, precision=precision, batch_size=32).outputs(texts)
    graphed = Predictor(model, tok, precision=precision, batch_size=32, cuda_graphs="on")
    out, few = graphed.outputs(texts), graphed.outputs(texts[:5])
    n = graphed._graphs.captures
    worst = (out - eager).abs().max().item()
    report("prediction graphs vs eager", precision=precision, captures=n, worst_abs=worst)
    assert graphed.graph_status == "graphs" and torch.allclose(out, eager, atol=tol, rtol=tol)
    assert torch.allclose(few, eager[:5], atol=tol, rtol=tol) and 2 <= n <= 6 * len(GRAPH_LENGTHS)
    model.classifier.weight = torch.nn.Parameter(model.classifier.weight.detach() * 2)   # new weight tensors
    changed = graphed.outputs(texts[:5])
    assert graphed._graphs.captures > n and not torch.allclose(changed, few)


@cuda_only
def test_validation_replays_graphs_when_training_does(tiny_bert_dir, movie_data):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    learn = Learner(model, movie_data, HParams(epochs=1, batch_size=16, precision="bf16", cuda_graphs="on"), device=DEV, progress=False)
    learn.fit()
    status, graphed = learn.predictor.graph_status, learn.history[-1]["valid_loss"]
    learn.predictor.cuda_graphs = "off"
    eager = learn.validate()["valid_loss"]
    report("validation with graphs", status=status, graphed=graphed, eager=eager)
    assert learn.graph_status == "graphs" and status == "graphs" and abs(graphed - eager) < 2e-2
