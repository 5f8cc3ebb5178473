#!/usr/bin/env bash
# One GPU call (issue 7): train the DyVTE routers of the LLaVA reference (all exit layers labelled per batch,
# label slack --abs-tol) and the Qwen2-VL reference heads. Results: $OUT/heads.tgz (checkpoints + logs).
#   run: bash scripts/gpu_heads.sh            (env: STEPS=600 BATCH=32 LR=2e-4 ABS_TOL=0.02 BUDGET_S=570 LLAVA=1
#                                              QWEN=reference-qwen2vl: the Qwen model, e.g. a carried new folder)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
END=$((SECONDS + ${BUDGET_S:-570}))
R=out/heads; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/heads.tgz" -C out heads' EXIT
step() {  # step NAME CMD...: run CMD with the time that is left, log to $R/NAME.log
  local name=$1; shift; local t=$((END - SECONDS))
  if [ $t -lt 30 ]; then echo "skipped $name (no time left)"; return; fi
  timeout $t "$@" > "$R/$name.log" 2>&1; echo "[$SECONDS s] $name rc=$?"; tail -c 1500 "$R/$name.log"; echo
}
T="python3 -m mmeff_lab.cli train"
[ "${LLAVA:-1}" = 1 ] && step dyvte_llava $T dyvte --model reference-llava --steps ${STEPS:-600} --batch-size ${BATCH:-32} --width 512 \
  --lr ${LR:-2e-4} --abs-tol ${ABS_TOL:-0.02} --device cuda --output $R/llava
step explain_qwen2vl $T explain --model ${QWEN:-reference-qwen2vl} --samples 256 --steps 500 --device cuda --output $R/qwen2vl
step dyvte_qwen2vl $T dyvte --model ${QWEN:-reference-qwen2vl} --steps ${STEPS:-600} --batch-size ${BATCH:-32} --width 512 \
  --lr ${LR:-2e-4} --abs-tol ${ABS_TOL:-0.02} --device cuda --output $R/qwen2vl
