"""``none``: no method at all — the baseline row, and a transparent run of mmeff's machinery."""

from __future__ import annotations

from dataclasses import dataclass

from mmeff.config import MethodConfig
from mmeff.engine.method import Method, register_method


@dataclass(frozen=True)
class NoneConfig(MethodConfig):
    method = "none"


class NoneMethod(Method):
    graphable = True


register_method(NoneConfig, NoneMethod)
