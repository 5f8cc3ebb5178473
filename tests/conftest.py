"""Shared fixtures: each tiny model family is built once per session (offline), saved, and loaded back with
``from_pretrained`` so the real loading path runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mmeff.models.factory import build_tiny

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny_{family}"))
        return cache[family]

    return get
