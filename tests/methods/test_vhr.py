"""VHR against an independent slow reference of the paper's layer-by-layer rule (He et al., ACL 2025; no code
released): for each configured layer in order, both prompts (with and without the image tokens) are run in full
with the head scales chosen so far applied to every row, the heads' outputs (``o_proj``'s input) of the last
prompt row are compared at that layer, and the layer's reinforced heads follow from the rule written out here
(unbiased std, the median of an even count = the mean of the two middle values). Then the prefill and greedy
decoding with the fixed scales are recomputed in full and compared with the wrapped model (eager and SDPA)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import mmeff
from mmeff.families import adapter_for
from tests.helpers import batch
from tests.methods.cfg_reference import step_inputs

ALPHA, LAYERS, STEPS = 2.0, (1, 2, 3), 3


def text_prompt(model, inputs: dict) -> dict:
    """The prompt without its image placeholder tokens, left padded again (Qwen keeps vision_start / end)."""
    image_ids = torch.tensor(adapter_for(model).image_token_ids)
    pairs = zip(inputs["input_ids"], inputs["attention_mask"])
    rows = [ids[m.bool() & ~torch.isin(ids, image_ids)] for ids, m in pairs]
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, n - len(r):], mask[b, n - len(r):] = r, 1
    out = {"input_ids": ids, "attention_mask": mask}
    if "image_grid_thw" not in inputs:  # LLaVA families: positions from the padding mask, as generate makes them
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    elif "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.zeros_like(ids)
    return out


@contextlib.contextmanager
def scaled_heads(model, scales: dict[int, torch.Tensor], seen: dict[int, torch.Tensor]):
    """Pre-hooks on every layer's ``o_proj``: record its input's last row, multiply head h by scales[layer][b, h]."""
    adapter = adapter_for(model)
    heads = adapter.text_config.num_attention_heads
    handles = []
    for i, layer in enumerate(adapter.layers):
        def hook(module, args, i=i):
            x = args[0]
            seen[i] = x[:, -1].view(x.shape[0], heads, -1).float()
            if i in scales:
                x = (x.view(*x.shape[:-1], heads, -1) * scales[i][:, None, :, None].to(x.dtype)).view_as(x)
            return (x,)
        handles.append(adapter.attention(layer).o_proj.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def rule(main: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, H] head factors from the heads' last-row outputs [B, H, d] with / without the image."""
    vhd = ((main - text) ** 2).sum(-1).sqrt()
    t = (text ** 2).sum(-1).sqrt()

    def above_mean_plus_std(x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = (((x - mean) ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()
        return x > mean + std

    s = vhd.sort(-1).values
    h = vhd.shape[-1]
    median = s[:, h // 2] if h % 2 else (s[:, h // 2 - 1] + s[:, h // 2]) / 2
    outlier = above_mean_plus_std(vhd) & above_mean_plus_std(t)
    return torch.where(~outlier & (vhd > median[:, None]), ALPHA, 1.0)


@torch.no_grad()
def reference(model, inputs: dict) -> tuple[dict[int, torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    text = text_prompt(model, inputs)
    scales: dict[int, torch.Tensor] = {}
    for layer in LAYERS:  # layer by layer: each decision sees the layers before it reinforced in both prompts
        seen_main: dict[int, torch.Tensor] = {}
        seen_text: dict[int, torch.Tensor] = {}
        with scaled_heads(model, scales, seen_main):
            model(**inputs, use_cache=False)
        with scaled_heads(model, scales, seen_text):
            model(**text, use_cache=False)
        scales[layer] = rule(seen_main[layer], seen_text[layer])
    ids, logits = inputs["input_ids"], []
    n = ids.shape[1]
    for _ in range(STEPS):  # greedy decoding, full recompute, the prefill's scales on every row
        with scaled_heads(model, scales, {}):
            last = model(**step_inputs(inputs, ids[:, n:]), use_cache=False).logits[:, -1].float()
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
    return scales, ids, logits


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vhr_equals_the_layer_by_layer_reference(models, attn):
    family, eager, sdpa, processor = models
    inputs = batch(processor, family, multi_image=False)
    scales, ids, logits = reference(eager, inputs)
    assert any(bool((s > 1).any()) for s in scales.values())
    model = eager if attn == "eager" else sdpa
    with mmeff.wrap(model, "vhr", alpha=ALPHA, layers=LAYERS, layers_of=0) as handle:
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        got = handle.pipeline.methods[0].data(handle.pipeline.state).scale
    assert sorted(got) == list(LAYERS)
    for layer in LAYERS:
        assert torch.equal(got[layer].float().cpu(), scales[layer]), (family, layer)
    assert torch.equal(out.sequences, ids), family
    for g, w in zip(out.logits, logits):
        torch.testing.assert_close(g.float(), w, rtol=1e-4, atol=1e-4)
