"""Decode steps over preallocated KV buffers, replayed from one CUDA graph (``mmeff.wrap(..., cuda_graphs=True)``).

At batch 1 a 7B decoder's decode step is bound by the host: ~1,000 kernel launches and the Python around them
take far longer than reading the 13.5 GB of weights. After the prefill, every :class:`~mmeff.engine.cache.SlotLayer`
moves its slots into a buffer with spare columns (:meth:`~mmeff.engine.cache.SlotLayer.reserve`), and the decoder's
single-token step — rotary embeddings, every layer, the final norm — runs eagerly for two steps (on a side
stream: the warm-up a capture needs, so a short answer never pays for one), is captured once and then replayed:
the host launches one graph per token.

The replayed step computes what the hooked eager step computes, in the same coordinates. Layer ``l`` of group
``g`` attends to its prompt slots (the tokens its group kept, minus padding) followed by the decoded tokens so
far, i.e. to buffer columns ``[0, S_g)`` where valid and ``[S_g, S_g + t]``; the columns beyond are masked. The
new token's key/value go to column ``S_g + t`` (an index computed inside the graph from the step counter).
Shapes never change, so the per-step inputs are copied into static tensors: the token's embedding, its position
ids (as the model computed them: M-RoPE included), the step counter, and the decoded part of the 2-D padding
mask. When a buffer fills up, it grows (doubling) and the step is captured again.

Scope: methods whose decode step is plain attention over the kept slots (``Method.graphable``); single-token
steps without requested hidden states / attentions; sdpa or eager attention. Any other call runs the eager
hooked path. With ``capture=False`` (CPU, tests) the very same static step runs eagerly: the reference the
captured graph is compared with on the GPU.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from mmeff.engine import attention
from mmeff.engine.cache import SlotLayer, cache_kwarg, find_cache
from mmeff.engine.state import State
from mmeff.errors import MmeffError
from mmeff.families.base import Adapter


class Owner(Protocol):
    """What static decode reads of the pipeline that owns it."""

    methods: list[Any]
    adapter: Adapter
    state: State | None

    @property
    def is_suspended(self) -> bool: ...

_OUTPUT_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
RESERVE = 256  # spare columns of the first buffers (doubled whenever they fill up)
WARMUP = 2  # real steps run eagerly on a side stream before the first capture (library handles, autotuning)


class StaticDecoder:
    """Owns the static decode of one wrapped model: patches the decoder's ``forward`` and routes eligible
    single-token steps to a :class:`_Run` (one per generation, kept in the generation's state)."""

    def __init__(self, pipeline: Owner, capture: bool = True, reserve: int = RESERVE) -> None:
        self.pipeline = pipeline
        self.capture = capture
        self.reserve = reserve
        self._lm: Any = None

    def attach(self) -> None:
        not_graphable = [m.name for m in self.pipeline.methods if not m.graphable]
        if not_graphable:
            raise MmeffError(
                f"cuda_graphs: {not_graphable} change the decode steps themselves (hooks, extra forwards or their "
                "own cache), which a replayed graph would skip; wrap without cuda_graphs"
            )
        lm = self._lm = self.pipeline.adapter.language_model
        original = lm.forward

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            run = None if args else self._run_for(kwargs)
            return original(*args, **kwargs) if run is None else run.step(self.pipeline.state, kwargs)

        lm.forward = forward  # an instance attribute shadowing the method: removed on detach

    def detach(self) -> None:
        if self._lm is not None and "forward" in vars(self._lm):
            del self._lm.forward
        self._lm = None

    def _run_for(self, kwargs: dict[str, Any]) -> _Run | None:
        """This call's static run, or None when the call must take the eager path."""
        p = self.pipeline
        st = p.state
        if st is None or st.phase != "decode" or p.is_suspended or torch.is_grad_enabled():
            return None
        cache = find_cache(kwargs)
        if type(cache) is not DynamicCache or not cache.layers:
            return None
        if not all(isinstance(layer, SlotLayer) for layer in cache.layers):
            return None
        embeds = kwargs.get("inputs_embeds")
        tokens = embeds if embeds is not None else kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        why = (
            "it feeds no tokens" if tokens is None
            else f"it feeds {tokens.shape[1]} tokens, not 1" if tokens.shape[1] != 1
            else "it asks for hidden states or attentions"
            if kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
            else "its attention mask is not a 2-D padding mask"
            if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2)
            else None
        )
        if why is not None:
            if cache.layers[0].filled is not None:  # the eager path cannot append to the static buffers
                raise MmeffError(f"cuda_graphs: a decode call after static decoding began takes the eager path: {why}")
            return None
        run = st.static_run
        if run is None or run.cache is not cache:
            run = st.static_run = _Run(p, st, cache, self.capture, self.reserve)
        return run


class _Run:
    """The static decode of one generation: buffers, static inputs, and the captured graph. It lives in the
    generation's state and refers to neither the state nor the pipeline (no cycle: its buffers and graph pool
    are freed as soon as the state is dropped)."""

    def __init__(self, p: Owner, state: State, cache: DynamicCache, capture: bool, reserve: int) -> None:
        self.cache, self.capture = cache, capture
        self.lm = p.adapter.language_model
        self.layers = p.adapter.layers
        self.adapter = p.adapter
        self.base = p.adapter.text_config._attn_implementation.removeprefix(attention.PREFIX)
        self.cache_kw = cache_kwarg(type(self.layers[0]).forward)
        hooked = [m.name for m in p.methods if m.overrides("head_scale")
                  or any(m.attention_hooks(i, state) for i in range(len(self.layers)))]
        if hooked:  # Method.graphable promised otherwise
            raise MmeffError(f"cuda_graphs: {hooked} hook the decoder layers at decode; they are not graphable")
        pad = state.attention_mask
        # per layer: its group; per group (a few, shared by many layers): prompt slot count and validity
        self.group_of: list[int] = []
        self.slots: dict[int, int] = {}
        self.prompt_valid: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(cache.layers):
            g = state.group_for(i)
            n = layer.stored_length() - state.decoded
            if n != g.index.shape[1]:
                raise MmeffError(f"cuda_graphs: layer {i} stores {n} prompt slots, its group holds {g.index.shape[1]}")
            self.group_of.append(id(g))
            if id(g) not in self.slots:
                self.slots[id(g)] = n
                self.prompt_valid[id(g)] = g.valid if pad is None else g.valid & torch.gather(pad.bool(), 1, g.index)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.extra = 0
        self._grow(max(reserve, 2 * state.decoded), state.decoded)

    # -- buffers -------------------------------------------------------------------------------------------
    def _grow(self, extra: int, done: int) -> None:
        """(Re)allocate every buffer with ``extra`` decode columns (``done`` of them filled and copied over); a
        captured graph pointed at the old ones."""
        self.graph = self.out = None
        for layer in self.cache.layers:  # prompt slots + ``extra`` decode columns
            layer.reserve(extra - done)
        old = getattr(self, "decoded_valid", None)
        ref = next(iter(self.prompt_valid.values()))
        self.decoded_valid = torch.zeros(ref.shape[0], extra, dtype=torch.bool, device=ref.device)
        if old is not None:
            self.decoded_valid[:, : old.shape[1]] = old
        self.extra = extra
        # steps still to run eagerly before capturing: short answers (POPE's yes/no) never pay for a capture;
        # after a growth the kernels are warm, but the new buffers get one eager step too
        self.warm = WARMUP if old is None else 1
        self.step_index = torch.zeros(1, dtype=torch.long, device=ref.device)
        self.embeds: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    # -- one step --------------------------------------------------------------------------------------------
    def step(self, st: State, kwargs: dict[str, Any]) -> BaseModelOutputWithPast:
        t = st.decoded  # this token's index among the decoded ones
        if t >= self.extra:
            self._grow(max(2 * self.extra, 2 * t), t)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.lm.embed_tokens(kwargs["input_ids"])
        positions = self.adapter.decode_position_ids(kwargs.get("position_ids"), embeds.shape[0], st.n_prompt + t,
                                                     self.step_index.device)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[1] != st.n_prompt + t + 1:
            raise MmeffError(
                f"cuda_graphs: the attention mask covers {mask.shape[1]} tokens, the sequence has {st.n_prompt + t + 1}"
            )
        if self.embeds is None:
            self.embeds, self.positions = embeds.clone(), positions.clone()
        else:
            self.embeds.copy_(embeds)
            self.positions.copy_(positions)
        self.step_index.fill_(t)
        if mask is None:
            self.decoded_valid[:, : t + 1] = True
        else:
            self.decoded_valid[:, : t + 1] = mask[:, st.n_prompt :].bool()
        if self.capture and self.graph is None and self.warm == 0:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            out = self.out.clone()
        elif self.capture:
            self.warm -= 1
            out = self._on_side_stream()
        else:
            out = self._forward()
        for layer in self.cache.layers:
            layer.filled += 1
        return BaseModelOutputWithPast(last_hidden_state=out, **{_OUTPUT_CACHE_FIELD: self.cache})

    def _forward(self) -> torch.Tensor:
        """The decoder's single-token step on the static tensors (what the graph captures)."""
        masks: dict[int, torch.Tensor] = {}
        for key, valid in self.prompt_valid.items():
            cols = torch.cat([valid, self.decoded_valid], 1)[:, None, None, :]
            if self.base != "sdpa":  # eager attention adds the mask
                additive = torch.zeros(cols.shape, dtype=self.embeds.dtype, device=cols.device)
                cols = additive.masked_fill_(~cols, torch.finfo(additive.dtype).min)
            masks[key] = cols
        slot = {key: self.step_index + n for key, n in self.slots.items()}
        cos_sin = self.lm.rotary_emb(self.embeds, self.positions)
        hidden = self.embeds
        for i, layer in enumerate(self.layers):
            key = self.group_of[i]
            self.cache.layers[i].slot = slot[key]
            hidden = layer.forward(
                hidden,
                attention_mask=masks[key],
                position_embeddings=cos_sin,
                use_cache=True,
                **{self.cache_kw: self.cache},
            )
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return self.lm.norm(hidden)

    def _on_side_stream(self) -> torch.Tensor:
        """The step, eagerly, on a side stream (how CUDA graphs want their warm-up runs)."""
        device = self.embeds.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = self._forward()
        torch.cuda.current_stream(device).wait_stream(side)
        return out

    def _capture(self) -> None:
        """Record the step into a graph (nothing runs: the caller replays it for this step's result)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._forward()
        self.graph = graph


def check_device(model: torch.nn.Module) -> None:
    """Raise unless the model sits on one CUDA device (what a CUDA graph of its decoder needs)."""
    devices = sorted({str(p.device) for p in model.parameters()})
    if len(devices) != 1 or not devices[0].startswith("cuda"):
        raise MmeffError(f"cuda_graphs needs the model on one CUDA device; its parameters are on {devices}")
