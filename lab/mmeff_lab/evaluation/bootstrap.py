"""Paired bootstrap confidence intervals for "method minus baseline" on the same samples.

``paired_bootstrap`` resamples sample indices with replacement and applies the same indices to both
arrays, so per-sample pairing (same question, same image) is kept. A metric maps a batch of resampled
arrays, shape (B, n, ...), to B values; the ``*_metric`` helpers below cover the benchmarks' statistics,
including set-level ones (F1, CHAIR_I, MME score) recomputed on each resample.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Metric = Callable[[np.ndarray], np.ndarray]


def paired_bootstrap(a: np.ndarray, b: np.ndarray, metric: Metric, n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05, chunk: int = 250) -> tuple[float, float, float]:
    """(delta, lo, hi): delta = metric(b) - metric(a) and its (1 - alpha) percentile interval.

    ``a`` (baseline) and ``b`` (method) hold one row per sample in the same order. ``chunk`` bounds the
    memory of one batch of resamples; results do not depend on it.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired samples differ in number: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError("no samples")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    n = a.shape[0]
    delta = float(metric(b[None])[0] - metric(a[None])[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    deltas = np.concatenate([metric(b[idx[i:i + chunk]]) - metric(a[idx[i:i + chunk]])
                             for i in range(0, n_boot, chunk)])
    lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return delta, float(lo), float(hi)


def mean_metric(x: np.ndarray) -> np.ndarray:
    """Mean of a per-sample value, e.g. correctness for accuracy or the hallucination flag for CHAIR_S."""
    return x.reshape(x.shape[0], x.shape[1], -1)[..., 0].mean(axis=1)


def pope_f1_metric(x: np.ndarray) -> np.ndarray:
    """F1 ("yes" positive) from rows [pred_is_yes, label_is_yes] (``pope.pope_sample_matrix``)."""
    p, y = x[..., 0].astype(bool), x[..., 1].astype(bool)
    tp = (p & y).sum(axis=1)
    denom = p.sum(axis=1) + y.sum(axis=1)  # 2TP + FP + FN
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def pope_accuracy_metric(x: np.ndarray) -> np.ndarray:
    return (x[..., 0] == x[..., 1]).mean(axis=1)


def chair_i_metric(x: np.ndarray) -> np.ndarray:
    """CHAIR_I from ``ChairResult.sample_matrix()`` rows: hallucinated mentions / mentions."""
    h, m = x[..., 1].sum(axis=1), x[..., 2].sum(axis=1)
    return np.where(m > 0, h / np.maximum(m, 1), 0.0)


def chair_s_metric(x: np.ndarray) -> np.ndarray:
    return x[..., 0].mean(axis=1)


def mme_total_metric(x: np.ndarray, n_subtasks: int = 14) -> np.ndarray:
    """Sum over subtasks of 100·acc + 100·acc+ from ``mme.mme_sample_matrix`` rows; a subtask absent
    from a resample contributes 0."""
    onehot = x[..., 2].astype(np.int64)[..., None] == np.arange(n_subtasks)  # (B, n, T)
    images = onehot.sum(axis=1)
    correct = np.einsum("bn,bnt->bt", x[..., 0] + x[..., 1], onehot)
    both = np.einsum("bn,bnt->bt", x[..., 0] * x[..., 1], onehot)
    safe = np.maximum(images, 1)
    per = np.where(images > 0, 100 * correct / (2 * safe) + 100 * both / safe, 0.0)
    return per.sum(axis=1)
