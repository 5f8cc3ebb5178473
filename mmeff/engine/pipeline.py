"""The pipeline: attaches a list of methods to an unmodified HF VLM through removable hooks, and runs them.

Nothing of the model is replaced: every change is a forward (pre-)hook on an existing module, an entry in
transformers' attention registry selected through the decoder config, an instance attribute recording the
vision encoding's inputs, or layer objects inside the ``DynamicCache`` that ``generate`` created. ``detach``
removes all of it, so the model is the original module for module (``mmeff.unwrap``). Methods install nothing
themselves: they override the hooks of :class:`~mmeff.engine.method.Method` and the pipeline calls them here, in
this order, per forward call (``model(...)`` or one ``generate`` step):

1. vision tower (``Point.ENCODER``): before each observed vision layer's attention, ``observe_vision``;
2. top-level pre-hook: phase (prefill = empty cache); at prefill the visual spans from ``input_ids``, a new
   :class:`~mmeff.engine.state.State` with each method's fresh ``Data``, ``begin``;
3. decoder pre-hook: the cache gets :class:`~mmeff.engine.cache.SlotLayer` layers when a stage removes tokens
   or owns the cache;
4. each decoder layer's pre-hook: ``select`` (prefill), then the layer's mask, rotary embeddings and position ids
   are gathered to the slots its group holds (the model builds them in original coordinates), then
   ``layer_input``;
5. inside the layer: ``attention_hooks``; before ``o_proj``, ``observe_heads`` then ``head_scale``; the last
   layer's hook scatters the kept hidden states back to the prompt length (a removed token's state stays what
   it was when removed), so outputs keep the shape the unwrapped model gives;
6. top-level forward hook: ``process_logits``; the step's measurements.

The pipeline is also each method's :class:`~mmeff.engine.method.Host`: the few services a method may ask for.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mmeff.engine import attention
from mmeff.engine.cache import CACHE_KWARGS, SlotLayer, cache_kwarg, cache_nbytes, find_cache, install_slot_layers
from mmeff.engine.method import EXCLUSIVE_POINTS, Kept, Method, Point
from mmeff.engine.prefill_graph import FIRST_CALL, PrefillGraphs
from mmeff.engine.side_stream import SideStream
from mmeff.engine.state import Group, State, gather_seq, identity_group, restrict_mask, select
from mmeff.engine.static_decode import RESERVE, StaticDecoder
from mmeff.errors import MmeffError, StageConflictError, UnsupportedModelError
from mmeff.families.base import Adapter


class _EndOfEmbedding(Exception):
    """Stops a forward once decoder layer 0's inputs are known (:meth:`Pipeline.decoder_inputs`)."""


class Pipeline:
    def __init__(self, model: nn.Module, adapter: Adapter, methods: list[Method], timing: bool = False) -> None:
        self.model = model
        self.adapter = adapter
        self.methods = methods
        self.timing = timing  # measure prefill / decode wall time (synchronises the device at each forward)
        self.state: State | None = None
        self._handles: list[RemovableHandle] = []
        self._orig_attn: str | None = None
        self._signature = inspect.signature(model.forward)
        self._memo: dict[tuple[int, int], Any] = {}
        self._encoder_inputs: dict[str, Any] = {}
        self._tower_call: tuple[tuple, dict[str, Any]] | None = None
        self._patched: list[tuple[Any, str]] = []
        self._layer_kwargs: dict[str, Any] = {}
        self._probe: tuple[int, list[Any]] | None = None
        self._heads: tuple[int, Callable[[torch.Tensor], torch.Tensor | None]] | None = None
        self._t0 = 0.0
        self._suspended = False
        self._measured: dict[str, Any] = {}
        self.static: StaticDecoder | None = None
        self.prefill_graphs: PrefillGraphs | None = None  # of the whole forward (None where the family cannot)
        self.decoder_graphs: PrefillGraphs | None = None  # of the decoder, where the whole forward runs eagerly
        self.validate()
        for m in methods:
            m.host = self

    # -- set-up ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        n_layers = len(self.adapter.layers)
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise StageConflictError(f"a method appears twice in {names}")
        for point in EXCLUSIVE_POINTS:
            users = [m.name for m in self.methods if point in m.points]
            if len(users) > 1:
                raise StageConflictError(
                    f"methods {users} all use the {point.value!r} insertion point, which only one method may own"
                )
        for m in self.methods:
            clash = sorted(m.conflicts & set(names))
            if clash:
                raise StageConflictError(f"method {m.name!r} cannot be combined with {clash}")
            if m.families is not None and self.adapter.family not in m.families:
                raise UnsupportedModelError(f"method {m.name!r} supports {m.families}, not {self.adapter.family}")
            m.validate(n_layers)

    @property
    def removes_tokens(self) -> bool:
        return any(m.overrides("select") for m in self.methods)

    @property
    def owns_cache(self) -> bool:
        return any(Point.CACHE in m.points for m in self.methods)

    def enable_static_decode(self, capture: bool = True, reserve: int = RESERVE) -> None:
        """Run single-token decode steps over static KV buffers (:mod:`mmeff.engine.static_decode`), replayed from
        a CUDA graph when ``capture`` (``capture=False``: the same static step, eagerly — the CPU reference)."""
        if self.static is None:
            static = StaticDecoder(self, capture, reserve)
            static.attach()  # refuses methods that are not graphable
            self.static = static

    def enable_prefill_graphs(self, capture: bool = True) -> None:
        """Replay whole prefills of a repeated shape from CUDA graphs (:mod:`mmeff.engine.prefill_graph`;
        ``capture=False``: the same bookkeeping with an eager "replay" — the CPU reference)."""
        if self.decoder_graphs is None:
            not_graphable = [m.name for m in self.methods if not m.graphable]
            if not_graphable:
                raise MmeffError(f"cuda_graphs: {not_graphable} run extra forwards or their own cache; not graphable")
            if self.adapter.graph_whole_forward:
                self.prefill_graphs = PrefillGraphs(self, self.model, capture)
                self.prefill_graphs.attach()
            self.decoder_graphs = PrefillGraphs(self, self.adapter.language_model, capture, outer=self.prefill_graphs)
            self.decoder_graphs.attach()

    def reset_call(self) -> None:
        """Forget what the hooks memoised for the current forward call (a prefill graph re-runs one)."""
        self._memo.clear()
        self._layer_kwargs = {}

    def _hook(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def attach(self) -> None:
        cfg = self.adapter.text_config
        base = cfg._attn_implementation or "eager"
        if base not in attention.BASES:
            raise UnsupportedModelError(
                f"mmeff needs the decoder's attention implementation to be one of {attention.BASES}, got {base!r} "
                "(load the model with attn_implementation='sdpa')"
            )
        attention.register()
        self._orig_attn = cfg._attn_implementation
        cfg._attn_implementation = attention.PREFIX + base
        model, lm = self.model, self.adapter.language_model
        self._hook(model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self._hook(model.register_forward_hook(self._top_post, with_kwargs=True))
        self._hook(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        layers = self.adapter.layers
        for i, layer in enumerate(layers):
            self._hook(layer.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))
            site = attention.Site(i, self._attn_hooks(i), self._phase, self._geometry(i))
            attention.SITES[self.adapter.attention(layer)] = site
        self._hook(layers[-1].register_forward_hook(self._last_layer_post))
        if any(m.overrides("head_scale") or m.overrides("observe_heads") for m in self.methods):
            for i, layer in enumerate(layers):
                o_proj = self.adapter.attention(layer).o_proj
                self._hook(o_proj.register_forward_pre_hook(self._o_proj_pre(i)))
        self._attach_encoder()
        self._record_encoder_inputs()
        for obj, name, replacement in self.adapter.instance_patches(self):  # family steps that follow selection
            setattr(obj, name, replacement)
            self._patched.append((obj, name))

    def _attach_encoder(self) -> None:
        """Point.ENCODER: the tower's arguments, then each observed vision layer's attention input."""
        observers: dict[int, list[Method]] = {}
        for m in self.methods:
            for layer in m.vision_layers:
                observers.setdefault(layer, []).append(m)
        if not observers:
            return
        self._hook(self.adapter.vision_tower.register_forward_pre_hook(self._tower_pre, with_kwargs=True))
        layers = self.adapter.vision_layers()
        for idx in sorted(observers):
            attn = self.adapter.vision_attention(layers[idx])
            self._hook(attn.register_forward_pre_hook(self._vision_pre(idx, observers[idx]), with_kwargs=True))

    def _tower_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._tower_call = None if self._suspended else (args, kwargs)

    def _vision_pre(self, idx: int, methods: list[Method]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._suspended:  # a side stream's tower call (e.g. VCD's noised image)
                return
            if self._tower_call is None:
                raise MmeffError("mmeff: a vision layer ran without its tower's pre-hook (unexpected call order)")
            call = self.adapter.vision_call(idx, module, args, kwargs, *self._tower_call)
            st = self.state if self.state is not None and self.state.phase == "prefill" else None
            with torch.no_grad():
                for m in methods:
                    m.observe_vision(call, st)

        return hook

    def _record_encoder_inputs(self) -> None:
        """Record the arguments of the vision encoding (pixels, image sizes, grids).

        ``generate`` (transformers >= 5.2x) encodes images before the first forward and passes only the
        features, so the span layout inputs are taken where the encoding happens. An instance attribute that
        shadows the method (removed on detach) is the only hook point a plain method offers.
        """
        base = self.adapter.base
        for name in ("get_image_features", "get_video_features"):
            original = getattr(base, name, None)
            if original is None:
                continue

            @functools.wraps(original)
            def recorder(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
                if self._suspended:
                    return __original(*args, **kwargs)
                bound = inspect.signature(__original).bind_partial(*args, **kwargs).arguments
                self._encoder_inputs.update({k: v for k, v in bound.items() if k != "kwargs"})
                return __original(*args, **kwargs)

            setattr(base, name, recorder)
            self._patched.append((base, name))

    def detach(self) -> None:
        for graphs in (self.decoder_graphs, self.prefill_graphs):  # the reverse of attach: patches are stacked
            if graphs is not None:
                graphs.detach()
        self.prefill_graphs = self.decoder_graphs = None
        if self.static is not None:
            self.static.detach()
            self.static = None
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        for obj, name in self._patched:
            delattr(obj, name)
        self._patched.clear()
        for layer in self.adapter.layers:
            attention.SITES.pop(self.adapter.attention(layer), None)
        self.adapter.text_config._attn_implementation = self._orig_attn
        self.state = None

    # -- what a method may ask for (the Host protocol) --------------------------------------------------------
    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the model inside a hook as if unwrapped (a method's extra no-image or noised-image forward):
        every mmeff hook passes through, and the current generation's state is restored afterwards."""
        saved, saved_measured, saved_enc = self.state, self._measured, self._encoder_inputs
        saved_layer_kwargs, saved_tower = self._layer_kwargs, self._tower_call
        self.state, self._suspended = None, True
        try:
            yield
        finally:
            self.state, self._measured, self._encoder_inputs, self._suspended = saved, saved_measured, saved_enc, False
            self._layer_kwargs, self._tower_call = saved_layer_kwargs, saved_tower

    @property
    def is_suspended(self) -> bool:
        """True inside :meth:`suspended` (a method's extra forward of the unwrapped model is running)."""
        return self._suspended

    def side_stream(self, inputs: dict[str, Any]) -> SideStream:
        return SideStream(self.model, self.adapter, self.suspended, inputs)

    def decoder_inputs(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        captured: dict[str, Any] = {}

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _EndOfEmbedding

        handle = self.adapter.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with self.suspended(), torch.no_grad():
                self.model(**inputs, use_cache=False)
        except _EndOfEmbedding:
            pass
        finally:
            handle.remove()
        return captured["hidden"], captured["kwargs"]

    def run_layer(self, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any],
                  heads: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
        self._heads = None if heads is None else (layer, heads)
        try:
            with self.suspended(), torch.no_grad():
                out = self.adapter.layers[layer](hidden, **kwargs)
        finally:
            self._heads = None
        return out[0] if isinstance(out, tuple) else out

    def probe_attention(self, layer: int, hidden: torch.Tensor, hooks: list[Any]) -> None:
        block = self.adapter.layers[layer]
        norm = getattr(block, "input_layernorm", None)
        if norm is None:
            raise MmeffError(f"mmeff: {type(block).__name__} has no input_layernorm to probe layer {layer} with")
        skip = (*CACHE_KWARGS, "use_cache", "hidden_states")  # the probe must not write the KV cache
        kwargs = {k: v for k, v in self._layer_kwargs.items() if k not in skip}
        attn = self.adapter.attention(block)
        self._probe = (layer, hooks)
        try:
            attn(hidden_states=norm(hidden), **{cache_kwarg(attn.forward): None}, **kwargs)
        finally:
            self._probe = None

    # -- measurements -------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """The last prefill's measurements (visual tokens in / kept, KV bytes), decoded tokens, every method's
        ``stats``, and with ``timing`` the prefill / decode wall times. Device values are recorded without a host
        synchronisation during the run and read back here."""
        return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in self._measured.items()}

    def _measure_prefill(self, st: State, output: Any) -> None:
        kept = st.kept_visual_per_layer(len(self.adapter.layers)).float()
        self._measured = {
            "visual_tokens_in": st.visual.sum(1).float().mean(),
            "visual_tokens_kept": kept.mean(),
            "visual_tokens_kept_per_layer": kept.mean(0),
            "kv_cache_bytes": cache_nbytes(find_cache(output)),
            "decode_tokens": 0,
        }
        if self.timing:
            self._measured.update(prefill_ms=self._clock() - self._t0, decode_ms=0.0)
        if self.decoder_graphs is not None:
            self._measured["prefill_graph"] = self._graph_mode()
        for m in self.methods:
            self._measured.update(m.stats(st))

    def _graph_mode(self) -> str:
        """How the last prefill ran with cuda_graphs: the whole forward, else the decoder alone, from a graph."""
        whole, decoder = self.prefill_graphs, self.decoder_graphs
        if whole is not None and (not whole.last.startswith("eager") or whole.last.startswith(FIRST_CALL)):
            return whole.last
        mode = f"decoder {decoder.last}"
        return mode if whole is None else f"{mode}; whole forward {whole.last}"

    def _clock(self) -> float:
        """Wall time in ms, after the device's queued work (timings of what the user waits for)."""
        device = next(self.adapter.language_model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() * 1e3

    # -- hooks ----------------------------------------------------------------------------------------------
    def _phase(self) -> str:
        return self.state.phase if self.state is not None else "prefill"

    def _top_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._suspended:
            return
        inputs = self._signature.bind_partial(*args, **kwargs).arguments
        inputs.update(inputs.pop("kwargs", {}) or {})
        cache = find_cache(inputs)
        self._memo.clear()
        if self.timing:
            self._t0 = self._clock()
        if cache is not None and cache.get_seq_length() > 0:
            if self.state is None:
                if self.removes_tokens:
                    raise MmeffError("mmeff: a decode step arrived without a prefill seen by this wrapper")
                return
            st = self.state
            if st.phase == "prefill":
                st.phase = "decode"
            st.step_tokens = self._query_length(inputs)
            return
        for key, value in self._encoder_inputs.items():  # features encoded before this forward (generate)
            if inputs.get(key) is None:
                inputs[key] = value
        self._encoder_inputs = {}
        if inputs.get("attention_mask") is None and inputs.get("input_ids") is not None:
            # generate drops an all-ones mask (unpadded batches): methods always see one
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        self.state = self._new_state(inputs)
        for m in self.methods:
            m.begin(self.state, inputs)

    def _query_length(self, inputs: dict) -> int:
        for key in ("input_ids", "inputs_embeds"):
            if inputs.get(key) is not None:
                return int(inputs[key].shape[1])
        return 1

    def _new_state(self, inputs: dict) -> State:
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            if any(m.points for m in self.methods):  # the baseline (`none`) uses no point and needs no spans
                raise MmeffError("mmeff needs input_ids to find the visual tokens (inputs_embeds alone is not enough)")
            emb = inputs["inputs_embeds"]
            b, n = emb.shape[:2]
            visual = torch.zeros(b, n, dtype=torch.bool, device=emb.device)
            state = State([[] for _ in range(b)], visual, visual.clone(), inputs.get("attention_mask"), n, [])
        else:
            b, n = input_ids.shape
            spans = self.adapter.spans(input_ids, inputs)
            visual = torch.zeros(b, n, dtype=torch.bool)
            layout = torch.zeros(b, n, dtype=torch.bool)
            for i, sample in enumerate(spans):
                for sp in sample:
                    visual[i, sp.start : sp.end] = True
                    layout[i, sp.start : sp.end] = sp.grid()["layout"]
            dev = input_ids.device
            state = State(spans, visual.to(dev), layout.to(dev), inputs.get("attention_mask"), n)
            state.host_prunable = (visual & ~layout).sum(1).tolist()
            state.groups.append(identity_group(b, n, dev))
            # held on the host: the adapters read them as Python layout (``image_tokens``), which inside a captured
            # prefill must not read the device
            state.span_inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v
                                 for k in self.adapter.span_inputs for v in [inputs.get(k)]}
        state.method_data = {m.name: m.Data() for m in self.methods if m.Data is not None}
        return state

    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        st = self.state
        if st is None or st.phase != "prefill" or not (self.removes_tokens or self.owns_cache or self.static):
            return None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.adapter.text_config, "use_cache", True)
        cache = find_cache(kwargs)
        if cache is None and not use_cache:
            return None
        factory = next((m.cache_layer for m in self.methods if Point.CACHE in m.points), None)
        for key in CACHE_KWARGS:
            kwargs.pop(key, None)
        kwargs[cache_kwarg(module.forward)] = install_slot_layers(cache, len(self.adapter.layers), factory)
        return args, kwargs

    def _attn_hooks(self, layer: int):
        def hooks() -> list[Any]:
            if self._probe is not None and self._probe[0] == layer:
                return self._probe[1]
            if self.state is None:
                return []
            out: list[Any] = []
            for m in self.methods:
                out.extend(m.attention_hooks(layer, self.state))
            return out

        return hooks

    def _geometry(self, layer: int):
        """The layer's visibility as positions: key j is visible to query i iff k_pos[j] <= q_pos[i] and
        k_valid[j] (what the fused statistics kernel takes instead of a mask)."""

        def geometry() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
            st = self.state
            if st is None:
                return None
            g = st.group if st.phase == "prefill" else st.group_for(layer)
            pad = st.attention_mask
            valid = g.valid if pad is None else g.valid & torch.gather(pad.bool(), 1, g.index)
            if st.phase == "prefill":
                return g.index, g.index, valid
            return st.decode_slots(g, valid)

        return geometry

    def _layer_pre(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            st = self.state
            if st is None:
                return None
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if st.phase == "prefill":
                self._layer_kwargs = kwargs  # in original coordinates, for probe_attention during select
                try:
                    hidden = self._apply_selections(layer, st, hidden)
                finally:
                    self._layer_kwargs = {}
            g = st.group_for(layer) if st.phase == "decode" else st.group
            if g is not st.groups[0]:
                self._restrict_kwargs(layer, st, g, kwargs)
            for m in self.methods:
                m.layer_input(layer, st, hidden)
            return (hidden, *rest), kwargs

        return hook

    def _apply_selections(self, layer: int, st: State, hidden: torch.Tensor) -> torch.Tensor:
        for m in self.methods:
            sel = m.select(layer, st, hidden)
            if sel is None:
                continue
            if isinstance(sel, Kept):
                keep, new_hidden, longest, uniform = sel.keep, sel.hidden, sel.longest, sel.uniform
            else:
                keep, new_hidden = sel if isinstance(sel, tuple) else (sel, None)
                longest, uniform = None, False
            new_hidden = hidden if new_hidden is None else new_hidden
            group = select(st.group, keep.to(hidden.device), layer, longest, uniform)
            st.saved_hidden.append(new_hidden)
            st.groups.append(group)
            hidden = gather_seq(new_hidden, group.order, dim=1)
        return hidden

    def _restrict_kwargs(self, layer: int, st: State, g: Group, kwargs: dict) -> None:
        n_slots = g.index.shape[1]
        cache = find_cache(kwargs)
        if st.phase == "prefill":
            if cache is not None and isinstance(cache.layers[layer], SlotLayer):
                cache.layers[layer].removed = st.n_prompt - n_slots
            for key in ("position_embeddings", "position_ids"):
                value = kwargs.get(key)
                if value is not None:
                    kwargs[key] = self._memoised(value, g, lambda v: self._gather_positions(v, g.index))
            mask = kwargs.get("attention_mask")
            kwargs["attention_mask"] = self._memoised(
                mask, g, lambda m: restrict_mask(m, g.index, g.index, g.valid, n_slots, (g.index, g.index), g.full)
            )
        else:
            q_pos, k_index, k_valid = st.decode_slots(g)  # the mask itself carries the padding
            mask = kwargs.get("attention_mask")
            kwargs["attention_mask"] = self._memoised(
                mask, g, lambda m: restrict_mask(m, None, k_index, k_valid, q_pos.shape[1], (q_pos, k_index))
            )

    def _memoised(self, value: Any, g: Group, fn: Any) -> Any:
        key = (id(value), id(g))
        if key not in self._memo:
            self._memo[key] = (value, fn(value))  # holding value keeps its id from being reused
        return self._memo[key][1]

    @staticmethod
    def _gather_positions(value: Any, index: torch.Tensor) -> Any:
        if isinstance(value, tuple):  # (cos, sin): sequence axis is -2
            return tuple(gather_seq(t, index, dim=-2) for t in value)
        return gather_seq(value, index, dim=-1)

    def _last_layer_post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        st = self.state
        if st is None or st.phase != "prefill" or not st.saved_hidden:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        for saved, group in zip(reversed(st.saved_hidden), reversed(st.groups[1:])):
            order = group.order[..., None].expand(-1, -1, saved.shape[-1])
            prior = torch.gather(saved, 1, order)
            hidden = saved.scatter(1, order, torch.where(group.valid[..., None], hidden, prior))
        st.saved_hidden.clear()
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _o_proj_pre(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if self._heads is not None:  # run_layer on a method's behalf: its own head callback only
                if self._heads[0] != layer:
                    return None
                y = self._heads[1](args[0])
                return None if y is None else (y, *args[1:])
            st = self.state
            if st is None:
                return None
            x = args[0]
            for m in self.methods:
                m.observe_heads(layer, st, x)
            scales = [s for m in self.methods if (s := m.head_scale(layer, st)) is not None]
            if not scales:
                return None
            heads = scales[0].shape[-1]
            factor = torch.stack(scales).prod(0) if len(scales) > 1 else scales[0]
            y = x.view(*x.shape[:-1], heads, -1) * factor.to(x.dtype)[:, None, :, None]
            return (y.view_as(x), *args[1:])

        return hook

    def _top_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        st = self.state
        if st is None or self._suspended:
            return None
        inputs = self._signature.bind_partial(*args, **kwargs).arguments
        for m in self.methods:
            if Point.LOGITS in m.points and getattr(output, "logits", None) is not None:
                output.logits = m.process_logits(st, output.logits, inputs)
        if st.phase == "prefill":
            self._measure_prefill(st, output)
            st.phase = "decode" if find_cache(output) is not None else "prefill"
            st.decoded = 0
            if st.phase == "prefill":  # no cache: every call is a fresh prefill
                self.state = None
        else:
            st.decoded += st.step_tokens
            self._measured["decode_tokens"] = st.decoded
            if self.timing:
                self._measured["decode_ms"] += self._clock() - self._t0
        return output
