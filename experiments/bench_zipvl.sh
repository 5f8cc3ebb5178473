#!/usr/bin/env bash
# One GPU call: the ZipVL sections of docs/performance.md (LLaVA-1.5-7B shape, random weights, 16k / 64k tokens of
# visual context). Steps (STEPS, in order; everything done lands in $OUT/zipvl.tgz, also on a timeout):
#   tests    ZipVL's GPU tests (Triton kernels = torch references, decode from the packed cache; prints the timings)
#   kernel   benchmarks/probe_scores.py: the probe-scoring kernel by tile shape vs its floor and SDPA
#   profile  benchmarks/profile_prefill.py of one 16k-token prefill, none vs zipvl
#   prefill  benchmarks/zipvl_prefill.py: prefill speed / peak memory at IMAGES x 576 tokens for several TAUS
#   bench    `mmeff bench` of the ZipVL presets at BENCH_IMAGES x 576 tokens (decode from the packed cache)
#   run: bash experiments/bench_zipvl.sh
#   (env: STEPS="tests kernel profile prefill bench" IMAGES="28 112" TAUS=0.975,0.5,0.3 BENCH_IMAGES=28 NEW_TOKENS=64)
set -uo pipefail
source experiments/gpu_env.sh
R=out/zipvl; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/zipvl.tgz" -C out zipvl' EXIT
for step in ${STEPS:-tests kernel profile prefill bench}; do
  case $step in
    tests) python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/kernels/test_probe_scores.py tests/kernels/test_kv_quant.py \
             tests/kernels/test_quant_attention.py tests/methods/test_zipvl.py 2>&1 | grep -E "floor|passed|failed|Error" ;;
    kernel) OUT=$R python3 benchmarks/probe_scores.py > $R/kernel.log 2>&1; grep -v "^N=" $R/kernel.log | tail -5
            grep "^N=" $R/kernel.log ;;
    profile) python3 benchmarks/profile_prefill.py --model llava-1.5-7b --preset none,zipvl --batch-size 1 --images 28 \
               --output $R/profile 2>&1 | grep -E "prefill|synchron" ;;
    prefill) for n in ${IMAGES:-28 112}; do
               OUT=$R python3 benchmarks/zipvl_prefill.py --images $n --repeats 2 --tau ${TAUS:-0.975,0.5,0.3} 2>&1 | tail -6
             done ;;
    bench) python3 -m mmeff_lab.cli bench --model llava-1.5-7b --images ${BENCH_IMAGES:-28} --batch-size 1 --repeats 3 \
             --warmup 1 --new-tokens ${NEW_TOKENS:-64} \
             --preset zipvl,benchmarks/presets/zipvl-t50.toml,benchmarks/presets/zipvl-t50-materialised.toml,benchmarks/presets/zipvl-t30.toml \
             --output $R/bench${BENCH_IMAGES:-28} > $R/bench.log 2>&1; cat $R/bench${BENCH_IMAGES:-28}/bench.md ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
