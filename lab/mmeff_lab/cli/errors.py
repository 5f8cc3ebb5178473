"""One error path for every command: an expected failure is one line on stderr and exit code 2.

Expected failures are :class:`~mmeff.errors.MmeffError` (bad presets, inputs, files, models) and the environment
errors a first run meets: no CUDA device, a model name that is neither local, shipped nor reachable, a missing
file. Anything else is a bug of ours: one line too, naming the exception, and the hint to rerun with
``mmeff --debug ...`` (or ``MMEFF_DEBUG=1``), which shows every traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import typer
from typer.core import TyperGroup

from mmeff.errors import MmeffError


def describe(e: BaseException) -> tuple[str, bool]:
    """(one line for the user, whether the failure was expected)."""
    text = " ".join(str(e).split())
    if isinstance(e, MmeffError):
        return text, True
    lower = text.lower()
    if ("nvidia driver" in lower or "not compiled with cuda" in lower or "no cuda gpus are available" in lower
            or "cuda driver version is insufficient" in lower):
        return "no usable CUDA device here: run with --device cpu (or --device auto, the default)", True
    if isinstance(e, OSError) and ("huggingface.co" in lower or "valid model identifier" in lower
                                   or "local folder" in lower or "offline mode" in lower):
        return (f"could not load the model: {text[:300]} — pass a local checkpoint folder, reference-llava, "
                "reference-qwen2vl or tiny-<family>"), True
    if isinstance(e, FileNotFoundError):
        return f"file not found: {e.filename or text}", True
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or text}", True
    return f"{type(e).__name__}: {text} (a bug in mmeff? rerun with mmeff --debug ... for the traceback)", False


def debug_enabled(ctx: click.Context | None = None) -> bool:
    if os.environ.get("MMEFF_DEBUG", "") not in ("", "0"):
        return True
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and (root.obj or {}).get("debug"))


class FriendlyGroup(TyperGroup):
    """Runs a command; turns what escapes it into one line on stderr with exit code 2 (see the module doc)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            if debug_enabled(ctx):
                raise
            message, _ = describe(e)
            click.echo(f"error: {message}", err=True)
            sys.stderr.flush()
            raise typer.Exit(2) from None
