#!/usr/bin/env bash
# One GPU call: the trained-pruner tables of docs/trained-pruners.md on both reference models (test split, the
# shipped heads), models side by side; results land in $OUT/trained_pruners.tgz (also on a timeout: `mmeff eval`
# writes each finished preset, so a cut-off table keeps its finished rows).
#   main:  "Both reference models": fastv-ref-50/75, dyvte, explain-50/75/90 and, on LLaVA, zipvl (also the
#          reference table of docs/zipvl.md)
#   exits: "DyVTE on test, with every forced exit": the dev-chosen DyVTE threshold (T_LLAVA, T_QWEN) beside the
#          paper's, plus every forced exit (all visual tokens dropped before layer k) for the oracle exit layer of
#          experiments/exit_oracle.py; --log-samples (the `none` logs also feed experiments/false_yes_by_twin.py)
#   run: bash experiments/train_heads.sh first when the heads are retrained, then
#        T_LLAVA=95 T_QWEN=95 bash experiments/table_trained_pruners.sh
#        (env: STEPS="main exits" LIMIT=500 BUDGET_S=560 DEVICE=cuda)
set -uo pipefail
source experiments/gpu_env.sh
export OMP_NUM_THREADS=4
END=$((SECONDS + ${BUDGET_S:-560})); R=out/trained_pruners; P=benchmarks/presets; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/trained_pruners.tgz" -C out trained_pruners' EXIT
python3 -c "from mmeff_lab.reference.synthetic import ensure_benchmarks as e; print(e())" || exit 1  # once, not per eval
E="python3 -m mmeff_lab.cli eval --device ${DEVICE:-cuda} --batch-size 64 --no-progress --tasks pope,mme --limit ${LIMIT:-500}"
table() {  # table NAME MODEL PRESETS [EXTRA ARGS]: one `mmeff eval` into a fresh $R/NAME within the time left
  local name=$1 model=$2 presets=$3; shift 3; rm -rf "${R:?}/$name"
  timeout $((END - SECONDS)) $E --model "$model" --output $R/$name --preset "$presets" "$@" > $R/$name.log 2>&1
  echo "[$SECONDS s] $name rc=$?"
}
for step in ${STEPS:-main exits}; do
  case $step in
    main)
      table llava_trained reference-llava \
        "$P/fastv-ref-50.toml,$P/fastv-ref-75.toml,dyvte,explain-50,explain-75,explain-90,zipvl" --n-boot 200 &
      table qwen2vl_trained reference-qwen2vl "$P/fastv-ref-50.toml,dyvte,explain-50,explain-75,explain-90" --n-boot 200 &
      wait
      for m in llava qwen2vl; do echo "== $m"; grep "^|" $R/${m}_trained.log | head -n 12; done ;;
    exits)
      X=$(python3 experiments/exit_oracle.py write $R/exit_presets 6) || exit 1
      for m in llava qwen2vl; do
        [ $m = llava ] && t=$P/dyvte-t${T_LLAVA:-95}.toml || t=$P/dyvte-qwen-t${T_QWEN:-95}.toml
        ( table exits_$m reference-$m "$P/fastv-ref-50.toml,dyvte,$t,explain-50,$X" --n-boot 500 --log-samples
          python3 experiments/exit_oracle.py report $R/exits_$m 6 > $R/exits_$m.oracle.txt 2>&1 ) &
      done
      wait
      for m in llava qwen2vl; do echo "== $m"; grep "^|" $R/exits_$m.log | head -n 14; cat $R/exits_$m.oracle.txt; done ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
