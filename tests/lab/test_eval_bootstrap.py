"""Paired bootstrap: exact zero for identical inputs, planted differences detected, set metrics."""

from __future__ import annotations

import numpy as np
import pytest

from mmeff_lab.evaluation.bootstrap import (
    chair_i_metric,
    mean_metric,
    mme_total_metric,
    paired_bootstrap,
    pope_accuracy_metric,
    pope_f1_metric,
)


def test_identical_predictions_zero_width() -> None:
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.integers(0, 2, 500), rng.integers(0, 2, 500)])
    for metric in (pope_f1_metric, pope_accuracy_metric):
        assert paired_bootstrap(x, x.copy(), metric, n_boot=200) == (0.0, 0.0, 0.0)


def test_planted_ten_point_difference_excluded_zero() -> None:
    n = 3000
    base = np.zeros(n)
    base[:1500] = 1  # 50% accuracy
    method = base.copy()
    method[1500:1800] = 1  # +10 points on the same samples
    delta, lo, hi = paired_bootstrap(base, method, mean_metric, n_boot=1000, seed=0)
    assert delta == pytest.approx(0.10)
    assert 0 < lo < 0.10 < hi < 0.12
    # Reversed order gives the mirrored interval; same seed is deterministic.
    assert paired_bootstrap(method, base, mean_metric, n_boot=1000, seed=0)[0] == pytest.approx(-0.10)
    assert paired_bootstrap(base, method, mean_metric, n_boot=1000, seed=0) == (delta, lo, hi)


def test_no_difference_interval_contains_zero() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 3000).astype(float)
    b = a.copy()
    flip = rng.choice(3000, 40, replace=False)
    b[flip[:20]] = 1 - b[flip[:20]]  # 20 changes each way: noise, no effect on average
    b[flip[20:]] = 1 - b[flip[20:]]
    _, lo, hi = paired_bootstrap(a, b, mean_metric, n_boot=500)
    assert lo <= 0 <= hi


def test_set_metrics_match_direct_formulas() -> None:
    x = np.array([[1, 1], [1, 0], [0, 0], [0, 1], [1, 1]])  # tp=2 fp=1 fn=1
    assert pope_f1_metric(x[None])[0] == pytest.approx(2 / 3)
    chair = np.array([[1, 2, 5, 1, 3], [0, 0, 3, 2, 2]], dtype=float)
    assert chair_i_metric(chair[None])[0] == pytest.approx(2 / 8)
    # Two subtasks: subtask 0 images (1,1),(1,0) -> acc .75 acc+ .5 -> 125; subtask 3 image (0,0) -> 0.
    mme = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 3]], dtype=float)
    assert mme_total_metric(mme[None])[0] == pytest.approx(125.0)
    with pytest.raises(ValueError, match="paired samples differ"):
        paired_bootstrap(x, x[:3], pope_f1_metric)
