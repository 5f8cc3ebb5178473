"""Benchmark loaders and metrics (POPE, CHAIR, MME) matching the official scripts, plus paired bootstrap."""

from .bootstrap import paired_bootstrap
from .errors import DataError

__all__ = ["DataError", "paired_bootstrap"]
