"""mmeff: cheaper, less hallucination-prone multimodal LLMs, with no retraining.

    handle = mmeff.wrap(model, "fastv")   # model(...) and model.generate(...) as before
    mmeff.unwrap(model)                   # the original model again
"""

from mmeff.api import Handle, handle_of, unwrap, wrap
from mmeff.config import MethodConfig
from mmeff.engine.method import Method, Point, method_names, register_method
from mmeff.errors import (
    ConfigError,
    ImageTokenMismatchError,
    MmeffError,
    StageConflictError,
    UnknownPresetError,
    UnsupportedModelError,
)
from mmeff.methods.fastv import FastVConfig
from mmeff.methods.none import NoneConfig
from mmeff.methods.vflowopt.method import VFlowOptConfig
from mmeff.presets import available_presets

__version__ = "0.1.0"

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
