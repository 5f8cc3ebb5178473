#!/usr/bin/env bash
# One GPU call: DyVTE routers of both reference models trained with the paper's settings (released code
# DoubtedSteam/DyVTE, scripts/v1_5/finetune_visual_gate.sh): router width 2048, one random exit layer per step, lr 6e-5
# with a 3% linear warm-up then cosine, the unslackened label rule (--abs-tol 0), global batch 128. Steps: 125 x 128 =
# 16,000 examples, as many as the shipped heads saw (train_heads.sh: 500 x 32). Writes out/heads_paper/<m>/ and
# never installs: compare with the shipped heads (docs/trained-pruners.md, "Training settings") before replacing them.
# Results: $OUT/heads_paper.tgz (presets, logs) and $OUT/<m>/dyvte.safetensors.part-* (the checkpoints, split).
#   bash experiments/train_heads_paper.sh   (env: MODELS="llava qwen2vl" STEPS=125 BATCH=128 BUDGET_S=560 DEVICE=cuda)
set -uo pipefail
source experiments/gpu_env.sh
END=$((SECONDS + ${BUDGET_S:-560})); DEV=${DEVICE:-cuda}
R=out/heads_paper; mkdir -p $R
# the routers (21 MB each) exceed what a device call returns per file: they come back split (cat the parts)
trap 'tar czf "${OUT:-/tmp/out}/heads_paper.tgz" --exclude="*.safetensors" -C out heads_paper
      for f in $R/*/dyvte.safetensors; do [ -f "$f" ] || continue; d=${OUT:-/tmp/out}/$(basename $(dirname $f)); mkdir -p $d
        split -b 7M "$f" "$d/dyvte.safetensors.part-"; sha256sum "$f"; done' EXIT
for m in ${MODELS:-llava qwen2vl}; do
  ( timeout $((END - SECONDS)) python3 -m mmeff_lab.cli train dyvte --model reference-$m --steps ${STEPS:-125} \
      --batch-size ${BATCH:-128} --width 2048 --lr 6e-5 --warmup 0.03 --exit-layers one --abs-tol 0 \
      --device $DEV --output $R/$m > $R/dyvte_$m.log 2>&1
    echo "[$SECONDS s] dyvte_$m rc=$?"; tail -c 1500 $R/dyvte_$m.log ) &
done
wait
