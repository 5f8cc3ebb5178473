"""``mmeff presets`` and ``mmeff models``: what is available."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text


def presets() -> None:
    """List the built-in presets and what each does."""
    from mmeff.presets import builtin_presets

    table = Table("preset", "method", "settings", "what it does")
    for name, p in sorted(builtin_presets().items()):
        settings = ", ".join(f"{k}={_short(v)}" for k, v in p.fields.items())
        if p.families:
            settings += f" (per-family: {', '.join(sorted(p.families))})"
        what = p.description + (f" — needs {p.requires}" if p.requires else "")
        table.add_row(name, p.method, Text(settings), Text(what))
    Console().print(table)


def _short(value: object) -> str:
    """Preset values as a person reads them: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def models() -> None:
    """List the supported model families."""
    from mmeff.families import ADAPTERS

    table = Table("family", "transformers classes")
    for a in ADAPTERS:
        table.add_row(a.family, ", ".join(a.model_classes))
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command()(presets)
    app.command()(models)
