#!/usr/bin/env bash
# Reference-model training on the GPU machine (docs/reference-model.md, "Data and training"), in stages that each
# fit one 10-minute device command and chain on a warm machine (out/ survives between calls while the machine stays
# warm; a fresh machine falls back to the carried model folder in .carry/<arch>). Each stage leaves <arch>.tgz
# (model + train log) in $OUT; the model folder replaces lab/mmeff_lab/reference/weights/<arch>/ by hand.
#   bash experiments/train_reference_models.sh A   # render scenes, LLaVA from the shipped weights with the auxiliary loss
#   bash experiments/train_reference_models.sh B   # finish the LLaVA schedule; start Qwen2-VL
#   bash experiments/train_reference_models.sh C   # continue Qwen2-VL
# env: LLAVA_TOTAL=13 QWEN_TOTAL=13 (minutes of training of each schedule)
set -uo pipefail
source experiments/gpu_env.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
W=lab/mmeff_lab/reference/weights
T="python experiments/train_reference.py"
LLAVA_TOTAL=${LLAVA_TOTAL:-13} QWEN_TOTAL=${QWEN_TOTAL:-13}
pack() { tar czf "$O/$1.tgz" -C "out/$1" model train_log.jsonl && ls -la "$O/$1.tgz"; }
cont() {  # resume from the checkpoint on this machine, else start from the carried (or shipped) weights
  if [ -f "out/$1/checkpoint.pt" ]; then echo "--resume"
  elif [ -d ".carry/$1" ]; then echo "--init-from .carry/$1 --warmup-steps 50"
  else echo "--init-from $W/$1"; fi; }
$T --prepare --images 24000 --workers 16 || exit 1
case "${1:-A}" in
  A) $T --arch llava --minutes 8.6 --total-minutes "$LLAVA_TOTAL" --init-from $W/llava \
        --warmup-steps 100 --aux-weight 1 --aux-minutes 6 && pack llava ;;
  B) $T --arch llava --minutes 4.3 --total-minutes "$LLAVA_TOTAL" $(cont llava) --aux-weight 1 --aux-minutes 6 \
        && pack llava
     $T --arch qwen2vl --minutes 4.6 --total-minutes "$QWEN_TOTAL" --init-from $W/qwen2vl \
        --warmup-steps 100 --aux-weight 1 --aux-minutes 6 && pack qwen2vl ;;
  C) $T --arch qwen2vl --minutes 9.0 --total-minutes "$QWEN_TOTAL" $(cont qwen2vl) --aux-weight 1 --aux-minutes 6 \
        && pack qwen2vl ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
