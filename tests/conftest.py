"""Shared fixtures: each tiny model family is built once per session (offline), saved, and loaded back with
``from_pretrained`` so the real loading path runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mmeff_lab.models.factory import FAMILIES, build_tiny, load_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny_{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="module", params=FAMILIES)
def models(request, tiny_model_dir):
    """(family, eager model, SDPA model, processor) for each tiny family: slow references run eager."""
    path = tiny_model_dir(request.param)
    eager, processor = load_tiny(path, attn_implementation="eager")
    sdpa, _ = load_tiny(path, attn_implementation="sdpa")
    return request.param, eager, sdpa, processor
