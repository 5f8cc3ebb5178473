"""GPU diagnostic for issue 28: where a prefill reads the device (a host sync or a pageable host->device copy),
which a CUDA-graph capture refuses. Runs one batch-1 prefill of a tiny model per family / preset under
``torch.cuda.set_sync_debug_mode("warn")`` (after a warm-up) and prints each syncing call site (mmeff and
transformers frames only).

    python experiments/capture_syncs.py [--families llava,llava_next,qwen2_vl] [--presets none,fastv-90,vflowopt-90]
"""

from __future__ import annotations

import argparse
import tempfile
import traceback
import warnings

import torch

import mmeff
from mmeff.families.prompt import make_inputs
from mmeff_lab.models.factory import build_tiny, load_tiny, random_image


def sites(fn) -> list[str]:
    found: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/mmeff/" in f.filename or "transformers/" in f.filename]
        where = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-4:][::-1])
        found.append(f"{str(message)[:60]} @ {where}")

    old = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="llava,llava_next,qwen2_vl")
    ap.add_argument("--presets", default="none,fastv-90,vflowopt-90")
    a = ap.parse_args()
    for family in a.families.split(","):
        model, processor = load_tiny(build_tiny(family, tempfile.mkdtemp() + "/m"))
        model = model.cuda().eval()
        inputs = make_inputs(processor, ["describe the picture"], [[random_image(1, (48, 40))]])
        inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
        for preset in a.presets.split(","):
            with mmeff.wrap(model, preset), torch.no_grad():
                model(**inputs)  # warm-up: lazily built constants, first-call checks
                torch.cuda.synchronize()
                found = sites(lambda m=model, x=inputs: m(**x))
            print(f"== {family} {preset}: {len(found)} syncing calls")
            for s in dict.fromkeys(found):
                print("   ", s)


if __name__ == "__main__":
    main()
