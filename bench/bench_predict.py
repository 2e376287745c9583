#!/usr/bin/env python
"""Classify the same texts with the same model through `bigmodel_nb`'s `Predictor` and through transformers' `pipeline`.

One model object (MiniLM with a classification head for the movie-review labels, or `--model DIR`, a folder
written by `bigmodel-nb finetune`), in eval mode, serves both: `Predictor(model, tok, batch_size=32, max_length=128)`
and `pipeline("text-classification", model=model, tokenizer=tok, batch_size=32)` called with `truncation=True,
max_length=128`. The texts are the first `--n` movie-review sentences in file order. After one untimed warm-up call
each, every timed call goes over all the texts, `--repeats` times, alternating which one goes first; the medians
are reported, with the labels' agreement and the largest difference between the two paths' probabilities.

    python bench/bench_predict.py --threads 1                   # 2,000 texts, batch 32, CPU; a few minutes
    python bench/bench_predict.py --threads 1 --n 10603 --json  # every sentence; JSON on the last line
    python bench/bench_predict.py --breakdown --threads 1       # also: where each path spends its time
    python bench/bench_predict.py --model runs/movie_reviews-minilm-<time> --device cuda

Target (see bench/README.md): the Predictor >= 2x the pipeline's texts/s at batch 32 on the CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET = 2.0                      # Predictor texts/s over the pipeline's, batch 32, CPU
MIN_AGREEMENT, MAX_PROB_DIFF = 0.999, 1e-4   # the two paths must give the same answers (the probability bound is for fp32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a classifier folder written by `bigmodel-nb finetune`; None: MiniLM with a new, seeded head")
    p.add_argument("--n", type=int, default=2000, help="how many movie-review sentences, from the start of the file (duplicates dropped)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass, in both")
    p.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens (at most the model's limit), in both")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each over all the texts; the median is reported")
    p.add_argument("--warmup", type=int, default=64, help="texts in the one untimed call of each before any timing")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast for both (the pipeline's calls run inside the same torch.autocast); auto: the library's "
                        "choice for prediction (bigmodel_nb.core.autocast_dtype): bf16/fp16 on CUDA, fp32 on a CPU")
    p.add_argument("--cuda-graphs", choices=("on", "off", "auto"), default="off",
                   help="the Predictor's forward passes replayed from CUDA graphs (Predictor(cuda_graphs=...)); on a CPU it says why not")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0; None: the best available")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None: torch's choice")
    p.add_argument("--seed", type=int, default=0, help="seeds the new classification head")
    p.add_argument("--breakdown", action="store_true",
                   help="after the timed runs, time each path's stages apart, one pass each: tokenizing, padding, forward, decoding")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line (progress then goes to stderr)")
    return p.parse_args(argv)


def _loadavg():
    try: return [round(x, 2) for x in os.getloadavg()]
    except OSError: return None


def sync(device):
    import torch
    if device.type == "cuda": torch.cuda.synchronize(device)


def cpu_name() -> str:
    "The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


# ---- the model and the texts ------------------------------------------------------------------------------------
def load_texts(n:int) -> list:
    "The first `n` distinct movie-review sentences, in the file's order."
    from bigmodel_nb.assets import load_sample
    df = load_sample("movie_reviews").drop_duplicates("text").reset_index(drop=True)
    if n > len(df): raise SystemExit(f"--n {n:,}: movie_reviews has only {len(df):,} distinct sentences")
    return df.text.iloc[:n].tolist()


def build_model(args):
    "`(model, tokenizer)`: a saved classifier, or MiniLM with a seeded new head for the movie-review labels; eval mode, fp32."
    import torch
    from bigmodel_nb.assets import load_sample
    from bigmodel_nb.data import TextClassificationData, load_tokenizer
    from bigmodel_nb.models import NewHeadWarning, load_classifier, quiet_transformers
    if args.model:
        from bigmodel_nb.predict import Predictor
        p = Predictor.from_pretrained(args.model, device="cpu")
        model, tok = p.model, p.tokenizer
        if not isinstance(model, torch.nn.Module):
            raise SystemExit(f"{args.model} is not a PyTorch model (an ONNX export?); transformers' pipeline needs one")
    else:
        df = load_sample("movie_reviews").drop_duplicates("text")
        data = TextClassificationData.from_df(df, seed=0)
        tok = load_tokenizer("minilm")
        torch.manual_seed(args.seed)
        with quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore", NewHeadWarning)            # a random head is expected: speed does not depend on it
            model, _ = load_classifier("minilm", data)
    return model.float().eval(), tok


def make_predictor(model, tok, args, device, max_length):
    from bigmodel_nb.predict import Predictor
    return Predictor(model, tok, device=device, precision=args.precision, batch_size=args.batch_size, max_length=max_length,
                     cuda_graphs=args.cuda_graphs)


def make_pipeline(model, tok, args, device, max_length, dtype):
    "A text-classification pipeline over the same model object; calling it runs under the Predictor's autocast."
    import torch
    from transformers import pipeline
    from bigmodel_nb.models import quiet_transformers
    with quiet_transformers(): pipe = pipeline("text-classification", model=model, tokenizer=tok, device=device, batch_size=args.batch_size)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)   # disabled in fp32
    def classify(texts):
        with autocast(): return pipe(texts, truncation=True, max_length=max_length)
    classify.pipe, classify.autocast = pipe, autocast
    return classify


# ---- measuring --------------------------------------------------------------------------------------------------
def timed(fn, texts, device) -> tuple:
    "`(fn(texts), wall seconds, process CPU seconds)`, the device synchronized at both edges."
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn(texts)
    sync(device)
    return out, time.perf_counter() - t, time.process_time() - c


def measure(paths:dict, texts, device, repeats:int, say) -> tuple:
    "Every path over all `texts`, `repeats` times, the order alternating; `(last outputs per path, runs per path)`."
    names, outputs, runs = list(paths), {}, {name: [] for name in paths}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            outputs[name], wall, cpu = timed(paths[name], texts, device)
            runs[name].append(dict(seconds=wall, cpu_seconds=cpu))
            say(f"  repeat {r + 1}, {name}: {len(texts) / wall:7.1f} texts/s ({wall:.2f} s, {cpu:.2f} CPU-s)")
    return outputs, runs


def summarize(runs:list, n:int) -> dict:
    wall, cpu = [r["seconds"] for r in runs], [r["cpu_seconds"] for r in runs]
    return dict(texts_per_s=n / statistics.median(wall), texts_per_cpu_s=n / statistics.median(cpu),
                seconds=statistics.median(wall), cpu_seconds=statistics.median(cpu),
                all_texts_per_s=[n / w for w in wall], all_texts_per_cpu_s=[n / c for c in cpu])


def agreement(predictor_out:list, pipeline_out:list) -> dict:
    "The share of texts with the same label, and the largest gap between the pipeline's score and the Predictor's probability of that label."
    same = sum(a["label"] == b["label"] for a, b in zip(predictor_out, pipeline_out))
    gap = max(abs(a["probs"][b["label"]] - b["score"]) for a, b in zip(predictor_out, pipeline_out))
    share = same / len(pipeline_out)
    return dict(agreement=share, disagreements=len(pipeline_out) - same, max_prob_diff=gap,
                agreement_ok=share >= MIN_AGREEMENT and gap <= MAX_PROB_DIFF)


def padding(tok, texts, batch_size:int, max_length:int, collate) -> dict:
    "Tokens per text each path feeds the model: the Predictor's length-sorted batches (its own `collate`) against file-order batches padded to their longest."
    from bigmodel_nb.data import SortedBatchSampler
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    sorted_tokens = sum(len(b) * collate.padded_length(max(lengths[i] for i in b)) for b in SortedBatchSampler(lengths, batch_size))
    chunks = [lengths[s:s + batch_size] for s in range(0, len(lengths), batch_size)]
    file_tokens = sum(len(c) * max(c) for c in chunks)
    n = len(texts)
    return dict(real_tokens_per_text=sum(lengths) / n, longest=max(lengths), predictor_tokens_per_text=sorted_tokens / n,
                pipeline_tokens_per_text=file_tokens / n, padding_ratio=file_tokens / sorted_tokens)


# ---- where the time goes (--breakdown) --------------------------------------------------------------------------
def clock(fn, device) -> tuple:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def breakdown_predictor(predictor, texts, device) -> dict:
    "The Predictor's stages one after another, as `predict` runs them: one tokenizer call, sort and pad, forward, decode."
    import torch
    from bigmodel_nb.data import SortedBatchSampler
    ids, t_tok = clock(lambda: predictor.encode(texts), device)
    def pad():
        sampler = SortedBatchSampler([len(x) for x in ids], predictor.batch_size)
        collate = predictor.text_collator()
        return sampler, [collate([{"input_ids": ids[i], "label": predictor.task.pad_target} for i in b]) for b in sampler]
    (sampler, batches), t_pad = clock(pad, device)
    outs, t_fwd = clock(lambda: [predictor.forward(b) for b in batches], device)
    _, t_rest = clock(lambda: predictor.task.decode(sampler.unsort(torch.cat(outs))), device)
    tokens = sum(b["input_ids"].numel() for b in batches)
    return dict(tokenize=t_tok, pad=t_pad, forward=t_fwd, rest=t_rest, tokens=tokens)


def breakdown_pipeline(classify, texts, device, max_length:int) -> dict:
    "The pipeline's stages apart: `preprocess` per text, its padding collate per batch, `forward` per batch, then each row split off and `postprocess`ed."
    from transformers.pipelines.base import pad_collate_fn
    pipe = classify.pipe
    bs = pipe._batch_size
    feats, t_tok = clock(lambda: [pipe.preprocess(t, truncation=True, max_length=max_length) for t in texts], device)
    collate = pad_collate_fn(pipe.tokenizer, None)
    batches, t_pad = clock(lambda: [collate(feats[s:s + bs]) for s in range(0, len(feats), bs)], device)
    def forward():
        with classify.autocast(): return [pipe.forward(b) for b in batches]
    outs, t_fwd = clock(forward, device)
    rows = lambda: [pipe.postprocess({"logits": o["logits"][i:i + 1]}) for o in outs for i in range(len(o["logits"]))]
    _, t_rest = clock(rows, device)
    tokens = sum(b["input_ids"].numel() for b in batches)
    return dict(tokenize=t_tok, pad=t_pad, forward=t_fwd, rest=t_rest, tokens=tokens)


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import torch
    import transformers
    from bigmodel_nb.core import autocast_dtype, get_device, precision_name
    from bigmodel_nb.data import model_max_length

    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads: torch.set_num_threads(args.threads)
    device = get_device(args.device)
    dtype = autocast_dtype(device, args.precision)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))

    texts = load_texts(args.n)
    model, tok = build_model(args)
    max_length = min(args.max_length, model_max_length(tok) or 512)
    predictor = make_predictor(model, tok, args, device, max_length)        # moves the model to `device`
    classify = make_pipeline(model, tok, args, device, max_length, dtype)
    if classify.pipe.model is not model: raise SystemExit("the pipeline made its own model; it must use the Predictor's")
    n_params = sum(p.numel() for p in model.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_name()} ({os.cpu_count()} cores)"
    pad = padding(tok, texts, args.batch_size, max_length, predictor.text_collator())
    say(f"device {dev_name}, {torch.get_num_threads()} torch thread(s), precision {precision_name(dtype)}; model {args.model or 'minilm'} "
        f"({n_params / 1e6:.1f}M parameters); {len(texts):,} texts (mean {pad['real_tokens_per_text']:.1f} tokens, longest "
        f"{pad['longest']}), batch {args.batch_size}, max length {max_length}; torch {torch.__version__}, transformers {transformers.__version__}")

    paths = {"Predictor": predictor.predict, "pipeline": classify}
    for name, fn in paths.items():
        _, wall, _ = timed(fn, texts[:args.warmup], device)
        say(f"warm-up, {name}: {min(args.warmup, len(texts))} texts in {wall:.2f} s")
    load_before = _loadavg()
    outputs, runs = measure(paths, texts, device, args.repeats, say)
    load_after = _loadavg()

    P, Q = summarize(runs["Predictor"], len(texts)), summarize(runs["pipeline"], len(texts))
    ratio, cpu_ratio = P["texts_per_s"] / Q["texts_per_s"], P["texts_per_cpu_s"] / Q["texts_per_cpu_s"]
    agree = agreement(outputs["Predictor"], outputs["pipeline"])
    stages = None
    if args.breakdown:
        stages = dict(Predictor=breakdown_predictor(predictor, texts, device),
                      pipeline=breakdown_pipeline(classify, texts, device, max_length))

    print(f"| {'':10} | {'texts/s':>8} | {'s':>7} | {'texts/CPU-s':>11} | {'padded tokens/text':>18} |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 9}|{'-' * 13}|{'-' * 20}|")
    for name, r, tokens in (("Predictor", P, pad["predictor_tokens_per_text"]), ("pipeline", Q, pad["pipeline_tokens_per_text"])):
        print(f"| {name:10} | {r['texts_per_s']:8.1f} | {r['seconds']:7.2f} | {r['texts_per_cpu_s']:11.1f} | {tokens:18.1f} |")
    print(f"| {'ratio':10} | {ratio:8.2f} | {'':7} | {cpu_ratio:11.2f} | {pad['padding_ratio']:18.2f} |")
    print(f"labels agree on {agree['agreement']:.2%} of {len(texts):,} texts ({agree['disagreements']} differ); "
          f"largest probability difference {agree['max_prob_diff']:.1e} ({'ok' if agree['agreement_ok'] else 'NOT within'} "
          f">= {MIN_AGREEMENT:.1%} and <= {MAX_PROB_DIFF:g}); real tokens per text {pad['real_tokens_per_text']:.1f}")
    print(f"target (Predictor >= {TARGET:g}x the pipeline's texts/s): {'met' if ratio >= TARGET else 'MISSED'} ({ratio:.2f}x); "
          f"load average before {load_before}, after {load_after}")
    if stages:
        print(f"\n| seconds over {len(texts):,} texts, one pass | tokenize | pad | forward | decode | forward ms per 1k tokens |")
        print("|---|---|---|---|---|---|")
        for name, s in stages.items():
            print(f"| {name} | {s['tokenize']:.3f} | {s['pad']:.3f} | {s['forward']:.2f} | {s['rest']:.3f} | {1e3 * s['forward'] / s['tokens'] * 1e3:.1f} |")
    if args.json:
        versions = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__, numpy=np.__version__)
        try:
            import tokenizers
            versions["tokenizers"] = tokenizers.__version__
        except ImportError: pass
        out = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=dev_name, model=args.model or "minilm",
                   n_params=n_params, n=len(texts), batch_size=args.batch_size, max_length=max_length, repeats=args.repeats,
                   precision=precision_name(dtype), threads=torch.get_num_threads(),
                   predictor_texts_per_s=P["texts_per_s"], pipeline_texts_per_s=Q["texts_per_s"], ratio=ratio,
                   predictor_texts_per_cpu_s=P["texts_per_cpu_s"], pipeline_texts_per_cpu_s=Q["texts_per_cpu_s"], cpu_ratio=cpu_ratio,
                   predictor_runs=P["all_texts_per_s"], pipeline_runs=Q["all_texts_per_s"],
                   predictor_cpu_runs=P["all_texts_per_cpu_s"], pipeline_cpu_runs=Q["all_texts_per_cpu_s"],
                   target=TARGET, target_met=ratio >= TARGET, **agree, **pad, breakdown=stages,
                   load_before=load_before, load_after=load_after, versions=versions, platform=platform.platform())
        print(json.dumps(out), flush=True)
    return dict(predictor=P, pipeline=Q, ratio=ratio, cpu_ratio=cpu_ratio, agreement=agree, padding=pad, breakdown=stages)


if __name__ == "__main__":
    main()
