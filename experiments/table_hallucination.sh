#!/usr/bin/env bash
# One GPU call: the hallucination table of docs/hallucination.md ("Reference-model results") on the reference models,
# side by side: all 500 synthetic CHAIR images and the first 500 POPE-adversarial questions (test split); on LLaVA the
# presets at the papers' values plus the sweep rows, on Qwen2-VL the papers' values. Results: $OUT/hallucination.tgz.
#   run: bash experiments/table_hallucination.sh
#   (env: MODELS="llava qwen2vl" LIMIT=500 BATCH=64 N_BOOT=200 BUDGET_S=560 DEVICE=cuda; the benchmarks-v1 table:
#    MODELS=llava BATCH=100 N_BOOT=1000)
set -uo pipefail
source experiments/gpu_env.sh
export OMP_NUM_THREADS=4
R=out/hallucination; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/hallucination.tgz" -C out hallucination' EXIT
P=benchmarks/presets
python3 -c "from mmeff_lab.reference.synthetic import ensure_benchmarks as e; print(e())" || exit 1  # once, not per eval
for m in ${MODELS:-llava qwen2vl}; do
  if [ $m = llava ]; then presets="vhr,$P/fia-former.toml,pai,vcd,$P/fia-code.toml,$P/vhr-a15.toml,$P/vhr-a125.toml,$P/fia-x2.toml"
  else presets="$P/vhr-all-layers.toml,$P/fia-former.toml,pai,vcd"; fi  # VHR has no Qwen layers in the paper: ours, labelled
  rm -rf $R/$m  # a fresh run (mmeff eval refuses a folder holding another one)
  ( timeout ${BUDGET_S:-560} python3 -m mmeff_lab.cli eval --model reference-$m --tasks chair,pope_adversarial \
      --limit ${LIMIT:-500} --chair-max-new-tokens 96 --batch-size ${BATCH:-64} --n-boot ${N_BOOT:-200} \
      --device ${DEVICE:-cuda} --no-progress --output $R/$m --preset "$presets" > $R/$m.log 2>&1
    echo "[$SECONDS s] $m rc=$?" ) &
done
wait
for m in ${MODELS:-llava qwen2vl}; do echo "== $m"; grep "^|" $R/$m.log | head -30; done
