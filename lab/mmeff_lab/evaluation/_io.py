"""Strict readers shared by the benchmark loaders: every problem becomes a DataError with file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DataError


def shipped_path(name: str) -> Path:
    """Path of a data file shipped in ``mmeff/evaluation/data`` (a real file for an installed package)."""
    path = Path(str(resources.files("mmeff_lab.evaluation").joinpath("data").joinpath(name)))
    if not path.is_file():
        raise DataError(path, "shipped data file is missing from the installed package")
    return path


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read: {e}") from e


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON ({e.msg} at column {e.colno}); truncated line?", lineno) from e
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", lineno)
        yield lineno, obj


def read_json_records(path: str | Path) -> list[tuple[int | None, dict[str, Any]]]:
    """A JSON list of objects (line unknown: None) or JSON lines, whichever the file holds."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON ({e.msg})", e.lineno) from e
        out: list[tuple[int | None, dict[str, Any]]] = []
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(path, f"item {i} is {type(obj).__name__}, expected an object")
            out.append((None, obj))
        return out
    return list(iter_json_lines(path))


def is_logged_sample(obj: dict[str, Any]) -> bool:
    """Whether a JSON line is one of lmms-eval's logged samples (a doc id and the model's responses)."""
    return "doc_id" in obj and ("filtered_resps" in obj or "resps" in obj)


def require(path: str | Path, lineno: int | None, obj: dict[str, Any], key: str, kind: type | tuple) -> Any:
    if key not in obj:
        raise DataError(path, f"missing field {key!r}", lineno)
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(path, f"field {key!r} has type {type(value).__name__}: {value!r}", lineno)
    return value


def check_image(path: Path, referenced_from: str | Path, lineno: int | None = None) -> None:
    """Fail unless ``path`` is a readable, complete image (decodes fully: catches truncated files)."""
    from PIL import Image

    if not path.is_file():
        raise DataError(referenced_from, f"image not found: {path}", lineno)
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...) for bad files
        raise DataError(path, f"corrupt or truncated image ({e})") from e
