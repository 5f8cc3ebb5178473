"""VAR, VHR, FIA, PAI, VCD: formulas pinned against slow references, neutral settings equal the unwrapped
model, batched left-padded runs, SDPA path equals the eager path."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mmeff
from mmeff.families import adapter_for
from mmeff.families.prompt import make_inputs
from mmeff.methods import fia, pai, var, vcd, vhr  # noqa: F401  (registration)
from mmeff.methods._halluc import text_only_inputs
from mmeff.methods.fia import dual_stream
from mmeff.methods.pai import cfg_logits
from mmeff.methods.var import discover_sink_dims, redistribute, sink_scores
from mmeff.methods.vcd import add_diffusion_noise, contrast
from mmeff.methods.vhr import head_divergence, reinforced_heads
from mmeff_lab.models.factory import load_tiny, random_image
from tests.helpers import batch, method_data

GEN = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)


def _dims(model, processor) -> tuple[int, ...]:
    return tuple(discover_sink_dims(model, processor, [("describe the picture", random_image(5))], k=2))


# -- pure formulas against loop references --------------------------------------------------------------
def test_sink_score_and_redistribution_formula():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 16, generator=g)
    rms = (h.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    ref = torch.stack([(h[..., d] / rms[..., 0]).abs() for d in (3, 11)], -1).amax(-1)
    torch.testing.assert_close(sink_scores(h, (3, 11)), ref)

    probs = torch.softmax(torch.randn(2, 3, 5, 9, generator=g) * 3, -1)
    visual = torch.zeros(2, 9, dtype=torch.bool)
    visual[:, 2:7] = True
    sink = torch.zeros(2, 9, dtype=torch.bool)
    sink[:, 0] = sink[:, 3] = True
    sink[1, 3] = False  # sample 1: no visual sink -> untouched
    rows = torch.ones(2, 5, dtype=torch.bool)
    rows[:, 0] = False
    out, sel = redistribute(probs, visual, sink, rows, rho=0.5, summ=0.2, p=0.6)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 5))
    for b in range(2):
        for hh in range(3):
            for i in range(5):
                a = probs[b, hh, i]
                img = a[visual[b]].sum()
                share = a[visual[b] & sink[b]].sum() / (a[visual[b]] + 1e-6).sum()
                want_sel = bool(rows[b, i] and (visual[b] & sink[b]).any() and share <= 0.5 and img >= 0.2)
                assert bool(sel[b, hh, i]) == want_sel
                want = a.clone()
                if want_sel:
                    budget = 0.4 * a[sink[b]].sum()
                    other = visual[b] & ~sink[b]
                    want[sink[b]] *= 0.6
                    want[other] += budget * a[other] / a[other].sum()
                torch.testing.assert_close(out[b, hh, i], want)
    assert sel[0].any() and not sel[1].any()
    same, _ = redistribute(probs, visual, sink, rows, rho=0.5, summ=0.2, p=1.0)
    torch.testing.assert_close(same, probs)


def test_vhd_outlier_rule_and_dual_stream_and_logit_rules():
    vhd = torch.tensor([[1.0, 2.0, 3.0, 10.0, 4.0, 0.5]])
    t = torch.tensor([[1.0, 1.0, 1.0, 9.0, 1.0, 1.0]])
    # head 3: VHD and T both above mean + std -> excluded; median 2.5 -> heads 2, 4 reinforced
    assert reinforced_heads(vhd, t).tolist() == [[False, False, True, False, True, False]]
    a, b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    d, n = head_divergence(a, b)
    torch.testing.assert_close(d, torch.stack([(a[0, i] - b[0, i]).norm() for i in range(4)])[None])
    torch.testing.assert_close(n, torch.stack([b[0, i].norm() for i in range(4)])[None])

    local = torch.arange(16.0)
    glob = torch.ones(16)
    glob[[3, 15]] = 50.0  # two IQR outliers
    top, bottom = dual_stream(local, glob, 0.25)
    assert bottom.nonzero().flatten().tolist() == [3, 15]
    assert top.nonzero().flatten().tolist() == [12, 13, 14]  # top 4 by local minus the global 15

    img, txt = torch.randn(2, 11), torch.randn(2, 11)
    torch.testing.assert_close(cfg_logits(img, txt, 1.1),
                               txt.log_softmax(-1) + 1.1 * (img.log_softmax(-1) - txt.log_softmax(-1)))
    got = contrast(img, txt, 1.0, 0.1)
    keep = img >= torch.log(torch.tensor(0.1)) + img.amax(-1, keepdim=True)
    torch.testing.assert_close(got[keep], (2 * img - txt)[keep])
    assert torch.isinf(got[~keep]).all()


# -- neutral settings equal the unwrapped model; SDPA == eager -------------------------------------------
NEUTRAL = [("var", dict(p=1.0, tau=0.5)), ("vhr", dict(alpha=1.0, layers=None, all_layers=True)),
           ("fia", dict(alpha=0.0, beta=0.0, gamma=1.0)), ("pai", dict(alpha=0.0, gamma=1.0)), ("vcd", dict(alpha=0.0))]


@torch.no_grad()
def test_neutral_settings_equal_unwrapped(models):
    family, _eager, sdpa, processor = models
    inputs = batch(processor, family)
    ref_logits = sdpa(**inputs).logits
    ref = sdpa.generate(**inputs, **GEN)
    dims = _dims(sdpa, processor)
    for preset, ov in NEUTRAL:
        ov = dict(ov, sink_dims=dims) if preset == "var" else ov
        with mmeff.wrap(sdpa, preset, **ov):
            out = sdpa.generate(**inputs, **GEN)
            logits = sdpa(**inputs).logits
        assert torch.equal(out, ref), (family, preset)
        if preset not in ("pai", "vcd"):
            real = inputs["attention_mask"].bool()  # padding rows are undefined in every attention path
            torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_sdpa_equals_eager_and_batch_equals_single(models):
    family, eager, sdpa, processor = models
    inputs = batch(processor, family, multi_image=False)
    single = make_inputs(processor, ["what color is the large shape on the left of these two images"],
                         [[random_image(2, (40, 64))]])
    dims = _dims(sdpa, processor)
    tau = 1.5 if family == "qwen3_vl" else 2.0  # the tiny random Qwen3 decoder's sink scores stay under 2
    cases = [("var", dict(sink_dims=dims, tau=tau, summ=0.0, rho=1.0)), ("vhr", dict(layers=(1, 2))),
             ("fia", {}), ("pai", {}), ("fastv+vhr", dict(layers=(2, 3)))]  # vcd: its noise depends on the batch
    for preset, ov in cases:
        outs = []
        for model in (eager, sdpa):
            with mmeff.wrap(model, preset, **ov) as handle:
                outs.append(model(**inputs).logits[:, -1])
                if preset == "var":  # the settings really redistribute something
                    assert any(s.any() for s in method_data(handle).selected.values())
                alone = model(**single).logits[:, -1]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outs[1][1], alone[0], rtol=1e-3, atol=1e-3, msg=lambda m, p=preset: f"{p}: {m}")


# -- method internals against slow references on the real model -----------------------------------------
@torch.no_grad()
def test_vhr_divergence_matches_two_unwrapped_runs(models):
    _family, _, sdpa, processor = models
    inputs = make_inputs(processor, ["describe the picture", "is there a dog"],
                         [[random_image(1)], [random_image(2, (40, 64))]])
    layer = 1
    # the no-image prompt: the same prompt without its image placeholder tokens (Qwen keeps vision_start/end)
    ids = inputs["input_ids"]
    visual = torch.isin(ids, torch.tensor(adapter_for(sdpa).image_token_ids))
    text = text_only_inputs(SimpleNamespace(visual=visual), inputs, 0)
    text["position_ids"] = (text["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    o_proj = adapter_for(sdpa).attention(adapter_for(sdpa).layers[layer]).o_proj
    seen = []
    h = o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, -1]))
    try:
        sdpa(**inputs)
        sdpa(**text)
    finally:
        h.remove()
    heads = sdpa.config.text_config.num_attention_heads
    vhd, t = head_divergence(*(s.view(2, heads, -1) for s in seen))
    want = torch.where(reinforced_heads(vhd, t), 2.0, 1.0)
    with mmeff.wrap(sdpa, "vhr", layers=(layer,), layers_of=0) as handle:
        sdpa(**inputs)
        got = method_data(handle).scale[layer]
        assert "vhr_extra_ms" in handle.stats
    torch.testing.assert_close(got, want)


@torch.no_grad()
def test_fia_selection_from_eager_vision_attention(models):
    family, eager, sdpa, processor = models
    if family != "llava":
        pytest.skip("CLS attention from output_attentions exists for the CLIP tower (LLaVA-1.5)")
    inputs = batch(processor, family, multi_image=False)
    att = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    with mmeff.wrap(sdpa, "fia", reading="text") as handle:  # released: no modulation (selection) at step 0
        sdpa(**inputs)
        top, bottom = method_data(handle).streams
    spans = adapter_for(sdpa).spans(inputs["input_ids"], inputs)
    for b in range(2):
        sp = spans[b][0]
        lo = att[0][b, :, 0, 1:].sum(0)
        gl = att[-2][b, :, 0, 1:].sum(0)
        t, bt = dual_stream(lo, gl, 0.25)
        assert torch.equal(top[b, sp.start:sp.end], t) and torch.equal(bottom[b, sp.start:sp.end], bt)
        assert not top[b, :sp.start].any() and not top[b, sp.end:].any()


def _full_logits(model, ids, extra, steps_mask):
    out = model(input_ids=ids, attention_mask=steps_mask, use_cache=False, **extra)
    return out.logits[:, -1]


@torch.no_grad()
def test_contrastive_streams_match_full_recompute(models):
    """PAI's no-image stream and VCD's noised stream, decoded with their own caches, give the logits of a full
    recompute of their sequences at every step; the final logits follow the formulas."""
    family, _, sdpa, processor = models
    inputs = batch(processor, family, multi_image=False)
    for preset in ("vcd", "pai"):
        with mmeff.wrap(sdpa, preset, alpha=0.0 if preset == "pai" else 1.0) as handle:
            out = sdpa.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
            side = method_data(handle).side
        ref = sdpa.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
        side_in = dict(side.inputs)
        n_prompt = inputs["input_ids"].shape[1]
        for step in range(GEN["max_new_tokens"]):
            new = out.sequences[:, n_prompt : n_prompt + step]
            ids = torch.cat([side_in["input_ids"], new], 1)
            mask = torch.cat([side_in["attention_mask"], torch.ones_like(new)], 1)
            extra = {k: v for k, v in side_in.items() if k not in ("input_ids", "attention_mask")}
            if "mm_token_type_ids" in extra:
                extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(new)], 1)
            if "image_grid_thw" not in extra:
                extra["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
            side_logits = _full_logits(sdpa, ids, extra, mask)
            main = sdpa(**{**inputs, "input_ids": torch.cat([inputs["input_ids"], new], 1),
                           "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1),
                           **({"mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], 1)}
                              if "mm_token_type_ids" in inputs else {})}).logits[:, -1]
            want = (contrast(main, side_logits, 1.0, 0.1) if preset == "vcd"
                    else cfg_logits(main, side_logits, 1.1, 0.1))
            fin = torch.isfinite(want)
            assert torch.equal(fin, torch.isfinite(out.logits[step]))
            torch.testing.assert_close(out.logits[step][fin], want[fin], rtol=2e-3, atol=2e-3)
        if preset == "vcd":
            g = torch.Generator().manual_seed(0)
            torch.testing.assert_close(side_in["pixel_values"], add_diffusion_noise(inputs["pixel_values"], 500, g))
        del ref


def test_vhr_paper_layers_scale_to_other_depths():
    from mmeff.methods.vhr import VHRConfig, effective_layers

    paper = VHRConfig(layers=(1, *range(18, 32)), layers_of=32)
    assert effective_layers(paper, 32) == paper.layers
    assert effective_layers(paper, 6) == (0, 3, 4, 5)  # 1 -> 0, 18..31 -> 3..5 (the last layer clamps)
    assert effective_layers(VHRConfig(layers=(2, 3)), 6) == (2, 3)  # layers_of = 0: absolute


def test_vhr_needs_layers_where_the_paper_gives_none(tiny_model_dir):
    """The paper gives VHR's layers for LLaVA-1.5 only: on Qwen families `vhr` is refused unless layers are
    passed, or every layer is asked for (our extension, labelled as such)."""
    model, _ = load_tiny(tiny_model_dir("qwen2_vl"), attn_implementation="sdpa")
    with pytest.raises(mmeff.ConfigError, match=r"the paper gives them for LLaVA-1\.5 only"):
        mmeff.wrap(model, "vhr")
    assert mmeff.handle_of(model) is None
    with mmeff.wrap(model, "vhr", all_layers=True) as handle:
        assert handle.pipeline.methods[0].active == set(range(len(handle.pipeline.adapter.layers)))
    preset = Path(__file__).resolve().parents[2] / "benchmarks" / "presets" / "vhr-all-layers.toml"
    with mmeff.wrap(model, str(preset)) as handle:
        assert handle.configs[0].all_layers
    with pytest.raises(mmeff.ConfigError, match="not both"):
        mmeff.wrap(model, "vhr", layers=(1,), all_layers=True)
    llava, _ = load_tiny(tiny_model_dir("llava"), attn_implementation="sdpa")
    with mmeff.wrap(llava, "vhr") as handle:  # the paper's layers, scaled to the tiny depth
        assert handle.pipeline.methods[0].active and not handle.configs[0].all_layers
