"""The attention insertion point: the positions-based visibility (geometry) the fused statistics kernel reads
equals the masks the layers use, in prefill and decode, with token selection."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.engine.method import Method, Point, lookup
from mmeff.engine.pipeline import Pipeline
from mmeff.families import adapter_for
from mmeff.methods.fastv import FastVConfig
from mmeff_lab.models.factory import FAMILIES, load_tiny
from tests.helpers import batch, visible_from_geometry


class _Probe(Method):
    """Checks, at every layer and step, that the geometry describes exactly the mask the layer applies."""

    points = frozenset({Point.LAYER})
    seen: list

    def attention_hooks(self, layer, state):
        outer = self

        class Check:
            def observe(self, call):
                q_pos, k_pos, k_valid = call.geometry
                from_geometry = visible_from_geometry(q_pos, k_pos, k_valid)
                m = call.mask
                if m is None:
                    q, k = call.query.shape[2], call.key.shape[2]
                    m = torch.ones(q, k, dtype=torch.bool).tril(k - q)[None, None]
                from_mask = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
                from_mask = from_mask.expand(from_geometry.shape[0], -1, -1, -1)[:, 0]
                # prefill: queries are the key slots, and only real tokens' rows are defined (not padding/fill);
                # decode: every query is a new token
                rows = k_valid if call.phase == "prefill" else torch.ones_like(q_pos, dtype=torch.bool)
                agree = (from_geometry == from_mask) | ~rows[:, :, None]
                outer.seen.append((call.phase, layer, bool(agree.all())))

        return [Check()]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_geometry_matches_masks_with_fastv(tiny_model_dir, family):
    model, processor = load_tiny(tiny_model_dir(family), attn_implementation="eager")
    inputs = batch(processor, family)
    adapter = adapter_for(model)
    fastv = lookup("fastv")[1](FastVConfig(k=1, ratio=0.5), adapter)
    probe = _Probe(mmeff.NoneConfig(), adapter)
    probe.seen = []
    pipe = Pipeline(model, adapter, [fastv, probe])
    pipe.attach()
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        pipe.detach()
    phases = {p for p, _, _ in probe.seen}
    assert phases == {"prefill", "decode"}
    assert all(ok for _, _, ok in probe.seen), [s for s in probe.seen if not s[2]]
