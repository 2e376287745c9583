#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command, from the repository root of a dev install:
#   bash bench/gpu_check.sh            # about 10 minutes on one H200; results under ${OUT:-gpu_results}/
# 1. tests/test_gpu.py (bf16/fp16 training, device-side skips, memory estimate, out-of-memory recovery, resume,
#    and the CUDA-graph replays: eager losses, live changes, exact resume, the fp16 fallback, prediction and validation
#    graphs against eager), with its measurements;
# 2. bench_trainer.py at batch 32 and 256: Trainer against the Learner eager, with CUDA graphs and compiled;
# 3. bench_predict.py: Predictor against transformers' pipeline on the GPU, eager and with CUDA graphs.
set -uo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python -m pytest tests/test_gpu.py -s -q -p no:cacheprovider 2>&1 | tee "$out/test_gpu.txt"
for b in 32 256; do
  python bench/bench_trainer.py --batch-size "$b" --variants eager,graphs,compiled --json 2> "$out/bench_trainer_b$b.log" \
    | tail -1 > "$out/bench_trainer_b$b.json"
done
python bench/bench_predict.py --device cuda --json 2> "$out/bench_predict.log" | tail -1 > "$out/bench_predict.json"
python bench/bench_predict.py --device cuda --cuda-graphs on --json 2> "$out/bench_predict_graphs.log" | tail -1 > "$out/bench_predict_graphs.json"
tail -n 3 "$out"/*.log
