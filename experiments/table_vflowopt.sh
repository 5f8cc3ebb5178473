#!/usr/bin/env bash
# One GPU call: the VFlowOpt-vs-FastV table of docs/vflowopt.md on the LLaVA reference (test split, one `mmeff eval`
# call, `none` and budget-matched FastV rows included) with the tuned 90% preset and its ablations (entropy off,
# recycling off). By default the tuned presets are those of docs/results/tuned/; TUNE=1 first re-tunes the 90%
# preset on the reference TRAIN scenes (`mmeff tune vflowopt`, up to 300 trials within TUNE_S seconds), writes its
# ablations (experiments/vflowopt_ablations.py) and evaluates those instead. Results: $OUT/vflowopt.tgz.
#   run: TUNE=1 TUNE_S=220 bash experiments/table_vflowopt.sh   (env: LIMIT=500 TUNE=0 TUNE_S=300 DEVICE=cuda)
set -uo pipefail
source experiments/gpu_env.sh
R=out/vflowopt; mkdir -p $R; DEV=${DEVICE:-cuda}
trap 'tar czf "${OUT:-/tmp/out}/vflowopt.tgz" -C out vflowopt' EXIT
P=benchmarks/presets T=docs/results/tuned
if [ "${TUNE:-0}" = 1 ]; then
  T=$R/tuned; mkdir -p $T
  python3 -m mmeff_lab.cli tune vflowopt --model lab/mmeff_lab/reference/weights/llava --budget 0.9 --trials 300 \
    --samples 30 --batch-size 30 --timeout ${TUNE_S:-300} --device $DEV --output $T/vflowopt-90-tuned.toml > $T/tune90.log 2>&1
  echo "tune rc=$? completed trials: $(grep -c '^trial' $T/tune90.log)"; tail -1 $T/tune90.log
  python3 experiments/vflowopt_ablations.py $T/vflowopt-90-tuned.toml $T 2>&1 | tail -3
fi
rm -rf $R/llava_prune  # a fresh run (mmeff eval refuses a folder holding another one)
python3 -m mmeff_lab.cli eval --model reference-llava --tasks pope,mme --limit ${LIMIT:-500} --device $DEV --batch-size 64 \
  --no-progress --n-boot 200 --output $R/llava_prune \
  --preset "$P/fastv-ref-50.toml,$P/fastv-ref-75.toml,$P/fastv-ref-83.toml,vflowopt-50,vflowopt-75,vflowopt-90,$T/vflowopt-90-tuned.toml,$T/vflowopt-90-tuned-noentropy.toml,$T/vflowopt-90-tuned-norecycle.toml" \
  > $R/llava_prune.log 2>&1; grep "^|" $R/llava_prune.log | head -14
