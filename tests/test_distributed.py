"""Two real CPU processes under torchrun train the same as one process with twice the batch.

`Learner` under `WORLD_SIZE=2` builds an `accelerate.Accelerator` (gloo on the CPU), wraps the model in
DDP and gives process r the examples r, r+2, ... of every global batch of `batch_size × 2` examples.
With dropout off, that is the same computation as one process with `batch_size × 2`, up to float
rounding (sums in another order, each half padded to its own longest example). This test runs both,
from one saved tiny BERT, on 251 real movie-review sentences (the last batch of each epoch is odd, so
the two shares differ by one), and checks:

- both torchrun processes and the single process exit 0, and DDP over gloo was really used;
- every global batch was split into two shares of ceil(n/2) and floor(n/2) rows, whose summed losses
  add up to the single process's loss of the same batch, and the all-reduced gradient norm of every step
  is the single process's;
- rank 0 and rank 1 end with bitwise identical weights;
- those weights match the single process's: max |Δw| <= ATOL, and small next to how far training
  moved the weights (see ATOL).

`OMP_NUM_THREADS=1` per child keeps 3 processes on a 2-core machine from fighting over cores.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_ddp.py"

N_EXAMPLES, PER_PROCESS_BATCH, EPOCHS, LR, SEED = 251, 16, 3, 2e-3, 0
# The two runs round differently in fp32 (each half padded to its own longest example, so other GEMM shapes; a
# 2-way all-reduce instead of one sum), and Adam divides each gradient by sqrt(v), which turns a relative gradient
# difference of ~1e-7 into an update difference of the same relative size, step after step. The worst tensors are
# the attention key biases: their exact gradient is 0 (softmax ignores a shift shared by all keys), so what Adam
# sees there is rounding noise in both runs. Measured on a 2-core x86 CPU, torch 2.13: max |Δw| = 2.4e-6 (a key
# bias), 1.4e-6 elsewhere, after 24 steps that move weights by up to 2.1e-2. 1e-5 leaves 4x margin and is still
# 2000x smaller than the movement. (Adam largely cancels a constant factor in the gradients, only clipping and eps
# see it, so the loss scaling is also checked on the gradient norms, and the sharding on each batch's loss; a run
# with the loss scaled by the wrong world size, and one with no sharding, both fail this test.)
ATOL = 1e-5
TIMEOUT_S = 240
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}     # a clean start even if pytest runs under torchrun
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    return env


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    "A 2-layer, 64-wide BERT with MiniLM's vocabulary and no dropout, saved once so that every run loads the same weights."
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    from bigmodel_nb.data import load_tokenizer
    tok = load_tokenizer("minilm")
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        classifier_dropout=0.0, num_labels=2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1}, pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED)
    path = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def _train_args(model, out, batch_size):
    return [str(SCRIPT), "--model", str(model), "--out", str(out), "--examples", str(N_EXAMPLES), "--batch-size", str(batch_size),
            "--epochs", str(EPOCHS), "--lr", str(LR), "--seed", str(SEED)]


def _launch_torchrun(model, out, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "--max_restarts", "0",
           *_train_args(model, out, PER_PROCESS_BATCH)]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _launch_single(model, out):
    cmd = [sys.executable, *_train_args(model, out, 2 * PER_PROCESS_BATCH)]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, what):
    try: out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill(); out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish within {TIMEOUT_S}s; its output:\n{out[-6000:]}")
    return proc.returncode, out


def _load(out, rank):
    from safetensors.torch import load_file
    return load_file(str(out / f"rank{rank}.safetensors")), json.loads((out / f"rank{rank}.json").read_text())


def test_two_processes_match_one(tiny_bert, tmp_path):
    import torch
    from safetensors.torch import load_file
    t0 = time.perf_counter()
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    # both launches at once (3 single-threaded processes): the wall time is about the slower of the two
    for attempt in range(2):           # a port taken between free_port() and torchrun's bind: one retry on a new port
        ddp = _launch_torchrun(tiny_bert, ddp_out, free_port())
        single = _launch_single(tiny_bert, single_out) if attempt == 0 else None
        rc_ddp, log_ddp = _finish(ddp, "torchrun --nproc_per_node 2")
        if single is not None: rc_single, log_single = _finish(single, "the single process")
        if rc_ddp == 0 or "address already in use" not in log_ddp.lower(): break
    assert rc_ddp == 0, f"torchrun exited with {rc_ddp}:\n{log_ddp[-6000:]}"
    assert rc_single == 0, f"the single process exited with {rc_single}:\n{log_single[-6000:]}"
    elapsed = time.perf_counter() - t0

    (w0, i0), (w1, i1), (ws, isg) = _load(ddp_out, 0), _load(ddp_out, 1), _load(single_out, 0)
    init = load_file(str(tiny_bert / "model.safetensors"))

    # really two processes, DDP over gloo, and the same amount of training as the single run
    assert (i0["world"], i0["rank"], i1["world"], i1["rank"]) == (2, 0, 2, 1)
    assert i0["wrapper"] == i1["wrapper"] == "DistributedDataParallel" and i0["backend"] == "gloo"
    assert isg["world"] == 1 and isg["wrapper"] != "DistributedDataParallel"
    steps = EPOCHS * -(-isg["n_train"] // (2 * PER_PROCESS_BATCH))
    assert i0["steps"] == i1["steps"] == isg["steps"] == steps
    assert i0["samples_seen"] == i1["samples_seen"] == isg["samples_seen"] == EPOCHS * N_EXAMPLES
    # the reported training loss adds up both processes' shares: the same on both ranks, and equal to the 1-process loss
    assert i0["train_loss"] == i1["train_loss"] and i0["train_loss"] == pytest.approx(isg["train_loss"], rel=1e-4)

    # the sharding: every global batch split into ceil/floor halves whose losses add up to the single run's
    assert len(i0["batches"]) == len(i1["batches"]) == len(isg["batches"]) == steps
    for k, (b0, b1, bs) in enumerate(zip(i0["batches"], i1["batches"], isg["batches"])):
        assert (b0["rows"], b1["rows"]) == (-(-bs["rows"] // 2), bs["rows"] // 2), f"batch {k}: shares {b0['rows']}+{b1['rows']} of {bs['rows']}"
        assert b0["ce_sum"] + b1["ce_sum"] == pytest.approx(bs["ce_sum"], rel=1e-5, abs=1e-5), f"batch {k}: losses differ"

    # the loss scaling: the all-reduced gradients have the single run's norm at every step (Adam would hide a constant
    # factor in the weights, so this is checked here)
    assert len(i0["grad_norms"]) == len(i1["grad_norms"]) == len(isg["grad_norms"]) == steps
    for k, (g0, g1, gs) in enumerate(zip(i0["grad_norms"], i1["grad_norms"], isg["grad_norms"])):
        assert g0 == g1, f"step {k}: the ranks saw different gradient norms ({g0} and {g1})"
        assert g0 == pytest.approx(gs, rel=1e-4), f"step {k}: gradient norm {g0:.6g} with 2 processes, {gs:.6g} with 1"

    # rank 0 and rank 1 hold the same model, bit for bit
    assert w0.keys() == w1.keys() == ws.keys()
    differ = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert not differ, f"rank 0 and rank 1 ended with different weights in {differ[:5]}"

    # ... which is the single process's model, up to float rounding
    diffs = {k: (w0[k].double() - ws[k].double()).abs().max().item() for k in w0}
    moved = max((ws[k].double() - init[k].double()).abs().max().item() for k in ws if k in init)
    worst = max(diffs, key=diffs.get)
    print(f"\n2 processes vs 1: max |Δw| = {diffs[worst]:.3g} (in {worst}); training moved weights by up to {moved:.3g}; "
          f"{steps} steps; both runs took {elapsed:.1f}s")
    assert moved > 1e-2, f"training hardly moved the weights (max {moved:.3g}): the comparison would prove nothing"
    assert diffs[worst] <= ATOL, f"2-process weights differ from the 1-process run by {diffs[worst]:.3g} in {worst} (> {ATOL})"
    assert diffs[worst] <= 1e-3 * moved

    # evaluation is sharded too: each process computes about half the rows, and every process ends with all of them
    n = isg["n_train"]
    assert isg["eval_rows"] == n and i0["eval_rows"] + i1["eval_rows"] == n and min(i0["eval_rows"], i1["eval_rows"]) > 0
    assert i0["eval_logits"] == i1["eval_logits"] and len(i0["eval_logits"]) == n
    gap = (torch.tensor(i0["eval_logits"]) - torch.tensor(isg["eval_logits"])).abs().max().item()
    assert gap <= 1e-4, f"gathered logits differ from the single process's by {gap:.3g}"
