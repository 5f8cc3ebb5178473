#!/usr/bin/env bash
# DyVTE exit threshold on the 12-layer reference (CPU or GPU): sweep on the DEV benchmark (held-out seeds from
# HELDOUT_SEED_BASE + 10^8) and the same presets on the TEST benchmark; the threshold is chosen from dev alone.
#   DEVICE=cpu bash scripts/dyvte_sweep.sh   (11 min on 2 CPU cores)
# needs .carry/llava12/model (scripts/gpu_deep.sh train) and .carry/heads12/dyvte.safetensors (... heads)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
source scripts/gpu_wheels.sh
O=${OUT:-/tmp/out}; R=out/sweep; mkdir -p "$O" $R
trap 'tar czf "$O/sweep.tgz" -C out sweep' EXIT
P=none
for t in 0.5 0.7 0.9 0.97; do
  n=dyvte-t${t#0.}  # no dot in a TOML table name
  printf '[%s]\ndescription = "DyVTE, exit when p_exit > %s"\nmethod = "dyvte"\nthreshold = %s\ncheckpoint = "%s"\n' \
    "$n" "$t" "$t" "$PWD/.carry/heads12/dyvte.safetensors" > $R/$n.toml
  P=$P,$R/$n.toml
done
DEVB=$(python -c "from mmeff_lab.reference.synthetic import ensure_benchmarks as e, HELDOUT_SEED_BASE as B
print(e('out/devbench', n_pope_images=100, n_chair_images=100, n_mme_images=50, seed_base=B + 100_000_000))")
E="python -m mmeff_lab.cli eval --model .carry/llava12/model --limit 300 --device ${DEVICE:-cuda} --batch-size 64 --no-progress"
$E --data "$DEVB" --tasks pope_random,pope_adversarial,mme --preset "$P" --output $R/dev 2>&1 | grep -v "Loading weights" | head -n 12
$E --tasks pope,mme --preset "$P" --output $R/test 2>&1 | grep -v "Loading weights" | head -n 12
