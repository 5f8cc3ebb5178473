"""Procedural reference data: scenes for training small VLMs and synthetic POPE/CHAIR/MME benchmarks."""

from .scenes import CATEGORIES, GROUPS, Scene, SceneObject, make_scene, position_words, render
from .synthetic import (
    HELDOUT_SEED_BASE,
    TRAIN_SEEDS,
    BenchmarkIntegrityError,
    ensure_benchmarks,
    verify_benchmarks,
    write_benchmarks,
)
from .text import detailed_caption, short_caption, training_examples

__all__ = [
    "CATEGORIES", "GROUPS", "HELDOUT_SEED_BASE", "TRAIN_SEEDS", "BenchmarkIntegrityError", "Scene",
    "SceneObject", "detailed_caption", "ensure_benchmarks", "make_scene", "position_words", "render",
    "short_caption", "training_examples", "verify_benchmarks", "write_benchmarks",
]
