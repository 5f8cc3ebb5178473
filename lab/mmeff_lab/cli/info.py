"""``mmeff presets`` and ``mmeff models``: what is available."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table


def presets() -> None:
    """List the built-in presets and what each does."""
    from mmeff.presets import builtin_presets

    table = Table("preset", "method", "settings", "what it does")
    for name, p in sorted(builtin_presets().items()):
        settings = ", ".join(f"{k}={v}" for k, v in p.fields.items())
        if p.families:
            settings += f" (per-family: {', '.join(sorted(p.families))})"
        table.add_row(name, p.method, settings, p.description)
    Console().print(table)


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
