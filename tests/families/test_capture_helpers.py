"""The capture helpers families use around a CUDA-graph capture (mmeff/families/base.py)."""

from __future__ import annotations

import torch
from transformers.models.llava_next import modeling_llava_next

from mmeff.families.base import device_lists_filled, filled_on
from mmeff.families.llava_next import LlavaNextAdapter


def test_filled_on_equals_the_copy() -> None:
    empty = torch.tensor([], dtype=torch.long)
    for host in (torch.tensor([3, 7, 11]), torch.tensor([[1.5, -2.0], [0.25, 4.0]]), empty):
        out = filled_on(host, "cpu")
        assert out.dtype == host.dtype and out.shape == host.shape
        assert torch.equal(out, host)


def test_device_lists_filled_routes_device_lists_only(monkeypatch) -> None:
    real = modeling_llava_next.torch
    calls: list[object] = []
    with device_lists_filled(modeling_llava_next):
        proxy = modeling_llava_next.torch
        assert proxy is not real and proxy.cat is torch.cat  # everything but ``tensor`` is torch
        monkeypatch.setattr("mmeff.families.base.filled_on", lambda host, device: calls.append(device) or host)
        host = proxy.tensor([4, 9], dtype=torch.long)  # no device: torch's own
        assert torch.equal(host, torch.tensor([4, 9])) and not calls
        assert torch.equal(proxy.tensor([4, 9], device="cpu"), host) and not calls
        assert torch.equal(proxy.tensor([4, 9], dtype=torch.long, device="meta"), host)  # a device: the fills
        assert calls == ["meta"]
    assert modeling_llava_next.torch is real


def test_llava_next_capture_context_restores() -> None:
    class Base:
        def get_placeholder_mask(self, *a):
            return a

    class Config:
        image_token_id = 5

    class Model:
        config = Config()
        model = Base()

    adapter = LlavaNextAdapter.__new__(LlavaNextAdapter)
    adapter.model = Model()  # no model built: the context only swaps attributes
    real = modeling_llava_next.torch
    with adapter.capture_context():
        assert modeling_llava_next.torch is not real
        assert "get_placeholder_mask" in vars(Model.model)
    assert modeling_llava_next.torch is real and "get_placeholder_mask" not in vars(Model.model)
