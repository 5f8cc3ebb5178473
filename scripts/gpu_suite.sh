#!/usr/bin/env bash
# One GPU call: kernel tests against their torch references, kernel timings, and `mmeff bench` on the full-size
# random-weight architectures. Everything lands in $OUT/results.tar.gz (one file back from the device).
#   run: bash scripts/gpu_suite.sh [quick]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=${OUT:-/tmp/out}/r; mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt"
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" >> "$R/gpu.txt"
python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -30 > "$R/gpu_tests.log"; tail -3 "$R/gpu_tests.log"
python benchmarks/attention_stats.py > "$R/attention_stats.md" 2>&1; tail -6 "$R/attention_stats.md"
P=${PRESETS:-fastv,fastv-90,vflowopt-90}
python -m mmeff_lab.cli bench --model llava-1.5-7b --preset "$P" --batch-size 1,16 --repeats 3 --warmup 1 --new-tokens 16 --output "$R/llava15" > "$R/llava15.log" 2>&1
tail -20 "$R/llava15.log"
python -m mmeff_lab.cli bench --model llava-next-7b --preset "$P" --batch-size 1 --repeats 3 --warmup 1 --new-tokens 16 --output "$R/next" > "$R/next.log" 2>&1
tail -10 "$R/next.log"
python -m mmeff_lab.cli bench --model qwen2-vl-7b --preset "$P" --batch-size 1 --repeats 3 --warmup 1 --new-tokens 16 --output "$R/qwen" > "$R/qwen.log" 2>&1
tail -10 "$R/qwen.log"
python benchmarks/zipvl_prefill.py --images 28 --repeats 3 > "$R/zipvl.log" 2>&1; tail -8 "$R/zipvl.log"
tar czf "${OUT:-/tmp/out}/results.tar.gz" -C "$(dirname "$R")" r && rm -rf "$R"
