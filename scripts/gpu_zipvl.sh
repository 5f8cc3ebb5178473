#!/usr/bin/env bash
# One GPU call (issue 8 / 10): ZipVL's probe kernel by tile shape, a profile of one 16k-token ZipVL prefill, and
# prefill speed / peak memory at 16k and 64k tokens for several taus, and `mmeff bench` of the ZipVL presets at
# 16k tokens. Results: $OUT/zipvl.tgz.
#   run: bash scripts/gpu_zipvl.sh   (env: STEPS="tests kernel profile prefill bench" IMAGES="28 112" TAUS=0.975,0.5,0.3)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=out/zipvl; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/zipvl.tgz" -C out zipvl' EXIT
for step in ${STEPS:-tests kernel profile prefill bench}; do
  case $step in
    tests) python3 -m pytest -q -s -m gpu tests/test_zipvl_kernels.py tests/test_zipvl.py 2>&1 | grep -E "floor|passed|failed|Error" ;;
    kernel) OUT=$R python3 benchmarks/probe_scores.py > $R/kernel.log 2>&1; grep -v "^N=" $R/kernel.log | tail -5
            grep "^N=" $R/kernel.log ;;
    profile) python3 benchmarks/profile_prefill.py --model llava-1.5-7b --preset none,zipvl --batch-size 1 --images 28 \
               --output $R/profile 2>&1 | grep -E "prefill|synchron" ;;
    prefill) for n in ${IMAGES:-28 112}; do
               OUT=$R python3 benchmarks/zipvl_prefill.py --images $n --repeats 2 --tau ${TAUS:-0.975,0.5,0.3} 2>&1 | tail -6
             done ;;
    bench) python3 -m mmeff_lab.cli bench --model llava-1.5-7b --images ${BENCH_IMAGES:-28} --batch-size 1 --repeats 3 --warmup 1 \
             --new-tokens ${NEW_TOKENS:-64} \
             --preset zipvl,benchmarks/presets/zipvl-t50.toml,benchmarks/presets/zipvl-t50-materialised.toml,benchmarks/presets/zipvl-t30.toml \
             --output $R/bench${BENCH_IMAGES:-28} > $R/bench.log 2>&1; cat $R/bench${BENCH_IMAGES:-28}/bench.md ;;
  esac
done
