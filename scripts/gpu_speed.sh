#!/usr/bin/env bash
# One GPU call (issue 10): `mmeff bench` of fastv / vflowopt-90 on the LLaVA-1.5-7B shape (batch 16 and 1) and the
# LLaVA-NeXT-7B anyres shape, plus torch.profiler breakdowns of one prefill. Results: $OUT/speed.tgz.
#   run: bash scripts/gpu_speed.sh            (env: PRESETS=fastv,fastv-90,vflowopt-90)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=out/speed; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/speed.tgz" -C out speed' EXIT
P=${PRESETS:-fastv,fastv-90,vflowopt-90}
B="python3 -m mmeff_lab.cli bench --repeats 3 --warmup 1 --new-tokens 16"
$B --model llava-1.5-7b --preset "$P" --batch-size 16,1 --output $R/llava15 > $R/llava15.log 2>&1; tail -22 $R/llava15.log
for b in 16 1; do
  python3 benchmarks/profile_prefill.py --model llava-1.5-7b --preset none,fastv-90,vflowopt-90 --batch-size $b \
    --output $R/profile 2>&1 | grep prefill
done
$B --model llava-next-7b --preset "$P" --batch-size 1 --output $R/next > $R/next.log 2>&1; tail -8 $R/next.log
