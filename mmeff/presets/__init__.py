"""Presets: named method configs stored as TOML data files in this folder.

Each top-level table of a ``*.toml`` file here is one preset::

    [fastv]
    description = "what it does, one line"
    method = "fastv"          # the registered method name
    k = 2                     # every other key is a field of that method's config
    ratio = 0.5
    [fastv.families.qwen2_vl] # optional per-family overrides (family keys as in mmeff.families)
    k = 3

Presets compose with ``+`` (``"vflowopt-75+vhr"``): the stages run in the order given. A path to a TOML file
of the same form (e.g. written by ``mmeff tune``) is accepted wherever a preset name is.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from mmeff.config import MethodConfig
from mmeff.errors import ConfigError, UnknownPresetError
from mmeff.io import atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_RESERVED = ("description", "families", "method", "requires")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    method: str
    fields: dict[str, Any] = field(default_factory=dict)
    families: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""
    requires: str = ""  # when the preset is refused (shown by ``mmeff presets``)

    def config(self, family: str | None = None) -> MethodConfig:
        data = {"method": self.method, **self.fields}
        if family is not None:
            data.update(self.families.get(family, {}))
        try:
            return config_from_dict(data)
        except ConfigError as e:
            where = f"{self.source} [{self.name}]" if self.source else f"preset [{self.name}]"
            raise ConfigError(f"{where}: {e}") from None


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build a config from ``{"method": name, field: value, ...}`` (the form presets store)."""
    data = dict(data)
    name = data.pop("method", None)
    if name is None:
        raise ConfigError(f"a method config needs a 'method' key; got keys {sorted(data)}")
    import mmeff.methods  # noqa: F401  (registers the built-in methods; imports torch: only when building one)
    from mmeff.engine.method import lookup

    config_cls, _ = lookup(name)
    base = config_cls()
    return base.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _parse(text: str, source: str) -> dict[str, Preset]:
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    presets = {}
    for name, body in tables.items():
        if not isinstance(body, dict) or "method" not in body:
            raise ConfigError(f"{source}: preset [{name}] needs a 'method' key")
        for key in body:
            near = difflib.get_close_matches(key, _RESERVED, n=1, cutoff=0.75)
            if key not in _RESERVED and near:
                raise ConfigError(f"{source}: preset [{name}] has a key {key!r}; did you mean {near[0]!r}?")
        families = body.get("families", {})
        if not isinstance(families, dict) or not all(isinstance(v, dict) for v in families.values()):
            raise ConfigError(f"{source}: preset [{name}]: 'families' must hold one table per family")
        fields = {k: v for k, v in body.items() if k not in _RESERVED}
        presets[name] = Preset(name, body.get("description", ""), body["method"], fields, families, source,
                               body.get("requires", ""))
    return presets


@cache
def builtin_presets() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            for name, preset in _parse(entry.read_text(encoding="utf-8"), entry.name).items():
                if name in presets:
                    raise ConfigError(f"preset {name!r} defined twice ({presets[name].source}, {entry.name})")
                presets[name] = preset
    return presets


def available_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(builtin_presets())


def load_preset_file(path: str | Path) -> dict[str, Preset]:
    path = Path(path)
    if not path.is_file():
        raise UnknownPresetError(f"preset file {str(path)!r} does not exist")
    return _parse(path.read_text(encoding="utf-8"), str(path))


def get_preset(name: str) -> Preset:
    if name.endswith(".toml"):
        found = load_preset_file(name)
        if len(found) != 1:
            raise ConfigError(f"{name}: expected exactly one preset in the file, found {sorted(found)}")
        return next(iter(found.values()))
    try:
        return builtin_presets()[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r}; valid presets: {', '.join(available_presets())} "
            "(or a path to a .toml preset file; combine presets with '+')"
        ) from None


def resolve(
    spec: str | MethodConfig | Sequence[str | MethodConfig],
    family: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[MethodConfig]:
    """Turn a preset name / ``a+b`` combination / config / list of those into method configs for ``family``.

    ``overrides`` set config fields; each must belong to at least one of the configs, and is applied to every
    config that has it.
    """
    items: list[str | MethodConfig]
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split("+") if s.strip()]
        if not items:
            raise UnknownPresetError(f"empty preset name; valid presets: {', '.join(available_presets())}")
    elif isinstance(spec, MethodConfig):
        items = [spec]
    else:
        items = list(spec)
    configs = [item if isinstance(item, MethodConfig) else get_preset(item).config(family) for item in items]
    configs = [c for c in configs if c.method != "none"] or configs[:1]
    if overrides:
        used: set[str] = set()
        out = []
        for c in configs:
            names = set(c.to_dict()) - {"method"}
            mine = {k: v for k, v in overrides.items() if k in names}
            used |= set(mine)
            out.append(c.replace(**mine) if mine else c)
        unknown = sorted(set(overrides) - used)
        if unknown:
            raise ConfigError(f"override(s) {unknown} match no field of {[type(c).__name__ for c in configs]}")
        configs = out
    return configs


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def write_preset(path: str | Path, name: str, config: MethodConfig, description: str) -> Path:
    """Write ``config`` as a one-preset TOML file (the format of this folder, readable wherever a preset name
    is), atomically. Fields left at None are omitted."""
    lines = [f"[{json.dumps(name)}]", f"description = {json.dumps(description)}",
             f"method = {json.dumps(config.method)}"]
    for key, value in config.to_dict().items():
        if key != "method" and value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)
