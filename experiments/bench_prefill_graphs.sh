#!/usr/bin/env bash
# One GPU call: batch-1 prefills replayed from CUDA graphs (mmeff/engine/prefill_graph.py), the "Batch-1 prefill
# from CUDA graphs" section of docs/performance.md. Results: $OUT/prefill_graphs.tgz (also on a timeout).
# Steps (STEPS, in order):
#   tests     GPU tests: the replayed prefill = the eager wrapper (and the static decode tests)
#   llava1 next1 qwen1 llava16   `mmeff bench --cuda-graphs both` (every preset eager and with graphs; ratios
#             against `none` in the same mode)
#   syncs     experiments/capture_syncs.py: where a prefill still reads the device (per family / preset)
#   run: bash experiments/bench_prefill_graphs.sh     (env: STEPS="tests llava1", REPEATS=5, NEW_TOKENS=64, BUDGET_S=560:
#        each step gets what is left of the budget, so the archive is written before the device call's limit)
set -uo pipefail
source experiments/gpu_env.sh
END=$((SECONDS + ${BUDGET_S:-560})); R=out/prefill_graphs; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/prefill_graphs.tgz" -C out prefill_graphs' EXIT
bench() {  # name, model, batch, extra args
  timeout $((END - SECONDS)) python3 -m mmeff_lab.cli bench --model $2 --batch-size $3 --repeats ${REPEATS:-5} --warmup 2 \
    --new-tokens ${NEW_TOKENS:-64} --cuda-graphs both --output $R/$1 "${@:4}" > $R/$1.log 2>&1
  cat $R/$1/bench.md 2>/dev/null || tail -20 $R/$1.log
}
for step in ${STEPS:-tests llava1 next1 qwen1 llava16}; do
  left=$((END - SECONDS)); [ $left -gt 10 ] || { echo "budget spent before $step"; break; }
  echo "[$SECONDS s] $step"
  case $step in
    tests) timeout $left python3 -m pytest -q -s -m gpu -p no:cacheprovider -rA tests/engine/test_prefill_graph.py \
             tests/engine/test_static_decode.py > $R/tests.log 2>&1; echo "tests rc=$?"
           grep -E "^(FAILED|ERROR)|passed|failed" $R/tests.log | tail -30 ;;
    llava1) bench llava1 llava-1.5-7b 1 --preset fastv,fastv-90,vflowopt-90 ;;
    next1) bench next1 llava-next-7b 1 --preset fastv,fastv-90,vflowopt-90 ;;
    qwen1) bench qwen1 qwen2-vl-7b 1 --preset fastv,fastv-90,vflowopt-90 ;;
    llava16) bench llava16 llava-1.5-7b 16 --preset fastv-90,vflowopt-90 ;;
    syncs) timeout $left python3 experiments/capture_syncs.py --families llava,llava_next,qwen2_vl,qwen3_vl \
             --presets none,fastv-90,vflowopt-90 > $R/syncs.log 2>&1; tail -40 $R/syncs.log ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
