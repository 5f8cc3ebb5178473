#!/usr/bin/env bash
# One GPU call: train the shipped heads of the reference models (lab/mmeff_lab/reference/weights/HEADS.md), the
# DyVTE routers (every exit layer labelled per batch, label slack --abs-tol) and the explain relevance mapper, both
# models side by side. Each run writes out/heads/<m>/ (checkpoint + the preset files `mmeff train` writes, which
# hold absolute paths); the checkpoints are then copied to lab/mmeff_lab/reference/weights/<m>/heads/, where the
# built-in presets `dyvte` and `explain-50/75/90` find them. Results: $OUT/heads.tgz (checkpoints, presets, logs).
#   bash experiments/train_heads.sh   (env: MODELS="llava qwen2vl" STEPS=500 BATCH=32 LR=2e-4 ABS_TOL=0.02 BUDGET_S=560
#                                      DEVICE=cuda INSTALL=1: 0 leaves the shipped heads as they are)
set -uo pipefail
source experiments/gpu_env.sh
END=$((SECONDS + ${BUDGET_S:-560})); DEV=${DEVICE:-cuda}
R=out/heads; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/heads.tgz" -C out heads' EXIT
bg() {  # bg NAME CMD...: run CMD in the background within the time that is left, log to $R/NAME.log
  local name=$1; shift
  ( timeout $((END - SECONDS)) "$@" > "$R/$name.log" 2>&1; echo "[$SECONDS s] $name rc=$?"; tail -c 1500 "$R/$name.log" ) &
}
T="python3 -m mmeff_lab.cli train"
for m in ${MODELS:-llava qwen2vl}; do
  bg dyvte_$m $T dyvte --model reference-$m --steps ${STEPS:-500} --batch-size ${BATCH:-32} --width 512 \
    --lr ${LR:-2e-4} --abs-tol ${ABS_TOL:-0.02} --device $DEV --output $R/$m
  bg explain_$m $T explain --model reference-$m --samples 256 --steps 500 --device $DEV --output $R/$m
done
wait
if [ "${INSTALL:-1}" = 1 ]; then
  for m in ${MODELS:-llava qwen2vl}; do
    H=lab/mmeff_lab/reference/weights/$m/heads; mkdir -p $H
    for f in dyvte explain; do [ -f $R/$m/$f.safetensors ] && cp $R/$m/$f.safetensors $H/ && echo "installed $H/$f.safetensors"; done
  done
fi
