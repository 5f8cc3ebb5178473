#!/usr/bin/env bash
# One GPU call (issue 6): the paper's 300-trial VFlowOpt search for one budget on the LLaVA reference (TRAIN
# scenes, never the benchmark), then the entropy-off / recycling-off ablations of the result. $OUT/tune.tgz.
#   run: bash scripts/gpu_tune.sh             (env: BUDGET=90 TRIALS=300 TUNE_S=480)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if [ -d .whl ]; then  # optuna travels as wheels (the GPU image has none)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site || exit 1
fi
B=${BUDGET:-90}; R=out/tune; mkdir -p $R
trap 'tar czf "${OUT:-/tmp/out}/tune.tgz" -C out tune' EXIT
python3 -m mmeff.cli tune vflowopt --model mmeff/reference/weights/llava --budget 0.$B --trials ${TRIALS:-300} \
  --samples 30 --batch-size 30 --timeout ${TUNE_S:-480} --device cuda --output $R/vflowopt-$B-tuned.toml > $R/tune$B.log 2>&1
echo "rc=$? trials: $(grep -c '^trial' $R/tune$B.log)"; tail -3 $R/tune$B.log
python3 scripts/ablate_preset.py $R/vflowopt-$B-tuned.toml $R 2>&1 | tail -3
