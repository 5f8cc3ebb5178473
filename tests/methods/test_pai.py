"""PAI against an independent slow reference written from the released code's logic (LALBJ/PAI):
``tests/methods/cfg_reference.py`` (the rows the release patches, its CFG and cutoff written out there)."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.methods._halluc import text_only_inputs
from tests.helpers import batch
from tests.methods.cfg_reference import cfg, patched_rows, peaky, reference_logits, step_inputs

GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
ALPHA, GAMMA, CUTOFF, START = 0.2, 1.1, 0.1, 2


@torch.no_grad()
@pytest.mark.parametrize("reading", ["released", "text"])
def test_pai_equals_the_released_logic(models, reading):
    family, eager, _, processor = models
    with peaky(eager):
        _check_against_reference(eager, processor, family, reading)


def _check_against_reference(eager, processor, family: str, reading: str) -> None:
    inputs = batch(processor, family, multi_image=False)
    cut = 0
    with mmeff.wrap(eager, "pai" if reading == "released" else "pai-text") as handle:
        assert handle.configs[0].cutoff == CUTOFF and handle.configs[0].alpha == ALPHA
        out = eager.generate(**inputs, **GEN)
        state = handle.pipeline.state
        side = dict(handle.pipeline.methods[0].data(state).side.inputs)
    pad = eager.config.get_text_config().pad_token_id
    want_side = text_only_inputs(state, inputs, 0 if pad is None else int(pad))
    assert torch.equal(side["input_ids"], want_side["input_ids"])
    n = inputs["input_ids"].shape[1]
    image = inputs["input_ids"] == eager.config.image_token_id
    for step in range(GEN["max_new_tokens"]):
        new = out.sequences[:, n: n + step]
        main_in = step_inputs(inputs, new)
        # the first step's last row is patched unless CFG switched the patch off (the released reading)
        rows = patched_rows(n, n + step, len(new), first_step=reading == "text")
        gain = ALPHA * torch.cat([image, torch.zeros_like(new, dtype=torch.bool)], 1).float()
        main = reference_logits(eager, main_in, rows, gain, START)
        no_image = reference_logits(eager, step_inputs(dict(side), new))
        want = cfg(main, no_image, GAMMA, CUTOFF)
        got = out.logits[step].float()
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), step
        fin = torch.isfinite(want)
        cut += int((~fin).sum())
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    assert cut > 0  # the cutoff removed tokens, so it is pinned too


@torch.no_grad()
def test_released_pai_answers_the_first_token_with_cfg_only(models):
    """One-word answers (POPE): the released PAI's first token is plain CFG (no amplification), the paper
    reading's is not; without CFG (gamma 1) the released code amplifies the first step too."""
    family, eager, _, processor = models
    inputs = batch(processor, family, multi_image=False)
    first = {}
    for preset, overrides in (("pai", {}), ("pai-text", {}), ("pai", {"alpha": 0.0})):
        with mmeff.wrap(eager, preset, **overrides):
            first[(preset, overrides.get("alpha"))] = eager(**inputs).logits[:, -1]
    torch.testing.assert_close(first[("pai", None)], first[("pai", 0.0)], rtol=0, atol=0)
    assert not torch.allclose(first[("pai-text", None)], first[("pai", None)])
    with mmeff.wrap(eager, "pai", gamma=1.0):
        amplified = eager(**inputs).logits[:, -1]
    with mmeff.wrap(eager, "none"):
        plain = eager(**inputs).logits[:, -1]
    assert not torch.allclose(amplified, plain)
