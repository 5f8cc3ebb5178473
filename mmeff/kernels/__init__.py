"""Kernels on mmeff's hot paths. Each op lives in ``kernels/<op>/`` with a plain-torch ``reference.py`` (what
CPU tests and non-CUDA devices use) beside its Triton kernel (``triton.py``), and one dispatching function in the
op's ``__init__``. Every dispatcher decides the same way, with :func:`use_triton`; the Triton module is imported
only on that path (Triton is an optional, GPU-only dependency)."""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Triton is installed and a CUDA device is present (what the kernels need)."""
    return _triton_importable() and torch.cuda.is_available()


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` runs its Triton kernel: all on CUDA, and Triton installed."""
    return all(t.is_cuda for t in tensors) and _triton_importable()
