#!/usr/bin/env bash
# One GPU call (issue 9): the hallucination table on the LLaVA-class reference, all 500 synthetic CHAIR images
# and the first 500 POPE-adversarial questions (test split), presets at the papers' values plus the sweep rows.
# Results: $OUT/halluc.tgz.   run: bash scripts/gpu_halluc.sh   (env: LIMIT=500)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source scripts/gpu_wheels.sh
R=out/halluc; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/halluc.tgz" -C out halluc' EXIT
P=benchmarks/presets
timeout ${BUDGET_S:-560} python3 -m mmeff_lab.cli eval --model reference-llava --tasks chair,pope_adversarial \
  --limit ${LIMIT:-500} --chair-max-new-tokens 96 --batch-size 100 --n-boot 1000 --device cuda --no-progress \
  --output $R/llava_halluc \
  --preset "vhr,fia,pai,vcd,$P/fia-code.toml,$P/vhr-a15.toml,$P/vhr-a125.toml,$P/fia-x2.toml" > $R/eval.log 2>&1
echo "eval rc=$?"; grep "^|" $R/eval.log | head -30
