"""CLIPScore (Hessel et al., EMNLP 2021) of generated captions, with an open_clip model.

    CLIP-S(c, v) = w · max(cos(E_v, E_c), 0),   w = 2.5

as the reference implementation (jmhessel/clipscore) computes it: the caption is prefixed with the paper's
prompt ``"A photo depicts "`` and tokenised with CLIP's BPE tokenizer truncated to the model's context
(77 tokens: start, the first 75 tokens, end — ``clip.tokenize(..., truncate=True)``, which open_clip's
tokenizer does the same way), so a long caption is scored on its opening only; image and text embeddings are
L2-normalised, their dot product clamped at 0 and multiplied by w. Images go through the model's own
evaluation transform (for CLIP: bicubic resize of the short side, centre crop, RGB, CLIP mean/std). Computed in
float32 on every device (the paper's numbers came from a float16 GPU model; the difference is ~1e-4).

The model: ``MODEL[:PRETRAINED]`` (``--clipscore``), where MODEL is an open_clip model name (``ViT-B-32``), the
path of a model config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``, registered under its file stem),
or ``local-dir:PATH`` (a folder with ``open_clip_config.json`` and the weights); PRETRAINED is a local
checkpoint file (``.pt``/``.bin``/``.safetensors``) or an open_clip pretrained tag (``openai``,
``laion2b_s34b_b79k``, ...), which is downloaded from the Hugging Face hub unless already in its cache.
Random weights are refused: a model needs PRETRAINED (or ``local-dir:``).

open_clip is an optional dependency (``pip install "mmeff[clip]"``), imported only here and only when used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmeff.errors import MmeffError

W = 2.5  # Hessel et al.: rescales the typical cosine range to roughly [0, 1]
PREFIX = "A photo depicts "  # the paper's prompt; the reference appends the space when missing
INSTALL_HINT = 'pip install "mmeff[clip]"'
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


class ClipScoreError(MmeffError):
    """A CLIPScore model that cannot be loaded or used (missing package, bad spec, weights unavailable)."""


def import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise ClipScoreError(f"CLIPScore needs the open_clip package (open-clip-torch): {INSTALL_HINT} ({e})") from None
    except Exception as e:  # e.g. a torchvision built for another torch fails at import
        raise ClipScoreError(f"open_clip is installed but does not import ({type(e).__name__}: {e}); "
                             f"reinstall it with {INSTALL_HINT}") from None
    return open_clip


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """open_clip and the hub client log failures at ERROR on the root logger before raising; the raised error
    is reported instead, as one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``MODEL[:PRETRAINED]`` -> (model, pretrained); ``local-dir:``/``hf-hub:`` models keep their colon."""
    spec = spec.strip()
    if not spec:
        raise ClipScoreError("--clipscore needs MODEL[:PRETRAINED], e.g. ViT-B-32:/path/to/weights.pt")
    if spec.startswith(("local-dir:", "hf-hub:")):
        return spec, None
    model, _, pretrained = spec.partition(":")
    return model, pretrained or None


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _tag_cached(pretrained_cfg: dict[str, Any], cache_dir: str | None) -> bool:
    """Whether the weights of a pretrained tag are already on disk (hub cache), so no download is needed."""
    hub = pretrained_cfg.get("hf_hub", "")
    if not hub:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in names)


def _resolve(spec: str, open_clip: Any, cache_dir: str | None) -> tuple[str, str | None, str]:
    """(open_clip model name, pretrained argument, what the weights are) for a spec; every input problem is
    one ClipScoreError here, before anything is built."""
    model, pretrained = parse_spec(spec)
    if model.startswith("hf-hub:"):
        if _offline():
            raise ClipScoreError(f"--clipscore {spec}: hf-hub models are downloaded from the Hugging Face hub, "
                                 "which is offline (HF_HUB_OFFLINE); give a local checkpoint: "
                                 "--clipscore MODEL:/path/to/weights.pt or local-dir:PATH")
        return model, None, model
    if model.startswith("local-dir:"):
        folder = Path(model.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ClipScoreError(f"--clipscore {spec}: {folder} has no open_clip_config.json")
        if not any(any(folder.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):  # open_clip looks there
            raise ClipScoreError(f"--clipscore {spec}: {folder} holds no weights (*.safetensors, *.bin, *.pth); "
                                 "random weights score nothing")
        return model, None, str(folder)
    if model.endswith(".json"):
        path = Path(model).expanduser()
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClipScoreError(f"--clipscore {spec}: model config {path} not found") from None
        except (OSError, ValueError) as e:
            raise ClipScoreError(f"--clipscore {spec}: model config {path} is not readable JSON ({e})") from None
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ClipScoreError(f"--clipscore {spec}: {path} is not an open_clip model config "
                                 "(needs embed_dim, vision_cfg, text_cfg)")
        open_clip.add_model_config(path)  # registered under the file stem, as open_clip names config files
        name = path.stem
    else:
        name = model.replace("/", "-")  # open_clip's own normalisation (ViT-B/32 -> ViT-B-32)
        if name not in open_clip.list_models():
            raise ClipScoreError(f"--clipscore {spec}: unknown open_clip model {model!r} (open_clip.list_models() "
                                 "names them, e.g. ViT-B-32, ViT-L-14; or give a model config .json)")
    tags = open_clip.list_pretrained_tags_by_model(name)
    shown = ", ".join(tags[:8]) + (", ..." if len(tags) > 8 else "") if tags else "none known"
    if pretrained is None:
        raise ClipScoreError(f"--clipscore {spec}: no weights given (random weights score nothing); use "
                             f"{model}:PRETRAINED with a local checkpoint file or a pretrained tag ({shown})")
    path = Path(pretrained).expanduser()
    if path.is_file():
        return name, str(path), str(path)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        if _offline() and not _tag_cached(tag_cfg, cache_dir):
            raise ClipScoreError(f"--clipscore {spec}: the weights of pretrained tag {pretrained!r} are not in the "
                                 "Hugging Face cache and the hub is offline (HF_HUB_OFFLINE); download them where "
                                 f"there is a network, or give a local checkpoint file: --clipscore {model}:PATH")
        return name, pretrained, f"pretrained tag {pretrained}"
    if path.is_dir():
        raise ClipScoreError(f"--clipscore {spec}: {path} is a folder; give the checkpoint file in it, or "
                             "local-dir:FOLDER for a folder with open_clip_config.json")
    if path.suffix in CHECKPOINT_SUFFIXES or os.sep in pretrained:
        raise ClipScoreError(f"--clipscore {spec}: checkpoint file {path} not found")
    raise ClipScoreError(f"--clipscore {spec}: {pretrained!r} is neither a checkpoint file nor a pretrained tag of "
                         f"{name} ({shown})")


@dataclass
class ClipScorer:
    """An open_clip model with its evaluation transform and tokenizer; :meth:`score` gives per-caption CLIP-S."""

    spec: str
    model: Any
    preprocess: Any
    tokenizer: Any
    weights: str
    context_length: int
    device: str = "cpu"
    _image_cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to(self, device: str) -> ClipScorer:
        self.model.to(device)
        self.device = device
        return self

    def describe(self) -> dict[str, Any]:
        """What results.json records about the metric."""
        return {"model": self.spec, "weights": self.weights, "w": W, "prefix": PREFIX,
                "context_length": self.context_length, "dtype": "float32"}

    @torch.no_grad()
    def image_features(self, images: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
        """Unnormalised float32 image embeddings, one row per image (cached by path across calls)."""
        from PIL import Image

        keys = [str(p) for p in images]
        todo = list(dict.fromkeys(k for k in keys if k not in self._image_cache))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            pixels = []
            for path in chunk:
                with Image.open(path) as im:  # the transform converts to RGB after the crop, as the reference
                    pixels.append(self.preprocess(im))
            feats = self.model.encode_image(torch.stack(pixels).to(self.device, torch.float32))
            for key, row in zip(chunk, feats.float().cpu().numpy()):
                self._image_cache[key] = row
        return np.stack([self._image_cache[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)

    @torch.no_grad()
    def text_features(self, captions: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unnormalised float32 embeddings of ``PREFIX + caption`` (truncated to the context, as the reference)."""
        out = []
        for i in range(0, len(captions), batch_size):
            tokens = self.tokenizer([PREFIX + c for c in captions[i:i + batch_size]])
            out.append(self.model.encode_text(tokens.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def score(self, images: Sequence[str | Path], captions: Sequence[str], batch_size: int = 32,
              progress: Any = None, description: str = "CLIP-S") -> list[float]:
        """Per-caption CLIP-S of ``captions[i]`` on ``images[i]``; ``progress`` (a rich Progress) shows a bar."""
        if len(images) != len(captions):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        bar = progress.add_task(description, total=len(captions)) if progress is not None else None
        scores: list[float] = []
        for i in range(0, len(captions), batch_size):
            img = self.image_features(images[i:i + batch_size], batch_size).astype(np.float64)
            txt = self.text_features(captions[i:i + batch_size], batch_size).astype(np.float64)
            scores += clip_s(img, txt).tolist()
            if bar is not None:
                progress.update(bar, advance=len(txt))
        return scores


def clip_s(image_features: np.ndarray, text_features: np.ndarray, w: float = W) -> np.ndarray:
    """w · max(cos, 0) row by row (features L2-normalised here, as the reference does)."""
    img = image_features / np.sqrt((image_features ** 2).sum(axis=1, keepdims=True))
    txt = text_features / np.sqrt((text_features ** 2).sum(axis=1, keepdims=True))
    return w * np.clip((img * txt).sum(axis=1), 0, None)


def load_scorer(spec: str, device: str = "cpu", cache_dir: str | None = None) -> ClipScorer:
    """The open_clip model of ``MODEL[:PRETRAINED]`` in float32 on ``device``, in eval mode; every failure is a
    one-line :class:`ClipScoreError` naming the problem."""
    open_clip = import_open_clip()
    name, pretrained, weights = _resolve(spec, open_clip, cache_dir)
    try:
        with _quiet():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, precision="fp32", device="cpu", cache_dir=cache_dir,
                pretrained_text=False)
    except Exception as e:  # open_clip raises RuntimeError / ValueError / OSError from several layers
        reason = " ".join(str(e).split())[:300]
        if pretrained is not None and not Path(pretrained).is_file():
            raise ClipScoreError(f"--clipscore {spec}: cannot get the weights of pretrained tag {pretrained!r} "
                                 f"(downloaded from the Hugging Face hub; no network?): {reason}; give a local "
                                 f"checkpoint file instead: --clipscore {name}:PATH") from None
        raise ClipScoreError(f"--clipscore {spec}: cannot load {weights} into open_clip model {name} "
                             f"({type(e).__name__}: {reason})") from None
    try:
        with _quiet():
            tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:
        raise ClipScoreError(f"--clipscore {spec}: cannot build the tokenizer of {name} ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]})") from None
    model.eval()
    context = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77))
    return ClipScorer(spec, model, preprocess, tokenizer, weights, context).to(device)


def score_sample_logs(scorer: ClipScorer, presets: Sequence[str], samples: Sequence[Any], output: Path,
                      read_log: Callable[[Path], dict[str, dict[str, Any]]], progress: Any = None) -> None:
    """``mmeff eval --clipscore``: add ``"clip_s"`` to every record of ``samples/<preset>/chair.jsonl`` that lacks
    it (the caption = the record's answer, the image = its sample's), each log rewritten atomically, so a run
    killed while scoring continues with ``--resume``. Image embeddings are computed once for all presets.
    ``read_log``: the runner's sample-log reader (records by id, in file order)."""
    from mmeff.io import atomic_write_text

    from .results import log_path

    images = {s.id: s.image for s in samples}
    for preset in presets:
        path = log_path(output, preset, "chair")
        records = read_log(path)
        todo = [r for r in records.values() if "clip_s" not in r]
        if not todo:
            continue
        scores = scorer.score([images[r["id"]] for r in todo], [r["answer"] for r in todo], progress=progress,
                              description=f"{preset} / chair CLIP-S")
        for r, value in zip(todo, scores):
            r["clip_s"] = value
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records.values()))


__all__ = ["PREFIX", "ClipScoreError", "ClipScorer", "W", "clip_s", "import_open_clip", "load_scorer", "parse_spec",
           "score_sample_logs"]
