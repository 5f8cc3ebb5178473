"""``lmms-eval --model mmeff``: lmms-eval's own HF wrapper for the model's family, with ``mmeff.wrap`` attached.

Registered through lmms-eval's ``lmms_eval.models`` entry-point group (``manifest`` below; declared in
``pyproject.toml`` and ``lab/pyproject.toml``)::

    lmms-eval --model mmeff --model_args pretrained=PATH,preset=vflowopt-90[,family=llava_hf] --tasks ...

Prompts, image handling and generation are lmms-eval's: the model is loaded by lmms-eval's wrapper for its
family (``llava_hf`` for LLaVA-1.5 / LLaVA-NeXT, ``qwen2_vl``, ``qwen2_5_vl``; picked from ``config.json``'s
``model_type``, or ``family=``), then wrapped with ``mmeff.wrap(model, preset)``. Every other ``model_args`` key
goes to that wrapper unchanged. Requests run one at a time, so each sample's cost is its own (no padding):
``visual_tokens_in``, ``visual_tokens_kept`` (mean over decoder layers), ``kv_cache_bytes`` (the prefill cache),
with the preset, in the sample's ``token_counts`` entry of lmms-eval's logged samples (``--log_samples``),
beside ``input_tokens`` / ``output_tokens``; their means go into the ``throughput`` block of lmms-eval's
results (``avg_mmeff_visual_tokens_kept``, ...).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lmms_eval.api.instance import GenerationResult, TokenCounts, unwrap_generation_output
from lmms_eval.api.model import lmms

MODEL_ID = "mmeff"
COST_FIELDS = ("visual_tokens_in", "visual_tokens_kept", "kv_cache_bytes")

# lmms-eval wrapper (module, class) per family name; our family names map onto lmms-eval's.
WRAPPERS: dict[str, tuple[str, str]] = {
    "llava_hf": ("lmms_eval.models.simple.llava_hf", "LlavaHf"),
    "qwen2_vl": ("lmms_eval.models.simple.qwen2_vl", "Qwen2_VL"),
    "qwen2_5_vl": ("lmms_eval.models.simple.qwen2_5_vl", "Qwen2_5_VL"),
}
# lmms-eval's llava_hf loads all three LLaVA classes
FAMILY_ALIASES = {"llava": "llava_hf", "llava_next": "llava_hf", "llava_onevision": "llava_hf"}


def manifest() -> Any:
    """The entry point's payload: lmms-eval's registry imports :class:`Mmeff` only when ``--model mmeff`` runs."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.Mmeff")


def _ensure_decord() -> None:
    """lmms-eval's HF wrappers import ``decord`` (video decoding) at module level, but lmms-eval does not depend
    on it. Without it, a stand-in lets image tasks run; a video task fails with an error naming the fix."""
    if "decord" in sys.modules or importlib.util.find_spec("decord") is not None:
        return
    stub = types.ModuleType("decord")

    def missing(*_: Any, **__: Any) -> Any:
        raise ImportError("video input needs decord: pip install decord")

    stub.VideoReader = missing  # type: ignore[attr-defined]
    stub.cpu = missing  # type: ignore[attr-defined]
    stub.__mmeff_stub__ = True  # type: ignore[attr-defined]
    sys.modules["decord"] = stub


def family_of(pretrained: str, family: str | None = None) -> str:
    """The lmms-eval wrapper name for ``pretrained``: ``family`` if given, else from its ``model_type``."""
    if family is not None:
        name = FAMILY_ALIASES.get(family, family)
        if name not in WRAPPERS:
            raise ValueError(f"mmeff: family={family!r} is not one of {', '.join([*WRAPPERS, *FAMILY_ALIASES])}")
        return name
    config = Path(pretrained).expanduser() / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
    else:  # a hub id: transformers resolves it (from the HF cache when offline)
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(pretrained).model_type
    name = FAMILY_ALIASES.get(model_type, model_type)
    if name not in WRAPPERS:
        raise ValueError(f"mmeff: {pretrained} has model_type {model_type!r}; supported: "
                         f"{', '.join([*FAMILY_ALIASES, *list(WRAPPERS)[1:]])} (or pass family=)")
    return name


def wrapper_class(family: str) -> type:
    _ensure_decord()
    module, cls = WRAPPERS[family]
    return getattr(importlib.import_module(module), cls)


@dataclass
class CostCounts(TokenCounts):
    """lmms-eval's per-request token counts plus the preset's measured cost (all logged by ``to_dict``)."""

    cost: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **self.cost}


class Mmeff(lmms):
    """Entry class of ``--model mmeff``. Constructing it returns an instance of a subclass that inherits the
    family's lmms-eval wrapper (``Mmeff`` first in its MRO), so lmms-eval's own prompt and generation code runs."""

    is_simple = True
    _families: ClassVar[dict[str, type]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Mmeff:
        if cls is Mmeff:
            family = family_of(kwargs.get("pretrained", ""), kwargs.get("family"))
            cls = Mmeff.family_class(family)
        return super().__new__(cls)

    @staticmethod
    def family_class(family: str) -> type:
        if family not in Mmeff._families:
            base = wrapper_class(family)
            Mmeff._families[family] = type(f"Mmeff{base.__name__}", (Mmeff, base),
                                           {"__module__": __name__, "mmeff_family": family})
        return Mmeff._families[family]

    def __init__(self, pretrained: str, preset: str = "none", family: str | None = None, **kwargs: Any) -> None:
        import mmeff

        super().__init__(pretrained=pretrained, **_placement(kwargs))  # the family wrapper loads model and processor
        self.preset = preset
        model = self.model
        self.mmeff_handle = mmeff.wrap(model, preset)
        self._calls: list[int] = []  # per request: the input length of each forward (prefill first)
        model.register_forward_pre_hook(self._count_forward, with_kwargs=True)
        self.mmeff_costs: list[dict[str, Any]] = []

    def _count_forward(self, _module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._calls.append(int(ids.shape[-1]) if ids is not None else 0)

    def _measure(self) -> dict[str, Any] | None:
        """The last request's cost, or None when it ran no forward (lmms-eval catches generation errors)."""
        if not self._calls:
            return None
        stats = self.mmeff_handle.stats
        cost: dict[str, Any] = {"preset": self.preset}
        cost.update({k: stats.get(k) for k in COST_FIELDS})
        return cost

    def generate_until(self, requests: list[Any]) -> list[GenerationResult]:
        results = []
        history = _metrics_history()
        logged_before = len(history())
        start = time.perf_counter()
        n_out = 0
        for request in requests:  # one at a time: the cost of each sample is its own
            self._calls = []
            (out,) = super().generate_until([request])
            text, counts = unwrap_generation_output(out)
            cost = self._measure()
            prefill = self._calls[0] if self._calls else None
            output_tokens = counts.output_tokens if counts is not None and counts.output_tokens else len(self._calls)
            n_out += output_tokens
            results.append(GenerationResult(text=text, token_counts=CostCounts(
                input_tokens=prefill, output_tokens=output_tokens, cost=cost or {"preset": self.preset})))
            if cost is not None:
                self.mmeff_costs.append(cost)
        self._log_summary(time.perf_counter() - start, n_out, wrapper_logged=len(history()) > logged_before)
        return results

    def cost_summary(self) -> dict[str, Any]:
        """Means of the per-sample costs measured so far, with the preset and the sample count."""
        summary: dict[str, Any] = {"preset": self.preset, "samples": len(self.mmeff_costs)}
        for key in COST_FIELDS:
            values = [c[key] for c in self.mmeff_costs if c.get(key) is not None]
            summary[key] = sum(values) / len(values) if values else None
        return summary

    def _log_summary(self, elapsed: float, tokens: int, wrapper_logged: bool) -> None:
        """Into lmms-eval's throughput log (results["throughput"]["avg_mmeff_*"]). Time and tokens count only
        when the family wrapper did not log its own for these requests (no double counting)."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        summary = self.cost_summary()
        extra = {f"mmeff_{k}": summary[k] for k in COST_FIELDS if summary[k] is not None}
        extra["mmeff_samples"] = summary["samples"]
        if wrapper_logged:
            elapsed, tokens = 0.0, 0
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=tokens,
                    avg_speed=tokens / elapsed if elapsed > 0 else 0.0, additional_metrics=extra)


def _placement(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``device`` defaults to CUDA where there is one, else the CPU (the wrappers assume CUDA), and a
    single-process run loads straight onto it: ``device_map`` = ``device`` unless given (llava_hf's default
    ``""`` is refused by transformers 5, qwen2_vl's is ``"cuda"``). Multi-process runs keep the wrappers' own
    placement."""
    import torch

    kwargs = dict(kwargs)
    if not kwargs.get("device"):
        kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if "device_map" not in kwargs and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        kwargs["device_map"] = kwargs["device"]
    return kwargs


def _metrics_history() -> Any:
    from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history

    return get_logged_metrics_history


__all__ = ["COST_FIELDS", "MODEL_ID", "CostCounts", "Mmeff", "family_of", "manifest"]
