"""VAR against an independent slow reference of its released logic (seilk/VisAttnSink: ``DimProspector``,
``HeadFork``, ``VARProcessor``), written here from the release, not from mmeff (``test_var_smollm.py`` reuses it
on a real pretrained decoder); the sink-dimension registry keyed by text-model identity.

The reference.

Greedy decoding is replayed by recomputing the whole sequence (prompt + tokens generated so far) with an eager
attention function of its own. What the released code does with a KV cache, row by row:

* sinks: at the input of each layer in ``layers``, the prompt's real tokens whose max over the sink dims of
  ``|h_d / rms(h)|`` is strictly above tau (the prospector runs while no token has been generated: decoded
  tokens are never sinks; ``decode_sinks`` flags them too, our option);
* rows: prompt rows after the last image token (``im + pa <= q``), and every generated row (each decode step's
  single row, which a recompute reproduces because attention is causal);
* per sample, only when the image holds a sink: heads/rows with sink share of image attention <= rho and image
  attention >= summ; on them every sink (visual or text) keeps p of its weight and the (1-p) taken from all of
  them goes to the image range, split like the image attention with the visual sinks zeroed.
The image tokens are the ones carrying the image token id (several images of a sample count as one range).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from tests.methods.cfg_reference import eager_scores, step_inputs

REF = "mmeff_test_var_reference"
_RUN: dict = {}


def _scores(h: torch.Tensor, dims) -> torch.Tensor:
    """[n] max_d |h_d / rms(h)| for h [n, D]."""
    h = h.float()
    rms = torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return torch.stack([(h[:, d] / rms[:, 0]).abs() for d in dims], -1).max(-1).values


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    scores, value = eager_scores(query, key, value, attention_mask, scaling)
    probs = torch.softmax(scores.float(), -1)
    layer = module.layer_idx
    if layer in _RUN["layers"]:
        probs = probs.clone()
        for b in range(probs.shape[0]):
            probs[b] = _redistribute_sample(probs[b], b, layer)
    probs = probs.to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _redistribute_sample(a: torch.Tensor, b: int, layer: int) -> torch.Tensor:
    """a [H, q, K] of sample b (full recompute: q = K = every position)."""
    run = _RUN
    vis_idx = run["visual"][b].nonzero().flatten()
    sink_idx = run["sinks"][layer][b].nonzero().flatten()
    vis_sink = sink_idx[torch.isin(sink_idx, vis_idx)]
    if vis_sink.numel() == 0:  # HeadFork: no visual sink, no head forked
        return a
    image_attn = a[:, :, vis_idx]
    portion = a[:, :, vis_sink].sum(-1) / (image_attn + 1e-6).sum(-1)
    summation = image_attn.sum(-1)
    copied = a.clone()
    copied[:, :, vis_sink] = 0.0
    others = copied[:, :, vis_idx]
    rows = run["rows"][b][None, :]
    chosen = (portion <= run["rho"]) & (summation >= run["summ"]) & rows & (others.sum(-1) > 0)
    new = a.clone()
    new[:, :, sink_idx] = a[:, :, sink_idx] * run["p"]
    budget = a[:, :, sink_idx].sum(-1) * (1 - run["p"])
    new[:, :, vis_idx] += budget[..., None] * others / others.sum(-1, keepdim=True).clamp_min(1e-30)
    run["chosen"].setdefault(layer, []).append(chosen)
    return torch.where(chosen[..., None], new, a)


AttentionInterface.register(REF, _attention)
AttentionMaskInterface.register(REF, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.language_model.layers


@torch.no_grad()
def reference_logits(model, inputs: dict, n_prompt: int, image_token_id: int, dims, layers, *, tau: float = 20.0,
                     rho: float = 0.5, summ: float = 0.2, p: float = 0.6, decode_sinks: bool = False
                     ) -> tuple[torch.Tensor, dict]:
    """Last-position logits (fp32) of a full recompute of ``inputs`` (the prompt of ``n_prompt`` tokens plus the
    tokens generated so far) under the released VAR on ``layers``; and what it used: ``sinks`` (layer -> [B, n]
    flags), ``chosen`` (layer -> [B] list of [H, n] rows redistributed)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    n = ids.shape[1]
    visual = ids == image_token_id
    pos = torch.arange(n)
    last_image = torch.where(visual, pos, -1).max(1).values
    rows = ((pos[None] > last_image[:, None]) & mask) | (pos[None] >= n_prompt)
    flaggable = mask & ((pos[None] < n_prompt) | decode_sinks)
    _RUN.clear()
    _RUN.update(layers=set(layers), visual=visual, rows=rows, rho=rho, summ=summ, p=p, sinks={}, chosen={})

    def prospect(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        layer = module.self_attn.layer_idx
        if layer in _RUN["layers"]:
            flags = torch.stack([_scores(hidden[b], dims) > tau for b in range(hidden.shape[0])])
            _RUN["sinks"][layer] = flags & flaggable
        return None

    hooks = [layer.register_forward_pre_hook(prospect, with_kwargs=True) for layer in decoder_layers(model)]
    text = model.get_decoder().config if hasattr(model, "get_decoder") else model.config
    old = text._attn_implementation
    text._attn_implementation = REF
    try:
        logits = model(**inputs, use_cache=False).logits[:, -1].float()
    finally:
        text._attn_implementation = old
        for h in hooks:
            h.remove()
    used = {"sinks": dict(_RUN["sinks"]), "chosen": dict(_RUN["chosen"])}
    _RUN.clear()
    return logits, used


def released_layers(n_layers: int, include_last: bool = True, start: int = 2) -> range:
    """The released code's layers: ``range(L)[2:]``, the last one modified too (its skip flag is shadowed)."""
    return range(start, n_layers if include_last else n_layers - 1)



# -- the tests --------------------------------------------------------------------------------------------------
import pytest  # noqa: E402

import mmeff  # noqa: E402
from mmeff.methods import var  # noqa: E402, F401  (registration)
from mmeff.methods.var import discover_sink_dims, text_model_key  # noqa: E402
from mmeff.presets import get_preset  # noqa: E402
from mmeff_lab.models.factory import load_tiny, random_image  # noqa: E402
from tests.helpers import batch, method_data  # noqa: E402

STEPS = 3
GEN = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
           return_dict_in_generate=True)
# Test settings: the tiny random decoders have no massive activations (64 wide: no score can exceed 8), so tau
# is set from the unwrapped model (a fifth of the image tokens score above it at the last layer's input), and
# rho = 1, summ = 0 select every eligible row with a visual sink (the conditions are pinned by
# test_halluc_methods.py and, at the paper's values, by test_var_smollm.py).
SETTINGS = {
    "released": dict(rho=1.0, summ=0.0),
    "skip-last": dict(rho=1.0, summ=0.0, include_last=False),  # the release's config intent
    "decode-sinks": dict(rho=1.0, summ=0.0, decode_sinks=True),  # ours
}


@torch.no_grad()
def _setting(model, processor, inputs, name: str, share: float = 0.2) -> tuple[list[int], dict]:
    """(sink dims, overrides with a tau that flags ``share`` of the image tokens at the input of the last layer
    VAR modifies)."""
    dims = discover_sink_dims(model, processor, [("describe the picture", random_image(5))], k=2)
    last = -2 if SETTINGS[name].get("include_last", True) else -3  # hidden_states[-1] is the final norm's output
    hidden = model(**inputs, output_hidden_states=True).hidden_states[last]
    image = inputs["input_ids"] == model.config.image_token_id
    score = torch.stack([_scores(h, dims) for h in hidden])[image]
    return dims, dict(SETTINGS[name], tau=float(torch.quantile(score, 1 - share)))


def generate_and_compare(model, ref_model, processor, inputs, dims, overrides: dict, atol: float) -> dict:
    """Wrapped greedy decoding vs the reference at every step; returns what both flagged/selected."""
    cfg = dict(overrides, sink_dims=tuple(dims))
    with mmeff.wrap(model, "var", **cfg) as handle:
        out = model.generate(**inputs, **GEN)
        data = method_data(handle)
        n_layers = len(handle.pipeline.adapter.layers)
        layers = handle.pipeline.methods[0].active_layers()
    n = inputs["input_ids"].shape[1]
    c = handle.configs[0]
    assert list(layers) == list(released_layers(n_layers, c.include_last, c.start_layer))
    image = ref_model.config.image_token_id
    used = None
    for step in range(STEPS):
        step_in = step_inputs(inputs, out.sequences[:, n : n + step])
        want, used_step = reference_logits(ref_model, step_in, n, image, dims, layers, tau=c.tau, rho=c.rho,
                                           summ=c.summ, p=c.p, decode_sinks=c.decode_sinks)
        torch.testing.assert_close(out.logits[step].float(), want, rtol=atol, atol=atol,
                                   msg=lambda m, s=step: f"step {s}: {m}")
        used = used_step if used is None else used
    # sinks: the same flags as the reference's prefill, in the same layers; none on decoded tokens by default
    assert set(data.sink) == set(layers) == set(used["sinks"])
    for layer in layers:
        got = data.sink[layer]
        width = got.shape[1]
        assert width == (n + STEPS - 1 if c.decode_sinks else n), (layer, width)
        assert torch.equal(got[:, :n].cpu(), used["sinks"][layer][:, :n])
    return {"data": data, "layers": layers, "out": out, "used": used}


@torch.no_grad()
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_var_equals_the_released_logic(models, setting):
    """Eager and SDPA, a left-padded batch (the second sample with two images), prefill and 2 decode steps:
    logits at every step equal the reference's; sinks flagged in the same layers (start_layer .. the last one,
    or one less with include_last=false), on prompt tokens only unless decode_sinks (ours)."""
    family, eager, sdpa, processor = models
    inputs = batch(processor, family)
    dims, ov = _setting(sdpa, processor, inputs, setting)
    for model in (eager, sdpa):
        got = generate_and_compare(model, eager, processor, inputs, dims, ov, atol=1e-5)
        data, layers, chosen = got["data"], got["layers"], got["used"]["chosen"]  # chosen: the prefill's rows
        rows = [r for c in chosen.values() for r in c]
        assert any(r.any() for r in rows) and not all(r.all() for r in rows), "some rows redistributed, not all"
        last = len(eager.model.language_model.layers) - 1
        assert (last in data.selected) == ov.get("include_last", True)
        assert any(c.any() for c in chosen[max(layers)])  # the last modified layer does change rows


@torch.no_grad()
def test_the_last_layer_changes_the_output(models):
    """What the layer-range test pins is visible: VAR on the last layer moves the prefill's logits."""
    family, _eager, sdpa, processor = models
    inputs = batch(processor, family, multi_image=False)
    runs = {}
    for name in SETTINGS:
        dims, ov = _setting(sdpa, processor, inputs, name)
        with mmeff.wrap(sdpa, "var", sink_dims=tuple(dims), **ov):
            runs[name] = torch.stack(sdpa.generate(**inputs, **GEN).logits)
    base = sdpa.generate(**inputs, **GEN)
    assert not torch.allclose(runs["released"], torch.stack(base.logits), atol=1e-4)
    assert not torch.allclose(runs["released"][0], runs["skip-last"][0], atol=1e-5)  # prefill: the last layer
    torch.testing.assert_close(runs["released"][0], runs["decode-sinks"][0])  # the prefill is the same


# -- the registry --------------------------------------------------------------------------------------------
def test_sink_dims_are_keyed_by_the_text_model_not_its_width():
    from transformers import LlamaConfig, MistralConfig

    registry = get_preset("var").config("llava_next").sink_dims_by_model
    llama2_7b = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064)  # Vicuna-7B v1.5
    llama2_13b = LlamaConfig(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                             intermediate_size=13824)
    mistral_7b = MistralConfig()  # LLaVA-NeXT-Mistral, BakLLaVA: 4096 wide, 32 layers
    llama3_8b = LlamaConfig(intermediate_size=14336, num_key_value_heads=8, vocab_size=128256)
    assert text_model_key(llama2_7b) == "llama:4096x32:ffn11008:kv32"
    assert registry[text_model_key(llama2_7b)] == [2533, 1415]  # the paper's / release's LLaMA-2-7B dims
    assert registry[text_model_key(llama2_13b)] == [2100, 4743]  # the release's LLaMA-2-13B dims
    for other in (mistral_7b, llama3_8b):
        assert other.hidden_size == 4096 and text_model_key(other) not in registry
    assert registry["llama:576x30:ffn1536:kv3"] == [507, 247]  # SmolLM2-135M (test_var_smollm.py)
    assert registry["llama:256x6:ffn704:kv4"] == [] == registry["qwen2_vl_text:256x6:ffn704:kv4"]
    c = get_preset("var").config("llava")
    assert (c.include_last, c.decode, c.decode_sinks, c.tau, c.start_layer) == (True, True, False, 20.0, 2)


def test_an_unknown_text_model_is_refused_with_the_way_out(tiny_model_dir):
    model, _ = load_tiny(tiny_model_dir("llava_next"))
    key = text_model_key(model.config.text_config)
    with pytest.raises(mmeff.ConfigError) as err:
        mmeff.wrap(model, "var")
    msg = str(err.value)
    for part in (f"({key};", "discover_sink_dims", "sink_dim_stats", "sink_dims=[...]", "sink_dims_by_model"):
        assert part in msg, part
    assert mmeff.handle_of(model) is None
    with pytest.raises(mmeff.ConfigError, match="decode_sinks=true needs decode=true"):
        mmeff.wrap(model, "var", sink_dims=(1,), tau=2.0, decode=False, decode_sinks=True)
    with pytest.raises(mmeff.ConfigError, match="outside the decoder's hidden size 64"):
        mmeff.wrap(model, "var", sink_dims=(64,), tau=2.0)
