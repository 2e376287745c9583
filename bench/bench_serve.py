#!/usr/bin/env python
"""Load-test the HTTP server of `bigmodel_nb.serve` on loopback: 1 to 64 concurrent clients, with micro-batching and without.

The server runs in a process of its own (as `bigmodel-nb serve` would), the clients are threads of this one, each in a closed
loop: send one sentence, wait for the answer, send the next, over one kept-alive connection. For every number of clients and
both settings (`--max-batch` texts per pass, and 1: each request alone) it reports requests per second, client-side latency
percentiles, the server's mean batch, and Little's law twice: on the server (L, the time-average of requests inside it,
against lambda * W) and for the closed loop (N clients against throughput x mean response time).

    python bench/bench_serve.py                                  # MiniLM with a new head; about 4 min on a 2-core CPU
    python bench/bench_serve.py --model runs/movie_reviews-minilm-<time> --seconds 20 --json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


SERVER = """
import sys
from bigmodel_nb.serve import serve
serve(sys.argv[1], port=int(sys.argv[2]), max_batch=int(sys.argv[3]), max_wait_ms=float(sys.argv[4]), max_length=int(sys.argv[5]),
      device="cpu", log_level="warning")
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a saved classifier folder; default: MiniLM with a new two-class head (the speed is the same)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per setting, after a warm-up of a quarter of that")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def log(*a):
    print(*a, file=sys.stderr if ARGS.json else sys.stdout, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def start_server(folder, max_batch, max_wait_ms, max_length):
    from bigmodel_nb.serve import ServeClient
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(folder), str(port), str(max_batch), str(max_wait_ms), str(max_length)])
    try: ServeClient(f"http://127.0.0.1:{port}").wait(timeout=180, process=proc)
    except BaseException as e:
        proc.kill()
        raise SystemExit(str(e)) if isinstance(e, (RuntimeError, TimeoutError)) else e
    return proc, port


def main(argv=None) -> int:
    global ARGS
    ARGS = a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bigmodel_nb.assets import load_sample
    from bigmodel_nb.serve import load_test
    folder = a.model
    if folder is None:
        from bigmodel_nb.models import load_classifier, quiet_transformers
        model, tok = load_classifier("minilm", labels=["negative", "positive"])
        folder = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "minilm"
        with quiet_transformers(): model.save_pretrained(folder); tok.save_pretrained(folder)
    texts = list(load_sample("movie_reviews").sample(2000, random_state=0).text)
    rows = []
    for mode, max_batch in (("batched", a.max_batch), ("one at a time", 1)):
        proc, port = start_server(folder, max_batch, a.max_wait_ms if max_batch > 1 else 0.0, a.max_length)
        try:
            table = load_test(f"http://127.0.0.1:{port}", texts, a.clients, a.seconds)
            for n, r in table.iterrows():
                if r.errors: raise SystemExit(f"{int(r.errors)} requests failed with {n} clients")
                rows.append(dict(mode=mode, max_batch=max_batch, clients=int(n), requests_per_s=r.requests_per_s, p50_ms=r.p50_ms,
                                 p95_ms=r.p95_ms, p99_ms=r.p99_ms, mean_batch=r.mean_batch, clients_N=int(n), x_times_r=r.X_times_R,
                                 server_L=r.server_L, server_lam_W=r.server_lam_W))
                r = rows[-1]
                log(f"  {mode:<14} {n:3d} clients: {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:7.1f}  p95 {r['p95_ms']:7.1f}  "
                    f"p99 {r['p99_ms']:7.1f} ms  batch {r['mean_batch'] or 0:5.1f}  N={n} vs X*R={r['x_times_r']:.2f}  L={r['server_L']:.2f} "
                    f"vs lambda*W={r['server_lam_W']:.2f}")
        finally:
            proc.terminate(); proc.wait(timeout=60)
    print(f"{'mode':<14} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'batch':>6} {'X*R':>6}")
    for r in rows:
        print(f"{r['mode']:<14} {r['clients']:7d} {r['requests_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['mean_batch'] or 0:6.1f} {r['x_times_r']:6.2f}")
    if a.json:
        import torch
        print(json.dumps(dict(date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=platform.processor() or platform.machine(),
                              cores=os.cpu_count(), model=str(a.model or "minilm (new head)"), max_length=a.max_length, max_wait_ms=a.max_wait_ms,
                              seconds=a.seconds, rows=rows, load=os.getloadavg(), torch=torch.__version__)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
