"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest

from mmeff_lab.models.factory import FAMILIES, load_tiny


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tiny_model_dir):
    """(family, SDPA tiny model, processor) for each tiny family."""
    model, processor = load_tiny(tiny_model_dir(request.param), attn_implementation="sdpa")
    return request.param, model, processor
