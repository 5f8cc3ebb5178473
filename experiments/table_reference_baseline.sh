#!/usr/bin/env bash
# One GPU call: the unwrapped reference models' baseline numbers of docs/reference-model.md ("Baseline numbers" and
# "Status against the acceptance"), both models side by side: experiments/eval_reference.py (first 300 questions per
# POPE split, 50 captions, 100 MME images per subtask, the attention ratio on 50 questions) and `mmeff eval` of
# POPE on the full splits (3,000 questions each). Results: $OUT/reference_baseline.tgz.
#   run: bash experiments/table_reference_baseline.sh   (env: MODELS="llava qwen2vl" BUDGET_S=560 DEVICE=cuda LIMIT=300
#        CHAIR_LIMIT=50 POPE_LIMIT=: all; LIMIT=4 CHAIR_LIMIT=2 POPE_LIMIT=4 DEVICE=cpu: a CPU smoke run)
set -uo pipefail
source experiments/gpu_env.sh
export OMP_NUM_THREADS=3
END=$((SECONDS + ${BUDGET_S:-560})); DEV=${DEVICE:-cuda}
R=out/reference_baseline; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/reference_baseline.tgz" -C out reference_baseline' EXIT
bg() {  # bg NAME CMD...: run CMD in the background within the time that is left, log to $R/NAME.log
  local name=$1; shift
  ( timeout $((END - SECONDS)) "$@" > "$R/$name.log" 2>&1; echo "[$SECONDS s] $name rc=$?" ) &
}
python3 -c "from mmeff_lab.reference.synthetic import ensure_benchmarks as e; print(e())" || exit 1  # once, not per eval
for m in ${MODELS:-llava qwen2vl}; do
  bg eval_$m python3 experiments/eval_reference.py --model lab/mmeff_lab/reference/weights/$m --limit ${LIMIT:-300} \
    --chair-limit ${CHAIR_LIMIT:-50} --batch-size 64 --device $DEV --json $R/reference_${m}_eval.json
  rm -rf $R/pope_full_$m
  bg pope_full_$m python3 -m mmeff_lab.cli eval --model reference-$m --tasks pope --batch-size 64 --device $DEV \
    --no-progress --n-boot 200 ${POPE_LIMIT:+--limit $POPE_LIMIT} --output $R/pope_full_$m
done
wait
for f in $R/*.log; do echo "== $f"; grep "^|\|^POPE\|^CHAIR\|^MME\|^ATTN" "$f" | tail -n 16; done
