"""The methods. Importing this package registers every built-in method by name."""

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
