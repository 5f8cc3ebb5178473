#!/usr/bin/env bash
# One GPU call (docs/reference-model.md, "Generator v2: twin glyphs"; the fine-tune that made the shipped weights):
# fine-tune the shipped reference models on scenes drawn in another glyph style (vocab.GLYPH_STYLES: "twins-*" =
# co-occurring categories in pairs that differ by one detail), several runs side by side on one H200, then evaluate
# each on a DEV benchmark of its own style (seeds HELDOUT_SEED_BASE + 10^8, never the test split).
#   RUNS="llava:twins-accent llava:twins-pattern qwen2vl:twins-accent" bash experiments/finetune_reference_glyphs.sh
# -> $OUT/<arch>_<style>.tgz (model + train log), $OUT/dev_eval.tgz (results + logs).
# env: MINUTES=5.5 LR=5e-4 P_HALLUC=0.2 IMAGES=24000 POPE_IMAGES=500 CHAIR_LIMIT=50 EVAL_S=170 DEVICE=cuda
#      (IMAGES=64 MINUTES=0.5 DEVICE=cpu POPE_IMAGES=4 CHAIR_LIMIT=2 RUNS=llava:twins-accent: a CPU smoke run)
set -uo pipefail
source experiments/gpu_env.sh
O=${OUT:-/tmp/out}; mkdir -p "$O" out/gly
RUNS=${RUNS:-llava:twins-accent llava:twins-pattern qwen2vl:twins-accent}; DEV=${DEVICE:-cuda}; MIN=${MINUTES:-5.5}
P=${P_HALLUC:-0.2}; W=lab/mmeff_lab/reference/weights
STYLES=$(for r in $RUNS; do echo "${r#*:}"; done | sort -u)
bench() { echo "from mmeff_lab.reference.synthetic import ensure_benchmarks as e, HELDOUT_SEED_BASE as B
print(e('out/devbench', n_pope_images=${POPE_IMAGES:-500}, n_chair_images=100, n_mme_images=50,
        seed_base=B + 100_000_000, glyphs='$1'))"; }
for s in $STYLES; do python -c "$(bench "$s")" > "out/gly/bench_$s.log" 2>&1 & done  # CPU, while the GPU trains
for s in $STYLES; do
  timeout 150 python experiments/train_reference.py --prepare --data "out/data_$s" --images "${IMAGES:-24000}" \
    --workers 16 --p-halluc "$P" --inline-halluc --balanced-sides --glyphs "$s" || exit 1
done
for r in $RUNS; do
  arch=${r%%:*} style=${r#*:} name=${r%%:*}_${r#*:}
  ( timeout "$(python -c "print(int($MIN * 60 + 60))")" python experiments/train_reference.py --device "$DEV" \
      --data "out/data_$style" --minutes "$MIN" --total-minutes "$MIN" --lr "${LR:-5e-4}" --warmup-steps 100 \
      --arch "$arch" --out "out/gly/$name" --init-from "$W/$arch" > "out/gly/$name.log" 2>&1
    grep "validation\|saved" "out/gly/$name.log" | tail -n 3
    tar czf "$O/$name.tgz" -C "out/gly/$name" model train_log.jsonl ) &
done
wait
for r in $RUNS; do
  style=${r#*:} name=${r%%:*}_${r#*:}
  b=$(python -c "$(bench "$style")") || exit 1
  env OMP_NUM_THREADS=4 timeout "${EVAL_S:-170}" python experiments/eval_reference.py --model "out/gly/$name/model" \
    --bench "$b" --chair-limit "${CHAIR_LIMIT:-50}" --batch-size 64 --device "$DEV" --json "out/gly/eval_$name.json" \
    > "out/gly/eval_$name.log" 2>&1 &
done
wait
for f in out/gly/eval_*.log; do echo "== $f"; grep -v "Loading weights" "$f" | tail -n 7; done
tar czf "$O/dev_eval.tgz" out/gly/*.json out/gly/*.log && ls -la "$O"
