"""ZipVL prefill benchmark: a LLaVA-1.5-7B-shaped decoder (random bf16 weights) over >= 16k visual tokens.

Measures, in one run on one GPU, prefill latency (median of ``--repeats``) and peak memory of the unwrapped
model (SDPA) and of the ``zipvl`` preset, prints a table and writes ``$OUT/zipvl_prefill_<images>.json`` if ``$OUT`` is
set. The vision tower is a 1-layer stub that yields 576 tokens per 336 px image (LLaVA-1.5's count), so the
timing is the language model's. ``--tiny`` runs a small CPU-sized shape (a smoke test of the script).

    python benchmarks/zipvl_prefill.py --images 28          # 28 x 576 = 16128 visual tokens
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import mmeff
import mmeff.families
import mmeff.methods.zipvl


def build(tiny: bool, device: str) -> LlavaForConditionalGeneration:
    if tiny:
        text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=64, patch_size=8)
    else:  # LLaVA-1.5-7B's decoder: Vicuna-7B
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=131072)
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=336, patch_size=14)
    config = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=32000,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    config.text_config.vocab_size = config.image_token_id + 64
    config._attn_implementation = "sdpa"
    dtype = torch.float32 if tiny else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.text_config._attn_implementation = "sdpa"
    return model.eval()


def inputs_for(model: LlavaForConditionalGeneration, images: int, device: str) -> dict[str, torch.Tensor]:
    cfg = model.config
    size = cfg.vision_config.image_size
    per_image = (size // cfg.vision_config.patch_size) ** 2
    gen = torch.Generator().manual_seed(0)
    ids: list[int] = [1]
    for _ in range(images):
        ids += torch.randint(100, 1000, (8,), generator=gen).tolist() + [cfg.image_token_id] * per_image
    ids += torch.randint(100, 1000, (40,), generator=gen).tolist()  # the question
    input_ids = torch.tensor([ids], device=device)
    pixels = torch.randn(images, 3, size, size, generator=gen).to(device, model.dtype)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}


def memory_trace(model, inputs) -> dict[str, float]:
    """GiB, one prefill: memory held when each decoder layer starts (growth = what the cache keeps) and the
    largest transient inside one layer (peak during it minus what it started with)."""
    layers = mmeff.families.adapter_for(model).layers
    start: list[float] = []
    transient: list[float] = []

    def pre(module, args):
        torch.cuda.reset_peak_memory_stats()
        start.append(torch.cuda.memory_allocated() / 2**30)

    def post(module, args, out):
        transient.append(torch.cuda.max_memory_allocated() / 2**30 - start[-1])

    hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return {"held_at_layer0_gib": start[0], "held_at_last_gib": start[-1],
            "growth_per_layer_gib": (start[-1] - start[0]) / max(1, len(start) - 1),
            "max_transient_gib": max(transient), "max_transient_layer": transient.index(max(transient))}


def measure(model, inputs, repeats: int, device: str) -> dict[str, float]:
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up kernels and allocator
            times.append((time.perf_counter() - start) * 1e3)
        del out
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    row = {"prefill_ms": statistics.median(times), "peak_gib": peak}
    if device == "cuda":
        row.update(memory_trace(model, inputs))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="zipvl")
    ap.add_argument("--tau", default="", help="comma-separated taus to run the preset with (random weights give "
                    "flat attention, so the paper's tau keeps nearly every token; tau ~ kept share)")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    model = build(args.tiny, device)
    inputs = inputs_for(model, args.images, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    rows = {"none": measure(model, inputs, args.repeats, device)}
    for tau in [float(t) for t in args.tau.split(",") if t] or [None]:
        name = args.preset if tau is None else f"{args.preset} tau={tau}"
        with mmeff.wrap(model, args.preset, **({} if tau is None else {"tau": tau})) as handle:
            rows[name] = measure(model, inputs, args.repeats, device)
            rows[name]["important_ratio"] = handle.stats.get("important_ratio", float("nan"))
            rows[name]["kv_cache_bytes"] = handle.stats["kv_cache_bytes"]
    base = rows["none"]
    n_tokens = inputs["input_ids"].shape[1]
    print(f"LLaVA-1.5-7B-shaped decoder, {n_tokens} tokens ({args.images} images), {device}, weights {weights:.1f} GiB")
    print(f"{'preset':<20}{'prefill ms':>12}{'speed-up':>10}{'peak GiB':>10}{'peak-w GiB':>12}{'kept':>8}")
    for name, r in rows.items():
        act = r["peak_gib"] - weights
        print(f"{name:<20}{r['prefill_ms']:>12.1f}{base['prefill_ms'] / r['prefill_ms']:>10.2f}"
              f"{r['peak_gib']:>10.2f}{act:>12.2f}{r.get('important_ratio', 1.0):>8.3f}"
              f"  cache growth/layer {r.get('growth_per_layer_gib', float('nan')):.3f} GiB,"
              f" max transient {r.get('max_transient_gib', float('nan')):.2f} GiB")
    result = {"tokens": n_tokens, "images": args.images, "device": torch.cuda.get_device_name() if device == "cuda"
              else "cpu", "weights_gib": weights, "rows": rows}
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / f"zipvl_prefill_{args.images}.json"
        with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as f:
            json.dump(result, f, indent=2)
        os.replace(f.name, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
