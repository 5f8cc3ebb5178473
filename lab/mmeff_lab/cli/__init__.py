"""The ``mmeff`` command line: a thin Typer layer over the library (one module per command group)."""

from __future__ import annotations

import typer

from mmeff_lab.cli import bench, eval, info, score, train, tune
from mmeff_lab.cli.errors import FriendlyGroup

app = typer.Typer(cls=FriendlyGroup, no_args_is_help=True, add_completion=False,
                  help="mmeff: cheaper, less hallucinating VLMs.")


@app.callback()
def _root(ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help="Show tracebacks (errors are one "
                                                          "line otherwise).")) -> None:
    ctx.obj = {"debug": debug}


info.register(app)
train.register(app)
eval.register(app)
score.register(app)
bench.register(app)
tune.register(app)


def main() -> None:
    app()


__all__ = ["app", "main"]
