"""Where a Learner training step spends its time: wall clock per step at several batch sizes, then one
`torch.profiler` window (CPU and, on a GPU, CUDA activity) with the busiest operators and the device's busy share.

    python bench/profile_step.py                      # the best device here, MiniLM on movie_reviews
    python bench/profile_step.py --device cpu --batch-sizes 32 --steps 10
"""
import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bigmodel_nb.assets import load_sample
from bigmodel_nb.core import get_device
from bigmodel_nb.data import TextClassificationData
from bigmodel_nb.learner import Callback, HParams, Learner
from bigmodel_nb.models import load_classifier, quiet_transformers


class Window(Callback):
    "Time (and optionally profile) optimizer steps `skip` .. `skip + n`, then stop the run."
    order = 99
    def __init__(self, skip, n, prof=None): self.skip, self.n, self.prof, self.t0, self.valid_s = skip, n, prof, None, 0.0
    def _sync(self):
        if self.learn.device.type == "cuda": torch.cuda.synchronize(self.learn.device)
    def before_validate(self): self.v0 = time.perf_counter()
    def after_validate(self):
        if self.t0 is not None: self.valid_s += time.perf_counter() - self.v0
    def after_step(self):
        if self.learn.step == self.skip:
            self._sync(); self.t0 = time.perf_counter()
            if self.prof is not None: self.prof.start()
        elif self.learn.step == self.skip + self.n:
            self._sync(); self.secs = time.perf_counter() - self.t0 - self.valid_s     # epoch-end validation excluded
            if self.prof is not None: self.prof.stop()
            self.learn.stop()


def run(data, tok, device, batch_size, skip, n, prof=None):
    with quiet_transformers(): model, _ = load_classifier("minilm", data)
    learn = Learner(model, data, HParams(epochs=50, lr=5e-5, batch_size=batch_size), device=device, progress=False,
                    keep_good_copy=False)
    w = Window(skip, n, prof)
    learn.add_cb(w)
    learn.fit()
    return w.secs / n, learn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--batch-sizes", default="32,64,128,256")
    p.add_argument("--steps", type=int, default=60, help="timed steps per batch size (after --skip warm-up steps)")
    p.add_argument("--skip", type=int, default=15)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)
    device = get_device(a.device)
    data = TextClassificationData.from_df(load_sample("movie_reviews"), on_invalid="drop")
    with quiet_transformers(): _, tok = load_classifier("minilm", data)
    data.tokenize(tok, max_length=a.max_length)
    out = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device), torch=torch.__version__)
    rows = []
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        per_step, learn = run(data, tok, device, bs, a.skip, a.steps)
        rows.append(dict(batch_size=bs, ms_per_step=1000 * per_step, samples_per_s=bs / per_step, precision=str(learn.dtype)))
        print(f"batch {bs:4d}: {1000 * per_step:7.2f} ms per step, {bs / per_step:8.1f} samples/s ({learn.dtype})", flush=True)
    out["steps"] = rows

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    bs = int(a.batch_sizes.split(",")[0])
    prof = profile(activities=acts)
    per_step, _ = run(data, tok, device, bs, a.skip, min(a.steps, 30), prof)
    n = min(a.steps, 30)
    ev = prof.key_averages()
    dev_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
    kernels = sum(dev_time(e) for e in ev) / n / 1000               # ms of device work per step
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")) / n
    out["profile"] = dict(batch_size=bs, ms_per_step_profiled=1000 * per_step, device_ms_per_step=kernels,
                          kernel_launches_per_step=launches,
                          top_cpu=[dict(op=e.key, calls_per_step=e.count / n, self_cpu_ms_per_step=e.self_cpu_time_total / n / 1000)
                                   for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:a.top]])
    print(f"\nprofiled at batch {bs}: {1000 * per_step:.2f} ms per step (profiler on), device busy {kernels:.2f} ms per step, "
          f"{launches:.0f} kernel launches per step")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=a.top))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
