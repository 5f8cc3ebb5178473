#!/usr/bin/env bash
# One GPU call (issue 26, what is left of "retrain the shipped mappers and say whether the mapper beats raw
# layer-0 attention"): per reference model, the explain relevance mapper retrained on Chefer's per-token
# target (one backward per answer token) over SAMPLES examples (ANSWER: teacher = the data's answer, greedy = the
# model's own), then POPE + MME of the retrained mapper, the shipped mapper (summed target) and the mapper-free
# ranking by layer-0 attention (explain-attn, ours) at 50/75/90% in ONE eval per model (paired CIs). Never
# installs: compare first (docs/trained-pruners.md), then copy out/explain_retrain/<m>/explain.safetensors to
# lab/mmeff_lab/reference/weights/<m>/heads/. Results: $OUT/explain_retrain.tgz (checkpoints, presets, evals).
#   bash experiments/retrain_explain.sh   (env: MODELS="llava qwen2vl" SAMPLES=1024 ANSWER=greedy LIMIT=500
#                                          BUDGET_S=570 DEVICE=cuda)
set -uo pipefail
source experiments/gpu_env.sh
END=$((SECONDS + ${BUDGET_S:-570})); DEV=${DEVICE:-cuda}
R=out/explain_retrain; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/explain_retrain.tgz" -C out explain_retrain' EXIT
for m in ${MODELS:-llava qwen2vl}; do
  t=$((END - SECONDS)); [ $t -gt 30 ] || { echo "budget spent before $m"; break; }
  echo "[$SECONDS s] train $m"
  timeout $t python3 -m mmeff_lab.cli train explain --model reference-$m --samples ${SAMPLES:-1024} --batch-size 32 \
    --target per-token --answer ${ANSWER:-greedy} --device $DEV --output $R/$m > $R/train_$m.log 2>&1
  echo "train rc=$?"; tail -5 $R/train_$m.log
  t=$((END - SECONDS)); [ $t -gt 30 ] || { echo "budget spent before the eval of $m"; break; }
  echo "[$SECONDS s] eval $m"
  rm -rf $R/eval_$m
  timeout $t python3 -m mmeff_lab.cli eval --model reference-$m --tasks pope,mme --limit ${LIMIT:-500} --device $DEV \
    --batch-size 64 --n-boot 200 --no-progress --output $R/eval_$m \
    --preset "explain-50,explain-75,explain-90,$R/$m/explain-50.toml,$R/$m/explain-75.toml,$R/$m/explain-90.toml,explain-attn-50,explain-attn-75,explain-attn-90" \
    > $R/eval_$m.log 2>&1
  echo "eval rc=$?"; grep "^|" $R/eval_$m.log | head -12
done
