"""The evaluation plot: one point per preset, the paired interval of its change against ``none`` as a bar."""

from __future__ import annotations

import pytest

from mmeff_lab.evaluation.plots import _series, plot_accuracy_vs_tokens


def results() -> dict:
    cost = {"visual_tokens_kept": 576.0}
    none = {"preset": "none", "tasks": {"pope_random": {"f1": 0.99, "accuracy": 0.995, "cost": cost},
                                        "mme": {"perception": 500.0, "cost": cost}}}
    pruned_cost = {"visual_tokens_kept": 58.0}
    fastv = {"preset": "fastv-90", "tasks": {"pope_random": {"f1": 0.97, "accuracy": 0.98, "cost": pruned_cost},
                                             "mme": {"perception": 480.0, "cost": pruned_cost}},
             "delta": {"pope_random": {"f1": {"delta": -0.02, "lo": -0.03, "hi": 0.02},
                                       "accuracy": {"delta": -0.015, "lo": -0.02, "hi": 0.0}},
                       "mme": {"perception": {"delta": -20.0, "lo": -35.0, "hi": -5.0}}}}
    return {"model": "m", "runs": [none, fastv]}


def test_series_carry_the_paired_intervals():
    s = _series(results())
    points, percent = s["pope_random F1 (%)"]
    assert percent and points[0] == ("none", 576.0, 99.0, None)
    preset, x, y, (lo, hi) = points[1]
    assert (preset, x) == ("fastv-90", 58.0) and y == pytest.approx(97.0)
    assert (lo, hi) == (pytest.approx(96.0), pytest.approx(101.0))  # none's value + the delta's interval
    mme_points, percent = s["MME perception"]
    assert not percent and mme_points[1][3] == (pytest.approx(465.0), pytest.approx(495.0))


def test_plot_keeps_percentages_at_most_100(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    seen = []
    real = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        seen.extend(ax.get_ylim() for ax in fig.axes if ax.get_title().endswith("(%)"))
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    path = plot_accuracy_vs_tokens(results(), tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen and all(high <= 100.0 and low >= 0.0 for low, high in seen)
