"""Speed and memory of presets against the unwrapped model, measured in one run (``mmeff bench``).

Per preset: vision-encoder ms, prefill ms (vision included) = time to first token, decode tokens/s, peak GPU
memory, KV-cache bytes after prefill (total, and the part holding visual tokens), visual tokens kept — medians
over repeats after warm-up, CUDA-event timing on GPU. Beside each preset the *ideal*: the same vision encoder
plus the unwrapped decoder simply run on the shortened sequence each layer sees (per-layer decoder cost taken
from whole-decoder runs at each length), so the gap to the limit is visible.

Models: a loaded model, or a named full-size architecture with random weights (``ARCHITECTURES``; labelled
random-weight in every output). Inputs are synthesised from the config (random pixels, random text ids around
the image tokens), so no processor is needed.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch
from torch import nn

import mmeff
from mmeff.families import adapter_for

ARCH_DIR = resources.files("mmeff_lab.models") / "architectures"


def architectures() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in ARCH_DIR.iterdir() if p.name.endswith(".json"))


def arch_spec(name: str) -> dict[str, Any]:
    path = ARCH_DIR / f"{name}.json"
    if not path.is_file():
        raise mmeff.UnknownPresetError(f"unknown architecture {name!r}; known: {', '.join(architectures())}")
    return json.loads(path.read_text())


def build_random(name: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 overrides: Callable[[Any], None] | None = None) -> nn.Module:
    """A full-size architecture with random weights, built directly on ``device`` (timing only)."""
    import transformers

    spec = arch_spec(name)
    cfg_dict = dict(spec["config"])
    config = transformers.CONFIG_MAPPING[cfg_dict.pop("model_type")](**cfg_dict)
    if overrides is not None:
        overrides(config)
    cls = getattr(transformers, {"llava": "LlavaForConditionalGeneration",
                                 "llava_next": "LlavaNextForConditionalGeneration",
                                 "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                                 "qwen2_vl": "Qwen2VLForConditionalGeneration",
                                 "qwen3_vl": "Qwen3VLForConditionalGeneration"}[spec["family"]])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    model.mmeff_random_weights = True  # every output says so
    return model.eval()


def synth_inputs(model: nn.Module, batch: int, images: int = 1, size: tuple[int, int] | None = None,
                 text: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of prompts (random text ids around ``images`` image placeholders each) with random pixels."""
    adapter = adapter_for(model)
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    n_img = batch * images
    inputs: dict[str, Any] = {}
    if adapter.family in ("llava", "llava_next", "llava_onevision"):
        s = cfg.vision_config.image_size
        size = size or (s, s)
        if adapter.family == "llava":
            inputs["pixel_values"] = torch.randn(n_img, 3, s, s, generator=g)
        else:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            n_patches = image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, s)
            inputs["pixel_values"] = torch.randn(n_img, n_patches, 3, s, s, generator=g)
            inputs["image_sizes"] = torch.tensor([list(size)] * n_img)
            if adapter.family == "llava_onevision":  # every image tiled (anyres_max), as in a one-image prompt
                inputs["batch_num_images"] = torch.ones(n_img, dtype=torch.long)
    else:
        vc = cfg.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        size = size or (28 * 16, 28 * 16)
        h, w = size[0] // unit * vc.spatial_merge_size, size[1] // unit * vc.spatial_merge_size
        inputs["image_grid_thw"] = torch.tensor([[1, h, w]] * n_img)
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        inputs["pixel_values"] = torch.randn(n_img * h * w, patch_dim, generator=g)
    layouts = adapter.image_layouts(inputs, n_img)
    per_image = [sum(t.length for t in tiles) + extra for tiles, extra in layouts]
    image_id = adapter.image_token_ids[0]
    brackets = (getattr(cfg, k, None) for k in ("vision_start_token_id", "vision_end_token_id"))
    special = {*adapter.image_token_ids, *brackets}
    vocab = [i for i in range(10, min(adapter.text_config.vocab_size, 1000)) if i not in special]

    def words(n: int) -> list[int]:
        return [vocab[i] for i in torch.randint(0, len(vocab), (n,), generator=g).tolist()]

    rows = []
    for b in range(batch):
        row = words(text // 3)
        for i in range(images):
            n = per_image[b * images + i]
            if adapter.family.startswith("qwen"):
                row += [cfg.vision_start_token_id, *([image_id] * n), cfg.vision_end_token_id]
            else:
                row += [image_id] * n
        row += words(text - text // 3)
        rows.append(row)
    ids = torch.tensor(rows)
    inputs["input_ids"] = ids
    inputs["attention_mask"] = torch.ones_like(ids)
    if adapter.family.startswith("qwen"):
        inputs["mm_token_type_ids"] = (ids == image_id).long()
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


class _Timer:
    """Milliseconds of a region: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end), out
        t = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t) * 1e3, out


@dataclass
class BenchRow:
    preset: str
    vision_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_tokens_per_s: float
    peak_memory_bytes: int | None
    kv_cache_bytes: int
    kv_visual_bytes: float
    visual_tokens_in: float
    visual_tokens_kept: float
    ideal_prefill_ms: float
    generate_ms: float = 0.0  # one whole generate call of new_tokens tokens (what a user waits for)
    cuda_graphs: bool = False
    prefill_graph: str = ""  # how the timed prefills ran with cuda_graphs ("replayed", or "eager: why")
    speedup: float = 1.0
    ideal_speedup: float = 1.0
    kv_visual_ratio: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


@torch.no_grad()
def bench(model: nn.Module, presets: list[str], *, batch_size: int = 1, images: int = 1,
          image_size: tuple[int, int] | None = None, new_tokens: int = 32, repeats: int = 5, warmup: int = 2,
          cuda_graphs: tuple[bool, ...] = (False,),
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure each preset (``none`` always first) on the same synthesised inputs; see the module doc.

    ``cuda_graphs``: modes to measure each preset in — eager hooks (False) and/or prefills and decode steps
    replayed from CUDA graphs (True: :mod:`mmeff.engine.prefill_graph`, :mod:`mmeff.engine.static_decode`); ratios
    are against ``none`` in the same mode (graphs against graphs). A row slower than that ``none`` is flagged."""
    presets = ["none", *[p for p in presets if p != "none"]]
    modes = sorted(set(cuda_graphs))
    device = next(model.parameters()).device
    timer = _Timer(device)
    adapter = adapter_for(model)
    inputs = synth_inputs(model, batch_size, images, image_size)
    n_layers = len(adapter.layers)
    cfg = adapter.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_token_layer_bytes = 2 * cfg.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    vision_kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    decoder_ms: dict[tuple[int, bool], float] = {}
    vision_ms: dict[bool, float] = {}
    refused: dict[str, str] = {}  # part of the graph-mode ideal that ran eagerly: why

    def median_ms(fn: Callable[[], Any], graphs: bool, part: str) -> float:
        """Median ms of ``fn``; ``graphs``: of one CUDA-graph replay of it (the launch savings the graph rows
        get), eager where CUDA refuses the capture (the reason in the result's ``ideal_eager_parts``)."""
        for _ in range(warmup):
            fn()
        if graphs and device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    fn()
                fn = graph.replay
                graph.replay()
            except Exception as e:  # a host read inside: this part of the ideal stays eager
                refused[part] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                torch.cuda.synchronize(device)
        try:
            return _median([timer(fn)[0] for _ in range(repeats)])
        finally:
            del fn
            if graphs and device.type == "cuda":
                del graph
                torch.cuda.empty_cache()  # each captured part holds its own memory pool

    def decoder_time(length: int, graphs: bool) -> float:
        """Unwrapped decoder prefill at ``length`` tokens (same batch), median ms."""
        if (length, graphs) not in decoder_ms:
            emb = torch.randn(batch_size, length, cfg.hidden_size, device=device, dtype=next(model.parameters()).dtype)
            lm = adapter.language_model
            run = lambda: lm(inputs_embeds=emb, use_cache=True)  # noqa: E731
            decoder_ms[length, graphs] = median_ms(run, graphs, "decoder")
        return decoder_ms[length, graphs]

    def vision_time(graphs: bool) -> float:
        """The vision encoder alone, unwrapped (a method's own encoder-side work is part of its prefill time)."""
        if graphs not in vision_ms:
            # graphed: the sizes the anyres path reads on the host go as CPU tensors (as in a captured prefill)
            kw = {k: v.cpu() if graphs and k in adapter.host_inputs else v for k, v in vision_kwargs.items()}
            vision_ms[graphs] = median_ms(lambda: adapter.base.get_image_features(**kw), graphs, "vision")
        return vision_ms[graphs]

    vision_time(False)  # before any preset runs (as every measurement so far)

    def measure(preset: str, graphs: bool) -> BenchRow:
        handle = mmeff.wrap(model, preset, cuda_graphs="all" if graphs else False, timing=True)
        try:
            prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
            gen = lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,  # noqa: E731
                                         do_sample=False)
            # with graphs a shape's first call runs eagerly and its second captures: time replays only
            warm = max(warmup, 2) if graphs else warmup
            for _ in range(warm):
                prefill()
            pre_t, peaks = [], []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                pre_t.append(timer(prefill)[0])
                if device.type == "cuda":
                    peaks.append(torch.cuda.max_memory_allocated(device))
            stats = handle.stats
            # ZipVL keeps every token but attends among / stores at high bits only the important ones
            extra = {k: v for k, v in stats.items() if k == "important_ratio"}
            if stats.get("vflowopt_vit_units_in"):  # a vision-side stage: the tower itself ran on fewer tokens
                extra["vision_units_kept"] = stats["vflowopt_vit_units_kept"] / stats["vflowopt_vit_units_in"]
                extra["vision_block"] = stats["vflowopt_vit_block"]
            for _ in range(2 if graphs else 1):
                gen()  # warm the decode path (and capture its graphs)
            rates, gen_t = [], []
            for _ in range(max(1, repeats // 2)):
                gen_t.append(timer(gen)[0])
                s = handle.stats  # decode steps timed by the pipeline (model forward per step, synchronised)
                rates.append(batch_size * s["decode_tokens"] / max(s["decode_ms"], 1e-6) * 1e3)
        finally:
            mmeff.unwrap(model)
        per_layer = stats["visual_tokens_kept_per_layer"]
        n_in = stats["visual_tokens_in"]
        full_len = inputs["input_ids"].shape[1]
        # the ideal in the row's mode: with graphs, the unwrapped parts replayed from graphs too
        ideal = vision_time(graphs) + sum(decoder_time(round(full_len - (n_in - kept)), graphs)
                                          for kept in per_layer) / n_layers
        return BenchRow(
            preset=preset, vision_ms=vision_time(graphs), prefill_ms=_median(pre_t), ttft_ms=_median(pre_t),
            decode_tokens_per_s=_median(rates),
            peak_memory_bytes=max(peaks) if peaks else None,
            kv_cache_bytes=stats["kv_cache_bytes"],
            kv_visual_bytes=batch_size * sum(per_layer) * kv_token_layer_bytes,
            visual_tokens_in=n_in, visual_tokens_kept=stats["visual_tokens_kept"], ideal_prefill_ms=ideal,
            generate_ms=_median(gen_t), cuda_graphs=graphs, extra=extra,
            prefill_graph=str(stats.get("prefill_graph", "")),
        )

    rows: list[BenchRow] = []
    errors: dict[str, str] = {}
    for graphs in modes:
        for preset in presets:
            name = preset + (" [graphs]" if graphs else "")
            if progress:
                progress(name)
            try:
                rows.append(measure(preset, graphs))
            except Exception as e:  # one failing preset must not lose the others' measurements
                if preset == "none" and graphs == modes[0]:  # the baseline of every ratio
                    raise
                errors[name] = f"{type(e).__name__}: {e}"
    for r in rows:  # ratios against `none` in the same mode (graphs against graphs), eager `none` if it is missing
        base = next((b for b in rows if b.preset == "none" and b.cuda_graphs == r.cuda_graphs), rows[0])
        r.speedup = base.prefill_ms / r.prefill_ms
        r.ideal_speedup = base.prefill_ms / r.ideal_prefill_ms
        r.kv_visual_ratio = r.kv_visual_bytes / base.kv_visual_bytes if base.kv_visual_bytes else 1.0
        r.extra["generate_speedup"] = base.generate_ms / r.generate_ms if r.generate_ms else 1.0
    return {
        "model": type(model).__name__,
        "random_weights": bool(getattr(model, "mmeff_random_weights", False)),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch_size": batch_size, "images": images, "sequence_length": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "rows": [asdict(r) for r in rows],
        "errors": errors,
        "ideal_eager_parts": refused,
    }


def to_markdown(result: dict[str, Any]) -> str:
    label = " (random weights: timing only)" if result["random_weights"] else ""
    lines = [
        f"**{result['model']}**{label} on {result['device']}, {result['dtype']}, batch {result['batch_size']}, "
        f"{result['sequence_length']} tokens, {result['new_tokens']} new tokens, median of {result['repeats']}",
        "",
        "| preset | visual kept | vision ms | prefill ms | ideal ms | speed-up | ideal | decode tok/s | peak mem GiB "
        "| KV MiB | visual KV vs none | generate ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] else "–"
        imp = r.get("extra", {}).get("important_ratio")
        name = r["preset"] + (f" ({100 * imp:.0f}% important)" if imp is not None else "")
        name += " [graphs]" if r.get("cuda_graphs") else ""
        mode = r.get("prefill_graph", "")
        if mode.startswith("eager"):
            name += f" (prefill {mode})"
        if r["preset"] != "none" and r["speedup"] < 1.0:
            name += " **slower than none**"
        mark = "†" if "vision_units_kept" in r.get("extra", {}) else ""
        lines.append(
            f"| {name} | {r['visual_tokens_kept']:.0f}/{r['visual_tokens_in']:.0f} | {r['vision_ms']:.1f} "
            f"| {r['prefill_ms']:.1f} | {r['ideal_prefill_ms']:.1f}{mark} | {r['speedup']:.2f}× "
            f"| {r['ideal_speedup']:.2f}×{mark} "
            f"| {r['decode_tokens_per_s']:.1f} | {peak} | {r['kv_cache_bytes'] / 2**20:.1f} "
            f"| {100 * r['kv_visual_ratio']:.1f}% | {r.get('generate_ms', 0.0):.1f} |"
        )
    lines += [
        "",
        "- *visual kept*: visual tokens each decoder layer attends to, averaged over the layers / tokens in.",
        "- *ideal*: the unwrapped vision encoder plus the unwrapped decoder run on the shortened sequence each layer "
        "sees (the limit a pruning preset can reach); for `none` it is the same model timed in parts, so its ratio "
        "shows the run-to-run noise. In `[graphs]` rows both parts are replayed from CUDA graphs too (what the "
        "graph rows save on launches, the ideal saves as well).",
        "- *speed-up*: prefill of `none` in the same mode (eager or graphs) / this row's prefill.",
    ]
    inside = [(r["preset"], r["extra"]) for r in result["rows"] if "vision_units_kept" in r.get("extra", {})]
    for preset, extra in dict(inside).items():
        lines.append(
            f"- † `{preset}` drops merged tokens inside the vision tower (after block {extra['vision_block']}, "
            f"{100 * extra['vision_units_kept']:.0f}% kept): its *ideal* still counts the whole unpruned tower, so "
            "it is not this row's limit (the row may beat it) and *vision ms* is the unpruned tower's time.")
    if result.get("device") == "cpu":
        lines.append("- Timed on the CPU: the times move severalfold with the machine's load; performance figures "
                     "are GPU runs (`--device cuda`).")
    slow = [r["preset"] + (" [graphs]" if r.get("cuda_graphs") else "") for r in result["rows"]
            if r["preset"] != "none" and r["speedup"] < 1.0]
    if slow:
        lines.append(f"\n**Slower than `none` in the same mode (prefill)**: {', '.join(slow)}")
    lines += [f"\n**{p} failed**: {e}" for p, e in result.get("errors", {}).items()]
    lines += [f"\n**Graph-mode ideal, {part} timed eagerly** (CUDA refused its capture: {why})"
              for part, why in result.get("ideal_eager_parts", {}).items()]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Speed-up and visual-KV share vs visual tokens kept, one line per benchmark configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for res in results:
        first = res["rows"][0].get("cuda_graphs", False)  # one point per preset: the first decode mode's rows
        rows = sorted((r for r in res["rows"] if r.get("cuda_graphs", False) == first),
                      key=lambda r: r["visual_tokens_kept"])
        x = [r["visual_tokens_kept"] / r["visual_tokens_in"] for r in rows]
        label = f"{res['model']} b{res['batch_size']}"
        a.plot(x, [r["speedup"] for r in rows], "o-", label=f"{label} measured")
        a.plot(x, [r["ideal_speedup"] for r in rows], "x--", label=f"{label} ideal")
        b.plot(x, [100 * r["kv_visual_ratio"] for r in rows], "o-", label=label)
        for r, xi in zip(rows, x):
            a.annotate(r["preset"], (xi, r["speedup"]), fontsize=7)
    a.set(xlabel="visual tokens kept (fraction, mean over layers)", ylabel="prefill speed-up vs none")
    b.set(xlabel="visual tokens kept (fraction)", ylabel="visual KV bytes vs none (%)")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
