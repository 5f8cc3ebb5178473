"""VAR: visual attention redistribution (Kang et al., "See What You Are Told: Visual Attention Sink in Large
Multimodal Models", ICLR 2025; released code seilk/VisAttnSink).

Sink tokens. At decoder layer l >= ``start_layer``, from the layer's input hidden states h_j (the residual
stream) of the prompt, in the prefill::

    s_j = max_{d in D} | h_jd / rms(h_j) |         rms(h) = sqrt(mean_d h_d^2 + 1e-6), D = the sink dimensions
    sink_j = s_j > tau                                                          (tau = 20, strict)

D belongs to one pretrained language model (LLaMA-2-7B / Vicuna-7B: {2533, 1415}; LLaMA-2-13B: {2100, 4743},
the released table). The presets key it by the text model's identity, :func:`text_model_key` (model type,
width, depth, MLP width, KV heads: ``llama:4096x32:ffn11008:kv32``), never by width alone (Mistral-7B and
Llama-3-8B are 4096 wide too). :func:`discover_sink_dims` finds D for any model (massive activations over a
calibration set), :func:`sink_dim_stats` checks that the dims single out sink tokens; an unknown model is
refused until ``sink_dims=[...]`` is passed. Since |h_d / rms(h)| <= sqrt(D_model), tau must stay below
sqrt(hidden size); a registry entry ``[]`` records a checked model without sink dims, and VAR refuses it (the
256-wide reference models: docs/hallucination.md).

Head/row selection (per sample b, head h, query row i, on the softmax attention A)::

    img_i   = sum_{j visual} A_ij
    share_i = sum_{j visual sink} A_ij / (sum_{j visual} (A_ij + 1e-6))
    selected iff share_i <= rho (0.5) and img_i >= summ (0.2) and the image has at least one visual sink

Redistribution on the selected rows (keeps each row a distribution)::

    A_ij <- p * A_ij                                          j any sink (visual or text, e.g. BOS)
    A_ij <- A_ij + (1 - p) * S_i * A_ij / sum_{k non-sink visual} A_ik      j non-sink visual
    S_i  = sum_{j sink} A_ij                                                  (p = 0.6)

Where, as released: layers ``start_layer`` (2) .. L-1, the last layer included (the release's config asks
to skip it, ``except_last_layer: 1``, but ``VARProcessor`` shadows that flag with its own ``False``, so the
released code modifies it; ``include_last=False`` is the config's intent); prefill rows after the sample's
last image token; every decode row (``decode=False``, ours, limits VAR to the prefill). Sinks are flagged in
the prefill only (the released prospector runs while no token has been generated), so a decoded token is never
a sink; ``decode_sinks=True`` (ours) flags decoded tokens too. Ours as well: left-padded batches and several
images per sample (the release takes one image, batch 1), padding is never a sink, and a row with no
non-sink visual attention is left alone (the release divides by zero there). The release never resets its
state between prompts (the first prompt's sinks are reused); we flag each prompt's own. Only the layers VAR
modifies take the eager path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmeff.config import MethodConfig
from mmeff.engine.attention import AttentionCall
from mmeff.engine.method import Method, Point, register_method
from mmeff.engine.state import State
from mmeff.errors import ConfigError
from mmeff.methods._halluc import key_flags


@dataclass(frozen=True)
class VARConfig(MethodConfig):
    method = "var"
    sink_dims: tuple[int, ...] = ()  # explicit sink dimensions (take precedence over the registry)
    # known sink dimensions by text-model identity (text_model_key), used when ``sink_dims`` is empty:
    # {"llama:4096x32:ffn11008:kv32": [2533, 1415]} for LLaMA-2-7B / Vicuna-7B; [] = checked, no sink dims
    sink_dims_by_model: dict[str, Any] = field(default_factory=dict)
    tau: float = 20.0
    rho: float = 0.5
    summ: float = 0.2
    p: float = 0.6
    start_layer: int = 2
    include_last: bool = True  # released: the last layer is modified (shadowed flag); False: the config's intent
    decode: bool = True  # released: every forward; False (ours): prefill rows only
    decode_sinks: bool = False  # released: sinks from the prefill only; True (ours): decoded tokens can be sinks


def text_model_key(text_config: Any) -> str:
    """The identity sink dimensions are keyed by: ``model_type:hidden x layers:ffn<MLP width>:kv<KV heads>``.

    Width alone is not enough (LLaMA-2-7B, Mistral-7B and Llama-3-8B are all 4096 wide and 32 deep); fine-tunes
    of one pretrained model (Vicuna, the LLaVA LLMs) share its key and its sink dims, which come from
    pretraining. Two pretrained models of the very same shape share a key as well: check with
    :func:`sink_dim_stats` when in doubt."""
    c = text_config
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return f"{c.model_type}:{c.hidden_size}x{c.num_hidden_layers}:ffn{c.intermediate_size}:kv{kv}"


def sink_scores(hidden: torch.Tensor, dims: Sequence[int], eps: float = 1e-6) -> torch.Tensor:
    """[..., L] sink score max_{d in dims} |h_d / rms(h)| of hidden states [..., L, D] (float32)."""
    h = hidden.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return normed[..., list(dims)].abs().amax(-1)


def redistribute(
    probs: torch.Tensor,
    visual: torch.Tensor,
    sink: torch.Tensor,
    rows: torch.Tensor,
    rho: float,
    summ: float,
    p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on softmax attention ``probs`` [B, H, q, K]; ``visual`` / ``sink`` [B, K] key flags, ``rows`` [B, q]
    eligible query rows. Returns (new probs, selected [B, H, q])."""
    vis = visual[:, None, None, :].to(probs.dtype)
    vsink = (visual & sink)[:, None, None, :].to(probs.dtype)
    sinks = sink[:, None, None, :]
    img = (probs * vis).sum(-1)
    share = (probs * vsink).sum(-1) / (img + 1e-6 * vis.sum(-1))
    other = probs * (visual & ~sink)[:, None, None, :].to(probs.dtype)
    other_sum = other.sum(-1)
    has_vsink = (visual & sink).any(1)[:, None, None]
    selected = (share <= rho) & (img >= summ) & rows[:, None, :] & has_vsink & (other_sum > 0)
    budget = (1.0 - p) * (probs * sinks.to(probs.dtype)).sum(-1, keepdim=True)
    new = torch.where(sinks, probs * p, probs) + budget * other / other_sum.clamp_min(1e-30)[..., None]
    return torch.where(selected[..., None], new, probs), selected


@dataclass
class _Data:
    # layer -> [B, N] sink flags over original prompt positions ([B, N + decoded] with decode_sinks)
    sink: dict[int, torch.Tensor] = field(default_factory=dict)
    selected: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, q] rows redistributed


class _Redistribute:
    def __init__(self, method: VAR, state: State) -> None:
        self.method, self.state = method, state

    def modify_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        st, c = self.state, self.method.config
        data: _Data = self.method.data(st)
        k_len = probs.shape[-1]
        visual = key_flags(st, call.layer, k_len, st.visual)
        sink = key_flags(st, call.layer, k_len, data.sink[call.layer])  # decoded keys: False unless decode_sinks
        if st.phase == "prefill":
            g = st.group_for(call.layer)
            last_vis = torch.where(st.visual, torch.arange(st.n_prompt, device=st.visual.device), -1).amax(1)
            rows = (g.index > last_vis[:, None]) & g.valid
            if st.attention_mask is not None:
                rows &= torch.gather(st.attention_mask.bool(), 1, g.index)
        else:
            rows = torch.ones(probs.shape[0], probs.shape[2], dtype=torch.bool, device=probs.device)
        out, selected = redistribute(probs, visual.to(probs.device), sink.to(probs.device), rows.to(probs.device),
                                     c.rho, c.summ, c.p)
        data.selected[call.layer] = selected
        return out


class VAR(Method):
    points = frozenset({Point.LAYER})
    Data = _Data

    config: VARConfig

    def validate(self, n_layers: int) -> None:
        c = self.config
        text = self.adapter.text_config
        hidden = text.hidden_size
        key = text_model_key(text)
        entry = c.sink_dims_by_model.get(key)
        if c.sink_dims:
            self.sink_dims = tuple(int(d) for d in c.sink_dims)
        elif entry is None:
            known = sorted(k for k, dims in c.sink_dims_by_model.items() if dims)
            raise ConfigError(
                f"var: no sink dimensions known for this text model ({key}; known: {known}). Sink dimensions "
                "belong to one pretrained language model, so they are keyed by its identity, not its width: find "
                "this model's with mmeff.methods.var.discover_sink_dims(model, processor, samples), check them "
                "with sink_dim_stats (a few tokens far above the rest, above tau), then pass them: "
                f"mmeff.wrap(model, 'var', sink_dims=[...]), or a preset file with "
                f"sink_dims_by_model = {{ \"{key}\" = [...] }}"
            )
        elif not entry:
            # An empty entry records a checked model without massive activations (the reference models):
            # VAR would flag no sink token and change nothing, which must not pass for a result.
            raise ConfigError(
                f"var: this text model ({key}) has no sink dimensions (preset sink_dims_by_model "
                f"{{'{key}': []}}: checked with sink_dim_stats, no massive activations; the mmeff reference "
                "models, docs/hallucination.md 'VAR on the reference models'), so VAR would find no sink token "
                "and change nothing; refused. For another model of this shape pass its own sink_dims=[...]"
            )
        else:
            self.sink_dims = tuple(int(d) for d in entry)
        # |h_d / rms(h)| <= sqrt(hidden) for every token, so a larger tau can never flag a sink.
        if c.tau >= math.sqrt(hidden):
            raise ConfigError(
                f"var: tau {c.tau} is unreachable on a {hidden}-wide decoder (|h_d / rms(h)| <= sqrt({hidden}) = "
                f"{math.sqrt(hidden):.1f}): no token could be a sink and VAR would change nothing"
            )
        bad = [d for d in self.sink_dims if not 0 <= d < hidden]
        if bad:
            raise ConfigError(f"var: sink_dims {bad} outside the decoder's hidden size {hidden}")
        if not 0 <= c.start_layer < n_layers:
            raise ConfigError(f"var: start_layer must be in [0, {n_layers - 1}], got {c.start_layer}")
        if not 0.0 <= c.p <= 1.0:
            raise ConfigError(f"var: p must be in [0, 1], got {c.p}")
        if c.decode_sinks and not c.decode:
            raise ConfigError("var: decode_sinks=true needs decode=true (decoded tokens are only seen in decode)")
        self.n_layers = n_layers

    def active_layers(self) -> range:
        """The decoder layers VAR flags sinks in and modifies."""
        c = self.config
        return range(c.start_layer, self.n_layers if c.include_last else self.n_layers - 1)

    def _active(self, layer: int, state: State) -> bool:
        return layer in self.active_layers() and (state.phase == "prefill" or self.config.decode)

    def layer_input(self, layer: int, state: State, hidden: torch.Tensor) -> None:
        """Sink flags of the layer's slots: the prompt's at prefill (scattered to original positions, padding
        never a sink); at decode only with ``decode_sinks`` (appended), else decoded keys stay non-sinks."""
        if not self._active(layer, state) or (state.phase != "prefill" and not self.config.decode_sinks):
            return
        flags = sink_scores(hidden, self.sink_dims) > self.config.tau
        data: _Data = self.data(state)
        if state.phase == "prefill":
            g = state.group_for(layer)
            real = g.valid
            if state.attention_mask is not None:
                real = real & torch.gather(state.attention_mask.bool().to(g.index.device), 1, g.index)
            sink = torch.zeros(state.visual.shape, dtype=torch.bool, device=flags.device)
            data.sink[layer] = sink.scatter(1, g.index.to(flags.device), flags & real.to(flags.device))
        else:
            data.sink[layer] = torch.cat([data.sink[layer], flags], 1)

    def attention_hooks(self, layer: int, state: State) -> list[Any]:
        if self._active(layer, state):
            return [_Redistribute(self, state)]
        return []


def _layer_inputs(model: torch.nn.Module, processor: Any, samples: Sequence[tuple[str, Any]], start_layer: int
                  ) -> Iterator[list[torch.Tensor]]:
    """Per (text, PIL image) sample (unwrapped forward): the inputs of layers start_layer..L-1 on the real
    tokens, each [n_real, D] float32."""
    from mmeff.families.prompt import make_inputs

    if not samples:
        raise ValueError("var: needs at least one (text, image) calibration sample")
    for text, image in samples:
        inputs = make_inputs(processor, [text], [[image]] if image is not None else [[]])
        inputs = inputs.to(next(model.parameters()).device)
        out = model(**inputs, output_hidden_states=True, use_cache=False)
        real = inputs["attention_mask"][0].bool()
        yield [h[0][real].float() for h in out.hidden_states[start_layer:-1]]


def _normed(h: torch.Tensor) -> torch.Tensor:
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()


@torch.no_grad()
def discover_sink_dims(model: torch.nn.Module, processor: Any, samples: Sequence[tuple[str, Any]], k: int = 2,
                       start_layer: int = 2) -> list[int]:
    """The ``k`` sink dimensions of a model's decoder: the dims of massive activations.

    Each sample (text, PIL image) runs once (unwrapped, ``output_hidden_states``); per layer input from
    ``start_layer`` on, every dim's largest |h_d / rms(h)| over the sample's real tokens is taken, averaged
    over layers and samples; the ``k`` dims with the largest average are returned (largest first). The ranking
    always names k dims, massive or not: check them with :func:`sink_dim_stats` before storing them.
    """
    total = None
    for layers in _layer_inputs(model, processor, samples, start_layer):
        score = torch.stack([_normed(h).amax(0) for h in layers]).mean(0)
        total = score if total is None else total + score
    return torch.topk(total, k).indices.tolist()


@torch.no_grad()
def sink_dim_stats(model: torch.nn.Module, processor: Any, samples: Sequence[tuple[str, Any]], dims: Sequence[int],
                   start_layer: int = 2) -> dict[str, float]:
    """Whether ``dims`` are massive-activation (sink) dims: their sink scores on the inputs of layers
    start_layer..L-1 over the samples' real tokens.

    Returns ``max`` (largest score of any token), ``typical`` (median score over tokens), ``first`` (score of
    the first real token, BOS in Llama prompts: the usual sink), each averaged over layers and samples;
    ``ratio`` = max / typical and ``bound`` = sqrt(hidden size), the largest score a token can have. Sink dims
    single out few tokens far above the rest (ratio >> 1, max above VAR's tau); dims that are large on every
    token (ratio ~ 1) mark no sink.
    """
    rows = []
    for layers in _layer_inputs(model, processor, samples, start_layer):
        for h in layers:
            s = _normed(h)[:, list(dims)].amax(-1)
            rows.append((float(s.max()), float(s.median()), float(s[0])))
            width = h.shape[-1]
    mx, typical, first = (sum(col) / len(rows) for col in zip(*rows))
    return {"max": mx, "typical": typical, "first": first, "ratio": mx / typical, "bound": math.sqrt(width)}


register_method(VARConfig, VAR)
