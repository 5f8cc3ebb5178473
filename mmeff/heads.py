"""Checkpoint files of trained heads: safetensors tensors plus string metadata, written atomically.

A head checkpoint records what it was trained for (``kind``, ``family``, the decoder's ``hidden_size`` and
``num_layers``) so a method can refuse a head that does not fit the model with a message naming the file.
A relative path is looked up in the current directory, then in the model's own folder (the directory it was
loaded from): a head ships beside the model it was trained for, as the lab's reference models carry theirs in
``heads/`` (what the built-in presets name: ``checkpoint = "heads/dyvte.safetensors"``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmeff.errors import ConfigError


def model_dir(model: Any) -> Path | None:
    """The local folder a transformers model was loaded from (``config._name_or_path``), if there is one."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(name).expanduser()
    return path if name and path.is_dir() else None


def resolve_checkpoint(path: str | os.PathLike[str], method: str, model: Any = None) -> Path:
    """The file a method config's ``checkpoint`` names (relative: the current directory, then the folder of
    ``model``); a clear error when there is none."""
    if not str(path):
        raise ConfigError(f"{method}: no checkpoint given; train one with `mmeff train {method} ...` "
                          "and use the preset file it writes (or set checkpoint=PATH)")
    p = Path(path).expanduser()
    folder = model_dir(model)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, *([folder / p] if folder is not None else [])]
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"{method}: checkpoint {str(path)!r} not found (tried {tried}); train one for this model "
                      f"with `mmeff train {method} ...` and pass checkpoint=PATH")


def save_head(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-encoded values) to ``path`` via a temp file + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_head(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a head checkpoint; ``kind`` must match what it was trained for."""
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors head checkpoint ({e})") from e
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except ValueError as e:
        raise ConfigError(f"{path}: metadata is not JSON-encoded ({e})") from e
    if meta.get("kind") != kind:
        raise ConfigError(f"{path}: a {meta.get('kind')!r} head, but the {kind!r} method needs a {kind!r} head")
    return tensors, meta


def check_fits(path: Path, meta: dict[str, Any], hidden_size: int, num_layers: int) -> None:
    """Refuse a head trained for a decoder of another width or depth."""
    want = {"hidden_size": hidden_size, "num_layers": num_layers}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise ConfigError(f"{path}: head trained for a decoder with {got}, but this model has {want} "
                          f"(family {meta.get('family')!r}, model {meta.get('model')!r}); train one for this model")


def open_head(path: str | os.PathLike[str], kind: str, model: Any, hidden_size: int, num_layers: int
              ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """Find (:func:`resolve_checkpoint`), read and check (:func:`check_fits`) the ``kind`` head a method's config
    names for ``model``: (file, tensors, metadata)."""
    file = resolve_checkpoint(path, kind, model)
    tensors, meta = load_head(file, kind)
    check_fits(file, meta, hidden_size, num_layers)
    return file, tensors, meta
