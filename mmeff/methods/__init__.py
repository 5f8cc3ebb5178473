"""The methods. Importing this package registers every built-in method by name."""

from mmeff.methods import fastv, none  # noqa: F401  (registration side effects)
from mmeff.methods.base import EXCLUSIVE_POINTS, Method, Point

__all__ = ["EXCLUSIVE_POINTS", "Method", "Point"]
