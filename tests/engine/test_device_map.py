"""Models dispatched by accelerate (``from_pretrained(..., device_map=...)``, big-model inference): mmeff's hooks run
beside accelerate's (``AlignDevicesHook`` moves each module's inputs and weights to its device), so a wrapped
model must give the tokens the same preset gives on the model in one piece.

On CPU the second "device" is the disk (those layers' weights are offloaded and loaded in per forward by
accelerate's hooks, the same code path as a second GPU, minus the copies); with two GPUs (``-m gpu``) the
decoder's second half sits on ``cuda:1``. CUDA graphs need the model on one device and say so."""

from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.errors import MmeffError
from mmeff.families import adapter_for
from mmeff_lab.models.factory import load_tiny
from tests.helpers import batch

GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
PRESETS = ["none", "fastv", "fastv-90", "vflowopt-90"]


def split_map(model: torch.nn.Module, first: str, second: str) -> dict[str, str]:
    """A device map putting the second half of the decoder layers on ``second``, everything else on ``first``."""
    layers = adapter_for(model).layers
    names = {id(m): n for n, m in model.named_modules()}
    path = names[id(layers)]
    out: dict[str, str] = {}

    def place(module: torch.nn.Module, prefix: str) -> None:
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            out[f"{prefix}{name}"] = first  # LLaVA-NeXT's image_newline
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if child is layers:
                for i in range(len(layers)):
                    out[f"{full}.{i}"] = first if i < len(layers) // 2 else second
            elif path.startswith(full + "."):
                place(child, full + ".")
            else:
                out[full] = first

    place(model, "")
    return out


def load_split(path, first: str, second: str, tmp_path):
    model, _ = load_tiny(path)
    device_map = split_map(model, first, second)
    cls = type(model)
    return cls.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32, use_safetensors=True,
                               device_map=device_map, offload_folder=str(tmp_path)).eval()


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_offloaded_model_gives_the_same_tokens(tiny_model_dir, family, tmp_path):
    path = tiny_model_dir(family)
    whole, processor = load_tiny(path)
    inputs = batch(processor, family)
    split = load_split(path, "cpu", "disk", tmp_path)
    last = adapter_for(split).layers[-1]
    assert type(getattr(last, "_hf_hook", None)).__name__ == "AlignDevicesHook"  # accelerate's hooks are live
    for preset in PRESETS:
        with mmeff.wrap(whole, preset):
            want = whole.generate(**inputs, **GEN).sequences
        with mmeff.wrap(split, preset) as handle:
            got = split.generate(**inputs, **GEN).sequences
            kept, total = handle.stats["visual_tokens_kept"], handle.stats["visual_tokens_in"]
        assert torch.equal(got, want), (family, preset)
        assert (kept < total) == (preset != "none")
    with pytest.raises(MmeffError, match="cuda_graphs needs the model on one CUDA device"):
        mmeff.wrap(split, "fastv-90", cuda_graphs=True)
    with mmeff.wrap(split, "none"):  # a refused wrap left nothing attached: the model wraps again
        pass


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_two_gpus_give_the_same_tokens_as_one(tiny_model_dir, family, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    path = tiny_model_dir(family)
    whole, processor = load_tiny(path)
    whole = whole.to("cuda:0")
    inputs = {k: v.to("cuda:0") for k, v in batch(processor, family).items()}
    split = load_split(path, "cuda:0", "cuda:1", tmp_path)
    assert {p.device.index for p in split.parameters()} == {0, 1}
    for preset in PRESETS:
        with mmeff.wrap(whole, preset):
            want = whole.generate(**inputs, **GEN).sequences
        with mmeff.wrap(split, preset):
            got = split.generate(**inputs, **GEN).sequences
        assert torch.equal(got, want), (family, preset)
