#!/usr/bin/env bash
# Every table of docs/performance.md, re-run in as few device calls as possible: one PART per call (each fits the
# device's 10-minute limit; every step gets what is left of BUDGET_S, so the archive is written before the limit).
# Raw outputs (bench.json / .md per table, logs, the GPU tests' logs, versions) land in $OUT/perf_part<N>.tgz;
# unpack them beside the doc with `tar xzf perf_part<N>.tgz -C docs/results/perf/` (one folder per part, each
# table's JSON named after its section in the MANIFEST below).
#
#   PART=1  GPU tests of the prefill graphs / static decode, then `mmeff bench --cuda-graphs both` (every preset
#           eager and from graphs) of LLaVA-1.5-7B batch 1, LLaVA-NeXT-7B anyres batch 1, Qwen2-VL-7B 1288² batch 1,
#           LLaVA-1.5-7B batch 16 (Qwen also with vflowopt-vit-75/90, ours): sections "LLaVA-1.5-7B shape", "LLaVA-NeXT-7B shape", "Qwen2-VL-7B shape",
#           "Batch-1 prefill from CUDA graphs", "Batch-1 latency: decode from CUDA graphs"
#   PART=2  issue 28's batch-16 acceptance: `vflowopt-90` / `fastv-90` at batch 16, 5 fresh processes (the median
#           of their ratios), then the decode-step breakdown (benchmarks/decode_step.py, batch 1 and 16)
#   PART=3  the fused attention-statistics kernel table, every GPU kernel test, the batch-16 profile ("Where the gap
#           to the ideal goes")
#   PART=4  ZipVL at 16k tokens: its GPU tests, the probe kernel table, `mmeff bench` of zipvl / τ 0.5 / τ 0.3 with
#           both quantizers (zipcache = the default, kivi = every number before issue 26)
#   PART=5  ZipVL at 64k tokens: `mmeff bench` (both quantizers) and benchmarks/zipvl_prefill.py (held / transient
#           memory per layer)
#   PART=6  ZipVL at 128k tokens (needs an H200: the unwrapped model's 64 GiB cache): benchmarks/zipvl_prefill.py
#
#   run: PART=1 bash experiments/bench_all.sh      (env: BUDGET_S=570, REPEATS=5, NEW_TOKENS=64)
set -uo pipefail
source experiments/gpu_env.sh
PART=${PART:?set PART=1..6}
END=$((SECONDS + ${BUDGET_S:-570})); R=out/perf_part$PART; ZP=benchmarks/presets; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/perf_part$PART.tgz" -C out perf_part$PART' EXIT
left() { echo $((END - SECONDS)); }
bench() {  # name, extra args (each table: one process)
  local t; t=$(left); [ "$t" -gt 20 ] || { echo "budget spent before $1"; return; }
  echo "[$SECONDS s] $1"
  timeout "$t" python3 -m mmeff_lab.cli bench --repeats ${REPEATS:-5} --warmup 2 --new-tokens ${NEW_TOKENS:-64} \
    --output $R/$1 "${@:2}" > $R/$1.log 2>&1
  cat $R/$1/bench.md 2>/dev/null || tail -20 $R/$1.log
}
step() {  # name, command...: a step other than a bench, under what is left of the budget
  local t; t=$(left); [ "$t" -gt 20 ] || { echo "budget spent before $1"; return; }
  echo "[$SECONDS s] $1"
  timeout "$t" "${@:2}" > $R/$1.log 2>&1; echo "$1 rc=$?"; tail -${TAIL:-8} $R/$1.log
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/versions.txt 2>&1
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" \
  >> $R/versions.txt 2>&1
cat $R/versions.txt
ZIPVL="zipvl,$ZP/zipvl-kivi.toml,$ZP/zipvl-t50.toml,$ZP/zipvl-t50-kivi.toml,$ZP/zipvl-t30.toml,$ZP/zipvl-t30-kivi.toml"
case $PART in
  1) step gpu_tests python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/engine/test_prefill_graph.py \
       tests/engine/test_static_decode.py
     bench llava1 --model llava-1.5-7b --batch-size 1 --cuda-graphs both --preset fastv,fastv-90,vflowopt-90
     bench next1 --model llava-next-7b --batch-size 1 --cuda-graphs both --preset fastv,fastv-90,vflowopt-90
     bench qwen1 --model qwen2-vl-7b --batch-size 1 --cuda-graphs both \
       --preset fastv,fastv-90,vflowopt-90,vflowopt-vit-75,vflowopt-vit-90  # vit: ours, issue 28 item 3
     bench llava16 --model llava-1.5-7b --batch-size 16 --cuda-graphs both --preset fastv,fastv-90,vflowopt-90 ;;
  2) for i in 1 2 3 4 5; do  # fresh processes: the run-to-run spread at batch 16 is larger than one run shows
       REPEATS=5 NEW_TOKENS=8 bench b16_run$i --model llava-1.5-7b --batch-size 16 --cuda-graphs both \
         --preset fastv-90,vflowopt-90 | grep -E "^\| (none|fastv-90|vflowopt-90)"
     done
     python3 - $R <<'EOF'
import glob, json, statistics, sys
runs = [json.load(open(f))[0]["rows"] for f in sorted(glob.glob(f"{sys.argv[1]}/b16_run*/bench.json"))]
for graphs in (False, True):
    for preset in ("fastv-90", "vflowopt-90"):
        s = [r["speedup"] for rows in runs for r in rows if r["preset"] == preset and r["cuda_graphs"] == graphs]
        if s:
            print(f"batch 16 {preset}{' [graphs]' if graphs else ''}: median {statistics.median(s):.2f}x of {len(s)} "
                  f"processes ({', '.join(f'{x:.2f}' for x in s)})")
EOF
     for b in 1 16; do
       TAIL=12 step decode_step_b$b env OUT=$R python3 benchmarks/decode_step.py --preset none,fastv-90,vflowopt-90 \
         --batch-size $b
     done ;;
  3) step attention_stats env OUT=$R python3 benchmarks/attention_stats.py
     step kernel_tests python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/kernels
     step profile_b16 python3 benchmarks/profile_prefill.py --model llava-1.5-7b --preset none,fastv-90,vflowopt-90 \
       --batch-size 16 --output $R/profile ;;
  4) step zipvl_tests python3 -m pytest -q -s -m gpu -p no:cacheprovider -rf tests/kernels/test_probe_scores.py \
       tests/kernels/test_kv_quant.py tests/kernels/test_quant_attention.py tests/methods/test_zipvl.py
     step probe_kernel env OUT=$R python3 benchmarks/probe_scores.py
     REPEATS=3 bench zipvl16k --model llava-1.5-7b --images 28 --batch-size 1 --preset "$ZIPVL" ;;
  5) REPEATS=3 bench zipvl64k --model llava-1.5-7b --images 112 --batch-size 1 --preset "$ZIPVL"
     step zipvl_prefill64k env OUT=$R python3 benchmarks/zipvl_prefill.py --images 112 --repeats 2 --tau 0.975,0.5,0.3 ;;
  6) step zipvl_prefill128k env OUT=$R python3 benchmarks/zipvl_prefill.py --images 224 --repeats 1 --tau 0.3 ;;
  *) echo "PART must be 1..6"; exit 2 ;;
esac
