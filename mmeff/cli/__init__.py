"""The ``mmeff`` command line: a thin Typer layer over the library (one module per command group)."""

from __future__ import annotations

import typer

from mmeff.cli import info

app = typer.Typer(no_args_is_help=True, add_completion=False, help="mmeff: cheaper, less hallucinating VLMs.")
info.register(app)


def main() -> None:
    app()


__all__ = ["app", "main"]
