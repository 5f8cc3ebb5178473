"""Probe-query attention scores per key, without the keys x keys attention matrix (ZipVL's importance).

``probe_scores`` dispatches to the Triton kernel on CUDA when Triton is importable, to the torch reference
otherwise; ``normalized_scores`` divides by the number of probes that see each key.
"""

from __future__ import annotations

import torch

from mmeff.kernels import use_triton
from mmeff.kernels.probe_scores import reference
from mmeff.kernels.probe_scores.reference import probe_counts


def probe_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    probe_pos: torch.Tensor,
    probe_weight: torch.Tensor,
    key_ok: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accumulated attention, probe count), [B, N] float32 each; see :mod:`.reference`."""
    if use_triton(query):
        from mmeff.kernels.probe_scores import triton as kernel

        return kernel.probe_scores(query, key, probe_pos, probe_weight, key_ok, scaling)
    return reference.probe_scores(query, key, probe_pos, probe_weight, key_ok, scaling)


def normalized_scores(acc: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean attention received from the probes that see the key (0 where no probe sees it)."""
    return torch.where(count > 0, acc / count.clamp_min(1e-12), 0.0)


__all__ = ["normalized_scores", "probe_counts", "probe_scores"]
