#!/usr/bin/env python
"""Fine-tune the same model on the same data with `bigmodel_nb`'s `Learner` and with Hugging Face's `Trainer`.

Both get the same initial weights (one model, deep-copied), the same tokenized train and test examples
(from one `TextClassificationData` split), batch size, learning rate, epochs, warmup, weight decay,
gradient clipping, precision, seed, linear schedule and fused AdamW. Only training is timed (no model
loading, tokenizing or evaluation); both models are then scored on the test split by the same code.
The Learner can be timed several ways in the same run (`--variants`): eager, eager with the last layer run for
every token (`HParams(first_token=False)`; by default it runs for the first token alone), with its step captured as CUDA
graphs, with the model compiled by `torch.compile`, and with the word-embedding matrix frozen. Each run also
reports its MFU (useful FLOPs per second against a bf16 matrix product measured on the spot) and peak memory.

    python bench/bench_trainer.py --max-samples 3000 --epochs 2          # ~minutes on a 2-core CPU
    python bench/bench_trainer.py --json                                  # full data; JSON on the last line
    python bench/bench_trainer.py --variants eager,graphs,compiled        # on a GPU: the Learner three ways, one run

See bench/README.md for the fairness choices and measured numbers.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm", help="asset name, folder or Hub id (through bigmodel_nb.assets.model_path)")
    p.add_argument("--max-samples", type=int, default=None, help="subsample this many rows (seeded) before splitting")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of training steps with a linear warmup")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens (default: the model's limit)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: the library's own choice (bigmodel_nb.core.autocast_dtype): bf16 on CUDA 8.0+ and on CPUs with AVX512-BF16 or AMX, fp16 on older CUDA, fp32 on other CPUs")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0, mps (default: the best available)")
    p.add_argument("--order", choices=("learner-first", "trainer-first"), default="learner-first",
                   help="which one is timed first (both are warmed up first either way)")
    p.add_argument("--warmup-steps", type=int, default=5,
                   help="untimed optimizer steps each framework runs on a throwaway copy of the model before any timing")
    p.add_argument("--trainer-group-by-length", action="store_true",
                   help="give Trainer length-grouped batches too (train_sampling_strategy='group_by_length' in 5.x, "
                        "group_by_length=True in 4.x); default: Trainer's default random batches")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--variants", default=None,
                   help="comma-separated Learner variants to time: eager, full-last-layer (HParams(first_token=False)), graphs (HParams(cuda_graphs='on')), compiled "
                        "(torch.compile of the model), frozen-embeddings (word embedding matrix not trained); "
                        "default: eager on a CPU, eager,graphs on CUDA")
    p.add_argument("--heldout", type=int, default=0,
                   help="with --max-samples: also score both models on this many sentences outside the subsample (seeded)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


# ---- data for Trainer: the very same tokenized examples, no `datasets` ------------------------------------------
class TrainerDataset:
    "The examples of a `TokenizedDataset` as the dicts of lists that `DataCollatorWithPadding` pads."
    def __init__(self, ds): self.ds = ds
    def __len__(self): return len(self.ds)
    def __getitem__(self, i):
        e = self.ds[i]
        ids = [int(t) for t in e["input_ids"]]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": int(e["label"])}


def training_args(**kw):
    "A `TrainingArguments` from `kw`, renamed / left out for the installed transformers version (4.40+ and 5.x)."
    from transformers import TrainingArguments
    known = set(inspect.signature(TrainingArguments.__init__).parameters)
    if "eval_strategy" in kw and "eval_strategy" not in known: kw["evaluation_strategy"] = kw.pop("eval_strategy")   # < 4.41
    if kw.pop("group_by_length", False):
        if "train_sampling_strategy" in known: kw["train_sampling_strategy"] = "group_by_length"                    # 5.x
        else: kw["group_by_length"] = True                                                                         # 4.x
    if "use_cpu" in kw and "use_cpu" not in known:
        kw["no_cuda"] = kw.pop("use_cpu")
    dropped = sorted(k for k in kw if k not in known)
    if dropped: warnings.warn(f"this transformers version has no TrainingArguments {dropped}; left out")
    return TrainingArguments(**{k: v for k, v in kw.items() if k in known})


# ---- evaluation: one function for both models -------------------------------------------------------------------
def test_accuracy(model, ds, collate, device, dtype, batch_size=128) -> float:
    import numpy as np
    import torch
    order = np.argsort(-np.asarray(ds.lengths), kind="stable")
    correct, was_training = 0, model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            b = collate([ds[int(i)] for i in order[s:s + batch_size]])
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            correct += int((logits.argmax(-1).cpu() == b["labels"]).sum())
    model.train(was_training)
    return correct / len(order)


def non_embedding_params(model) -> int:
    "Parameters outside the embedding tables: the ones every token multiplies through (the N of 6N)."
    import torch
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def train_flops(model, lengths, epochs) -> float:
    """Useful training FLOPs: per real token 6N (forward and backward through the non-embedding weights) plus
    12 * layers * width * T for the attention scores and their weighting of the values, T the example's own length."""
    import numpy as np
    cfg = model.config
    L = np.asarray(lengths, dtype=np.float64)
    n = non_embedding_params(model)
    return epochs * float((6 * n * L + 12 * cfg.num_hidden_layers * cfg.hidden_size * L * L).sum())


def matmul_peak(device, dtype) -> float:
    "FLOP/s of a large square matrix product in `dtype` on `device`, best of a few: the peak that MFU divides by."
    import torch
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(6):
        sync(device); t = time.perf_counter(); a @ b; sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


class PeakMemory:
    """The most memory a run used, in MB. CUDA: the allocator's peak since the start (reset there). CPU: the process's
    resident memory, read every 20 ms by a thread (on Linux; elsewhere the process's high-water mark so far)."""
    def __init__(self, device): self.device, self.peak = device, 0.0
    def _rss(self):
        with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    def __enter__(self):
        import threading
        import torch
        if self.device.type == "cuda": torch.cuda.reset_peak_memory_stats(self.device); return self
        self.done = threading.Event()
        def watch():
            while not self.done.wait(0.02): self.peak = max(self.peak, self._rss())
        if os.path.exists("/proc/self/statm"):
            self.peak = self._rss(); self.thread = threading.Thread(target=watch, daemon=True); self.thread.start()
        return self
    def __exit__(self, *exc):
        import torch
        if self.device.type == "cuda": self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif hasattr(self, "thread"): self.done.set(); self.thread.join()
        else:
            import resource
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loadavg():
    try: return [round(x, 2) for x in os.getloadavg()]
    except OSError: return None


def sync(device):
    import torch
    if device.type == "cuda": torch.cuda.synchronize(device)
    elif device.type == "mps": torch.mps.synchronize()


# ---- the two runs -----------------------------------------------------------------------------------------------
VARIANTS = ("eager", "full-last-layer", "graphs", "compiled", "frozen-embeddings")

def run_learner(model, data, tok, args, precision, device, max_steps=None, variant="eager") -> dict:
    "Train with `Learner`; the clock runs from `before_fit` to `after_fit`, less the per-epoch validations."
    import torch
    from bigmodel_nb.learner import Callback, CancelFitException, HParams, Learner

    class Clock(Callback):
        order = -100
        def before_fit(self): sync(device); self.t0, self.c0, self.excluded, self.c_excluded = time.perf_counter(), time.process_time(), 0.0, 0.0
        def before_validate(self): sync(device); self.tv, self.cv = time.perf_counter(), time.process_time()
        def after_validate(self):
            self.excluded += time.perf_counter() - self.tv; self.c_excluded += time.process_time() - self.cv
        def after_step(self):
            if max_steps is not None and self.learn.step >= max_steps: raise CancelFitException()
        def after_fit(self): sync(device); self.t1, self.c1 = time.perf_counter(), time.process_time()
        after_cancel_fit = after_fit

    hp = HParams(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, weight_decay=args.weight_decay,
                 warmup=args.warmup, grad_accum=1, max_grad_norm=args.max_grad_norm, precision=precision,
                 seed=args.seed, schedule="linear", cuda_graphs="on" if variant == "graphs" else "off",
                 first_token=variant != "full-last-layer")
    if variant == "frozen-embeddings": model.get_input_embeddings().weight.requires_grad_(False)
    trained = torch.compile(model) if variant == "compiled" else model
    clock = Clock()
    learn = Learner(trained, data, hp, tokenizer=tok, cbs=[clock], progress=False, device=str(device))
    learn.fit()
    seconds = clock.t1 - clock.t0 - clock.excluded
    out = dict(seconds=seconds, cpu_seconds=clock.c1 - clock.c0 - clock.c_excluded, samples=learn.samples_seen, steps=learn.step,
               samples_per_s=learn.samples_seen / seconds, train_loss=learn.train_loss, model=learn.model,
               graph_status=learn.graph_status, first_token_status=learn.first_token_status)
    if learn.history: out["library_samples_per_s"] = learn.history[-1]["samples_per_s"]   # the Learner's own clock
    return out


def run_trainer(model, train_ds, tok, args, precision, device, max_steps=None) -> dict:
    "Train with `transformers.Trainer`; the clock runs from `on_train_begin` to `on_train_end` (no evaluation, no saving)."
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k): sync(device); self.t0, self.c0 = time.perf_counter(), time.process_time()
        def on_train_end(self, *a, **k): sync(device); self.t1, self.c1 = time.perf_counter(), time.process_time()

    n = len(train_ds)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = max_steps or steps_per_epoch * args.epochs
    fused = device.type in ("cuda", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        targs = training_args(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
            max_steps=max_steps if max_steps is not None else -1,
            learning_rate=args.lr, weight_decay=args.weight_decay, lr_scheduler_type="linear",
            warmup_steps=round(args.warmup * total), max_grad_norm=args.max_grad_norm,
            bf16=precision == "bf16", fp16=precision == "fp16", seed=args.seed, data_seed=args.seed,
            optim="adamw_torch_fused" if fused else "adamw_torch", eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
            dataloader_pin_memory=device.type == "cuda", remove_unused_columns=False,
            use_cpu=device.type == "cpu", group_by_length=args.trainer_group_by_length,
        )
        clock = Clock()
        # the library's padding rule on this device: each batch's longest on a CPU, a multiple of 8 on a GPU
        collator = DataCollatorWithPadding(tok, pad_to_multiple_of=None if device.type == "cpu" else 8, return_tensors="pt")
        trainer = Trainer(model=model, args=targs, train_dataset=TrainerDataset(train_ds), data_collator=collator, callbacks=[clock])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # "fast tokenizer: __call__ is faster than pad" and the like
            result = trainer.train()
    seconds = clock.t1 - clock.t0
    samples = min(total * args.batch_size, n * args.epochs) if max_steps else n * args.epochs
    return dict(seconds=seconds, cpu_seconds=clock.c1 - clock.c0, samples=samples, steps=trainer.state.global_step, samples_per_s=samples / seconds,
                train_loss=result.training_loss, train_runtime=result.metrics.get("train_runtime"), model=trainer.model)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification
    from bigmodel_nb.assets import load_sample, model_path
    from bigmodel_nb.core import autocast_dtype, get_device, precision_name
    from bigmodel_nb.data import TextClassificationData, load_tokenizer

    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads: torch.set_num_threads(args.threads)
    device = get_device(args.device)
    if device.type == "cuda" and device.index is not None: torch.cuda.set_device(device)   # Trainer uses the current GPU
    precision = args.precision if args.precision != "auto" else precision_name(autocast_dtype(device, "auto", training=True))
    dtype = autocast_dtype(device, precision)

    # data: one split, tokenized once, seen by both
    df = load_sample("movie_reviews")
    n_dup = int(df.duplicated("text").sum())
    df = df.drop_duplicates("text").reset_index(drop=True)      # the sample repeats 2 texts; TextClassificationData refuses them
    held = None
    if args.max_samples and args.max_samples < len(df):
        sub = df.sample(n=args.max_samples, random_state=args.seed)
        if args.heldout:                                         # sentences no run trains on: a larger, quieter test
            rest = df.drop(sub.index)
            rest = rest.sample(n=min(args.heldout, len(rest)), random_state=args.seed).reset_index(drop=True)
            held = TextClassificationData.from_df(rest, seed=args.seed, valid_pct=0.0, test_pct=0.0)
        df = sub.reset_index(drop=True)
    elif args.heldout: raise SystemExit("--heldout needs --max-samples: without a subsample every sentence is already in the split")
    data = TextClassificationData.from_df(df, seed=args.seed)
    tok = load_tokenizer(args.model)
    data.tokenize(tok, max_length=args.max_length)
    train_ds, test_ds = data.dataset("train"), data.dataset("test")
    if held is not None:
        if held.label2id != data.label2id: raise SystemExit("the held-out sentences have other labels than the subsample")
        held.tokenize(tok, max_length=args.max_length)
        held_ds = held.dataset("train")
    collate = data.collator()

    # one initial model, deep-copied for every run (same classifier-head initialisation)
    torch.manual_seed(args.seed)
    base = AutoModelForSequenceClassification.from_pretrained(model_path(args.model), num_labels=data.num_labels,
                                                              id2label=dict(data.id2label), label2id=dict(data.label2id))
    n_params = sum(p.numel() for p in base.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)" if device.type == "cpu" else str(device))
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    say(f"device {dev_name}, precision {precision}, model {args.model} ({n_params/1e6:.1f}M parameters), "
        f"train {len(train_ds):,} / test {len(test_ds):,} (dropped {n_dup} duplicate texts), batch {args.batch_size}, "
        f"epochs {args.epochs}, lr {args.lr:g}; torch {torch.__version__}, transformers {transformers.__version__}")

    # warm-up: each framework runs a few untimed steps on a throwaway copy first (kernels, allocator, lazy imports)
    if args.warmup_steps > 0:
        t = time.perf_counter()
        run_learner(copy.deepcopy(base), data, tok, args, precision, device, max_steps=args.warmup_steps)
        run_trainer(copy.deepcopy(base), train_ds, tok, args, precision, device, max_steps=args.warmup_steps)
        say(f"warm-up: {args.warmup_steps} steps each, {time.perf_counter() - t:.1f}s")

    variants = (args.variants or ("eager,graphs" if device.type == "cuda" else "eager")).split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or "eager" not in variants: raise SystemExit(f"--variants: {bad or variants} — pick from {', '.join(VARIANTS)}, eager included")
    flops = train_flops(base, train_ds.lengths, args.epochs)
    peak_bf16 = matmul_peak(device, torch.bfloat16)
    say(f"useful training FLOPs {flops:.3g} ({flops / args.epochs / len(train_ds):.3g} per example); "
        f"bf16 matmul peak here {peak_bf16 / 1e12:.3g} TFLOP/s")

    runs, load_before = {}, _loadavg()
    names = ["learner" if v == "eager" else f"learner-{v}" for v in variants]
    order = [*names, "trainer"] if args.order == "learner-first" else ["trainer", *names]
    for name in order:
        model = copy.deepcopy(base)
        variant = "eager" if name == "learner" else name.removeprefix("learner-")
        with PeakMemory(device) as mem:
            r = (run_trainer(model, train_ds, tok, args, precision, device) if name == "trainer"
                 else run_learner(model, data, tok, args, precision, device, variant=variant))
        r["peak_memory_mb"] = mem.peak
        model = r.pop("model")
        r["accuracy"] = test_accuracy(model, test_ds, collate, device, dtype)
        if held is not None: r["heldout_accuracy"] = test_accuracy(model, held_ds, collate, device, dtype)
        r["samples_per_cpu_s"] = r["samples"] / r["cpu_seconds"]
        r["mfu"] = flops / r["seconds"] / peak_bf16
        runs[name] = r
        say(f"{name}: {r['samples']:,} samples in {r['seconds']:.1f}s = {r['samples_per_s']:.1f} samples/s "
            f"({r['cpu_seconds']:.1f} process CPU-s), train loss {r['train_loss']:.4f}, test accuracy {r['accuracy']:.4f}, "
            + (f"held-out accuracy {r['heldout_accuracy']:.4f} ({len(held_ds):,}), " if held is not None else "") +
            f"MFU {100 * r['mfu']:.2f}%, peak memory {r['peak_memory_mb']:,.0f} MB" + (f" [{r['graph_status']}]" if r.get("graph_status", "off") != "off" else "")
            + (f" [last layer: {r['first_token_status']}]" if r.get("first_token_status") not in (None, "on") else ""))
        del model
    load_after = _loadavg()

    L, T = runs["learner"], runs["trainer"]
    ratio = L["samples_per_s"] / T["samples_per_s"]
    cpu_ratio = L["samples_per_cpu_s"] / T["samples_per_cpu_s"]
    say("")
    say(f"| {'':28} | {'samples/s':>10} | {'× Trainer':>9} | {'train s':>8} | {'samples/CPU-s':>13} | {'test acc':>8} | {'MFU %':>6} | {'peak MB':>8} |")
    say(f"|{'-'*30}|{'-'*12}|{'-'*11}|{'-'*10}|{'-'*15}|{'-'*10}|{'-'*8}|{'-'*10}|")
    for name, r in [*((n, runs[n]) for n in names), ("trainer", T)]:
        say(f"| {name:28} | {r['samples_per_s']:10.1f} | {r['samples_per_s'] / T['samples_per_s']:9.2f} | {r['seconds']:8.1f} | "
            f"{r['samples_per_cpu_s']:13.1f} | {r['accuracy']:8.4f} | {100 * r['mfu']:6.2f} | {r['peak_memory_mb']:8,.0f} |")
    say(f"| {'Learner (eager) − Trainer':28} | {'':10} | {ratio:9.2f} | {'':8} | {cpu_ratio:13.2f} | {L['accuracy'] - T['accuracy']:+8.4f} | {'':6} | {'':8} |")
    say(f"(load average before {load_before}, after {load_after}; on a shared machine a high load makes wall-clock rates noisy)")
    if args.json:
        import accelerate
        out = dict(date=datetime.date.today().isoformat(), device=dev_name, model=args.model, n_params=n_params,
                   n_train=len(train_ds), n_test=len(test_ds), batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                   precision=precision, seed=args.seed, order=args.order, warmup_steps=args.warmup_steps,
                   trainer_group_by_length=args.trainer_group_by_length, torch_threads=torch.get_num_threads(),
                   learner_samples_per_s=L["samples_per_s"], trainer_samples_per_s=T["samples_per_s"], ratio=ratio,
                   learner_accuracy=L["accuracy"], trainer_accuracy=T["accuracy"],
                   learner_heldout_accuracy=L.get("heldout_accuracy"), trainer_heldout_accuracy=T.get("heldout_accuracy"),
                   learner_train_s=L["seconds"], trainer_train_s=T["seconds"],
                   learner_cpu_s=L["cpu_seconds"], trainer_cpu_s=T["cpu_seconds"], cpu_ratio=cpu_ratio,
                   learner_train_loss=L["train_loss"], trainer_train_loss=T["train_loss"],
                   learner_library_samples_per_s=L.get("library_samples_per_s"), trainer_train_runtime=T.get("train_runtime"),
                   load_before=load_before, load_after=load_after, train_flops=flops, bf16_matmul_peak_flops=peak_bf16,
                   learner_mfu=L["mfu"], trainer_mfu=T["mfu"], learner_peak_memory_mb=L["peak_memory_mb"],
                   trainer_peak_memory_mb=T["peak_memory_mb"],
                   variants={n: dict(samples_per_s=r["samples_per_s"], ratio=r["samples_per_s"] / T["samples_per_s"],
                                     accuracy=r["accuracy"], heldout_accuracy=r.get("heldout_accuracy"), train_s=r["seconds"], cpu_s=r["cpu_seconds"], mfu=r["mfu"],
                                     peak_memory_mb=r["peak_memory_mb"], train_loss=r["train_loss"],
                                     graph_status=r.get("graph_status"), first_token_status=r.get("first_token_status")) for n, r in runs.items()},
                   python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                   accelerate=accelerate.__version__, numpy=np.__version__, platform=platform.platform())
        print(json.dumps(out), flush=True)
    return runs


if __name__ == "__main__":
    main()
