"""Family adapters: :func:`adapter_for` picks the one that supports a model."""

from __future__ import annotations

from torch import nn

from mmeff.errors import UnsupportedModelError
from mmeff.families.base import Adapter, ImageSpan, Tile
from mmeff.families.llava import LlavaAdapter
from mmeff.families.llava_next import LlavaNextAdapter
from mmeff.families.llava_onevision import LlavaOnevisionAdapter
from mmeff.families.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from mmeff.families.qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter,
                                      LlavaOnevisionAdapter, Qwen3VLAdapter)
FAMILY_NAMES: tuple[str, ...] = tuple(a.family for a in ADAPTERS)


def adapter_for(model: nn.Module) -> Adapter:
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model)
    supported = ", ".join(c for a in ADAPTERS for c in a.model_classes)
    raise UnsupportedModelError(f"mmeff does not support {name}; supported model classes: {supported}")


__all__ = ["ADAPTERS", "FAMILY_NAMES", "Adapter", "ImageSpan", "Tile", "adapter_for"]
