"""The public entry points: ``wrap`` attaches a preset's stages to a model, ``unwrap`` takes them off."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any
from weakref import WeakKeyDictionary

from torch import nn

import mmeff.methods  # noqa: F401  (registers the built-in methods)
from mmeff.config import MethodConfig
from mmeff.engine.method import lookup
from mmeff.engine.pipeline import Pipeline
from mmeff.engine.static_decode import check_device
from mmeff.errors import MmeffError
from mmeff.families import adapter_for
from mmeff.presets import resolve

_HANDLES: WeakKeyDictionary[nn.Module, Handle] = WeakKeyDictionary()


class Handle:
    """What ``wrap`` returns: the configs in force, the last measurements, and ``remove()``."""

    def __init__(self, model: nn.Module, pipeline: Pipeline) -> None:
        self.model = model
        self.pipeline = pipeline

    @property
    def family(self) -> str:
        return self.pipeline.adapter.family

    @property
    def configs(self) -> list[MethodConfig]:
        return [m.config for m in self.pipeline.methods]

    @property
    def stats(self) -> dict[str, Any]:
        """Measured at the last prefill: visual tokens in / kept (mean over layers), KV-cache bytes, decoded tokens,
        each method's own measurements; with ``wrap(..., timing=True)`` also ``prefill_ms`` / ``decode_ms``."""
        return self.pipeline.stats

    def remove(self) -> None:
        if _HANDLES.get(self.model) is self:
            self.pipeline.detach()
            del _HANDLES[self.model]

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Handle({self.family}, {[c.method for c in self.configs]})"


def wrap(
    model: nn.Module,
    preset: str | MethodConfig | Sequence[str | MethodConfig] = "none",
    *,
    cuda_graphs: bool | str = False,
    timing: bool = False,
    **overrides: Any,
) -> Handle:
    """Attach the stages of ``preset`` to ``model`` (in place) and return a :class:`Handle`.

    ``preset``: a preset name (``mmeff.available_presets()``), several joined by ``+``, a path to a preset
    ``.toml`` file, a method config, or a list of those. ``overrides`` change config fields. Keep calling
    ``model(...)`` / ``model.generate(...)`` as before; ``mmeff.unwrap(model)`` restores the original.

    ``cuda_graphs=True`` (or ``"decode"``): decode steps read a preallocated KV cache and replay one CUDA graph
    per token (:mod:`mmeff.engine.static_decode`). ``cuda_graphs="all"``: also a prefill whose shapes were seen
    before replays one CUDA graph of the whole forward (:mod:`mmeff.engine.prefill_graph`;
    ``handle.stats["prefill_graph"]`` says how the last one ran) — opt-in: measured on LLaVA-1.5 only so far
    (docs/performance.md), hence not part of ``True`` yet. The model must sit on one CUDA device, and every
    method be graphable.

    ``timing=True``: ``handle.stats`` also reports the prefill and decode wall times; each forward then waits for
    the device at its start and end, so leave it off where speed matters.
    """
    if model in _HANDLES:
        raise MmeffError("this model is already wrapped; call mmeff.unwrap(model) first")
    check_transformers()
    if cuda_graphs not in (False, True, "decode", "all"):
        raise MmeffError(f"cuda_graphs must be False, True / 'decode' or 'all', got {cuda_graphs!r}")
    adapter = adapter_for(model)
    configs = resolve(preset, adapter.family, overrides)
    methods = [lookup(c.method)[1](c, adapter) for c in configs]
    pipeline = Pipeline(model, adapter, methods, timing=timing)
    if cuda_graphs:
        check_device(model)
    pipeline.attach()
    if cuda_graphs:
        try:
            pipeline.enable_static_decode()
            if cuda_graphs == "all":
                pipeline.enable_prefill_graphs()
        except MmeffError:
            pipeline.detach()
            raise
    handle = Handle(model, pipeline)
    _HANDLES[model] = handle
    return handle


TESTED_TRANSFORMERS = ((5, 17), 5)  # the oldest tested release, and the one major version the hooks are written for
ALLOW_UNTESTED = "MMEFF_ALLOW_UNTESTED_TRANSFORMERS"


def check_transformers(version: str | None = None) -> None:
    """Refuse a transformers release outside the tested range (the pins say so too, but an environment can hold
    another one): mmeff patches attention functions, caches and model forwards whose internals change between
    majors, and a silent mismatch would give wrong numbers, not errors. ``MMEFF_ALLOW_UNTESTED_TRANSFORMERS=1``
    lets a user try anyway."""
    if version is None:
        import transformers

        version = transformers.__version__
    parts = re.match(r"(\d+)\.(\d+)", version)
    (oldest, major) = TESTED_TRANSFORMERS
    if parts is None or os.environ.get(ALLOW_UNTESTED) == "1":
        return
    got = (int(parts[1]), int(parts[2]))
    if got[0] != major or got < oldest:
        raise MmeffError(f"transformers {version} is untested: mmeff supports {oldest[0]}.{oldest[1]} up to the "
                         f"latest {major}.x (pip install 'transformers>={oldest[0]}.{oldest[1]},<{major + 1}'); "
                         f"set {ALLOW_UNTESTED}=1 to try it anyway")


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every mmeff hook from ``model``; it is the original module for module. Returns ``model``."""
    handle = _HANDLES.get(model)
    if handle is None:
        raise MmeffError("this model is not wrapped by mmeff")
    handle.remove()
    return model


def handle_of(model: nn.Module) -> Handle | None:
    return _HANDLES.get(model)
