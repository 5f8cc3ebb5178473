"""VFlowOpt's importance map against references built without the implementation (issue 26).

Each reference takes the attention the model itself computes (eager attention: CLIP's ``output_attentions``;
Qwen's per-chunk softmax recorded from the eager attention function, so its rotary and ``cu_seqlens`` split are
the model's own), the layout the model itself gives its features (LLaVA-NeXT: ``pack_image_features`` run on
marker features), the feature layer found by matching layer outputs with what the projector reads, and the patch
entropy from the original uint8 image (a planted four-colour region: exactly 2 bits). Then the rule of the
paper / released code by plain loops: recv = A.mean(0), G = recv > t * mean (empty: the argmax; bounded:
min(t * mean, t_max * max)), s = A[G].mean(0) + alpha_v * softmax(entropy). Qwen2.5-VL's window order is undone by
a window walk written here.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import mmeff
from mmeff.families import adapter_for
from mmeff.families.prompt import make_inputs
from mmeff.methods.vflowopt.method import VFlowOptConfig, low_counts
from mmeff_lab.models.factory import load_tiny, random_image
from tests.helpers import method_data

NO_PRUNING = dict(m=100.0, r_v=1.0, llm_layers=(), llm_ratios=(), layers_of=0)  # score only: nothing leaves
QUAD = [(0, 0, 0), (90, 40, 10), (170, 170, 170), (255, 250, 240)]  # four well-separated grey levels


def planted(size: tuple[int, int], cell: tuple[int, int], side: int, seed: int = 0) -> Image.Image:
    """A flat image (w, h) whose ``side`` x ``side`` block ``cell`` (row, col) holds a 2x2-pixel tiling of the
    four QUAD colours (each a quarter of the block: entropy 2 bits); the rest one colour (entropy 0)."""
    img = Image.new("RGB", size, (30 + 20 * seed, 120, 200))
    r0, c0 = cell[0] * side, cell[1] * side
    for y in range(side):
        for x in range(side):
            img.putpixel((c0 + x, r0 + y), QUAD[(y % 2) * 2 + (x % 2)])
    return img


def entropy_of_blocks(img: Image.Image, side: int) -> torch.Tensor:
    """[rows * cols] entropy (bits) of the grey levels round(0.3333 (R + G + B)) of each side x side block."""
    w, h = img.size
    out = []
    for r in range(h // side):
        for c in range(w // side):
            counts: dict[int, int] = {}
            for y in range(r * side, (r + 1) * side):
                for x in range(c * side, (c + 1) * side):
                    g = round(0.3333 * sum(img.getpixel((x, y))))
                    counts[g] = counts.get(g, 0) + 1
            n = side * side
            out.append(-sum(k / n * math.log2(k / n) for k in counts.values()))
    return torch.tensor(out)


def rule(a: torch.Tensor, t: float, t_max: float | None = None) -> tuple[torch.Tensor, bool]:
    """(relevance [n], released G empty) of one unit's head-mean attention a [n, n], by plain loops."""
    n = a.shape[0]
    recv = [float(sum(a[q, j] for q in range(n))) / n for j in range(n)]
    mean = sum(recv) / n
    theta = t * mean if t_max is None else min(t * mean, t_max * max(recv))
    glob = [j for j in range(n) if recv[j] > theta]
    empty = not any(r > t * mean for r in recv)
    if not glob:
        glob = [max(range(n), key=lambda j: (recv[j], -j))]
    return sum(a[g] for g in glob) / len(glob), empty


def layer_feeding(outputs: list[torch.Tensor], features: torch.Tensor) -> int:
    """Index of the layer whose output is ``features`` (what the projector / merger reads)."""
    hits = [i for i, o in enumerate(outputs) if o.shape == features.shape and torch.equal(o, features)]
    assert len(hits) == 1, f"{len(hits)} layers match the features"
    return hits[0]


def record_outputs(layers) -> tuple[list[torch.Tensor], list]:
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in layers]
    return outs, hooks


def span_scores(handle, model, inputs) -> list[torch.Tensor]:
    """Per image (image order): the method's scores at its span positions (-inf at layout tokens)."""
    scores = method_data(handle).scores
    out = {}
    for b, sample in enumerate(adapter_for(model).spans(inputs["input_ids"], inputs)):
        for sp in sample:
            out[sp.image_index] = scores[b, sp.start : sp.end]
    return [out[i] for i in sorted(out)]


# -- CLIP (LLaVA-1.5) -------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("t,t_rule", [(1.0, "released"), (1e4, "released"), (1e4, "bounded")])
def test_clip_relevance_entropy_and_feature_layer(tiny_model_dir, t, t_rule):
    model, processor = load_tiny(tiny_model_dir("llava"), attn_implementation="eager")
    images = [planted((32, 32), (1, 2), 8), planted((32, 32), (3, 0), 8, seed=1), random_image(5, (32, 32))]
    inputs = make_inputs(processor, ["describe", "compare the two"], [[images[0]], images[1:]])
    tower = model.model.vision_tower
    outs, hooks = record_outputs(adapter_for(model).vision_layers())
    ref = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    for h in hooks:
        h.remove()
    layer = layer_feeding(outs, ref.hidden_states[model.config.vision_feature_layer])
    assert layer == 0  # the tiny LLaVA reads hidden_states[-2] of 2 layers: layer 0's output
    cfg = VFlowOptConfig(t=t, t_rule=t_rule, t_max=0.5, alpha_v=1.0, **NO_PRUNING)
    with mmeff.wrap(model, cfg) as handle:
        model(**inputs)
        assert handle.pipeline.methods[0].vision_layer == layer
        got = span_scores(handle, model, inputs)
        stats = handle.stats
    n_empty = 0
    for i, img in enumerate(images):
        rel, empty = rule(ref.attentions[layer][i].float().mean(0), t, 0.5 if t_rule == "bounded" else None)
        n_empty += empty
        want = rel[1:] + torch.softmax(entropy_of_blocks(img, 8), 0)  # CLS is a query and a candidate, not a token
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)
    assert entropy_of_blocks(images[0], 8).argmax() == 6  # the planted block (1, 2), row-major
    assert stats["vflowopt_units"] == 3 and stats["vflowopt_empty_global"] == n_empty
    assert n_empty == (3 if t > 100 else 0)


@torch.no_grad()
def test_feature_layer_follows_vision_feature_layer(tiny_model_dir):
    """reference-llava reads the last layer (vision_feature_layer -1): the default scores that layer; an
    explicit vision_layer still wins; features taken from the embeddings are refused."""
    model, processor = load_tiny(tiny_model_dir("llava"), attn_implementation="eager")
    inputs = make_inputs(processor, ["describe"], [[random_image(1, (32, 32))]])
    for chosen, want in ((-1, 1), (2, 1), (1, 0), ([-2, -1], 1)):
        model.config.vision_feature_layer = chosen
        with mmeff.wrap(model, VFlowOptConfig(**NO_PRUNING)) as handle:
            assert handle.pipeline.methods[0].vision_layer == want, chosen
    model.config.vision_feature_layer = -1
    with mmeff.wrap(model, VFlowOptConfig(vision_layer=0, **NO_PRUNING)) as handle:
        assert handle.pipeline.methods[0].vision_layer == 0
        model(**inputs)
    model.config.vision_feature_layer = 0
    with pytest.raises(mmeff.ConfigError, match="vision embeddings"):
        mmeff.wrap(model, VFlowOptConfig(**NO_PRUNING))
    model.config.vision_feature_layer = -2
    for bad, match in ((dict(t_rule="max"), "t_rule"), (dict(t_max=1.0), "t_max"), (dict(vision_layer=5), "outside")):
        with pytest.raises(mmeff.ConfigError, match=match):
            mmeff.wrap(model, VFlowOptConfig(**{**NO_PRUNING, **bad}))


# -- LLaVA-NeXT: per-tile relevance laid out as the model lays out its features ---------------------------------
@torch.no_grad()
def test_llava_next_unpad_layout(tiny_model_dir):
    model, processor = load_tiny(tiny_model_dir("llava_next"), attn_implementation="eager")
    images = [random_image(1, (48, 40)), random_image(2, (40, 64)), random_image(3, (64, 32))]
    inputs = make_inputs(processor, ["describe", "compare the two"], [[images[0]], images[1:]])
    base = model.model
    seen: dict[str, object] = {}
    original = base.pack_image_features

    def pack(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        # the model's own layout, read from marker features: (tile, patch) of every token, or None (newline)
        marks = []
        for f in image_features:
            n_tiles, n_patch, d = f.shape
            mk = torch.zeros(n_tiles, n_patch, d)
            mk[..., 0] = torch.arange(n_tiles)[:, None].float()
            mk[..., 1] = torch.arange(n_patch)[None, :].float()
            mk[..., 2] = 1.0
            marks.append(mk)
        packed, _ = original(marks, image_sizes, vision_feature_select_strategy, torch.zeros(f.shape[-1]))
        seen["layout"] = [[(int(x[0]), int(x[1])) if x[2] == 1.0 else None for x in p] for p in packed]
        return original(image_features, image_sizes, vision_feature_select_strategy, image_newline)

    def grab(_m, args, kwargs):
        seen.setdefault("pixels", args[0] if args else kwargs["pixel_values"])

    base.pack_image_features = pack
    hook = base.vision_tower.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        cfg = VFlowOptConfig(t=1.0, alpha_v=0.5, **NO_PRUNING)
        with mmeff.wrap(model, cfg) as handle:
            model(**inputs)
            got = span_scores(handle, model, inputs)
            stats = handle.stats
    finally:
        del base.pack_image_features
        hook.remove()
    pixels = seen["pixels"]  # [all tiles, 3, 32, 32], images in order, base tile first
    layer = model.config.vision_feature_layer % (model.config.vision_config.num_hidden_layers + 1) - 1
    attn = model.model.vision_tower(pixels, output_attentions=True).attentions[layer]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    tile_scores = []
    for i in range(pixels.shape[0]):
        rel, _ = rule(attn[i].float().mean(0), 1.0)
        levels = torch.clamp((pixels[i].float() * std + mean) * 255, 0, 255).trunc()  # released uint8 cast
        grey = torch.round((levels * 0.3333).sum(0)).long()
        ent = []
        for r in range(4):
            for c in range(4):
                hist = torch.bincount(grey[8 * r : 8 * r + 8, 8 * c : 8 * c + 8].flatten(), minlength=256).float() / 64
                ent.append(float(-(hist[hist > 0] * hist[hist > 0].log2()).sum()))
        tile_scores.append(rel[1:] + 0.5 * torch.softmax(torch.tensor(ent), 0))
    offset, n_newlines = 0, 0
    for i, layout in enumerate(seen["layout"]):
        want = torch.tensor([float("-inf") if x is None else float(tile_scores[offset + x[0]][x[1]]) for x in layout])
        offset += 1 + max(x[0] for x in layout if x is not None)
        n_newlines += sum(x is None for x in layout)
        assert len(layout) > 17 and any(x is None for x in layout)  # anyres tiles unpadded, with newlines
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)
    assert offset == pixels.shape[0] == stats["vflowopt_units"]
    assert n_newlines > 0


# -- Qwen2-VL / Qwen2.5-VL: rotary, cu_seqlens chunks, window order ---------------------------------------------
def window_order(rows: int, cols: int, side: int) -> list[int]:
    """Raster index of the merged token in each internal slot of a Qwen2.5-VL windowed tower: windows of
    side x side tokens row-major over the grid (the last ones cut), tokens row-major inside a window."""
    order = []
    for r0 in range(0, rows, side):
        for c0 in range(0, cols, side):
            order += [r * cols + c for r in range(r0, min(r0 + side, rows)) for c in range(c0, min(c0 + side, cols))]
    return order


@torch.no_grad()
@pytest.mark.parametrize("family,layer", [("qwen2_vl", None), ("qwen2_5_vl", None), ("qwen2_5_vl", 0)])
@pytest.mark.parametrize("t", [1.0, 1e4])
def test_qwen_relevance_entropy_windows(tiny_model_dir, family, layer, t, monkeypatch):
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as q25
    import transformers.models.qwen2_vl.modeling_qwen2_vl as q2

    model, processor = load_tiny(tiny_model_dir(family), attn_implementation="eager")
    images = [planted((48, 40), (1, 4), 8), planted((40, 64), (6, 2), 8, seed=1), planted((64, 32), (2, 7), 8, seed=2)]
    inputs = make_inputs(processor, ["describe", "compare the two"], [[images[0]], images[1:]])
    tower = model.model.visual
    blocks = list(tower.blocks)
    chunks: dict[int, list[torch.Tensor]] = {}
    mod = q2 if family == "qwen2_vl" else q25
    eager = mod.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = eager(module, *args, **kwargs)
        for i, blk in enumerate(blocks):
            if module is blk.attn:
                chunks.setdefault(i, []).append(weights[0].float().mean(0))  # [n, n] head mean of one chunk
        return out, weights

    monkeypatch.setattr(mod, "eager_attention_forward", recording)
    outs, hooks = record_outputs(blocks)
    merged_in: list[torch.Tensor] = []
    hooks.append(tower.merger.register_forward_pre_hook(lambda _m, a: merged_in.append(a[0])))
    cfg = VFlowOptConfig(t=t, alpha_v=1.0, vision_layer=layer, **NO_PRUNING)
    try:
        with mmeff.wrap(model, cfg) as handle:
            model(**inputs)
            used = handle.pipeline.methods[0].vision_layer
            got = span_scores(handle, model, inputs)
            stats = handle.stats
    finally:
        for h in hooks:
            h.remove()
    assert used == (layer if layer is not None else layer_feeding(outs[: len(blocks)], merged_in[0]))
    # the layer's attention over the packed sequence: chunk blocks on the diagonal, in the tower's order
    parts = chunks[used]
    n_total = sum(p.shape[0] for p in parts)
    full = torch.zeros(n_total, n_total)
    pos = 0
    for p in parts:
        full[pos : pos + len(p), pos : pos + len(p)] = p
        pos += len(p)
    vc = model.config.vision_config
    windowed = family == "qwen2_5_vl"
    assert len(parts) > 3 if windowed and used not in vc.fullatt_block_indexes else len(parts) == 3
    merge = vc.spatial_merge_size
    start, n_empty = 0, 0
    for i, (grid, img) in enumerate(zip(inputs["image_grid_thw"].tolist(), images)):
        _, h, w = grid
        assert (w * vc.patch_size, h * vc.patch_size) == img.size  # no resize: the planted block stays put
        n = h * w
        rel, empty = rule(full[start : start + n, start : start + n], t)
        n_empty += empty
        start += n
        per_token = rel.view(-1, merge * merge).sum(1)  # a merged token is 2x2 consecutive patches
        rows, cols = h // merge, w // merge
        order = window_order(rows, cols, vc.window_size // merge // vc.patch_size) if windowed else range(rows * cols)
        raster = torch.empty_like(per_token)
        raster[list(order)] = per_token
        ent = entropy_of_blocks(img, merge * vc.patch_size)
        assert ent.max() == pytest.approx(2.0) and (ent > 0).sum() == 1
        torch.testing.assert_close(got[i], raster + torch.softmax(ent, 0), rtol=1e-4, atol=1e-6)
    assert stats["vflowopt_units"] == 3 and stats["vflowopt_empty_global"] == n_empty
    assert n_empty == (3 if t > 100 else 0)


# -- the released newline count ------------------------------------------------------------------------------
def test_low_counts_with_newlines_in_l():
    # 100 real tokens + 10 newlines, r_v 0.5, m 3: ours L = 100, released L = 110 (newlines never leave)
    assert low_counts([100], 0.5, 3.0) == [50 + 11]
    assert low_counts([100], 0.5, 3.0, layout=[10]) == [55 + 12]
    assert low_counts([100], 0.1, 3.0, layout=[10]) == [100]  # 99 + 12: capped at the real tokens
    assert low_counts([100], 0.5, 3.0, recycle=False, layout=[10]) == [55]
    assert low_counts([4, 100], 0.5, 1.0, layout=[10, 0]) == [4, 100]  # capped at the real tokens


@torch.no_grad()
def test_layout_in_count_released_llava_next(tiny_model_dir):
    """layout_in_count: each stage drops round((n + h) (1 - r)) of an image's n real tokens (h: its newlines)."""
    model, processor = load_tiny(tiny_model_dir("llava_next"))
    inputs = make_inputs(processor, ["describe"], [[random_image(1, (48, 40))]])
    (span,) = adapter_for(model).spans(inputs["input_ids"], inputs)[0]
    h = sum(t.rows for t in span.tiles if t.newline)
    n = sum(t.rows * t.cols for t in span.tiles)
    kept = {}
    for released in (False, True):
        cfg = VFlowOptConfig(r_v=0.5, recycle=False, llm_layers=(2,), llm_ratios=(0.5,), layers_of=0,
                             layout_in_count=released)
        with mmeff.wrap(model, cfg) as handle:
            model(**inputs)
            kept[released] = handle.stats["visual_tokens_kept_per_layer"]
    n0 = n - round((n + h) * 0.5)
    n2 = n0 - min(n0, round((n0 + h) * 0.5))
    assert kept[True] == pytest.approx([n0 + h, n0 + h, n2 + h, n2 + h])
    m0 = n - round(n * 0.5)
    assert kept[False] == pytest.approx([m0 + h, m0 + h, m0 - round(m0 * 0.5) + h, m0 - round(m0 * 0.5) + h])
    assert n0 < m0
