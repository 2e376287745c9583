#!/usr/bin/env python
"""Compress one fine-tuned classifier every way `bigmodel_nb.compress` offers and measure each form against it.

A MiniLM is fine-tuned on the movie-review sentences (or `--model DIR` names one already saved), then turned
into fp16, bf16, int8 (PyTorch through torchao, and ONNX Runtime), ONNX fp32, and a three-layer student
distilled from it (as is, and as ONNX int8). Every form is timed with `compress.inference_speed` on the same
test sentences in the same process (latency at batch 1, throughput at batch 32, medians) and scored on the
whole test split; the ratios are against the fp32 model measured in the same run.

    python bench/bench_compress.py                        # full train split; about 10 min on a 2-core CPU
    python bench/bench_compress.py --max-train 2000 --json
    python bench/bench_compress.py --model runs/movie_reviews-minilm-<time>    # a model fine-tuned before

Targets (see bench/README.md): int8 >= 1.5x the fp32 throughput at batch 32, <= 0.5x its size, <= 1 point of
accuracy lost; the distilled student >= 1.8x the throughput within 2 points.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGETS = dict(int8_throughput=1.5, int8_size=0.5, int8_points=1.0, student_throughput=1.8, student_points=2.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a fine-tuned classifier folder (bigmodel-nb finetune's output); default: fine-tune MiniLM here")
    p.add_argument("--max-train", type=int, default=None, help="fine-tune on this many training sentences (seeded sample); default: all")
    p.add_argument("--epochs", type=int, default=1, help="the teacher's epochs, when it is fine-tuned here")
    p.add_argument("--student-epochs", type=int, default=2)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="the weight of the teacher's term in the student's loss")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch's threads and ONNX Runtime's, for training and timing")
    p.add_argument("--latency-n", type=int, default=50, help="sentences timed one at a time")
    p.add_argument("--batches", type=int, default=10, help="batches of 32 timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def log(*args):
    print(*args, file=sys.stderr if ARGS.json else sys.stdout, flush=True)


def saved_bytes(model) -> int:
    buffer = io.BytesIO()
    import torch
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def main(argv=None) -> int:
    global ARGS
    ARGS = a = parse_args(argv)
    import numpy as np
    import torch
    from bigmodel_nb.compress import (Distill, drop_layers, export_onnx, import_torchao, inference_speed, load_onnx, quantize,
                                      quantize_onnx)
    from bigmodel_nb.core import set_seed
    from bigmodel_nb.data import DataWarning, TextClassificationData
    from bigmodel_nb.learner import HParams, Learner
    from bigmodel_nb.models import load_classifier
    from bigmodel_nb.predict import Predictor

    warnings.simplefilter("ignore", DataWarning)
    torch.set_num_threads(a.threads)
    try: import_torchao(); have_torchao = True
    except ImportError: have_torchao = False
    load_before = os.getloadavg()

    reviews = TextClassificationData.from_asset("movie_reviews")
    train = np.flatnonzero(reviews.df.split == "train")
    if a.max_train: train = np.random.default_rng(a.seed).permutation(train)[:a.max_train]
    data = reviews.subset(np.concatenate([train, np.flatnonzero(reviews.df.split == "test")]))
    set_seed(a.seed)
    teacher_s = None
    if a.model:
        teacher, tok = load_classifier(a.model)
        log(f"teacher: {a.model}")
    else:
        teacher, tok = load_classifier("minilm", data)
    data.tokenize(tok, max_length=a.max_length)
    if not a.model:
        t0 = time.perf_counter()
        Learner(teacher, data, HParams(lr=1e-4, epochs=a.epochs, batch_size=32, seed=a.seed), tokenizer=tok, progress=False).fit()
        teacher_s = time.perf_counter() - t0
        log(f"teacher: MiniLM fine-tuned on {len(train):,} sentences x {a.epochs} epoch(s) in {teacher_s:.0f} s")
    teacher.eval()
    test = data.df[data.df.split == "test"]
    texts = list(test.text)
    y = torch.tensor([teacher.config.label2id[l] for l in test.label])
    need = max(a.latency_n + 1, (a.batches + 1) * 32)
    if len(texts) < need: raise SystemExit(f"the test split has {len(texts)} sentences; --latency-n and --batches need {need}")

    rows, reference = {}, {}

    def measure(name, model, size):
        with torch.no_grad(): pred = Predictor(model, tok, max_length=a.max_length).outputs(texts).argmax(-1)
        reference.setdefault("pred", pred)
        one = inference_speed(model, tok, texts, batch_size=1, batches=a.latency_n, max_length=a.max_length)
        many = inference_speed(model, tok, texts, batch_size=32, batches=a.batches, max_length=a.max_length)
        rows[name] = dict(weights_mb=size / 1e6, latency_ms=one["ms_per_batch"], throughput=many["texts_per_s"],
                          accuracy=(pred == y).float().mean().item(), agreement=(pred == reference["pred"]).float().mean().item())
        log(f"  {name:<28} {size / 1e6:7.1f} MB {one['ms_per_batch']:7.1f} ms {many['texts_per_s']:7.0f}/s  acc {rows[name]['accuracy']:.4f}")

    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    log(f"measuring on {len(texts):,} test sentences, {a.threads} thread(s)")
    measure("fp32", teacher, saved_bytes(teacher))
    for method, name in (("fp16", "fp16"), ("bf16", "bf16")) + ((("int8-dynamic", "int8 dynamic (torchao)"),) if have_torchao else ()):
        q = quantize(teacher, method)
        measure(name, q, saved_bytes(q))
    onnx32 = export_onnx(teacher, tok, work / "onnx-fp32")
    onnx8 = quantize_onnx(onnx32, work / "onnx-int8")
    for name, folder in (("ONNX fp32", onnx32), ("ONNX int8", onnx8)):
        measure(name, load_onnx(folder, threads=a.threads)[0], (folder / "model.onnx").stat().st_size)

    set_seed(a.seed)
    student = drop_layers(teacher)
    t0 = time.perf_counter()
    Learner(student, data, HParams(lr=1e-4, epochs=a.student_epochs, batch_size=32, seed=a.seed), tokenizer=tok, progress=False,
            cbs=[Distill(teacher, T=a.temperature, alpha=a.alpha)]).fit()
    student_s = time.perf_counter() - t0
    log(f"student: 3 of 6 layers, distilled for {a.student_epochs} epoch(s) in {student_s:.0f} s")
    student.eval()
    measure("student (distilled)", student, saved_bytes(student))
    s8 = quantize_onnx(export_onnx(student, tok, work / "student-fp32"), work / "student-int8")
    measure("student, ONNX int8", load_onnx(s8, threads=a.threads)[0], (s8 / "model.onnx").stat().st_size)

    fp32 = rows["fp32"]
    for r in rows.values():
        r.update(size_ratio=r["weights_mb"] / fp32["weights_mb"], throughput_ratio=r["throughput"] / fp32["throughput"],
                 latency_ratio=fp32["latency_ms"] / r["latency_ms"], points_lost=100 * (fp32["accuracy"] - r["accuracy"]))
    T = TARGETS
    def int8_ok(r): return r["throughput_ratio"] >= T["int8_throughput"] and r["size_ratio"] <= T["int8_size"] and r["points_lost"] <= T["int8_points"]
    targets = {"ONNX int8": int8_ok(rows["ONNX int8"]),
               "student (distilled)": rows["student (distilled)"]["throughput_ratio"] >= T["student_throughput"]
                                      and rows["student (distilled)"]["points_lost"] <= T["student_points"]}
    if have_torchao: targets["int8 dynamic (torchao)"] = int8_ok(rows["int8 dynamic (torchao)"])

    header = f"{'form':<28} {'MB':>7} {'x size':>7} {'ms, 1':>7} {'x lat':>6} {'sent/s, 32':>11} {'x thru':>7} {'accuracy':>9} {'pts lost':>8} {'agree':>6}"
    print(header)
    for name, r in rows.items():
        print(f"{name:<28} {r['weights_mb']:7.1f} {r['size_ratio']:7.2f} {r['latency_ms']:7.1f} {r['latency_ratio']:6.2f} "
              f"{r['throughput']:11.0f} {r['throughput_ratio']:7.2f} {r['accuracy']:9.4f} {r['points_lost']:8.1f} {r['agreement']:6.3f}")
    for name, ok in targets.items(): print(f"target for {name}: {'met' if ok else 'MISSED'}")
    if a.json:
        import onnxruntime, transformers
        print(json.dumps(dict(
            date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=platform.processor() or platform.machine(),
            cores=os.cpu_count(), threads=a.threads, model=a.model or "minilm", n_train=len(train), n_test=len(texts),
            teacher_epochs=None if a.model else a.epochs, teacher_train_s=teacher_s, student_epochs=a.student_epochs, student_train_s=student_s,
            temperature=a.temperature, alpha=a.alpha, max_length=a.max_length, latency_n=a.latency_n, batches=a.batches,
            forms=rows, targets=TARGETS, targets_met=targets, load_before=load_before, load_after=os.getloadavg(),
            versions=dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                          onnxruntime=onnxruntime.__version__))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
