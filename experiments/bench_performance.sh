#!/usr/bin/env bash
# One GPU call: the 7B-shape speed tables of docs/performance.md (full-size random-weight architectures, bf16).
# Steps (STEPS, in order; everything done lands in $OUT/performance.tgz, also on a timeout):
#   env       GPU, torch / transformers / triton versions
#   gputests  every test marked gpu (kernels against their torch references, CUDA graphs)
#   shapes    `mmeff bench` of PRESETS on LLaVA-1.5-7B (batch 16 and 1), LLaVA-NeXT-7B anyres and Qwen2-VL-7B
#             high-res (batch 1): the three shape tables
#   kernel    benchmarks/attention_stats.py: the fused attention-statistics kernel table
#   profile   benchmarks/profile_prefill.py of none / fastv-90 / vflowopt-90 at batch 16 and 1 ("Where the gap to
#             the ideal goes")
#   run: bash experiments/bench_performance.sh   (env: STEPS="env gputests shapes kernel" PRESETS=fastv,fastv-90,vflowopt-90)
# The ZipVL and CUDA-graph sections have their own drivers: experiments/bench_zipvl.sh, experiments/bench_cuda_graphs.sh.
set -uo pipefail
source experiments/gpu_env.sh
R=out/performance; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/performance.tgz" -C out performance' EXIT
P=${PRESETS:-fastv,fastv-90,vflowopt-90}
B="python3 -m mmeff_lab.cli bench --preset $P --repeats 3 --warmup 1 --new-tokens 16"
for step in ${STEPS:-env gputests shapes kernel}; do
  case $step in
    env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
         python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" \
           >> $R/gpu.txt; cat $R/gpu.txt ;;
    gputests) python3 -m pytest -q -m gpu -p no:cacheprovider tests > $R/gpu_tests.log 2>&1; tail -3 $R/gpu_tests.log ;;
    shapes) $B --model llava-1.5-7b --batch-size 16,1 --output $R/llava15 > $R/llava15.log 2>&1; tail -20 $R/llava15.log
            $B --model llava-next-7b --batch-size 1 --output $R/next > $R/next.log 2>&1; tail -10 $R/next.log
            $B --model qwen2-vl-7b --batch-size 1 --output $R/qwen > $R/qwen.log 2>&1; tail -10 $R/qwen.log ;;
    kernel) OUT=$R python3 benchmarks/attention_stats.py > $R/attention_stats.md 2>&1; tail -6 $R/attention_stats.md ;;
    profile) for b in 16 1; do
               python3 benchmarks/profile_prefill.py --model llava-1.5-7b --preset none,fastv-90,vflowopt-90 --batch-size $b \
                 --output $R/profile 2>&1 | grep -E "prefill|synchron"
             done ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
