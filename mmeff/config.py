"""The base class of method configs: one small frozen dataclass per method (registered with its method class by
:func:`mmeff.engine.method.register_method`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from mmeff.errors import ConfigError


@dataclass(frozen=True)
class MethodConfig:
    """Base class of every method config. Subclasses set ``method`` to their registered name."""

    method: ClassVar[str] = ""

    def replace(self, **overrides: Any) -> MethodConfig:
        """A copy with some fields changed; unknown field names are an error, not silently ignored."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"{type(self).__name__} has no field(s) {unknown}; its fields are {sorted(names)}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}
