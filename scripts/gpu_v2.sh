#!/usr/bin/env bash
# GPU calls after a reference-model change (issue 4; tables of issues 6, 7, 9): stage A retrains the trained
# pruners' heads of both reference models (into mmeff/reference/heads/<m>/) while the unwrapped baselines and the
# tables that need no head run; stage B the tables that need the heads. Everything done lands in $OUT/v2.tgz
# (also on a timeout; `mmeff eval` writes each finished preset, so a cut-off table keeps its finished rows).
#   run: STAGES="A B" bash scripts/gpu_v2.sh   (env: BUDGET_S=560 LIMIT=500)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=3
source scripts/gpu_wheels.sh
END=$((SECONDS + ${BUDGET_S:-560})); LIMIT=${LIMIT:-500}
R=out/v2; mkdir -p $R
trap 'mkdir -p $R/heads; cp -r mmeff/reference/heads/llava mmeff/reference/heads/qwen2vl $R/heads/;
      tar czf "${OUT:-/tmp/out}/v2.tgz" -C out v2' EXIT
left() { echo $((END - SECONDS)); }
bg() {  # bg NAME CMD...: run CMD in the background within the time that is left, log to $R/NAME.log
  local name=$1; shift
  ( timeout "$(left)" "$@" > "$R/$name.log" 2>&1; echo "[$SECONDS s] $name rc=$?" ) &
}
python3 -c "from mmeff_lab.reference.synthetic import ensure_benchmarks as e; print(e())" || exit 1  # once, not per eval
E="python3 -m mmeff_lab.cli eval --device cuda --batch-size 64 --no-progress --n-boot 200"
P=benchmarks/presets
T="python3 -m mmeff_lab.cli train"
if [[ " ${STAGES:-A B} " == *" A "* ]]; then
  for m in llava qwen2vl; do
    bg dyvte_$m $T dyvte --model reference-$m --steps ${STEPS:-500} --batch-size 32 --width 512 --lr 2e-4 \
      --abs-tol 0.02 --device cuda --output mmeff/reference/heads/$m
    bg explain_$m $T explain --model reference-$m --samples 256 --steps 500 --device cuda --output mmeff/reference/heads/$m
    bg base_$m python3 scripts/eval_reference.py --model mmeff/reference/weights/$m --limit 300 --chair-limit 50 \
      --batch-size 64 --device cuda --json $R/reference_${m}_eval.json
    bg pope_$m $E --model reference-$m --tasks pope --output $R/pope_full_$m
  done
  bg llava_prune $E --model reference-llava --tasks pope,mme --limit $LIMIT --output $R/llava_prune \
    --preset "$P/fastv-ref-50.toml,$P/fastv-ref-75.toml,$P/fastv-ref-83.toml,vflowopt-50,vflowopt-75,vflowopt-90"
  bg llava_halluc $E --model reference-llava --tasks chair,pope_adversarial --limit $LIMIT --chair-max-new-tokens 96 \
    --output $R/llava_halluc --preset "vhr,fia,pai,vcd,$P/fia-code.toml,$P/vhr-a15.toml,$P/vhr-a125.toml,$P/fia-x2.toml"
  wait
fi
if [[ " ${STAGES:-A B} " == *" B "* ]]; then
  bg llava_trained $E --model reference-llava --tasks pope,mme --limit $LIMIT --output $R/llava_trained \
    --preset "$P/fastv-ref-50.toml,$P/fastv-ref-75.toml,dyvte,explain-50,explain-75,explain-90,zipvl"
  bg qwen_trained $E --model reference-qwen2vl --tasks pope,mme --limit $LIMIT --output $R/qwen_trained \
    --preset "$P/fastv-ref-50.toml,dyvte,explain-50,explain-75,explain-90"
  bg qwen_halluc $E --model reference-qwen2vl --tasks chair,pope_adversarial --limit $LIMIT --chair-max-new-tokens 96 \
    --output $R/qwen_halluc --preset vhr,fia,pai,vcd
  wait
fi
for f in $R/*.log; do echo "== $f"; grep "^|\|^POPE\|^CHAIR\|^MME\|^ATTN\|label\|overlap\|accuracy" "$f" | tail -n 16; done
