"""How often VFlowOpt's global-token set G is empty on the shipped reference models (CPU; 12 minutes on 2 shared cores).

For each reference model, each preset threshold t (vflowopt-50/75/90) and each scored vision layer (the old
hard-coded -2 and the default, the model's feature layer) and t rule (released: recv > t * mean; bounded, ours:
recv > min(t * mean, t_max * max)), one prefill of ``--images`` reference training scenes with a describe prompt;
prints, per setting, the units (images: one CLIP tile / one Qwen image each) whose released G was empty (the
fallback to the most attended token), and the mean |G| actually used. Numbers in docs/vflowopt.md
("Global tokens on the reference models") come from:

    PYTHONPATH=$PWD:$PWD/lab python experiments/vflowopt_global_tokens.py --images 20

``--newlines`` prints instead, for a 672x672 image on LLaVA-NeXT-7B (576 base + 48x48 grid tokens, 48 newlines,
32 decoder layers), the real tokens each preset keeps after the input stage (before recycled cells) and after
each LLM stage, with our token count and the released one (newlines in L): docs/vflowopt.md "Newline count".
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import mmeff
from mmeff.families import adapter_for
from mmeff.families.prompt import make_inputs
from mmeff.methods.vflowopt.budget import effective_schedule
from mmeff.methods.vflowopt.method import low_counts
from mmeff.presets import get_preset
from mmeff_lab.reference.model import load_reference
from mmeff_lab.training.data import reference_samples

ARCHS = {"llava": "llava", "qwen2vl": "qwen2_vl"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--t-max", type=float, default=0.5, help="the bounded rule's fraction of max(recv)")
    ap.add_argument("--newlines", action="store_true", help="the LLaVA-NeXT newline-count arithmetic instead")
    args = ap.parse_args()
    if args.newlines:
        newline_counts()
        return
    torch.set_num_threads(2)
    samples = reference_samples(args.images)
    print("| model | preset (t) | vision layer | t rule | empty G (of units) | mean G size |")
    print("|---|---|---|---|---|---|")
    for arch, family in ARCHS.items():
        model, processor = load_reference(arch=arch, attn_implementation="sdpa")
        inputs = make_inputs(processor, [s.text for s in samples], [[s.image] for s in samples])
        n_vision = len(adapter_for(model).vision_layers())
        for name in ("vflowopt-50", "vflowopt-75", "vflowopt-90"):
            base = get_preset(name).config(family)
            for layer in (-2, None):
                for rule in ("released", "bounded"):
                    cfg = dataclasses.replace(base, vision_layer=layer, t_rule=rule, t_max=args.t_max)
                    with torch.no_grad(), mmeff.wrap(model, cfg) as handle:
                        model(**inputs)
                        st = handle.stats
                        used = handle.pipeline.methods[0].vision_layer
                    label = f"{used} of {n_vision} ({'-2, old preset' if layer == -2 else 'feature layer'})"
                    print(f"| reference-{arch} | {name} ({base.t:.1f}) | {label} | {rule} | "
                          f"{st['vflowopt_empty_global']} of {st['vflowopt_units']} | "
                          f"{st['vflowopt_global_tokens']:.2f} |")


def newline_counts(n_real: int = 576 + 48 * 48, newlines: int = 48, depth: int = 32) -> None:
    """Real tokens kept per stage (input stage before recycled cells, then each LLM stage), ours vs released."""
    for name in ("vflowopt-50", "vflowopt-75", "vflowopt-90"):
        cfg = get_preset(name).config("llava_next")
        layers, ratios = effective_schedule(cfg, depth)
        row = {}
        for label, h in (("ours", 0), ("released", newlines)):
            n = n_real - low_counts([n_real], cfg.r_v, cfg.m, cfg.recycle, [h])[0]
            kept = [n]
            for r in ratios:
                n -= min(n, round((n + h) * (1.0 - r)))
                kept.append(n)
            row[label] = kept
        print(f"{name} (stages before layers {list(layers)}): ours {row['ours']}, released {row['released']}")


if __name__ == "__main__":
    main()
