"""The VFlowOpt tuner: a few optuna trials on a tiny model give a budget-exact preset that wrap accepts."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.families.prompt import make_inputs
from mmeff.methods.vflowopt.budget import averaged_budget, solve_last_ratio
from mmeff.methods.vflowopt.tune import objective_value, r1_interval, search_space, tune_vflowopt
from mmeff.presets import get_preset, write_preset
from mmeff_lab.models.factory import load_tiny
from mmeff_lab.training.data import TrainingDataError, reference_samples


def test_objective_and_space():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert objective_value(a, a) == pytest.approx(2.0)
    assert objective_value(a, torch.tensor([[0.0, 1.0], [0.0, 3.0]])) == pytest.approx(1.0)
    sp = search_space(0.75)  # the official space is the one of 25% kept
    assert sp["r_v"] == (0.25, 0.375) and sp["r_1"][0] == pytest.approx(0.2 / 0.375)
    # r_1 interval: its ends give r_2 = 1 and r_2 = 0 under the budget (6 layers, stages at 2 and 4, 90%)
    lo, hi = r1_interval(0.9, 0.15, (2, 4), 6)
    assert solve_last_ratio(0.9, 0.15, (2, 4), (lo, 0.0), 6) == pytest.approx(1.0)
    assert solve_last_ratio(0.9, 0.15, (2, 4), (hi, 0.0), 6) == pytest.approx(0.0)
    assert (lo, hi) == pytest.approx((0.5, 1.0))
    with pytest.raises(TrainingDataError, match="TRAIN_SEEDS"):
        reference_samples(3, seed0=-1)


def test_tune_writes_a_budget_exact_preset(tiny_model_dir, tmp_path):
    model, processor = load_tiny(tiny_model_dir("qwen2_vl"))
    items = reference_samples(2, seed0=123)
    batches = [make_inputs(processor, [s.text], [[s.image.resize((112, 112))]]) for s in items]
    cfg, score = tune_vflowopt(model, batches, budget=0.75, trials=8, startup_trials=4, llm_layers=(1, 3), layers_of=0)
    assert 0.0 < score <= 2.0 + 1e-5
    with mmeff.wrap(model, cfg) as handle, torch.no_grad():  # the measured share (cells counted) meets the budget
        model(**batches[0])
        assert 1 - handle.stats["visual_tokens_kept"] / handle.stats["visual_tokens_in"] >= 0.75 - 0.01
    lo, hi = r1_interval(0.75, cfg.r_v, (1, 3), 4)
    assert max(lo, search_space(0.75)["r_1"][0]) - 1e-9 <= cfg.llm_ratios[0] <= min(hi, 1.0) + 1e-9
    assert averaged_budget(cfg, 4) == pytest.approx(0.75)
    path = write_preset(tmp_path / "my-preset.toml", "my-preset", cfg, "tuned in a test")
    preset = get_preset(str(path))
    assert preset.config() == cfg
    with mmeff.wrap(model, str(path)) as handle, torch.no_grad():
        model(**batches[0])
        assert handle.stats["visual_tokens_kept"] < handle.stats["visual_tokens_in"]
