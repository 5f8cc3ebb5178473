"""Kernels on mmeff's hot paths. Each op lives in ``kernels/<op>/`` with a plain-torch ``reference.py`` (what
CPU tests and non-CUDA devices use) beside its Triton kernel, and one dispatching function."""
