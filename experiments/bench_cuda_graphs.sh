#!/usr/bin/env bash
# One GPU call: the CUDA-graph decode section of docs/performance.md ("Batch-1 latency: decode from CUDA graphs") and
# its "More repeats, same code" rows: static decode + CUDA graphs (mmeff/engine/static_decode.py). Results:
# $OUT/graphs.tgz (also on a timeout). Steps (STEPS, in order):
#   tests     the GPU tests of the static decode (captured graph = the static step = the eager hooked decode)
#   gputests  every GPU kernel and static-decode test
#   step      benchmarks/decode_step.py: a decode step's breakdown, eager vs graph replay, batch 1 and 16
#   llava1 qwen1 next1 llava16 long   `mmeff bench --cuda-graphs both` per model and batch (every preset with eager
#             decode steps and with graph replay, ratios against eager `none` from the same run; long: 512 new tokens)
#   short3    a 3-token answer (the capture comes at the third step)
#   b1many b16many   batch-1 prefill medians over 21 repeats, batch 16 over 9 (the host jitter is large)
#   run: bash experiments/bench_cuda_graphs.sh
#   (env: STEPS="tests step llava1 qwen1 next1 llava16 long" NEW_TOKENS=64; the repeats: STEPS="b1many b16many")
set -uo pipefail
source experiments/gpu_env.sh
R=out/graphs; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/graphs.tgz" -C out graphs' EXIT
bench() {  # name, model, batch, extra args
  python3 -m mmeff_lab.cli bench --model $2 --batch-size $3 --repeats 3 --warmup 1 --new-tokens ${NEW_TOKENS:-64} \
    --cuda-graphs both --output $R/$1 "${@:4}" > $R/$1.log 2>&1
  cat $R/$1/bench.md 2>/dev/null || tail -20 $R/$1.log
}
for step in ${STEPS:-tests step llava1 qwen1 next1 llava16 long}; do
  case $step in
    tests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_static_decode.py 2>&1 | tail -15 ;;
    gputests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/engine/test_static_decode.py 2>&1 | tail -15 ;;
    step) for b in 1 16; do OUT=$R python3 benchmarks/decode_step.py --preset none,fastv-90,vflowopt-90 --batch-size $b; done ;;
    llava1) bench llava1 llava-1.5-7b 1 --preset fastv,fastv-90,vflowopt-90 ;;
    qwen1) bench qwen1 qwen2-vl-7b 1 --preset fastv,vflowopt-90 ;;
    next1) bench next1 llava-next-7b 1 --preset fastv,vflowopt-90 ;;
    llava16) bench llava16 llava-1.5-7b 16 --preset fastv,vflowopt-90 ;;
    long) NEW_TOKENS=512 bench long llava-1.5-7b 1 --preset vflowopt-90 ;;  # the buffers grow once (256 -> 512 decode columns)
    short3) python3 -m mmeff_lab.cli bench --model llava-1.5-7b --preset fastv-90 --batch-size 1 --repeats 5 --warmup 2 \
              --new-tokens 3 --cuda-graphs both --output $R/short3 > $R/short3.log 2>&1
            cat $R/short3/bench.md ;;
    b1many) python3 -m mmeff_lab.cli bench --model llava-1.5-7b --batch-size 1 --repeats 21 --warmup 3 \
              --new-tokens 8 --preset fastv,fastv-90,vflowopt-90 --output $R/b1many > $R/b1many.log 2>&1
            cat $R/b1many/bench.md ;;  # batch-1 prefill medians over 21 repeats (the host jitter is large)
    b16many) python3 -m mmeff_lab.cli bench --model llava-1.5-7b --batch-size 16 --repeats 9 --warmup 2 \
              --new-tokens 8 --preset fastv,fastv-90,vflowopt-90 --output $R/b16many > $R/b16many.log 2>&1
            cat $R/b16many/bench.md ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
