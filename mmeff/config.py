"""Method configs and the method registry.

A method is a frozen dataclass config plus one :class:`~mmeff.engine.method.Method` subclass, bound together by
:func:`register_method` (peft's ``register_peft_method`` pattern). Registration rejects duplicate names; looking
up an unknown name raises an error that lists the known ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mmeff.errors import ConfigError, UnknownPresetError

if TYPE_CHECKING:
    from mmeff.engine.method import Method


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


_REGISTRY: dict[str, tuple[type[MethodConfig], type[Method]]] = {}


def register_method(config_cls: type[MethodConfig], method_cls: type[Method]) -> None:
    """Bind a config class to the method class that implements it, under ``config_cls.method``."""
    name = config_cls.method
    if not name:
        raise ConfigError(f"{config_cls.__name__}.method must be a non-empty name")
    if name in _REGISTRY:
        raise ConfigError(f"method {name!r} is already registered (by {_REGISTRY[name][1].__name__})")
    _REGISTRY[name] = (config_cls, method_cls)
    method_cls.config_cls = config_cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def lookup(name: str) -> tuple[type[MethodConfig], type[Method]]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownPresetError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}") from None


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build a config from ``{"method": name, field: value, ...}`` (the form presets store)."""
    data = dict(data)
    name = data.pop("method", None)
    if name is None:
        raise ConfigError(f"a method config needs a 'method' key; got keys {sorted(data)}")
    config_cls, _ = lookup(name)
    base = config_cls()
    return base.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
