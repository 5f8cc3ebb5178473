"""ZipVL: the ratio rule, probe scoring, quantization bounds and packing, the mixed-precision cache under
``generate`` for every family, and exactness in the lossless setting (tau = 1, 16 bits)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import mmeff
import mmeff.methods.zipvl
from mmeff.families.prompt import make_inputs
from mmeff.kernels.attention_stats import attention_probs
from mmeff.kernels.kv_quant import quantize_kv
from mmeff.kernels.kv_quant import reference as kvq
from mmeff.kernels.probe_scores import normalized_scores, probe_scores
from mmeff.methods.zipvl.method import ZipVLCacheLayer, ZipVLConfig, choose_probes, important_set
from mmeff_lab.models.factory import FAMILIES, load_tiny, random_image
from tests.helpers import SIZES, batch

GEN = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


# -- the ratio rule ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.5, 0.8, 0.975, 1.0])
def test_important_set_is_smallest_set_reaching_tau(tau):
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        n = 7
        scores = torch.rand(1, n, generator=gen) ** 3
        cand = torch.rand(1, n, generator=gen) > 0.25
        cand[0, 0] = True
        got = important_set(scores, cand, tau)[0]
        total = scores[0][cand[0]].sum().item()
        idx = cand[0].nonzero().flatten().tolist()
        best = min(
            (len(sub) for r in range(len(idx) + 1) for sub in itertools.combinations(idx, r)
             if scores[0, list(sub)].sum().item() >= tau * total - 1e-6),
        )
        if tau >= 1.0:
            best = len(idx)  # every candidate, even zero-mass ones
        assert int(got.sum()) == best
        assert not bool((got & ~cand[0]).any())
        assert scores[0][got].sum().item() >= tau * total - 1e-6


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.975])
def test_important_set_counts_on_accumulated_mass(tau):
    """``ratio_mass="accumulated"``: p = the smallest count whose *accumulated* mass reaches tau of its total
    (brute force over subsets), and the p kept are the highest *normalized* scores."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        n = 7
        acc = torch.rand(1, n, generator=gen) ** 2
        norm = acc / torch.arange(n, 0, -1)  # accumulated / rows that see the key: a different order
        cand = torch.rand(1, n, generator=gen) > 0.2
        cand[0, 1] = True
        got = important_set(norm, cand, tau, mass=acc)[0]
        idx = cand[0].nonzero().flatten().tolist()
        total = acc[0, idx].sum().item()
        p = min(len(sub) for r in range(len(idx) + 1) for sub in itertools.combinations(idx, r)
                if acc[0, list(sub)].sum().item() >= tau * total - 1e-6)
        want = sorted(idx, key=lambda j: (-norm[0, j].item(), j))[:p]
        assert got.nonzero().flatten().tolist() == sorted(want)


def test_choose_probes_counts_and_recent_window():
    real = torch.ones(2, 40, dtype=torch.bool)
    real[1, :10] = False  # left padding
    probes, recent = choose_probes(real, 0.1, 0.5, torch.Generator().manual_seed(0))
    assert probes.sum(1).tolist() == [4, 3]
    assert recent[0, 38:].all() and recent.sum(1).tolist() == [2, 2]
    assert not bool((probes & ~real).any()) and bool((recent <= probes).all())
    again, _ = choose_probes(real, 0.1, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again, probes)  # seeded
    # ragged rows: ceil(ratio * n) probes, the last round(share * probes) real slots as the recent window
    real = torch.rand(3, 300, generator=torch.Generator().manual_seed(1)) < torch.tensor([[0.2], [0.7], [1.0]])
    probes, recent = choose_probes(real, 0.1, 0.25, torch.Generator().manual_seed(2))
    for b in range(3):
        slots = real[b].nonzero().flatten()
        n_probe = math.ceil(0.1 * len(slots))
        n_recent = max(1, round(n_probe * 0.25))
        assert int(probes[b].sum()) == n_probe and recent[b].nonzero().flatten().tolist() == slots[-n_recent:].tolist()


# -- probe scoring -----------------------------------------------------------------------------------------------
def test_probe_scores_match_full_eager_attention():
    torch.manual_seed(0)
    b, h, hkv, n, d = 2, 4, 2, 23, 8
    q, k = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d)
    ok = torch.ones(b, n, dtype=torch.bool)
    ok[1, :5] = False  # padding keys
    mask = ok[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    mask = mask | torch.eye(n, dtype=torch.bool)[None, None]  # padded rows see themselves (no empty row)
    full = attention_probs(q, k, mask, 0.3).mean(1)  # [B, N, N]: every row, materialised
    pos = torch.tensor([[3, 10, 20, 22], [7, 15, 21, 22]])
    w = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    probe_q = torch.gather(q, 2, pos[:, None, :, None].expand(b, h, 4, d))
    acc, count = probe_scores(probe_q, k, pos, w, ok, 0.3)
    want = torch.einsum("bpn,bp->bn", torch.gather(full, 1, pos[..., None].expand(b, 4, n)), w)
    torch.testing.assert_close(acc, want, rtol=1e-5, atol=1e-6)
    seen = ((torch.arange(n)[None, None, :] <= pos[:, :, None]).float() * w[..., None]).sum(1) * ok
    torch.testing.assert_close(count, seen)
    norm = normalized_scores(acc, count)
    assert torch.equal(norm == 0, count == 0)


# -- quantization ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_quantize_dequantize_error_within_bound(bits, axis):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 37, 16) * torch.linspace(0.1, 5, 16)  # channel outliers; 37 tokens: a partial group
    qt = quantize_kv(x, bits, 8, axis)
    err = (qt.dequantize() - x).abs()
    # bound per element: half a step of its group
    if axis == "token":
        step = qt.scale.float().view(2, 3, 37, 16 // 8, 1).expand(-1, -1, -1, -1, 8).reshape(2, 3, 37, 16)
    else:
        t_pad = qt.scale.shape[1] * 8
        step = qt.scale.float().view(2, 3, 16, -1, 1).expand(-1, -1, -1, -1, 8).reshape(2, 3, 16, t_pad)
        step = step[..., :37].transpose(-1, -2)
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-6).all())
    assert bool((step > 0).all())
    rng = (x.amax() - x.amin()).item()
    assert err.max().item() <= rng / ((1 << bits) - 1)  # and coarsely: never more than one step of the total range


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_layout_round_trips(bits):
    per = 8 // bits
    codes = torch.randint(0, 1 << bits, (5, 32), generator=torch.Generator().manual_seed(bits))
    # values that are exactly representable: offset 0, scale 1 per group -> the codes themselves
    x = codes.float()
    x[:, ::16] = 0.0
    x[:, 1::16] = float((1 << bits) - 1)  # pin min/max of every 16-group so the scale is exactly 1
    packed, scale, offset = kvq.quantize_rows(x, bits, 16)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32 // per)
    assert torch.equal(scale, torch.ones_like(scale)) and torch.equal(offset, torch.zeros_like(offset))
    # byte k holds columns k*per .. k*per+per-1 at increasing bit offsets
    manual = sum(x.long()[:, j::per] << (j * bits) for j in range(per)).to(torch.uint8)
    assert torch.equal(packed, manual)
    assert torch.equal(kvq.dequantize_rows(packed, scale, offset, bits, 16, torch.float32), x)


def test_cache_layer_bytes_and_blocks():
    cfg = ZipVLConfig(hi_bits=4, lo_bits=2, group_size=16, recompress_every=3)
    layer = ZipVLCacheLayer(cfg)
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    out_k, _ = layer.update(k, v)
    assert out_k is k and layer.get_seq_length() == 40
    fp_bytes = layer.nbytes()
    imp = torch.zeros(2, 40, dtype=torch.bool)
    imp[0, :10] = True
    imp[1, 30:] = True
    layer.compress(imp)
    assert layer.get_seq_length() == 40 and layer.nbytes() < fp_bytes / 4
    # the full-precision prompt is released, not kept alive by an empty view of its storage
    assert layer.keys.untyped_storage().nbytes() == 0 and layer.values.untyped_storage().nbytes() == 0
    full_k, _full_v = layer.full()
    hi_err = (full_k - k).abs()[0, :, :10].max()
    lo_err = (full_k - k).abs()[0, :, 10:].max()
    assert hi_err < lo_err  # important tokens at 4 bits, the rest at 2
    for step in range(4):  # decode: buffered in full precision, recompressed after 3 tokens
        nk = torch.randn(2, 2, 1, 16)
        buf, _ = layer.update(nk, nk)  # the buffer: the blocks are read by the decode hook
        kk, _ = layer.full()
        assert kk.shape[-2] == 41 + step and layer.get_seq_length() == 41 + step
        assert buf.shape[-2] == (step + 1 if step < 3 else 1)
        if step < 3:
            assert torch.equal(kk[..., -1:, :], nk) and torch.equal(buf[..., -1:, :], nk)
            layer.score_acc += 1.0
            layer.score_cnt += 1.0
    assert len(layer.blocks) == 2 and layer.keys.shape[-2] == 1


@pytest.mark.parametrize("quantizer", ["zipcache", "cst", "kivi"])
def test_cache_layer_counts_every_stored_byte(quantizer):
    """``nbytes`` of a compressed layer = the bytes of its codes, parameters, indices and buffer, by formula:
    KIVI's fp32 (scale, offset) per 16-group; ZipCache's per (sample, head, channel) for keys and per (sample,
    token) for values, plus the block's channel normalisers counted once although both parts hold them."""
    b, h, t, d, g = 2, 2, 40, 16, 16
    layer = ZipVLCacheLayer(ZipVLConfig(hi_bits=4, lo_bits=2, group_size=g, quantizer=quantizer))
    k, v = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    layer.update(k, v)
    imp = torch.zeros(b, t, dtype=torch.bool)
    imp[0, :10] = True
    imp[1, 25:] = True  # 10 / 15 important: parts of 15 (hi) and 30 (lo) rows, ragged rows padded
    layer.compress(imp)
    want = 0
    for bits, m in ((4, 15), (2, 30)):
        mp = m + (-m % g)  # key rows padded to the tile
        cst = m * d * bits // 8 * b * h + 2 * 4 * b * m  # codes, per-token (scale, offset) in fp32
        want += b * m * 4  # int32 token indices
        if quantizer == "kivi":
            want += mp * bits // 8 * b * h * d + 2 * 4 * b * h * d * (mp // g)
            want += m * d * bits // 8 * b * h + 2 * 4 * b * h * m * (d // g)
        elif quantizer == "zipcache":
            want += mp * bits // 8 * b * h * d + 2 * 4 * b * h * d + cst
        else:
            want += 2 * cst
    want += {"kivi": 0, "zipcache": 1, "cst": 2}[quantizer] * 4 * b * h * d  # normalisers, once per block
    assert layer.nbytes() == want
    full_k, full_v = layer.full()
    for got, x in ((full_k, k), (full_v, v)):  # hi tokens more exact than lo tokens
        err = (got - x).abs()
        assert err[0, :, :10].mean() < err[0, :, 10:].mean()


def test_decode_attention_over_parts_and_buffer_is_exact():
    """Split-K decode: the (out, lse) partials of a block's parts (tokens in any order, padding entries in the
    dummy column) and the full-precision buffer merge into softmax attention over every key (GQA, hidden
    columns); the buffer's probabilities come out too. A quantized part = its dequantized keys/values."""
    from mmeff.kernels.quant_attention import Segment, decode_attention
    from mmeff.kernels.quant_attention.reference import part_attention, part_bias, segment_attention

    torch.manual_seed(0)
    b, hq, hkv, t, n, d = 2, 6, 3, 50, 40, 16  # a block of 40 tokens, then a buffer of 10
    q, k, v = torch.randn(b, hq, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    bias = torch.randn(b, t)
    bias[0, 7] = float("-inf")
    bias[1, :12] = float("-inf")  # left padding
    kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    p = torch.softmax(torch.einsum("bhd,bhtd->bht", q, kk) * 0.25 + bias[:, None], -1)
    want = torch.einsum("bht,bhtd->bhd", p, vv)
    important = torch.rand(b, n) < 0.3
    parts = []
    for members in (important, ~important):
        m = int(members.sum(1).max()) + 1  # one padding entry at least
        index = torch.full((b, m), n, dtype=torch.int32)
        for i in range(b):
            cols = members[i].nonzero()[:, 0]
            index[i, : len(cols)] = cols.int()
        at = torch.where(index < n, index, 0)
        parts.append(Segment(quantize_kv(k[:, :, :n], 16, 16, "channel", at),
                             quantize_kv(v[:, :, :n], 16, 16, "token", at), index, n, bias[:, :n]))
    out, probs = decode_attention(q, parts, k[:, :, n:], v[:, :, n:], bias[:, n:], 0.25)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, p[..., n:], rtol=1e-5, atol=1e-6)

    index = torch.tensor([[3, 9, 20, t], [0, 1, 2, 5]], dtype=torch.int32)  # the last of sample 0: padding
    kq = quantize_kv(k, 8, 16, "channel", torch.where(index < t, index, 0))
    vq = quantize_kv(v, 8, 16, "token", torch.where(index < t, index, 0))
    out, lse = part_attention(q, Segment(kq, vq, index, t, bias), 0.25)
    hidden = part_bias(index, t, bias)
    assert torch.isinf(hidden[0, 3]) and torch.equal(hidden[1], bias[1, [0, 1, 2, 5]])
    want_out, want_lse = segment_attention(q, kq.dequantize(), vq.dequantize(), hidden, 0.25)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


# -- end to end --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tiny_model_dir):
    model, processor = load_tiny(tiny_model_dir(request.param), attn_implementation="sdpa")
    return request.param, model, processor


@torch.no_grad()
def test_lossless_setting_equals_unwrapped_and_quantized_generate_runs(family_model):
    family, model, processor = family_model
    inputs = batch(processor, family, multi_image=family.startswith("llava"))  # Qwen's two-image batch is slow
    ref = model.generate(**inputs, **GEN)
    with mmeff.wrap(model, "zipvl", tau=1.0, hi_bits=16, lo_bits=16, recompress_every=2) as handle:
        out = model.generate(**inputs, **GEN)
        assert handle.stats["important_ratio"] == 1.0
    assert torch.equal(out.sequences, ref.sequences), family
    for got, want in zip(out.logits, ref.logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    fp_bytes = sum(t.numel() * t.element_size() for layer in model(**inputs).past_key_values.layers
                   for t in (layer.keys, layer.values))
    with mmeff.wrap(model, "zipvl", tau=0.9, recompress_every=2, group_size=16) as handle:
        out = model.generate(**inputs, **GEN)
        stats = handle.stats
        kv = handle.stats["kv_cache_bytes"]
    assert out.sequences.shape == ref.sequences.shape
    assert all(torch.isfinite(x).all() for x in out.logits)
    assert 0 < stats["important_ratio"] < 1
    assert 0 < kv < 0.4 * fp_bytes  # 4/2-bit codes plus scales, offsets and token indices


def independent_keep(probs: torch.Tensor, real: torch.Tensor, tau: float, mass: str) -> torch.Tensor:
    """ZipVL's kept set from a layer's eager attention probabilities [B, H, L, L] with every real row a probe
    (``probe_ratio=1``, ``recent_share=0``: the last real token is the recent window), written from the paper's
    formulas without the implementation: normalized score = attention received (mean over heads, summed over
    real rows) / number of real rows at or after the key; ``p`` = smallest count whose sorted mass (normalized
    or accumulated) reaches tau of the total; keep the ``p`` highest normalized scores and the last real token."""
    b, _, n, _ = probs.shape
    keep = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        rows = real[i].nonzero().flatten().tolist()
        acc = {j: sum(probs[i, :, r, j].double().mean().item() for r in rows) for j in rows}
        norm = {j: acc[j] / sum(1 for r in rows if r >= j) for j in rows}
        by_norm = sorted(rows, key=lambda j: (-norm[j], j))
        a = norm if mass == "normalized" else acc
        values = sorted((a[j] for j in rows), reverse=True)
        total, run, p = sum(values), 0.0, 0
        while p < len(values) and run < tau * total * (1 - 1e-9):
            run += values[p]
            p += 1
        for j in [*by_norm[:p], rows[-1]]:
            keep[i, j] = True
    return keep


@torch.no_grad()
@pytest.mark.parametrize(("single", "mass", "queries"), [
    (False, "normalized", "important"), (True, "normalized", "important"), (False, "accumulated", "all"),
])
def test_sparse_prefill_equals_reference_with_independent_importance(tiny_model_dir, single, mass, queries):
    """With 16-bit storage, ZipVL's prefill logits = a reference in which each layer's kept set comes from that
    layer's own eager attention probabilities (``independent_keep``, not the implementation's probe kernel or
    ratio rule), then, in the same layer: ``sparse_queries="important"`` — kept rows attend to the kept keys
    only, the other rows' attention output is zero; ``"all"`` — every row attends to the kept keys only (a row
    that sees none: zero). The per-layer kept ratio of ``handle.stats`` is the reference's too. ``single``: one
    unpadded sample (the index_select / index_copy path)."""
    family, tau = "llava", 0.8
    model, processor = load_tiny(tiny_model_dir(family), attn_implementation="eager")
    inputs = batch(processor, family)
    if single:  # the longer, unpadded sample: two images
        inputs = make_inputs(processor, ["what color is the large shape on the left of these two images"],
                             [[random_image(2, SIZES[1]), random_image(3, SIZES[2])]])
        assert inputs["attention_mask"].all()
    real = inputs["attention_mask"].bool()
    kw = dict(tau=tau, probe_ratio=1.0, recent_share=0.0, hi_bits=16, lo_bits=16, ratio_mass=mass,
              sparse_queries=queries)
    with mmeff.wrap(model, "zipvl", **kw) as handle:
        got = model(**inputs).logits
        ratios = handle.stats["important_ratio_per_layer"]
    from mmeff.families import adapter_for

    kept = []

    def post(module, args, kwargs, output):
        probs = output[1]  # eager: the softmax probabilities of the dense layer on this run's hidden states
        keep = independent_keep(probs, real, tau, mass)
        kept.append(keep)
        n = keep.shape[1]
        m = kwargs.get("attention_mask")
        if m is None:
            m = torch.zeros(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        hidden = torch.finfo(m.dtype).min
        m = m.masked_fill(~keep[:, None, None, :], hidden)
        rows = keep if queries == "important" else (m > hidden / 2).any(-1)[:, 0]  # rows with an output
        eye = torch.eye(n, dtype=torch.bool)[None, None] & ~rows[:, None, :, None]  # keeps SDPA finite
        out = module.forward(*args, **{**kwargs, "attention_mask": m.masked_fill(eye, 0.0)})
        return (out[0] * rows[..., None].to(out[0].dtype), *out[1:])

    hooks = [adapter_for(model).attention(layer).register_forward_hook(post, with_kwargs=True)
             for layer in adapter_for(model).layers]
    try:
        want = model(**inputs, use_cache=False).logits  # no cache: the hook runs each layer twice
    finally:
        for h in hooks:
            h.remove()
    shares = torch.stack([(k & real).sum(1).float().div(real.sum(1)).mean() for k in kept])
    assert shares.min() > 0 and shares.max() < 1 and shares.min() < 0.95  # really sparse: the test can fail
    torch.testing.assert_close(torch.tensor(ratios, dtype=torch.float64), shares.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_composes_after_fastv(tiny_model_dir):
    family = "llava"  # composition is family-independent machinery
    model, processor = load_tiny(tiny_model_dir(family), attn_implementation="sdpa")
    inputs = batch(processor, family)
    ref = model.generate(**inputs, **GEN)
    with mmeff.wrap(model, "fastv", k=1, ratio=0.5) as handle:
        fastv = model.generate(**inputs, **GEN)
    with mmeff.wrap(model, "fastv+zipvl", tau=1.0, hi_bits=16, lo_bits=16, k=1, ratio=0.5) as handle:
        both = model.generate(**inputs, **GEN)
        assert [m.name for m in handle.pipeline.methods] == ["fastv", "zipvl"]
        per_layer = handle.stats["visual_tokens_kept_per_layer"]
        assert per_layer[1] < per_layer[0]
    assert torch.equal(both.sequences, fastv.sequences)  # lossless zipvl on top of fastv = fastv
    for got, want in zip(both.logits, fastv.logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with mmeff.wrap(model, "fastv+zipvl", k=1, ratio=0.5, recompress_every=2, group_size=16) as handle:
        out = model.generate(**inputs, **GEN)
        assert handle.stats["important_ratio"] < 1
    assert out.sequences.shape == ref.sequences.shape


def assert_fused_decode_matches_reference(model, inputs, quantizer: str = "zipcache") -> None:
    """Greedy ``generate`` through the decode hook (fused_decode) = through the dequantize-then-SDPA reference,
    across recompressions (every 2 tokens)."""
    gen = {**GEN, "max_new_tokens": 6, "min_new_tokens": 6}
    runs = {}
    for fused in (True, False):
        with mmeff.wrap(model, "zipvl", tau=0.9, recompress_every=2, group_size=16, fused_decode=fused,
                        quantizer=quantizer):
            runs[fused] = model.generate(**inputs, **gen)
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for got, want in zip(runs[True].logits, runs[False].logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # boolean vs additive float masks
def test_decode_from_quantized_cache_equals_materialised_reference(tiny_model_dir, attn):
    """The decode hook's segment-wise attention over the stored parts (plus the buffer, across
    recompressions) = dequantizing the whole layer and running SDPA, on a left-padded batch; and ZipVL refuses
    to run beside a method whose attention edits it would bypass."""
    model, processor = load_tiny(tiny_model_dir("llava"), attn_implementation=attn)
    assert_fused_decode_matches_reference(model, batch(processor, "llava"))
    with pytest.raises(mmeff.errors.StageConflictError, match="var"):
        mmeff.wrap(model, "zipvl+var")


def test_presets_resolve_per_family_and_bad_config_is_refused(tiny_model_dir):
    from mmeff.presets import resolve

    for family in FAMILIES:
        (cfg,) = resolve("zipvl", family)
        (fast,) = resolve("zipvl-fast", family)
        assert (cfg.hi_bits, cfg.lo_bits) == (4, 2) and fast.tau < cfg.tau
    assert resolve("zipvl", "llava")[0].tau == 0.975
    model, _ = load_tiny(tiny_model_dir("llava"), attn_implementation="sdpa")
    assert (cfg.quantizer, cfg.ratio_mass, cfg.sparse_queries) == ("zipcache", "normalized", "important")
    for bad in ({"tau": 0.0}, {"hi_bits": 3}, {"lo_bits": 8, "hi_bits": 4}, {"group_size": 12}):
        with pytest.raises(mmeff.errors.ConfigError):
            mmeff.wrap(model, "zipvl", **bad)
    for name in ("quantizer", "ratio_mass", "sparse_queries"):
        with pytest.raises(mmeff.errors.ConfigError, match=name):
            mmeff.wrap(model, "zipvl", **{name: "nonsense"})


@torch.no_grad()
def test_cache_is_released_with_the_output(tiny_model_dir):
    """The wrapper must not keep the last prompt's (possibly many-GiB) cache alive once the caller drops it."""
    import weakref

    model, processor = load_tiny(tiny_model_dir("llava"), attn_implementation="sdpa")
    inputs = batch(processor, "llava")
    with mmeff.wrap(model, "zipvl", tau=0.5):
        out = model(**inputs, use_cache=True)
        layers = [weakref.ref(layer) for layer in out.past_key_values.layers]
        assert all(r() is not None for r in layers)
        del out
        assert all(r() is None for r in layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
@pytest.mark.parametrize("quantizer", ["zipcache", "cst", "kivi"])
def test_generate_with_fused_decode_equals_materialised_reference(tiny_model_dir, quantizer):
    """End to end on CUDA: ``generate`` decoding through the Triton kernel (the torch reference for CST keys)
    = the dequantize-then-SDPA path (left-padded batch, recompression every 2 tokens)."""
    from mmeff_lab.models.factory import load_tiny
    from tests.helpers import batch

    model, processor = load_tiny(tiny_model_dir("llava"), attn_implementation="sdpa")
    model.to("cuda")
    inputs = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch(processor, "llava").items()}
    assert_fused_decode_matches_reference(model, inputs, quantizer)
