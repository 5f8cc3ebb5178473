# Sourced by the GPU scripts: optuna / nltk / pycocotools travel as wheels in .whl/ (carry: [".whl"]), since the
# GPU image has none of them and no pip access; installs them into /tmp/site and puts it on PYTHONPATH (skipped
# where they are importable already, e.g. a local run).
if [ -d .whl ] && ! python3 -c "import nltk, pycocotools, optuna" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site || exit 1
fi
