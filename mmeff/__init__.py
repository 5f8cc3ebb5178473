"""mmeff: cheaper, less hallucination-prone multimodal LLMs, with no retraining.

    handle = mmeff.wrap(model, "fastv")   # model(...) and model.generate(...) as before
    mmeff.unwrap(model)                   # the original model again

The names below are imported on first use (PEP 562): ``import mmeff`` and the command line's ``--help`` do not
pay for torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from mmeff.errors import (
    ConfigError,
    ImageTokenMismatchError,
    MmeffError,
    StageConflictError,
    UnknownPresetError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from mmeff.api import Handle, handle_of, unwrap, wrap
    from mmeff.config import MethodConfig
    from mmeff.engine.method import Method, Point, method_names, register_method
    from mmeff.methods.fastv import FastVConfig
    from mmeff.methods.none import NoneConfig
    from mmeff.methods.vflowopt.method import VFlowOptConfig
    from mmeff.presets import available_presets

__version__ = "0.1.0"

_LAZY = {
    "Handle": "mmeff.api", "handle_of": "mmeff.api", "unwrap": "mmeff.api", "wrap": "mmeff.api",
    "MethodConfig": "mmeff.config",
    "Method": "mmeff.engine.method", "Point": "mmeff.engine.method", "method_names": "mmeff.engine.method",
    "register_method": "mmeff.engine.method",
    "FastVConfig": "mmeff.methods.fastv", "NoneConfig": "mmeff.methods.none",
    "VFlowOptConfig": "mmeff.methods.vflowopt.method",
    "available_presets": "mmeff.presets",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        if importlib.util.find_spec(f"mmeff.{name}") is not None:  # a subpackage: ``mmeff.families`` after import
            return importlib.import_module(f"mmeff.{name}")
        raise AttributeError(f"module 'mmeff' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ConfigError",
    "FastVConfig",
    "Handle",
    "ImageTokenMismatchError",
    "Method",
    "MethodConfig",
    "MmeffError",
    "NoneConfig",
    "Point",
    "StageConflictError",
    "UnknownPresetError",
    "UnsupportedModelError",
    "VFlowOptConfig",
    "available_presets",
    "handle_of",
    "method_names",
    "register_method",
    "unwrap",
    "wrap",
]
