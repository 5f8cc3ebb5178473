"""The methods. Importing this package registers every built-in method by name."""

from mmeff.engine.method import EXCLUSIVE_POINTS, Method, Point
from mmeff.methods import (  # noqa: F401  (registration side effects)
    dyvte,
    explain,
    fastv,
    fia,
    none,
    pai,
    var,
    vcd,
    vflowopt,
    vhr,
    zipvl,
)

__all__ = ["EXCLUSIVE_POINTS", "Method", "Point"]
