"""Whole prefills replayed from CUDA graphs (``mmeff.wrap(..., cuda_graphs=True)``).

At batch 1 a 7B prefill is bound by the host: the vision tower, 32 decoder layers and mmeff's hooks launch a few
thousand kernels, and a pruning preset only adds host work (its selections) while removing GPU work. A CUDA graph
of the whole wrapped forward — vision tower, the hooks' selections, every decoder layer, the LM head — replays
all of it with one launch.

How a prefill becomes a replay. The top-level ``forward`` is shadowed (an instance attribute, removed on detach);
each prefill call gets a *signature*: the shapes, dtypes and devices of its tensor arguments, its other arguments,
the image spans the pipeline found in ``input_ids`` and the values of the small integer tensors that steer the
model's Python (image sizes, grids). Per signature:

1. first call: eager, as without graphs (it also warms the kernels: autotuning, library handles);
2. second call: the arguments are copied into static tensors, the generation's :class:`~mmeff.engine.state.State`
   (made by the pipeline's pre-hook, ``begin`` included) is copied too, the forward is captured with those and
   the graph replayed;
3. later calls: arguments and the new state's tensors are copied into the captured ones (the state's Python
   structure is equal by construction: a signature fixes every shape and span), one replay, then the caller gets
   a fresh state (the captured post-prefill state, its tensors cloned), the KV cache layers (cloned: a later
   replay overwrites the graph's memory) and the outputs (cloned).

A capture only records what the Python did once, so the forward must make no decision from tensor values: any
host synchronisation inside it (``.item()``, a boolean branch on a tensor) makes CUDA refuse the capture. That
signature then stays eager and ``handle.stats["prefill_graph"]`` says why; nothing is silently wrong. The
selections of the fixed-budget presets (FastV's ratio, VFlowOpt's budget) give their counts from the host-side
span layout (:class:`~mmeff.engine.method.Kept`), so they capture. transformers' own consistency checks
(``torch_compilable_check``: image tokens = image features) read a tensor; they ran on the eager first call of
the signature and are switched off for the capture only (``TRANSFORMERS_DISABLE_TORCH_CHECK``).

Memory: each captured signature holds its graph's private pool (about the eager prefill's transient peak, KV
cache included) until the wrapper is removed; at most ``max_graphs`` signatures are kept (least recently used
first out). With ``capture=False`` (CPU, tests) the same bookkeeping runs and the "replay" is the eager forward
over the captured tensors, whose results are copied into the captured outputs: the reference the GPU graph is
compared with, and a check that the post-prefill state's structure does not depend on values.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from transformers.cache_utils import Cache

from mmeff.engine.cache import CACHE_KWARGS, find_cache
from mmeff.engine.state import State
from mmeff.errors import MmeffError
from mmeff.families.base import Adapter

MAX_GRAPHS = 4
FIRST_CALL = "eager: first call of this shape (the warm-up a capture needs)"
_SMALL_INT = 64  # integer tensors up to this many elements are part of the signature by value


class Owner(Protocol):
    """What prefill graphs read of the pipeline that owns them."""

    model: torch.nn.Module
    adapter: Adapter
    state: State | None

    @property
    def is_suspended(self) -> bool: ...

    def reset_call(self) -> None: ...


class Mismatch(MmeffError):
    """Two objects that should have the same structure (same signature) do not."""


# -- structure walks --------------------------------------------------------------------------------------------
def fork(obj: Any, tensor: Callable[[torch.Tensor], torch.Tensor], memo: dict[int, Any] | None = None) -> Any:
    """A copy of ``obj``'s containers (dataclasses, lists, tuples, dicts, cache layers and caches) with every
    tensor replaced by ``tensor(t)``; a tensor reached twice maps to one result (aliasing is kept). Other
    objects (spans, strings, numbers) are shared."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = tensor(obj)
    elif isinstance(obj, list):
        out = [fork(x, tensor, memo) for x in obj]
    elif isinstance(obj, tuple):
        items = [fork(x, tensor, memo) for x in obj]
        out = type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    elif isinstance(obj, dict) and type(obj) in (dict, OrderedDict):
        out = type(obj)((k, fork(v, tensor, memo)) for k, v in obj.items())
    elif _is_model_output(obj):
        out = type(obj)(**{k: fork(v, tensor, memo) for k, v in obj.items()})
    elif (dataclasses.is_dataclass(obj) and not isinstance(obj, type)) or _is_cache_part(obj):
        out = copy.copy(obj)
        memo[id(obj)] = out
        for name, value in _fields(obj).items():
            object.__setattr__(out, name, fork(value, tensor, memo))  # frozen dataclasses too
        return out
    else:
        return obj
    memo[id(obj)] = out
    return out


def copy_into(dst: Any, src: Any, path: str = "") -> None:
    """Copy every tensor of ``src`` into the tensor at the same place of ``dst`` (same structure, same shapes);
    anything else must be equal. Raises :class:`Mismatch` naming the first place where they differ."""
    if isinstance(dst, torch.Tensor):
        if not isinstance(src, torch.Tensor) or src.shape != dst.shape:
            raise Mismatch(f"{path or 'value'}: {_describe(src)} where {_describe(dst)} was captured")
        if src.data_ptr() != dst.data_ptr():
            dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        if type(src) is not type(dst) or len(src) != len(dst):
            raise Mismatch(f"{path or 'value'}: {_describe(src)} where {_describe(dst)} was captured")
        for i, (d, s) in enumerate(zip(dst, src)):
            copy_into(d, s, f"{path}[{i}]")
    elif isinstance(dst, dict) or _is_model_output(dst):
        if type(src) is not type(dst) or list(src.keys()) != list(dst.keys()):
            raise Mismatch(f"{path or 'value'}: keys {list(src.keys())} where {list(dst.keys())} were captured")
        for k in dst:
            copy_into(dst[k], src[k], f"{path}.{k}")
    elif (dataclasses.is_dataclass(dst) and not isinstance(dst, type)) or _is_cache_part(dst):
        if type(src) is not type(dst):
            raise Mismatch(f"{path or 'value'}: {type(src).__name__} where {type(dst).__name__} was captured")
        a, b = _fields(dst), _fields(src)
        if a.keys() != b.keys():
            raise Mismatch(f"{path or 'value'}: fields {sorted(b)} where {sorted(a)} were captured")
        for k in a:
            copy_into(a[k], b[k], f"{path}.{k}")
    elif not _same(dst, src):
        raise Mismatch(f"{path or 'value'}: {src!r} where {dst!r} was captured")


def _fields(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "__dict__"):
        return vars(obj)
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if type(a) is type(b) else False
    except Exception:  # objects without a usable equality: same object only
        return a is b


def _describe(x: Any) -> str:
    return f"tensor{tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _is_model_output(obj: Any) -> bool:
    return hasattr(obj, "to_tuple") and isinstance(obj, OrderedDict)


def _is_cache_part(obj: Any) -> bool:
    from transformers.cache_utils import CacheLayerMixin

    return isinstance(obj, (Cache, CacheLayerMixin))


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _share(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def _transformers_checks_off() -> Iterator[None]:
    """transformers' tensor-valued sanity checks read the device (a sync a capture refuses); the eager first call
    of every signature ran them."""
    old = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"]
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = old


# -- one signature ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Entry:
    seen: int = 0
    failed: str | None = None  # why this signature stays eager
    graph: Any = None  # torch.cuda.CUDAGraph (capture=True)
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # static arguments
    pre: State | None = None  # the captured state as the pipeline's pre-hook left it (its tensors: graph inputs)
    post: State | None = None  # the same state after the captured forward (its tensors: graph outputs)
    output: Any = None  # the captured forward's output (its cache: ``cache``)
    cache: Cache | None = None
    cache_name: str | None = None
    host: set[str] = dataclasses.field(default_factory=set)  # inputs captured as CPU tensors (Adapter.host_inputs)
    # tensors the forward stored as module attributes (Qwen2-VL's ``rope_deltas``, read by later decode steps):
    # a replay refreshes their values but not the attributes, which an eager call in between may have moved
    attributes: list[tuple[torch.nn.Module, str, torch.Tensor]] = dataclasses.field(default_factory=list)


class PrefillGraphs:
    """Owns the prefill graphs of one module of a wrapped model (see the module doc): the whole model, or its
    decoder (``outer``: the whole model's graphs, which this level serves only where they run eagerly)."""

    def __init__(self, pipeline: Owner, module: torch.nn.Module, capture: bool = True, max_graphs: int = MAX_GRAPHS,
                 outer: PrefillGraphs | None = None) -> None:
        self.pipeline = pipeline
        self.capture = capture
        self.max_graphs = max_graphs
        self.outer = outer
        self.entries: OrderedDict[Any, _Entry] = OrderedDict()
        self.last = "eager"  # how the last prefill ran (handle.stats["prefill_graph"])
        self.busy = False  # capturing, or re-running the forward for a capture=False replay
        self._module: Any = module
        self._previous: Any = None
        self._signature: inspect.Signature | None = None

    def attach(self) -> None:
        module = self._module
        self._previous = vars(module).get("forward")  # another mmeff patch (static decode) stays underneath
        original = module.forward
        self._signature = inspect.signature(original)

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._call(original, args, kwargs)

        module.forward = forward  # an instance attribute shadowing the method: removed on detach

    def detach(self) -> None:
        if self._module is not None and "forward" in vars(self._module):
            if self._previous is None:
                del self._module.forward
            else:
                self._module.forward = self._previous
        self._module = None
        self.entries.clear()

    # -- routing ----------------------------------------------------------------------------------------------
    def _call(self, original: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        p = self.pipeline
        st = p.state
        if (st is None or st.phase != "prefill" or p.is_suspended or torch.is_grad_enabled()
                or (self.outer is not None and self.outer.busy)):
            return original(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}) or {})
        key, why = self._key(bound, st)
        if key is None:
            self.last = f"eager: {why}"
            return original(*args, **kwargs)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry()
            while len(self.entries) > self.max_graphs:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        entry.seen += 1
        if entry.failed is not None:
            self.last = f"eager: {entry.failed}"
            return original(**bound)
        if entry.seen == 1:
            self.last = FIRST_CALL
            return original(**bound)
        if entry.pre is None:
            try:
                self._capture(entry, original, bound, st)
            except Exception as e:  # CUDA refused the capture (a host sync inside): this shape stays eager
                entry.failed = _reason(e)
                entry.graph = entry.pre = entry.post = entry.output = entry.cache = None
                entry.inputs = {}
                p.state = st
                p.reset_call()
                self.last = f"eager: {entry.failed}"
                return original(**bound)
            self.last = "captured"
        else:
            self.last = "replayed"
        return self._replay(entry, original, bound, st)

    def _key(self, bound: dict[str, Any], st: State) -> tuple[Any, str | None]:
        parts: list[Any] = []
        for name, value in bound.items():
            if name in CACHE_KWARGS and not isinstance(value, torch.Tensor):
                if value is not None and (not isinstance(value, Cache) or value.get_seq_length() > 0):
                    return None, f"the {name} argument is not an empty transformers cache"
                parts.append((name, type(value).__name__))
                continue
            try:
                parts.append((name, _signature(value, by_value=name != "attention_mask")))
            except TypeError as e:
                return None, f"argument {name!r} holds {e} (only tensors and plain values graph)"
        if bound.get("output_attentions") or bound.get("output_hidden_states"):
            return None, "it asks for attentions or hidden states"
        if self.capture and any(t.device.type != "cuda" for t in _tensors(bound)):
            return None, "an input is not on a CUDA device"
        parts.append(("spans", repr(st.spans)))
        return tuple(parts), None

    # -- capture and replay ----------------------------------------------------------------------------------
    def _capture(self, entry: _Entry, original: Callable[..., Any], bound: dict[str, Any], st: State) -> None:
        p = self.pipeline
        memo: dict[int, Any] = {}
        cache_name = next((k for k in CACHE_KWARGS if k in bound and bound[k] is not None), None)
        inputs: dict[str, Any] = {}
        whole = self._module is p.model
        for name, value in bound.items():
            if name == cache_name:
                inputs[name] = copy.deepcopy(value)  # an empty cache of the caller's type, filled by the capture
            elif whole and name in p.adapter.host_inputs and _by_value(value):
                inputs[name] = value.cpu()  # read on the host by the forward; its value is in the signature
                entry.host.add(name)
            else:
                inputs[name] = fork(value, _clone, memo)
        captured = fork(st, _clone, memo)  # the state's inputs (the pre-hook's tensors, aliases of the arguments)
        entry.inputs, entry.cache_name = inputs, cache_name
        entry.pre = fork(captured, _share)
        p.state = captured
        p.reset_call()
        before = _tensor_attributes(p.model)
        self.busy = True
        try:
            with _transformers_checks_off(), p.adapter.capture_context():
                if self.capture:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = original(**inputs)
                    entry.graph = graph
                else:
                    out = original(**inputs)
        finally:
            self.busy = False
        entry.post, entry.output = captured, out
        entry.cache = find_cache(out)
        entry.attributes = [(mod, name, value) for (mod, name), value in _tensor_attributes(p.model).items()
                            if before.get((mod, name)) is not value]

    def _replay(self, entry: _Entry, original: Callable[..., Any], bound: dict[str, Any], st: State) -> Any:
        p = self.pipeline
        try:
            copy_into(entry.pre, st, "state")
        except Mismatch as e:  # the pre-hook made a different structure than at capture: run this call eagerly
            p.state = st
            self.last = f"eager: {e}"
            return original(**bound)
        for name, value in bound.items():
            if name != entry.cache_name and name not in entry.host:  # host inputs: equal by the signature
                copy_into(entry.inputs[name], value, name)
        if entry.graph is not None:
            entry.graph.replay()
        else:  # capture=False: the eager forward over the captured tensors, its results copied into the captured ones
            inputs = dict(entry.inputs)
            if entry.cache_name is not None:
                inputs[entry.cache_name] = copy.deepcopy(bound[entry.cache_name])
            p.state = fork(entry.pre, _share)
            p.reset_call()
            self.busy = True
            try:
                with _transformers_checks_off(), p.adapter.capture_context():
                    out = original(**inputs)
            finally:
                self.busy = False
            copy_into(entry.post, p.state, "state")
            copy_into(entry.output, out, "output")
            now = [getattr(module, name) for module, name, _ in entry.attributes]
            copy_into([value for _, _, value in entry.attributes], now, "attributes")
        p.state = fork(entry.post, _clone)
        p.reset_call()
        for module, name, value in entry.attributes:
            setattr(module, name, value.clone())
        memo: dict[int, Any] = {}
        user_cache = bound.get(entry.cache_name) if entry.cache_name else None
        if entry.cache is not None:
            layers = fork(entry.cache.layers, _clone, memo)
            if user_cache is not None:  # generate keeps its cache object: fill it in place
                user_cache.layers = layers
                memo[id(entry.cache)] = user_cache
            else:
                memo[id(entry.cache)] = fresh = copy.copy(entry.cache)
                fresh.layers = layers
        return fork(entry.output, _clone, memo)


def _signature(value: Any, by_value: bool = True) -> Any:
    """A hashable description of an argument: shapes, dtypes and devices of its tensors (small integer tensors
    by value too: image sizes and grids steer the model's Python), plain values as they are."""
    if isinstance(value, torch.Tensor):
        sig: tuple[Any, ...] = (tuple(value.shape), value.dtype, str(value.device))
        if by_value and _by_value(value):
            sig += (tuple(value.flatten().tolist()),)
        return sig
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_signature(v, by_value) for v in value))
    if isinstance(value, dict) or _is_model_output(value):
        return (type(value).__name__, *((k, _signature(v, by_value)) for k, v in value.items()))
    raise TypeError(f"a {type(value).__name__}")


def _by_value(value: Any) -> bool:
    """Whether a tensor argument is part of the signature by value (:func:`_signature`)."""
    return (isinstance(value, torch.Tensor) and not value.is_floating_point() and value.numel() <= _SMALL_INT)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict) or _is_model_output(value):
        for v in value.values():
            yield from _tensors(v)


def _tensor_attributes(model: torch.nn.Module) -> dict[tuple[torch.nn.Module, str], torch.Tensor]:
    """Plain (non-parameter, non-buffer) tensor attributes of every module."""
    return {(mod, name): value for mod in model.modules() for name, value in vars(mod).items()
            if isinstance(value, torch.Tensor)}


def _reason(e: Exception) -> str:
    """One line: what refused the capture and where (the innermost frame of mmeff or transformers)."""
    tb = e.__traceback__
    where = ""
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        for package in ("/mmeff/", "/transformers/"):
            if package in f:
                where = f" at {package[1:]}{f.rsplit(package, 1)[1]}:{tb.tb_lineno}"
        tb = tb.tb_next
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"the capture failed ({type(e).__name__}: {first}{where})"
