"""VFlowOpt: importance-map pieces pinned on known inputs, recycling and budgets by hand, and generation with
the cache against a slow reference that recomputes everything per step (independent plan: plain loops)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import mmeff
from mmeff.families import adapter_for
from mmeff.families.llava import LlavaAdapter
from mmeff.methods.vflowopt.budget import averaged_budget, fastv_ratio_for_budget, kept_fraction, solve_last_ratio
from mmeff.methods.vflowopt.method import VFlowOptConfig, cell_ids, merge_cells, recycle_plan, token_entropy
from mmeff.presets import get_preset
from mmeff_lab.models.factory import load_tiny
from tests.helpers import batch, dense_relevance, greedy_recompute, method_data


# -- importance map --------------------------------------------------------------------------------------
def test_clip_token_regions_and_entropy_layout():
    # a 2x2-patch tile: patch (0, 1) is two-valued, the others flat -> entropy map [0, 1, 0, 0] row-major
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    px = torch.zeros(1, 3, 8, 8)
    px[:, :, :2, 4:] = 1.0
    clip = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(patch_size=4)))
    regions, counts = LlavaAdapter(clip).token_regions(px, None)
    assert regions.shape == (4, 3, 16) and counts == [4]
    ent = token_entropy(regions, mean, std)
    torch.testing.assert_close(ent, torch.tensor([0.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)


@torch.no_grad()
def test_clip_relevance_matches_eager_attentions(tiny_model_dir):
    """The hook's own q/k attention equals the tower's eager attention weights (CLS kept as a query)."""
    model, processor = load_tiny(tiny_model_dir("llava"), attn_implementation="eager")
    inputs = batch(processor, "llava")
    tower = model.model.vision_tower
    out = tower(inputs["pixel_values"], output_attentions=True)
    layer = -2 % len(out.attentions)
    cfg = VFlowOptConfig(t=1.0, alpha_v=0.0, llm_layers=(), llm_ratios=(), layers_of=0, vision_layer=layer)
    with mmeff.wrap(model, cfg) as handle:
        model(**inputs)
        units = method_data(handle).scores
    want = [dense_relevance(a.float().mean(0), 1.0)[1:] for a in out.attentions[layer]]
    spans = [sp for sample in adapter_for(model).spans(inputs["input_ids"], inputs) for sp in sample]
    for b, sp in zip([0, 1, 1], spans):
        torch.testing.assert_close(units[b, sp.start : sp.end], want[sp.image_index], rtol=1e-4, atol=1e-6)


# -- recycling and budgets -------------------------------------------------------------------------------
def _plan_one(scores, tile, row, col, r_v, m, recycle=True):
    unit = torch.zeros_like(tile)
    cell = cell_ids(unit, tile, row, col, m)
    return recycle_plan(scores, unit, cell, [len(scores)], r_v, m, recycle)


def test_recycle_plan_cells_weighted_mean_and_placement():
    # one 4x4 tile, m = 2: cells are the four 2x2 quadrants
    scores = torch.tensor([9, 8, 1, 2, 7, 6, 3, 0.5, 10, 11, 12, 13, 4, 5, 14, 15], dtype=torch.float)
    row, col = torch.arange(16) // 4, torch.arange(16) % 4
    tile = torch.zeros(16, dtype=torch.long)
    kept, rep = _plan_one(scores, tile, row, col, r_v=0.5, m=2.0)
    # reduce = 8, merged = int(16 / 4) = 4 -> the 12 lowest leave: all but scores 15, 14, 13, 12
    cells = {}
    for i, r in enumerate(rep.tolist()):
        if r >= 0:
            cells.setdefault(r, []).append(i)
    assert cells == {0: [0, 1, 4, 5], 6: [2, 3, 6, 7], 9: [8, 9, 12, 13]}  # keyed by each cell's best member
    assert kept.nonzero().flatten().tolist() == [0, 6, 9, 10, 11, 14, 15]
    torch.manual_seed(0)
    x = torch.randn(16, 5)
    out = merge_cells(x, scores, rep)
    for r, members in cells.items():
        w = scores[members]
        torch.testing.assert_close(out[r], (w[:, None] * x[members]).sum(0) / w.sum())
    others = [i for i in range(16) if i not in cells]
    assert torch.equal(out[others], x[others])  # non-representatives are untouched (dropped or kept as they are)
    # a zero weight sum falls back to the plain mean
    zero = scores.clone()
    zero[[0, 1, 4, 5]] = torch.tensor([1.0, -1.0, 0.0, 0.0])
    torch.testing.assert_close(merge_cells(x, zero, rep)[0], x[[0, 1, 4, 5]].mean(0))
    # ablation: no recycling keeps exactly the top round(N r_v) = 8 tokens and forms no cell
    kept, rep = _plan_one(scores, tile, row, col, r_v=0.5, m=2.0, recycle=False)
    assert (rep == -1).all() and kept.nonzero().flatten().tolist() == [0, 1, 8, 9, 10, 11, 14, 15]


def test_recycle_plan_batched_equals_per_image():
    # three images of different sizes, tiles and ties, packed: the same as planning each on its own
    gen = torch.Generator().manual_seed(3)
    sizes = [(1, 5, 5), (2, 3, 4), (1, 6, 6)]  # (tiles, rows, cols)
    parts = []
    for n_tiles, rows, cols in sizes:
        n = n_tiles * rows * cols
        s = torch.randint(0, 6, (n,), generator=gen).float()  # many ties
        t = torch.arange(n_tiles).repeat_interleave(rows * cols)
        r, c = (torch.arange(n) % (rows * cols)) // cols, torch.arange(n) % cols
        parts.append((s, t, r, c))
    unit = torch.cat([torch.full((len(p[0]),), i) for i, p in enumerate(parts)])
    packed = [torch.cat([p[k] for p in parts]) for k in range(4)]
    counts = [len(p[0]) for p in parts]
    for recycle in (True, False):
        kept, rep = recycle_plan(packed[0], unit, cell_ids(unit, *packed[1:], 2.5), counts, 0.3, 2.5, recycle)
        off = 0
        for s, t, r, c in parts:
            k1, r1 = _plan_one(s, t, r, c, 0.3, 2.5, recycle)
            assert torch.equal(kept[off : off + len(s)], k1)
            assert torch.equal(rep[off : off + len(s)], torch.where(r1 >= 0, r1 + off, -1))
            off += len(s)


def test_budget_constraint():
    # the official 10% config: r_v, r_1 given, the last ratio follows (0.6011 in their release)
    last = solve_last_ratio(0.9, 0.11661529508161146, [9, 18], [1.0, 0.0], 28)
    assert last == pytest.approx(0.6011, abs=2e-4)
    assert kept_fraction(0.5, [1, 3], [0.5, 0.5], 4) == pytest.approx((0.5 + 0.25 * 2 + 0.125) / 4)
    assert solve_last_ratio(0.7, 0.3, [], [], 10) == pytest.approx(0.3)
    for n in (28, 32, 4):
        for b in (0.5, 0.75, 0.9):
            assert averaged_budget(get_preset(f"vflowopt-{int(b * 100)}").config("llava"), n) == pytest.approx(b)
    for fam, n in (("llava", 32), ("llava_next", 32), ("qwen2_vl", 28), ("qwen2_5_vl", 28), ("llava_onevision", 28)):
        for b in (50, 75, 90):
            assert averaged_budget(get_preset(f"fastv-{b}").config(fam), n) == pytest.approx(b / 100)
            assert averaged_budget(get_preset(f"vflowopt-{b}").config(fam), n) == pytest.approx(b / 100)
    assert fastv_ratio_for_budget(0.9, 32) == pytest.approx(0.96)
    for b in (50, 75, 90):  # LLaVA-OneVision's SigLIP normalisation
        cfg = get_preset(f"vflowopt-{b}").config("llava_onevision")
        assert cfg.pixel_mean == cfg.pixel_std == (0.5, 0.5, 0.5)
    with pytest.raises(mmeff.ConfigError, match="out of reach"):
        averaged_budget(VFlowOptConfig(r_v=0.1, llm_layers=(1, 2), llm_ratios=(1.0, 1.0), layers_of=0, budget=0.2), 4)


# -- the whole method against a slow reference -----------------------------------------------------------
CFG = dict(t=1.0, m=2.0, r_v=0.5, alpha_v=0.5, llm_layers=(1, 3), llm_ratios=(0.5, 0.6), layers_of=0)


def plan(state_scores, spans, x0, cfg):
    """Independent plan by plain loops: (removed-from-layer dict, {(b, pos): merged vector}, counts)."""
    removed = {0: set(), **{layer: set() for layer in cfg["llm_layers"]}}
    merged, counts = {}, []
    for b, sample in enumerate(spans):
        for sp in sample:
            g = sp.grid()
            cand = [i for i in range(sp.length) if not g["layout"][i]]
            pos = [sp.start + i for i in cand]
            s = {p: float(state_scores[b, p]) for p in pos}
            n = len(pos)
            n_low = min(n, round(n * (1 - cfg["r_v"])) + int(n / cfg["m"] ** 2))
            low = sorted(pos, key=lambda p: (s[p], p))[:n_low]
            cells = {}
            for p in low:
                i = p - sp.start
                m = cfg["m"]
                key = (int(g["tile"][i]), math.floor(int(g["row"][i]) / m), math.floor(int(g["col"][i]) / m))
                cells.setdefault(key, []).append(p)
            reps = set()
            for members in cells.values():
                rep = max(members, key=lambda p: (s[p], -p))
                w = torch.tensor([s[p] for p in members])
                merged[(b, rep)] = (w[:, None] / w.sum() * x0[b, members].float()).sum(0)
                reps.add(rep)
            removed[0] |= {(b, p) for p in low if p not in reps}
            alive = [p for p in pos if p not in low or p in reps]
            counts.append([len(alive)])
            for layer, ratio in zip(cfg["llm_layers"], cfg["llm_ratios"]):
                n_drop = round(len(alive) * (1 - ratio))
                drop = sorted(alive, key=lambda p: (s[p], p))[:n_drop]
                removed[layer] |= {(b, p) for p in drop}
                alive = [p for p in alive if p not in drop]
                counts[-1].append(len(alive))
    return removed, merged, counts


def slow_generate(model, inputs, removed, merged, steps):
    layers = adapter_for(model).layers
    hidden_from = {}
    acc = set()
    for layer in range(len(layers)):
        acc |= removed.get(layer, set())
        hidden_from[layer] = set(acc)

    def hook(layer):
        def fn(module, args, kwargs):
            m = kwargs["attention_mask"]
            n = m.shape[-1]
            drop = torch.zeros(m.shape[0], n, dtype=torch.bool)
            for b, p in hidden_from[layer]:
                drop[b, p] = True
            m = m.masked_fill(drop[:, None, None, :], torch.finfo(m.dtype).min)
            own = torch.eye(n, dtype=torch.bool)[None, None] & drop[:, None, None, :]
            kwargs["attention_mask"] = m.masked_fill(own, 0.0)  # a hidden token still sees itself
            if layer == 0:
                h = (args[0] if args else kwargs["hidden_states"]).clone()
                for (b, p), v in merged.items():
                    h[b, p] = v.to(h.dtype)
                if args:
                    args = (h, *args[1:])
                else:
                    kwargs["hidden_states"] = h
            return args, kwargs
        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    return greedy_recompute(model, inputs, steps, handles)


@torch.no_grad()
def test_vflowopt_generate_equals_slow_reference(models):
    family, eager, sdpa, processor = models
    inputs = batch(processor, family)  # two left-padded samples, the second with two images
    cfg = VFlowOptConfig(**CFG)
    x0 = {}

    def grab(module, args, kwargs):  # registered before wrap: sees the embeddings before the input stage
        x0.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    cap = adapter_for(eager).layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with mmeff.wrap(eager, cfg) as handle:
        eager(**inputs)
        scores = method_data(handle).scores
        spans = handle.pipeline.state.spans
    cap.remove()
    removed, merged, counts = plan(scores, spans, x0["h"], CFG)
    assert removed[0] and merged and removed[1] and removed[3]  # every stage really acts
    steps = 4
    ref_ids, ref_logits = slow_generate(eager, inputs, removed, merged, steps)
    per_sample = [[0] * 3 for _ in spans]
    i = 0
    for b, sample in enumerate(spans):
        for _ in sample:
            per_sample[b] = [a + c for a, c in zip(per_sample[b], counts[i])]
            i += 1
    layout = [sum(int(sp.grid()["layout"].sum()) for sp in sample) for sample in spans]
    expected = [sum(per_sample[b][s] + layout[b] for b in range(len(spans))) / len(spans) for s in range(3)]
    for model in (eager, sdpa):
        with mmeff.wrap(model, cfg) as handle:
            out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref_ids), family
        for got, want in zip(out.logits, ref_logits):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert handle.stats["visual_tokens_kept_per_layer"] == pytest.approx(
            [expected[0], expected[1], expected[1], expected[2]])


@torch.no_grad()
def test_presets_run_and_keep_requested_counts(models):
    family, _, sdpa, processor = models
    inputs = batch(processor, family)
    for name in ("vflowopt-90",):
        with mmeff.wrap(sdpa, name) as handle:
            out = sdpa(**inputs)
            method = handle.pipeline.methods[0]
            state = handle.pipeline.state
            assert torch.isfinite(out.logits).all()
            kept = handle.stats["visual_tokens_kept_per_layer"]
            assert kept[0] < handle.stats["visual_tokens_in"]
            # each LLM stage drops exactly round(n (1 - r)) of every image's remaining prunable tokens
            for layer, ratio in zip(method.layers, method.ratios):
                before, after = state.group_for(layer - 1), state.group_for(layer)
                for b, sample in enumerate(state.spans):
                    for sp in sample:
                        n, n_after = (_n_prunable(state, g, b, sp) for g in (before, after))
                        assert n_after == n - round(n * (1 - ratio))


def _n_prunable(state, g, b, sp) -> int:
    ok = state.prunable_in_group(g)[b] & (g.index[b] >= sp.start) & (g.index[b] < sp.end)
    return int(ok.sum())


@torch.no_grad()
def test_text_only_prompt_is_untouched(tiny_model_dir):
    # no image: no input stage, and the LLM stages must not look for scores that were never made
    from mmeff.families.prompt import make_inputs
    from mmeff_lab.models.factory import load_tiny

    model, processor = load_tiny(tiny_model_dir("llava"))
    inputs = make_inputs(processor, ["a prompt without any image"], [[]])
    want = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with mmeff.wrap(model, "vflowopt-90"):
        got = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)
