#!/usr/bin/env bash
# One GPU call: the acceptance tables of issues 4 (baseline), 6 (VFlowOpt vs FastV, ablations, tuned vs default),
# 7 (DyVTE / explain), 8 (ZipVL) and 9 (hallucination) on the shipped reference models, plus VFlowOpt tuning
# on the reference TRAIN scenes. Stages run in priority order within one time budget; everything done lands in
# $OUT/tables.tgz (also when a stage times out).
#   run: bash scripts/gpu_tables.sh          (env: BUDGET_S=560 TRIALS=100 TUNE_S=45 LIMIT=1000 DEVICE=cuda)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
END=$((SECONDS + ${BUDGET_S:-560})); TRIALS=${TRIALS:-100}; LIMIT=${LIMIT:-1000}; DEVICE=${DEVICE:-cuda}
source scripts/gpu_wheels.sh
R=out/tables; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/tables.tgz" -C out tables' EXIT
step() {  # step NAME CMD...: run CMD with the time that is left, log to $R/NAME.log
  local name=$1; shift; local t=$((END - SECONDS))
  if [ $t -lt 20 ]; then echo "skipped $name (no time left)"; return; fi
  timeout $t "$@" > "$R/$name.log" 2>&1; echo "[$SECONDS s] $name rc=$?"; grep -v Warning "$R/$name.log" | tail -n 14
}
E="python3 -m mmeff_lab.cli eval --device $DEVICE --batch-size 64 --no-progress --n-boot 200 --limit $LIMIT"
P=benchmarks/presets
heads() {  # heads ARCH: train the trained-pruner heads that are not shipped yet (reference TRAIN scenes)
  local H=mmeff/reference/heads/$1
  [ -f $H/dyvte.safetensors ] || step heads_dyvte_$1 python3 -m mmeff_lab.cli train dyvte --model reference-$1 \
    --steps 600 --batch-size 8 --width 512 --device $DEVICE --output $H
  [ -f $H/explain.safetensors ] || step heads_explain_$1 python3 -m mmeff_lab.cli train explain --model reference-$1 \
    --samples 256 --steps 500 --device $DEVICE --output $H
  mkdir -p $R/heads/$1 && cp $H/* $R/heads/$1/ 2>/dev/null
}
for b in 50 75 90; do
  step tune$b python3 -m mmeff_lab.cli tune vflowopt --model mmeff/reference/weights/llava --budget 0.$b --trials $TRIALS \
    --samples 30 --batch-size 30 --timeout ${TUNE_S:-45} --device $DEVICE --output $R/vflowopt-$b-tuned.toml
done
# ablations of the tuned 90% preset: entropy off, recycling off (same kept-token count)
python3 scripts/ablate_preset.py $R/vflowopt-90-tuned.toml $R 2>&1 | tail -3
V=$(ls $R/vflowopt-*-tuned.toml $R/vflowopt-90-tuned-*.toml 2>/dev/null | paste -sd,)
step llava_prune $E --model reference-llava --tasks pope,mme --output $R/llava_prune \
  --preset "$P/fastv-ref-50.toml,$P/fastv-ref-75.toml,$P/fastv-ref-83.toml,vflowopt-50,vflowopt-75,vflowopt-90${V:+,$V}"
step llava_halluc $E --model reference-llava --tasks chair,pope_adversarial --chair-max-new-tokens 128 \
  --output $R/llava_halluc --preset "vhr,$P/vhr-a15.toml,$P/vhr-a125.toml,fia,$P/fia-x2.toml,pai,vcd"
heads llava
step llava_trained $E --model reference-llava --tasks pope,mme --output $R/llava_trained \
  --preset "$P/fastv-ref-50.toml,$P/fastv-ref-75.toml,dyvte,explain-50,explain-75,explain-90,zipvl"
heads qwen2vl
step qwen_prune $E --model reference-qwen2vl --tasks pope,mme --output $R/qwen_prune \
  --preset "$P/fastv-ref-50.toml,$P/fastv-ref-75.toml,$P/fastv-ref-83.toml,vflowopt-50,vflowopt-75,vflowopt-90,dyvte,explain-50,zipvl"
step qwen_halluc $E --model reference-qwen2vl --tasks chair,pope_adversarial --chair-max-new-tokens 128 \
  --output $R/qwen_halluc --preset vhr,fia,pai,vcd
