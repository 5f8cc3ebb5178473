#!/usr/bin/env bash
# Issue 7 on benchmarks v2, one GPU call: per reference model, the test table of the trained pruners with the
# dev-chosen DyVTE threshold, plus every forced exit (all visual tokens dropped before layer k) for the oracle
# bound of scripts/exit_oracle.py. Both models run side by side; results land in $OUT/dyvte_v2.tgz.
#   run: T_LLAVA=95 T_QWEN=95 bash scripts/gpu_dyvte_v2.sh   (env: LIMIT=500 BUDGET_S=560 DEVICE=cuda)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=4
source scripts/gpu_wheels.sh
END=$((SECONDS + ${BUDGET_S:-560})); R=out/dyvte_v2; P=benchmarks/presets; rm -rf $R; mkdir -p $R  # a fresh run
trap 'tar czf "${OUT:-/tmp/out}/dyvte_v2.tgz" -C out dyvte_v2' EXIT
python3 -c "from mmeff_lab.reference.synthetic import ensure_benchmarks as e; print(e())" || exit 1
X=$(python3 scripts/exit_oracle.py write $R/exits 6)
E="python3 -m mmeff_lab.cli eval --device ${DEVICE:-cuda} --batch-size 64 --no-progress --n-boot 500 --tasks pope,mme --log-samples"
table() {  # table NAME MODEL PRESETS
  timeout $((END - SECONDS)) $E --model "$2" --limit "${LIMIT:-500}" --output $R/$1 --preset "$3" > $R/$1.log 2>&1
  echo "[$SECONDS s] $1 rc=$?"; python3 scripts/exit_oracle.py report $R/$1 6 > $R/$1.oracle.txt 2>&1
}
table llava reference-llava "$P/fastv-ref-50.toml,dyvte,$P/dyvte-t${T_LLAVA:-95}.toml,explain-50,$X" &
table qwen2vl reference-qwen2vl "$P/fastv-ref-50.toml,dyvte,$P/dyvte-qwen-t${T_QWEN:-95}.toml,explain-50,$X" &
wait
for m in llava qwen2vl; do echo "== $m"; grep "^|" $R/$m.log | head -n 14; cat $R/$m.oracle.txt; done
