#!/usr/bin/env bash
# One GPU call: re-measures what the VFlowOpt default change of issue 26 moves (docs/vflowopt.md). The built-in
# vflowopt-50/75/90 now score the model's feature layer (reference-llava: its last vision layer, 3 of 4; the rows
# in docs/vflowopt.md were measured with the old hard-coded -2, layer 2). Steps:
#   tests:  the VFlowOpt GPU tests (Triton kernels against the torch reference, details and bounded rule included)
#           and the CPU reference tests of the importance map, on the GPU machine's torch
#   table:  `mmeff eval` of the LLaVA reference (test split, as experiments/table_vflowopt.sh) for vflowopt-50/75/90
#           with the new default, vflowopt-90 with the old vision_layer = -2 (same call, for the paired
#           comparison) and vflowopt-90 with the bounded global-token rule (ours)
#   fill:   fill slots of the captured-prefill bound at vflowopt-50/75/90 over 8 reference prompts per model
#           (docs/vflowopt.md "GPU path"), with the new default
# Results: $OUT/vflowopt_defaults.tgz.
#   run: bash experiments/table_vflowopt_defaults.sh   (env: STEPS="tests table fill" LIMIT=500 DEVICE=cuda)
set -uo pipefail
source experiments/gpu_env.sh
R=out/vflowopt_defaults; mkdir -p $R; DEV=${DEVICE:-cuda}
trap 'tar czf "${OUT:-/tmp/out}/vflowopt_defaults.tgz" -C out vflowopt_defaults' EXIT
STEPS=${STEPS:-tests table fill}

if [[ " $STEPS " == *" tests "* ]]; then
  python3 -m pytest -q -m "gpu or not gpu" tests/kernels/test_vflowopt_score.py tests/methods/test_vflowopt.py \
    tests/methods/test_vflowopt_reference.py > $R/tests.log 2>&1; echo "tests rc=$?"; tail -3 $R/tests.log
fi

if [[ " $STEPS " == *" table "* ]]; then
  P=$R/presets; mkdir -p $P
  # vflowopt-90 as shipped before issue 26 (vision layer -2), and with the bounded rule (ours, t_max 0.5)
  python3 - "$P" <<'EOF'
import dataclasses, sys
from mmeff.presets import get_preset, write_preset
base = get_preset("vflowopt-90").config("llava")
write_preset(f"{sys.argv[1]}/vflowopt-90-layer-2.toml", "vflowopt-90-layer-2",
             dataclasses.replace(base, vision_layer=-2), "vflowopt-90 scoring vision layer -2 (the old default)")
write_preset(f"{sys.argv[1]}/vflowopt-90-bounded.toml", "vflowopt-90-bounded",
             dataclasses.replace(base, t_rule="bounded"), "vflowopt-90, bounded global-token rule (ours, t_max 0.5)")
EOF
  rm -rf $R/llava_prune  # a fresh run (mmeff eval refuses a folder holding another one)
  python3 -m mmeff_lab.cli eval --model reference-llava --tasks pope,mme --limit ${LIMIT:-500} --device $DEV \
    --batch-size 64 --no-progress --n-boot 200 --output $R/llava_prune \
    --preset "vflowopt-50,vflowopt-75,vflowopt-90,$P/vflowopt-90-layer-2.toml,$P/vflowopt-90-bounded.toml" \
    > $R/llava_prune.log 2>&1; echo "eval rc=$?"; grep "^|" $R/llava_prune.log | head -10
fi

if [[ " $STEPS " == *" fill "* ]]; then
  python3 - > $R/fill_slots.txt 2>&1 <<'EOF'
import dataclasses
import torch
import mmeff
from mmeff.families.prompt import make_inputs
from mmeff.presets import get_preset
from mmeff_lab.reference.model import load_reference
from mmeff_lab.training.data import reference_samples
samples = reference_samples(8)
families = {"llava": "llava", "qwen2vl": "qwen2_vl"}
for arch, family in families.items():
    model, processor = load_reference(arch=arch, device="cuda")
    inputs = make_inputs(processor, [s.text for s in samples], [[s.image] for s in samples]).to("cuda")
    for name in ("vflowopt-50", "vflowopt-75", "vflowopt-90"):
        for layer in (None, -2):  # the new default (feature layer) and the old one
            cfg = dataclasses.replace(get_preset(name).config(family), vision_layer=layer)
            with torch.no_grad(), mmeff.wrap(model, cfg) as handle:
                model(**inputs)
                g = handle.pipeline.state.group_for(0)  # the input stage's group: where the host-side bound pads
                print(f"{arch} {name} vision_layer={layer}: {int((~g.valid).sum())} fill slots of {g.index.numel()}; "
                      f"empty G {handle.stats['vflowopt_empty_global']} of {handle.stats['vflowopt_units']}")
EOF
  echo "fill rc=$?"; tail -12 $R/fill_slots.txt
fi
