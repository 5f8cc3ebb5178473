#!/usr/bin/env bash
# GPU calls (issues 6/7): does a deeper reference decoder read the image earlier? Trains a 12-layer LLaVA-class
# reference (decoder 12 x 256, GQA 4/2 heads, MLP 352; vision tower, projector and embeddings from the shipped
# 6-layer model, decoder layers fresh), then evaluates it and the shipped model on a DEV benchmark (held-out
# seeds from HELDOUT_SEED_BASE + 10^8, never the test split): none, vflowopt-75/90 and every forced exit.
#   bash scripts/gpu_deep.sh train   # -> $OUT/llava12.tgz (model folder + train log)
#   bash scripts/gpu_deep.sh eval    # model from out/deep/llava12/model or .carry/llava12 -> $OUT/deep_eval.tgz
# env: MINUTES=8.8 IMAGES=24000 DEVICE=cuda LIMIT=300 BATCH=64 (smaller values give a CPU smoke run)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source scripts/gpu_wheels.sh  # nltk / pycocotools as wheels (carry: .whl)
O=${OUT:-/tmp/out}; mkdir -p "$O" out/deep
DEV=${DEVICE:-cuda}; LIMIT=${LIMIT:-300}; BATCH=${BATCH:-64}
case "${1:-}" in
train)
  python scripts/train_reference.py --prepare --images "${IMAGES:-24000}" --workers "${WORKERS:-16}" || exit 1
  python scripts/train_reference.py --arch llava --out out/deep/llava12 --device "$DEV" \
    --minutes "${MINUTES:-8.8}" --total-minutes "${MINUTES:-8.8}" --warmup-steps 100 --aux-weight 1 --aux-minutes 3 \
    --init-from mmeff/reference/weights/llava --init-skip 'language_model\.layers\.' \
    --text-config '{"num_hidden_layers": 12, "num_key_value_heads": 2, "intermediate_size": 352}' || exit 1
  tar czf "$O/llava12.tgz" -C out/deep/llava12 model train_log.jsonl && ls -la "$O/llava12.tgz" ;;
eval)
  M=out/deep/llava12/model; [ -d $M ] || M=.carry/llava12/model
  trap 'tar czf "$O/deep_eval.tgz" -C out/deep --exclude llava12 . && ls -la "$O/deep_eval.tgz"' EXIT
  BENCH=$(python -c "from mmeff_lab.reference.synthetic import ensure_benchmarks as e, HELDOUT_SEED_BASE as B
print(e('out/devbench', n_pope_images=${POPE_IMAGES:-100}, n_chair_images=${CHAIR_IMAGES:-100}, n_mme_images=${MME_IMAGES:-50}, seed_base=B + 100_000_000))")
  E="python -m mmeff_lab.cli eval --data $BENCH --limit $LIMIT --device $DEV --batch-size $BATCH --no-progress"
  for spec in "llava12 $M 12" "llava6 mmeff/reference/weights/llava 6"; do
    set -- $spec
    $E --model "$2" --tasks pope,mme,chair --preset none,vflowopt-75,vflowopt-90 --chair-max-new-tokens 128 \
      --output "out/deep/main_$1" 2>&1 | grep -v "Loading weights" | head -n 12
    P=$(python scripts/exit_oracle.py write "out/deep/x$3" "$3")
    $E --model "$2" --tasks pope_random,pope_adversarial,mme --preset "none,$P" --log-samples \
      --output "out/deep/exits_$1" 2>&1 | grep -v "Loading weights" | head -n 20
    python scripts/exit_oracle.py report "out/deep/exits_$1" "$3"
  done ;;
heads)  # DyVTE routers + explain mapper for the 12-layer model, then the issue-7 table on the TEST benchmarks
  M=out/deep/llava12/model; [ -d $M ] || M=.carry/llava12/model
  H=out/deep/heads12; mkdir -p $H
  trap 'tar czf "$O/heads12.tgz" -C out/deep heads12 && ls -la "$O/heads12.tgz"' EXIT
  timeout ${DYVTE_S:-330} python -m mmeff_lab.cli train dyvte --model $M --steps ${STEPS:-400} --batch-size ${HBATCH:-32} \
    --width 512 --lr 2e-4 --abs-tol 0.02 --device "$DEV" --output $H 2>&1 | grep -v "Loading weights" | tail -n 25
  python -m mmeff_lab.cli train explain --model $M --samples ${SAMPLES:-256} --steps 500 --device "$DEV" --output $H \
    2>&1 | grep -v "Loading weights" | tail -n 8
  printf '[fastv-12-50]\ndescription = "FastV K=2, ratio 0.6: 50%% removed on average over 12 layers"\nmethod = "fastv"\nk = 2\nratio = 0.6\n' > $H/fastv-12-50.toml
  P=none,$H/fastv-12-50.toml; for f in dyvte explain-50 explain-75 explain-90; do [ -f $H/$f.toml ] && P=$P,$H/$f.toml; done
  python -m mmeff_lab.cli eval --model $M --tasks pope,mme --limit $LIMIT --device $DEV --batch-size $BATCH --no-progress \
    --preset "$P,vflowopt-50,vflowopt-90" --output $H/test_trained 2>&1 | grep -v "Loading weights" | head -n 16 ;;
*) echo "usage: gpu_deep.sh train|eval|heads"; exit 2 ;;
esac
