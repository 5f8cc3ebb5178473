# Sourced by the GPU drivers, from the repository root: puts the library and the lab (lab/) on PYTHONPATH (the
# GPU machine gets the working tree, no pip install), and makes optuna / nltk / pycocotools importable: they travel
# as wheels in .whl/ (carry: [".whl"]), since the GPU image has none of them and no index access; installed into
# /tmp/site, which goes on PYTHONPATH too (skipped where they are importable already, e.g. a local run).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/lab${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && ! python3 -c "import nltk, pycocotools, optuna" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
fi
