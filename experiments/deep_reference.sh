#!/usr/bin/env bash
# A 12-layer LLaVA-class reference (experiment, not shipped): does a deeper decoder read the image earlier?
# docs/reference-model.md "A deeper LLaVA-class reference", docs/trained-pruners.md "On a 12-layer reference",
# docs/vflowopt.md "What is not met". One GPU call per stage (sweep: also on the CPU):
#   bash experiments/deep_reference.sh train   # decoder 12 x 256, GQA 4/2 heads, MLP 352; vision tower, projector and
#                                              # embeddings from the shipped 6-layer model, decoder layers fresh
#                                              # -> $OUT/llava12.tgz (model folder + train log)
#   bash experiments/deep_reference.sh eval    # it and the shipped model on a DEV benchmark (held-out seeds from
#                                              # HELDOUT_SEED_BASE + 10^8, never the test split): none, vflowopt-75/90 and
#                                              # every forced exit, with the oracle exit layer -> $OUT/deep_eval.tgz
#   bash experiments/deep_reference.sh heads   # its DyVTE routers + explain mapper, then the trained-pruner table on the
#                                              # TEST benchmarks -> $OUT/heads12.tgz
#   DEVICE=cpu bash experiments/deep_reference.sh sweep   # DyVTE exit threshold: sweep on DEV, the same presets on
#                                              # TEST; the threshold is chosen from dev alone (11 min on 2 CPU cores)
#                                              # -> $OUT/sweep.tgz
# The model comes from out/deep/llava12/model, else the carried .carry/llava12/model; the sweep's routers from
# out/deep/heads12, else .carry/heads12.
# env: MINUTES=8.8 IMAGES=24000 DEVICE=cuda LIMIT=300 BATCH=64 (smaller values give a CPU smoke run)
set -uo pipefail
source experiments/gpu_env.sh
O=${OUT:-/tmp/out}; mkdir -p "$O" out/deep
DEV=${DEVICE:-cuda}; LIMIT=${LIMIT:-300}; BATCH=${BATCH:-64}; W=lab/mmeff_lab/reference/weights
M=out/deep/llava12/model; [ -d $M ] || M=.carry/llava12/model
devbench() {  # the DEV benchmark folder (rendered once): devbench POPE_IMAGES CHAIR_IMAGES MME_IMAGES
  python -c "from mmeff_lab.reference.synthetic import ensure_benchmarks as e, HELDOUT_SEED_BASE as B
print(e('out/devbench', n_pope_images=$1, n_chair_images=$2, n_mme_images=$3, seed_base=B + 100_000_000))"; }
case "${1:-}" in
train)
  python experiments/train_reference.py --prepare --images "${IMAGES:-24000}" --workers "${WORKERS:-16}" || exit 1
  python experiments/train_reference.py --arch llava --out out/deep/llava12 --device "$DEV" \
    --minutes "${MINUTES:-8.8}" --total-minutes "${MINUTES:-8.8}" --warmup-steps 100 --aux-weight 1 --aux-minutes 3 \
    --init-from $W/llava --init-skip 'language_model\.layers\.' \
    --text-config '{"num_hidden_layers": 12, "num_key_value_heads": 2, "intermediate_size": 352}' || exit 1
  tar czf "$O/llava12.tgz" -C out/deep/llava12 model train_log.jsonl && ls -la "$O/llava12.tgz" ;;
eval)
  trap 'tar czf "$O/deep_eval.tgz" -C out/deep --exclude llava12 . && ls -la "$O/deep_eval.tgz"' EXIT
  BENCH=$(devbench ${POPE_IMAGES:-100} ${CHAIR_IMAGES:-100} ${MME_IMAGES:-50}) || exit 1
  E="python -m mmeff_lab.cli eval --data $BENCH --limit $LIMIT --device $DEV --batch-size $BATCH --no-progress"
  for spec in "llava12 $M 12" "llava6 $W/llava 6"; do
    set -- $spec
    $E --model "$2" --tasks pope,mme,chair --preset none,vflowopt-75,vflowopt-90 --chair-max-new-tokens 128 \
      --output "out/deep/main_$1" 2>&1 | grep -v "Loading weights" | head -n 12
    P=$(python experiments/exit_oracle.py write "out/deep/x$3" "$3")
    $E --model "$2" --tasks pope_random,pope_adversarial,mme --preset "none,$P" --log-samples \
      --output "out/deep/exits_$1" 2>&1 | grep -v "Loading weights" | head -n 20
    python experiments/exit_oracle.py report "out/deep/exits_$1" "$3"
  done ;;
heads)  # DyVTE routers + explain mapper for the 12-layer model, then the trained-pruner table on the TEST benchmarks
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
sweep)  # DyVTE exit threshold on DEV (chosen there), the same presets on TEST
  R=out/sweep; mkdir -p $R
  trap 'tar czf "$O/sweep.tgz" -C out sweep' EXIT
  C=out/deep/heads12/dyvte.safetensors; [ -f $C ] || C=.carry/heads12/dyvte.safetensors
  P=none
  for t in 0.5 0.7 0.9 0.97; do
    n=dyvte-t${t#0.}  # no dot in a TOML table name
    printf '[%s]\ndescription = "DyVTE, exit when p_exit > %s"\nmethod = "dyvte"\nthreshold = %s\ncheckpoint = "%s"\n' \
      "$n" "$t" "$t" "$PWD/$C" > $R/$n.toml
    P=$P,$R/$n.toml
  done
  DEVB=$(devbench 100 100 50) || exit 1
  E="python -m mmeff_lab.cli eval --model $M --limit $LIMIT --device $DEV --batch-size $BATCH --no-progress"
  $E --data "$DEVB" --tasks pope_random,pope_adversarial,mme --preset "$P" --output $R/dev 2>&1 | grep -v "Loading weights" | head -n 12
  $E --tasks pope,mme --preset "$P" --output $R/test 2>&1 | grep -v "Loading weights" | head -n 12 ;;
*) echo "usage: deep_reference.sh train|eval|heads|sweep"; exit 2 ;;
esac
