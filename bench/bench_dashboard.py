"""Dashboard overhead: the same training run with and without the panel steering it.

The panel's callback runs in the training thread (progress updates, status, and throttled plot
redraws), so it costs training time. This script trains the same model on the same data several
times, alternating "fit() alone" and "Dashboard.start()", and compares training throughput
(examples per second of training time, evaluation excluded). The target: at most 5% slower.

    python bench/bench_dashboard.py                      # MiniLM, 1,200 movie reviews, 1 epoch, 2 repeats
    python bench/bench_dashboard.py --model tiny          # a 2-layer BERT: fast steps, where overhead shows most
    python bench/bench_dashboard.py --json                # one JSON object on the last line
"""
import argparse
import copy
import json
import statistics
import sys
import threading
import time

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, logging as hf_logging

from bigmodel_nb.assets import load_sample
from bigmodel_nb.core import get_device, set_seed
from bigmodel_nb.dashboard import Dashboard
from bigmodel_nb.data import TextClassificationData, load_tokenizer
from bigmodel_nb.learner import HParams, Learner
from bigmodel_nb.models import load_classifier


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", help="'minilm', 'tiny' (a 2-layer BERT with random weights) or a folder")
    ap.add_argument("--max-samples", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternated")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both modes (on a busy machine use 1: "
                    "threads waiting for each other swamp what is measured)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    hf_logging.set_verbosity_error(); hf_logging.disable_progress_bar()
    if args.threads: torch.set_num_threads(args.threads)
    out = sys.stderr if args.json else sys.stdout

    df = load_sample("movie_reviews").sample(args.max_samples, random_state=0)
    data = TextClassificationData.from_df(df, on_invalid="drop")
    tok = load_tokenizer("minilm")
    data.tokenize(tok)
    set_seed(0)
    if args.model == "tiny":
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=256, num_labels=data.num_labels)
        base = BertForSequenceClassification(cfg)
    else:
        base, _ = load_classifier(args.model, data)

    rates = {"fit": [], "dashboard": []}
    for r in range(args.repeats):
        for mode in ("fit", "dashboard") if r % 2 == 0 else ("dashboard", "fit"):
            learn = Learner(copy.deepcopy(base), data, HParams(lr=5e-5, batch_size=args.batch_size, epochs=args.epochs),
                            tokenizer=tok, device=args.device, progress=False)
            if mode == "fit":                                  # in a thread too, so both modes run under the same threading
                t = threading.Thread(target=learn.fit); t.start(); t.join()
            else:
                dash = Dashboard(learn)
                dash.start(); dash.thread.join()
                dash.close()
            rate = learn.samples_seen / learn._train_time
            rates[mode].append(rate)
            print(f"run {r + 1} {mode:9s}: {rate:8.1f} examples/s of training time", file=out, flush=True)
    fit, dash = statistics.median(rates["fit"]), statistics.median(rates["dashboard"])
    result = dict(model=args.model, device=str(get_device(args.device)), n_train=len(learn.train_ds), epochs=args.epochs,
                  batch_size=args.batch_size, repeats=args.repeats, fit_samples_per_s=fit, dashboard_samples_per_s=dash,
                  slowdown_pct=100 * (1 - dash / fit), torch=torch.__version__)
    print(f"fit() alone {fit:.1f} ex/s, with the dashboard {dash:.1f} ex/s: {result['slowdown_pct']:+.1f}% slower", file=out)
    if args.json: print(json.dumps(result))


if __name__ == "__main__":
    main()
