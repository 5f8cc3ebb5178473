"""Load a supported VLM and its processor from a model spec (what ``mmeff eval --model`` accepts).

Specs:
* a local directory with ``config.json`` (a transformers checkpoint or a :func:`build_tiny` folder);
* ``reference-llava`` / ``reference-qwen2vl``: the small reference models shipped in
  ``mmeff/reference/weights/{llava,qwen2vl}/``;
* ``tiny-<family>`` (``tiny-llava``, ``tiny-qwen2_vl``, ...): a tiny random model built once into
  ``$MMEFF_CACHE/models`` (default ``~/.cache/mmeff/models``), for tests and smoke runs;
* anything else of the form ``owner/name``: a hub id, passed to ``from_pretrained`` as is.

Weights are read with safetensors only. The Qwen processors need torchvision for their video processor;
without it the image-only subclasses of :mod:`mmeff_lab.models.factory` are used (same image/text path).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mmeff.errors import MmeffError, UnsupportedModelError
from mmeff.families import adapter_for
from mmeff_lab.models.factory import FAMILIES, Qwen2_5_VLProcessorNoVideo, Qwen2VLProcessorNoVideo, build_tiny

DEFAULT_MODEL = "reference-llava"
REFERENCE_MODELS = {"reference-llava": "llava", "reference-qwen2vl": "qwen2vl"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NO_VIDEO = {"qwen2_vl": Qwen2VLProcessorNoVideo, "qwen2_5_vl": Qwen2_5_VLProcessorNoVideo}


class ModelLoadError(MmeffError):
    """A model spec that names no loadable model; the message says which spec and why."""


def models_cache_dir() -> Path:
    root = os.environ.get("MMEFF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mmeff") / "models"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None``: float32 on CPU (bf16 matmuls are slow there), bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise MmeffError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> str:
    """``auto`` (CUDA where torch sees a device, else the CPU), ``cpu``, or ``cuda[:N]`` checked to exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise MmeffError(f"--device {device}: no usable CUDA device here; use --device cpu (or auto)")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise MmeffError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise MmeffError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def resolve_spec(spec: str) -> str | Path:
    """The local directory a spec names, or the spec itself when it is a hub id."""
    if spec in REFERENCE_MODELS:
        path = Path(str(resources.files("mmeff_lab.reference").joinpath("weights").joinpath(REFERENCE_MODELS[spec])))
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec}: the reference model is not installed ({path}/config.json is missing); "
                                 "pass --model with a local checkpoint or tiny-<family> instead")
        return path
    if spec.startswith("tiny-"):
        family = spec[len("tiny-"):]
        if family not in FAMILIES:
            raise ModelLoadError(f"{spec}: unknown tiny family {family!r}; expected tiny-<family> with family one "
                                 f"of {', '.join(FAMILIES)}")
        return ensure_tiny(family)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: no config.json; not a transformers model directory")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # hub id
    raise ModelLoadError(f"{spec}: no such directory, and not a hub id (owner/name), {', '.join(REFERENCE_MODELS)} "
                         f"or tiny-<family>")


def ensure_tiny(family: str, cache_dir: str | Path | None = None) -> Path:
    """The tiny random model of ``family`` in the cache, built on first use (safe when processes race)."""
    target = Path(cache_dir or models_cache_dir()) / f"tiny-{family}"
    if not (target / "config.json").is_file():
        try:
            build_tiny(family, target)
        except (FileExistsError, OSError):
            if not (target / "config.json").is_file():  # lost a race only if another process finished it
                raise
    return target


def _load_processor(source: str | Path, model_type: str | None) -> Any:
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if model_type in _NO_VIDEO and (not is_torchvision_available() or not _has_video_processor(source)):
        return _NO_VIDEO[model_type].from_pretrained(source)
    processor = AutoProcessor.from_pretrained(source)
    if not hasattr(processor, "image_processor"):  # AutoProcessor falls back to the bare tokenizer
        raise ModelLoadError(f"{source}: AutoProcessor gave a {type(processor).__name__}, not an image + text "
                             "processor (is the image processor config missing?)")
    return processor


def _has_video_processor(source: str | Path) -> bool:
    """Whether a local Qwen folder configures a video processor (the stock processor cannot be built without
    one: AutoProcessor then silently returns the tokenizer). Hub ids are assumed complete."""
    if not isinstance(source, Path):
        return True
    if (source / "video_preprocessor_config.json").is_file():
        return True
    config = source / "processor_config.json"
    return config.is_file() and "video_processor" in json.loads(config.read_text())


def load_model(spec: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
               attn_implementation: str = "sdpa") -> tuple[Any, Any, str]:
    """Load ``spec`` (see the module docstring) for inference: returns ``(model, processor, family)``."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar on every command says nothing a user needs

    source = resolve_spec(spec)
    torch_dtype = resolve_dtype(dtype, device)
    model_type = None
    if isinstance(source, Path):
        try:
            model_type = json.loads((source / "config.json").read_text())["model_type"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{source}/config.json: unreadable or without model_type ({e})") from e
    try:
        processor = _load_processor(source, model_type)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype, use_safetensors=True,
                                                            attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {spec!r} from {source}: {e}") from e
    model = model.to(device).eval()
    try:
        family = adapter_for(model).family
    except UnsupportedModelError as e:
        raise ModelLoadError(f"{spec}: {e}") from e
    return model, processor, family


__all__ = ["DEFAULT_MODEL", "DTYPES", "ModelLoadError", "ensure_tiny", "load_model", "models_cache_dir",
           "resolve_device", "resolve_dtype", "resolve_spec"]
