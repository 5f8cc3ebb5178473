#!/usr/bin/env bash
# One GPU call: re-measures what issue 26 moved in docs/zipvl.md — the zipvl preset now quantizes with ZipCache's
# released scheme (quantizer="zipcache") where every earlier number used the KIVI-style groups (quantizer="kivi",
# benchmarks/presets/zipvl-kivi.toml), and the two readings exposed as options (ratio_mass, sparse_queries).
# Steps (STEPS, in order; everything done lands in $OUT/zipvl_readings.tgz, also on a timeout):
#   tests      the quantizer / decode-kernel GPU tests (Triton = torch reference for both layouts; prints the
#              decode-attention timing of a 16k / 64k 7B layer per quantizer against the bytes floor)
#   reference  docs/zipvl.md "On the LLaVA-class reference": mmeff eval of none, zipvl (zipcache), the kivi
#              setting and both alternative readings on reference-llava (POPE + MME, first LIMIT per split)
#   bench      docs/zipvl.md / docs/performance.md cache bytes and decode: mmeff bench of zipvl, zipvl-t50 and
#              zipvl-t30 with each quantizer at BENCH_IMAGES x 576 tokens (LLaVA-1.5-7B shape, random weights)
#   run: bash experiments/zipvl_readings.sh      (env: STEPS="tests reference bench" LIMIT=500 BENCH_IMAGES=28
#        NEW_TOKENS=64 BUDGET_S=560)
set -uo pipefail
source experiments/gpu_env.sh
END=$((SECONDS + ${BUDGET_S:-560})); R=out/zipvl_readings; P=benchmarks/presets; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/zipvl_readings.tgz" -C out zipvl_readings' EXIT
for step in ${STEPS:-tests reference bench}; do
  left=$((END - SECONDS)); [ $left -gt 10 ] || { echo "budget spent before $step"; break; }
  case $step in
    tests) timeout $left python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/kernels/test_kv_quant.py \
             tests/kernels/test_quant_attention.py tests/methods/test_zipvl.py 2>&1 | tee $R/tests.log \
             | grep -E "floor|passed|failed|Error" ;;
    reference) rm -rf $R/reference
      timeout $left python3 -m mmeff_lab.cli eval --model reference-llava --tasks pope,mme --limit ${LIMIT:-500} \
        --device cuda --batch-size 64 --n-boot 200 --no-progress --output $R/reference \
        --preset "none,zipvl,$P/zipvl-kivi.toml,$P/zipvl-accumulated.toml,$P/zipvl-allrows.toml" > $R/reference.log 2>&1
      tail -25 $R/reference.log ;;
    bench) timeout $left python3 -m mmeff_lab.cli bench --model llava-1.5-7b --images ${BENCH_IMAGES:-28} --batch-size 1 \
             --repeats 3 --warmup 1 --new-tokens ${NEW_TOKENS:-64} \
             --preset "zipvl,$P/zipvl-kivi.toml,benchmarks/presets/zipvl-t50.toml,$P/zipvl-t50-kivi.toml,benchmarks/presets/zipvl-t30.toml,$P/zipvl-t30-kivi.toml" \
             --output $R/bench${BENCH_IMAGES:-28} > $R/bench.log 2>&1; cat $R/bench${BENCH_IMAGES:-28}/bench.md ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
