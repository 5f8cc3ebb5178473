#!/usr/bin/env bash
# One GPU call (issues 6, 10): `mmeff bench` of the LLaVA-1.5-7B shape, then the VFlowOpt-vs-FastV table on the
# LLaVA reference (test split, one `mmeff eval` call, `none` and `fastv` rows included) with the tuned presets
# in docs/results/tuned/. Results: $OUT/tables2.tgz.
#   run: bash scripts/gpu_tables2.sh          (env: LIMIT=500 BENCH=1 TUNE=0 TUNE_S=300: TUNE=1 first re-tunes the 90% preset,
#        300 trials, and its ablations, and evaluates those instead of docs/results/tuned/)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source scripts/gpu_wheels.sh
R=out/tables2; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/tables2.tgz" -C out tables2' EXIT
[ "${BENCH:-1}" = 1 ] && python3 -m mmeff_lab.cli bench --model llava-1.5-7b --preset fastv,fastv-90,vflowopt-90 --batch-size 16,1 --repeats 3 \
  --warmup 1 --new-tokens 16 --output $R/llava15 > $R/llava15.log 2>&1; grep -A9 "^| preset" $R/llava15.log
P=benchmarks/presets T=docs/results/tuned
if [ "${TUNE:-0}" = 1 ]; then
  T=$R/tuned; mkdir -p $T
  python3 -m mmeff_lab.cli tune vflowopt --model mmeff/reference/weights/llava --budget 0.9 --trials 300 --samples 30 \
    --batch-size 30 --timeout ${TUNE_S:-300} --device cuda --output $T/vflowopt-90-tuned.toml > $T/tune90.log 2>&1
  echo "tune rc=$? completed trials: $(grep -c '^trial' $T/tune90.log)"; tail -1 $T/tune90.log
  python3 scripts/ablate_preset.py $T/vflowopt-90-tuned.toml $T 2>&1 | tail -3
fi
python3 -m mmeff_lab.cli eval --model reference-llava --tasks pope,mme --limit ${LIMIT:-500} --device cuda --batch-size 64 \
  --no-progress --n-boot 200 --output $R/llava_prune \
  --preset "$P/fastv-ref-50.toml,$P/fastv-ref-75.toml,$P/fastv-ref-83.toml,vflowopt-50,vflowopt-75,vflowopt-90,$T/vflowopt-90-tuned.toml,$T/vflowopt-90-tuned-noentropy.toml,$T/vflowopt-90-tuned-norecycle.toml" \
  > $R/llava_prune.log 2>&1; grep "^|" $R/llava_prune.log | head -14
