"""vflowopt-vit (ours, not in the paper; issue 28): VFlowOpt's importance scored inside Qwen2-VL's vision tower
drops whole merge units after an early block.

The reference is built without the implementation: the unwrapped tower's blocks run in a loop written here
(eager attention per image, our own rotary application, the rotary embeddings and patch embeddings the unwrapped
tower makes for the full grid), the importance at block k from that loop's own attention probabilities by the
paper's rule in plain loops (``rule``), the top units per image kept, the later blocks run on the kept patches
only, the merger, then the unwrapped language model on the prompt with the dropped placeholder tokens removed,
at the M-RoPE positions the unwrapped model gives the full prompt gathered at the kept tokens.
"""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.methods.vflowopt.vit import VFlowOptViTConfig
from mmeff.presets import get_preset
from mmeff_lab.models.factory import load_tiny
from tests.helpers import batch
from tests.methods.test_vflowopt_reference import rule

T = 1.0  # a low threshold: the global set is never empty (the released rule, no fallback involved)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [S, H, d] rotated by the vision rotary embeddings (cos, sin [S, d]): x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rot * sin[:, None]


def _block(blk, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One Qwen2-VL vision block by hand (attention within each segment of ``lengths``); also each segment's
    head-mean attention probabilities."""
    attn = blk.attn
    s = x.shape[0]
    q, k, v = attn.qkv(blk.norm1(x)).view(s, 3, attn.num_heads, -1).unbind(1)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    outs, probs, start = [], [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))  # [H, n, d]
        p = torch.softmax(qs @ ks.transpose(1, 2) * attn.head_dim**-0.5, dim=-1)
        probs.append(p.mean(0))
        outs.append((p @ vs).transpose(0, 1).reshape(n, -1))
        start += n
    x = x + attn.proj(torch.cat(outs))
    return x + blk.mlp(blk.norm2(x)), probs


@torch.no_grad()
def reference_tower(model, pixels: torch.Tensor, grid: torch.Tensor, block: int, keep: float
                    ) -> tuple[torch.Tensor, list[list[int]], list[int]]:
    """(merged features of the kept units [U', D], per image the kept units (raster order), the number of packed
    positions each block ran on)."""
    tower = model.model.visual
    seen = {}
    hook = tower.blocks[0].register_forward_pre_hook(lambda _m, a, kw: seen.update(kw), with_kwargs=True)
    tower(pixels, grid_thw=grid)  # the unwrapped tower: its rotary embeddings of the full grid
    hook.remove()
    cos, sin = seen["position_embeddings"]
    x = tower.patch_embed(pixels)
    lengths = [t * h * w for t, h, w in grid.tolist()]
    kept_units, ran = [], []
    for i, blk in enumerate(tower.blocks):
        ran.append(x.shape[0])
        x, probs = _block(blk, x, cos, sin, lengths)
        if i != block:
            continue
        index, start = [], 0
        for p, n in zip(probs, lengths):
            rel, _ = rule(p, T)
            per_unit = [float(rel[4 * u : 4 * u + 4].sum()) for u in range(n // 4)]
            n_keep = max(1, round(len(per_unit) * keep))
            top = sorted(sorted(range(len(per_unit)), key=lambda u: (-per_unit[u], u))[:n_keep])
            kept_units.append(top)
            index += [start + 4 * u + j for u in top for j in range(4)]
            start += n
        x, cos, sin = x[index], cos[index], sin[index]
        lengths = [4 * len(top) for top in kept_units]
    return tower.merger(x), kept_units, ran


@torch.no_grad()
def reference_logits(model, inputs, block: int, keep: float, steps: int
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[int]], list[int]]:
    """Per sample: prefill logits at its kept non-padding positions, and the greedy tokens of ``steps`` steps
    (full recompute per step, end-of-sequence never chosen, as ``generate(min_new_tokens=steps)``); the kept
    positions per sample; the positions each tower block ran on."""
    feats, kept_units, ran = reference_tower(model, inputs["pixel_values"], inputs["image_grid_thw"], block, keep)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    image_id = model.config.image_token_id
    lm, embed = model.model.language_model, model.get_input_embeddings()
    eos = torch.tensor(model.generation_config.eos_token_id).view(-1)
    prefill, tokens, kept_pos = [], [], []
    img, feat = 0, 0
    for b in range(ids.shape[0]):
        keep_b, rows = [], []
        p = 0
        while p < ids.shape[1]:
            if not mask[b, p]:
                p += 1
                continue
            if ids[b, p] != image_id:
                keep_b.append(p)
                p += 1
                continue
            n = int(inputs["image_grid_thw"][img].prod()) // 4  # one image's run of placeholder tokens
            keep_b += [p + u for u in kept_units[img]]
            rows += list(range(feat, feat + len(kept_units[img])))
            feat += len(kept_units[img])
            p += n
            img += 1
        kept_pos.append(keep_b)
        x = embed(ids[b, keep_b])
        x[ids[b, keep_b] == image_id] = feats[rows]
        pos = positions[:, b, keep_b]
        nxt_pos = int(positions[:, b][:, mask[b].bool()].max()) + 1
        out = []
        for step in range(steps + 1):
            logits = model.lm_head(lm(inputs_embeds=x[None], position_ids=pos[:, None]).last_hidden_state)[0]
            if step == 0:
                prefill.append(logits)
            if step == steps:
                break
            nxt = logits[-1].index_fill(0, eos, float("-inf")).argmax()
            out.append(int(nxt))
            x = torch.cat([x, embed(nxt[None])])
            pos = torch.cat([pos, torch.full((3, 1), nxt_pos + step)], 1)
        tokens.append(torch.tensor(out))
    return prefill, tokens, kept_pos, ran


def _count_positions(model) -> tuple[list[int], list]:
    ran: list[int] = []
    hooks = [blk.register_forward_pre_hook(lambda _m, a, kw: ran.append((a[0] if a else kw["hidden_states"]).shape[0]),
                                           with_kwargs=True) for blk in model.model.visual.blocks]
    return ran, hooks


@torch.no_grad()
@pytest.mark.parametrize("keep,block", [(0.25, 0), (0.1, 0), (0.25, 1)])
def test_vit_stage_equals_slow_reference(tiny_model_dir, keep, block):
    eager, processor = load_tiny(tiny_model_dir("qwen2_vl"), attn_implementation="eager")
    sdpa, _ = load_tiny(tiny_model_dir("qwen2_vl"), attn_implementation="sdpa")
    inputs = batch(processor, "qwen2_vl")  # two left-padded samples, the second with two images of other sizes
    cfg = VFlowOptViTConfig(keep=keep, t=T, block=None if block == 0 else block)  # None: ceil(2 / 4) - 1 = 0
    steps = 3
    ref_prefill, ref_tokens, kept_pos, ref_ran = reference_logits(eager, inputs, block, keep, steps)
    grid = inputs["image_grid_thw"].tolist()
    want_units = [max(1, round(h * w // 4 * keep)) for _, h, w in grid]
    for model in (eager, sdpa):
        ran, hooks = _count_positions(model)
        with mmeff.wrap(model, cfg) as handle:
            logits = model(**inputs).logits
            stats = handle.stats
            out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        for h in hooks:
            h.remove()
        # blocks 0..block ran on every patch, the later ones (and the merger) on the kept units' patches only
        n_patches = sum(h * w for _, h, w in grid)
        assert ran[:2] == ref_ran == [n_patches if i <= block else 4 * sum(want_units) for i in range(2)]
        assert stats["vflowopt_vit_block"] == block
        assert stats["vflowopt_vit_units_kept"] == sum(want_units) < stats["vflowopt_vit_units_in"]
        assert stats["visual_tokens_kept"] == pytest.approx(sum(want_units) / 2)  # mean over the 2 samples
        n = inputs["input_ids"].shape[1]
        for b, pos in enumerate(kept_pos):
            torch.testing.assert_close(logits[b, pos], ref_prefill[b], rtol=1e-5, atol=1e-5)
            assert torch.equal(out[b, n:], ref_tokens[b]), (b, out[b, n:], ref_tokens[b])


@torch.no_grad()
def test_budget_per_image_and_presets(tiny_model_dir):
    """Each image keeps max(1, round(n keep)) of its n merged tokens at the LLM input; the presets keep 25% / 10%
    and run the stage on Qwen2-VL."""
    model, processor = load_tiny(tiny_model_dir("qwen2_vl"))
    inputs = batch(processor, "qwen2_vl")
    assert get_preset("vflowopt-vit-75").config().keep == 0.25 and get_preset("vflowopt-vit-90").config().keep == 0.1
    for name, keep in (("vflowopt-vit-75", 0.25), ("vflowopt-vit-90", 0.1)):
        with mmeff.wrap(model, name) as handle:
            model(**inputs)
            state = handle.pipeline.state
            g = state.group_for(0)
            for b, sample in enumerate(state.spans):
                for sp in sample:
                    inside = g.valid[b] & (g.index[b] >= sp.start) & (g.index[b] < sp.end)
                    assert int(inside.sum()) == max(1, round(sp.length * keep)), (name, b, sp)
    tower = model.model.visual  # unwrap removed the tower patches: the model is the original again
    assert not any("forward" in vars(m) for m in (*tower.blocks, tower.merger))


def test_refuses_other_families(tiny_model_dir):
    for family in ("llava", "qwen2_5_vl", "qwen3_vl"):
        model, _ = load_tiny(tiny_model_dir(family))
        with pytest.raises(mmeff.MmeffError, match=f"supports only qwen2_vl .*not {family}"):
            mmeff.wrap(model, "vflowopt-vit-90")
    model, _ = load_tiny(tiny_model_dir("qwen2_vl"))
    with pytest.raises(mmeff.ConfigError, match="block 2 outside"):
        mmeff.wrap(model, VFlowOptViTConfig(block=2))
