"""Training of the reference VLMs: pre-rendered scenes, processor-exact GPU preprocessing, resumable loop.

Data: scenes from ``TRAIN_SEEDS`` are rendered in parallel processes (JPEG round trip, as the benchmark images
are JPEGs) into one uint8 array that lives in GPU memory; every scene contributes ``draws`` independent sets
of ``training_examples`` (captions, existence with uniform negatives, count, colour, position). The loss
covers answer tokens (and their end-of-turn token) only.

GPU preprocessing reproduces the saved processor bit for bit: normalisation is elementwise on uint8 pixels, so
a lookup table of the 3 x 256 values *computed by the processor itself* (:func:`pixel_lut`) followed by the
same patch layout gives identical tensors (``tests/test_reference_models.py`` checks this on CPU).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmeff.engine.cache import cache_kwarg
from mmeff.io import atomic_write_text

from .model import IMAGE_SIZE, NUM_VISUAL_TOKENS, TOKEN_GRID, answer_text, build_model, chat_prompt, save_reference
from .scenes import DEFAULT_GLYPHS, Scene, make_scene, render
from .synthetic import JPEG_QUALITY, TRAIN_SEEDS
from .text import training_examples
from .vocab import CATEGORIES

__all__ = ["Examples", "TrainConfig", "batch_inputs", "encode_examples", "gpu_pixel_inputs", "pixel_lut",
           "prepare_data", "render_scene", "train"]


# ---------------------------------------------------------------- data


def patch_labels(scene: Scene, grid: int = TOKEN_GRID) -> np.ndarray:
    """(grid, grid) uint8: per visual-token cell, 1 + the category index of the top-most object whose box holds
    the cell centre, 0 for background (objects are drawn in order, later ones on top). Targets of the optional
    auxiliary vision loss."""
    labels = np.zeros((grid, grid), dtype=np.uint8)
    centre = (np.arange(grid) + 0.5) / grid
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        rows = (centre >= y0) & (centre <= y1)
        cols = (centre >= x0) & (centre <= x1)
        inside = rows[:, None] & cols[None, :]
        labels[inside] = CATEGORIES.index(obj.category) + 1
    return labels


def render_scene(seed: int, draws: int = 2, text: dict | None = None, glyphs: str = DEFAULT_GLYPHS
                 ) -> tuple[np.ndarray, list[list[tuple[str, str]]], np.ndarray]:
    """(H, W, 3) uint8 pixels of the scene after a JPEG round trip, ``draws`` sets of (question, answer), and the
    scene's per-cell category labels (:func:`patch_labels`); ``text``: keyword arguments of
    :func:`training_examples`; ``glyphs``: the glyph style."""
    scene = make_scene(seed, glyphs)
    buf = io.BytesIO()
    render(scene, IMAGE_SIZE).save(buf, format="JPEG", quality=JPEG_QUALITY)
    pixels = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    qa = [training_examples(scene, np.random.default_rng([seed, 23, d]), **(text or {})) for d in range(draws)]
    return pixels, qa, patch_labels(scene)


def _render_star(args: tuple[int, int, dict, str]) -> tuple[np.ndarray, list[list[tuple[str, str]]], np.ndarray]:
    return render_scene(*args)


def prepare_data(out_dir: str | Path, n_images: int, *, draws: int = 2, workers: int = 16,
                 first_seed: int = 0, p_halluc: float = 0.15, balanced_sides: bool = False,
                 inline_halluc: bool = False, glyphs: str = DEFAULT_GLYPHS) -> Path:
    """Render ``n_images`` training scenes into ``out_dir/images.npy`` + ``texts.json`` (skipped if present);
    ``p_halluc``, ``balanced_sides`` and ``inline_halluc`` go to :func:`training_examples`; ``glyphs``: the glyph
    style of the scenes."""
    out = Path(out_dir)
    text = {"p_halluc": p_halluc, "balanced_sides": balanced_sides, "inline_halluc": inline_halluc}
    meta = {"n_images": n_images, "draws": draws, "first_seed": first_seed, "image_size": IMAGE_SIZE, "labels": 1,
            **text, "glyphs": glyphs}
    if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()) == meta:
        return out
    if first_seed < TRAIN_SEEDS.start or first_seed + n_images > TRAIN_SEEDS.stop:
        raise ValueError(f"seeds [{first_seed}, {first_seed + n_images}) leave TRAIN_SEEDS {TRAIN_SEEDS}")
    out.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(out / "images.tmp.npy", mode="w+", dtype=np.uint8,
                                       shape=(n_images, IMAGE_SIZE, IMAGE_SIZE, 3))
    texts: list[list[list[tuple[str, str]]]] = []
    labels = np.zeros((n_images, TOKEN_GRID, TOKEN_GRID), dtype=np.uint8)
    jobs = [(first_seed + i, draws, text, glyphs) for i in range(n_images)]
    with get_context("fork").Pool(workers) as pool:
        for i, (pix, qa, lab) in enumerate(pool.imap(_render_star, jobs, chunksize=64)):
            images[i] = pix
            texts.append(qa)
            labels[i] = lab
    images.flush()
    del images
    os.replace(out / "images.tmp.npy", out / "images.npy")
    np.save(out / "labels.npy", labels)
    _write_json(out / "texts.json", texts)
    _write_json(out / "meta.json", meta)
    return out


def _write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj))


@dataclass
class Examples:
    """Tokenised single-turn examples, right-padded: ``tokens[i, :length[i]]`` holds prompt + answer + EOS
    with ONE image placeholder at ``image_pos``; answer tokens start at ``answer_start[i]``."""

    tokens: torch.Tensor  # (E, L) int64
    length: torch.Tensor  # (E,)
    answer_start: torch.Tensor  # (E,)
    image: torch.Tensor  # (E,) index into the image array
    image_pos: int
    pad_id: int
    image_token_id: int


def encode_examples(arch: str, tokenizer, texts: list[list[list[tuple[str, str]]]]) -> Examples:
    """Tokenise every (question, answer) of every draw of every image exactly as the processor would."""
    prompts, answers, image_idx = [], [], []
    for i, draws in enumerate(texts):
        for qa in draws:
            for q, a in qa:
                prompts.append(chat_prompt(arch, q))
                answers.append(answer_text(arch, a))
                image_idx.append(i)
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    image_token_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    rows = [p + a + [eos] for p, a in zip(p_ids, a_ids)]
    unk = tokenizer.unk_token_id
    bad = next((i for i, r in enumerate(rows) if unk in r), None)
    if bad is not None:
        raise ValueError(f"training text has a word outside the tokenizer's vocabulary: {prompts[bad]!r} -> "
                         f"{answers[bad]!r}")
    pos = {r.index(image_token_id) for r in p_ids}
    if len(pos) != 1:
        raise ValueError(f"{arch}: the image placeholder is not at one fixed position ({sorted(pos)[:5]})")
    lengths = np.array([len(r) for r in rows])
    tokens = np.full((len(rows), int(lengths.max())), tokenizer.pad_token_id, dtype=np.int64)
    tokens[np.arange(tokens.shape[1])[None, :] < lengths[:, None]] = np.fromiter(
        (t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))  # row-major fill = row order
    return Examples(torch.from_numpy(tokens), torch.from_numpy(lengths), torch.tensor([len(p) for p in p_ids]),
                    torch.tensor(image_idx), pos.pop(), tokenizer.pad_token_id, image_token_id)


def batch_inputs(ex: Examples, idx: torch.Tensor, arch: str) -> dict[str, torch.Tensor]:
    """input_ids (image placeholder expanded to 256 tokens, as the processor does), attention_mask, labels
    (and Qwen's mm_token_type_ids: 1 on image tokens)."""
    n_extra = NUM_VISUAL_TOKENS - 1
    length = ex.length[idx]
    width = int(length.max())
    tok = ex.tokens[idx, :width]
    b = tok.shape[0]
    p = ex.image_pos
    img = torch.full((b, NUM_VISUAL_TOKENS), ex.image_token_id, dtype=tok.dtype, device=tok.device)
    input_ids = torch.cat([tok[:, :p], img, tok[:, p + 1:]], dim=1)
    pos = torch.arange(input_ids.shape[1], device=tok.device)[None]
    attention_mask = (pos < (length[:, None] + n_extra)).long()
    is_answer = (pos >= (ex.answer_start[idx][:, None] + n_extra)) & attention_mask.bool()
    labels = torch.where(is_answer, input_ids, torch.full_like(input_ids, -100))
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if arch == "qwen2vl":
        out["mm_token_type_ids"] = (input_ids == ex.image_token_id).long()
    return out


# ---------------------------------------------------------------- processor-exact pixel preprocessing


def _patchify_qwen(x: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * gh * gw, C * temporal * patch * patch) in Qwen2-VL's merge-friendly order."""
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x[:, None].expand(b, temporal, c, h, w)  # a still image is repeated over the temporal patch
    x = x.reshape(b, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def _layout(processor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Arrange per-pixel values (B, C, H, W) the way the processor lays out ``pixel_values``."""
    ip = processor.image_processor
    if not hasattr(ip, "merge_size"):  # CLIP: plain (B, C, H, W)
        return {"pixel_values": x}
    b, _, h, w = x.shape
    grid = torch.tensor([[1, h // ip.patch_size, w // ip.patch_size]] * b, device=x.device)
    return {"pixel_values": _patchify_qwen(x, ip.patch_size, ip.merge_size, ip.temporal_patch_size),
            "image_grid_thw": grid}


def pixel_lut(processor) -> torch.Tensor:
    """(3, 256) float32: the processor's output value for each channel and uint8 input value.

    Computed by running the processor on an image that holds every value in every channel, and checked to
    be a function of (channel, value) alone, i.e. that the preprocessing is elementwise.
    """
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    img = np.stack([(yy * IMAGE_SIZE + xx + 85 * c) % 256 for c in range(3)], axis=-1).astype(np.uint8)
    out = processor.image_processor(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]
    keys = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)[None])).long()
    keys = keys + 256 * torch.arange(3)[None, :, None, None]
    keys = _layout(processor, keys)["pixel_values"]
    if keys.shape != out.shape:
        raise RuntimeError(f"processor output shape {tuple(out.shape)} != expected layout {tuple(keys.shape)}")
    lut = torch.full((3 * 256,), float("nan"), dtype=torch.float32)
    lut[keys.reshape(-1)] = out.reshape(-1).float()
    if torch.isnan(lut).any() or not torch.equal(lut[keys], out.float()):
        raise RuntimeError("image preprocessing is not elementwise per (channel, value); the LUT would differ")
    return lut.reshape(3, 256)


def gpu_pixel_inputs(processor_lut: torch.Tensor, processor, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model image inputs for uint8 ``images`` (B, H, W, 3) of IMAGE_SIZE, on their device."""
    if images.dtype != torch.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected uint8 (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) images, got {images.dtype} "
                         f"{tuple(images.shape)}")
    lut = processor_lut.to(images.device)
    idx = images.permute(0, 3, 1, 2).long() + 256 * torch.arange(3, device=images.device)[None, :, None, None]
    return _layout(processor, lut.reshape(-1)[idx])


# ---------------------------------------------------------------- training loop


@dataclass
class TrainConfig:
    arch: str
    data_dir: str
    out_dir: str
    minutes: float = 8.0  # wall budget of this command (training stops in time to save)
    total_minutes: float = 8.0  # training time of the whole schedule (over all resumed commands)
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 300
    weight_decay: float = 0.05
    min_lr_ratio: float = 0.05
    seed: int = 0
    checkpoint_every_s: float = 120.0
    log_every: int = 25
    device: str = "cuda"
    init_from: str = ""  # a saved model folder to start from (continue training with a fresh optimiser)
    init_skip: str = ""  # regex: parameters of init_from NOT copied (e.g. the decoder layers of a resized model)
    text_overrides: dict[str, object] = field(default_factory=dict)  # decoder sizes (build_model)
    # auxiliary vision loss: per visual token, predict the category under it (patch_labels) from the projected
    # features through a throw-away linear head, weighted ``aux_weight`` for the first ``aux_minutes`` of training
    aux_weight: float = 0.0
    aux_minutes: float = 0.0
    probe_scenes: int = 64  # validation scenes of the existence-accuracy probe printed at checkpoints
    extra: dict[str, object] = field(default_factory=dict)


def _lr(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay over *training time* (steps per second are unknown in advance)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _batches(n: int, batch: int, gen: torch.Generator, device: str) -> Iterator[torch.Tensor]:
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch].to(device)


class _QwenTrainingSpeedups:
    """Training-time shortcuts for the Qwen2-VL class, where every image has the same size.

    transformers runs the Qwen2-VL vision attention once per image (a Python loop over ``cu_seqlens``) unless
    flash-attention is installed, and recomputes the M-RoPE position ids per sample on every step. With equal
    images both are wasteful: the attention becomes ONE batched SDPA call (block-diagonal = per-image batch), and
    the 3-D position ids (image at a fixed position, text after it) are computed once by the model's own
    ``compute_3d_position_ids`` and sliced per batch. Outputs equal the stock path (tested on CPU).
    """

    def __init__(self, model: torch.nn.Module, ex: Examples, processor) -> None:
        from transformers.models.qwen2_vl import modeling_qwen2_vl as mq

        ip = processor.image_processor
        self.patches = (IMAGE_SIZE // ip.patch_size) ** 2
        self._rotary = mq.apply_rotary_pos_emb_vision
        for block in model.model.visual.blocks:
            block.attn.forward = self._batched(block.attn, block.attn.forward)
        # position ids of the widest possible row, all tokens valid: every row shares its prefix
        width = int(ex.length.max()) + NUM_VISUAL_TOKENS - 1
        row = batch_inputs(ex, torch.argmax(ex.length)[None], "qwen2vl")
        assert row["input_ids"].shape[1] == width
        grid = torch.tensor([[1, IMAGE_SIZE // ip.patch_size, IMAGE_SIZE // ip.patch_size]], device=ex.tokens.device)
        with torch.no_grad():
            pos = model.model.compute_3d_position_ids(
                input_ids=row["input_ids"], image_grid_thw=grid, video_grid_thw=None, inputs_embeds=None,
                attention_mask=torch.ones_like(row["input_ids"]),
                **{cache_kwarg(model.model.compute_3d_position_ids): None},
                mm_token_type_ids=row["mm_token_type_ids"])
        self.position_ids = pos  # (rows, 1, width)

    def position_ids_for(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, w = input_ids.shape
        return self.position_ids[..., :w].expand(*self.position_ids.shape[:-2], b, w)

    def _batched(self, attn: torch.nn.Module, stock):
        def forward(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
            n = hidden_states.shape[0]
            if n % self.patches or position_embeddings is None:
                return stock(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
            q, k, v = attn.qkv(hidden_states).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = self._rotary(q, k, *position_embeddings)
            q, k, v = (t.reshape(n // self.patches, self.patches, attn.num_heads, -1).transpose(1, 2)
                       for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
            return attn.proj(out.transpose(1, 2).reshape(n, -1))
        return forward


class _ExistenceProbe:
    """First-answer-token accuracy on existence questions ("Is there a ...?", half yes) about validation scenes:
    a cheap progress signal printed at every checkpoint. The scenes come from the end of ``TRAIN_SEEDS``, which
    no training run renders, and never from the benchmarks' held-out seeds."""

    def __init__(self, arch: str, processor, lut: torch.Tensor, device: str, glyphs: str, n_scenes: int = 64
                 ) -> None:
        first = TRAIN_SEEDS.stop - n_scenes
        scenes = [render_scene(first + i, draws=1, glyphs=glyphs) for i in range(n_scenes)]
        texts = [[[qa for qa in s[1][0] if qa[0].startswith("Is there a") and "only one" not in qa[0]]]
                 for s in scenes]
        ex = encode_examples(arch, processor.tokenizer, texts)
        self.arch = arch
        self.ex = Examples(*(getattr(ex, k).to(device) for k in ("tokens", "length", "answer_start", "image")),
                           ex.image_pos, ex.pad_id, ex.image_token_id)
        self.images = torch.from_numpy(np.stack([s[0] for s in scenes])).to(device)
        self.processor, self.lut = processor, lut

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module, fast: _QwenTrainingSpeedups | None = None) -> float:
        was_training = model.training
        model.eval()
        idx = torch.arange(len(self.ex.length), device=self.ex.tokens.device)
        inputs = batch_inputs(self.ex, idx, self.arch)
        pix = gpu_pixel_inputs(self.lut, self.processor, self.images[self.ex.image])
        if fast is not None:
            inputs["position_ids"] = fast.position_ids_for(inputs["input_ids"])
        inputs.pop("labels")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.ex.tokens.is_cuda):
            logits = model(**inputs, **pix).logits
        at = self.ex.answer_start + NUM_VISUAL_TOKENS - 1  # first answer token, in expanded coordinates
        pred = logits[idx, at - 1].argmax(-1)
        model.train(was_training)
        return float((pred == inputs["input_ids"][idx, at]).float().mean())


class _AuxVisionLoss:
    """Cross-entropy of a throw-away linear head on the projected visual tokens against :func:`patch_labels`
    (object cells only): a direct training signal for the vision tower, which the language loss alone reaches
    only once the model has learnt to look. The features are caught by a hook on the projector's output."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, data: Path) -> None:
        if not (data / "labels.npy").is_file():
            raise ValueError(f"{data}: no labels.npy for the auxiliary vision loss; re-run --prepare")
        self.labels = torch.from_numpy(np.load(data / "labels.npy")).long().to(cfg.device)
        base = model.model
        projector = base.multi_modal_projector if hasattr(base, "multi_modal_projector") else base.visual.merger
        self.feats: torch.Tensor | None = None
        projector.register_forward_hook(lambda module, args, out: setattr(self, "feats", out))
        width = model.config.text_config.hidden_size
        self.head = torch.nn.Linear(width, len(CATEGORIES) + 1).to(cfg.device)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.feats.reshape(images.shape[0], NUM_VISUAL_TOKENS, -1)
        target = self.labels[images].reshape(images.shape[0], -1)
        target = torch.where(target > 0, target, torch.full_like(target, -100))
        # normalised: the projector's outputs are large at the start, and raw logits would swamp the language loss
        logits = self.head(torch.nn.functional.layer_norm(feats.float(), feats.shape[-1:]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)


def init_from(model: torch.nn.Module, folder: str | Path, skip: str = "") -> None:
    """Copy the parameters of a saved model into ``model``: every one not matching the ``skip`` regex must exist
    with the same shape (a resized model names what it re-initialises in ``skip``)."""
    src = type(model).from_pretrained(folder, dtype=torch.float32).state_dict()
    dst = model.state_dict()
    pattern = re.compile(skip) if skip else None
    keep = {k: v for k, v in src.items() if not (pattern and pattern.search(k))}
    bad = [k for k, v in keep.items() if k not in dst or dst[k].shape != v.shape]
    if bad:
        raise ValueError(f"{folder}: {len(bad)} parameters do not fit the model (first: {bad[0]}); "
                         "name them in init_skip to re-initialise them")
    model.load_state_dict(keep, strict=False)
    print(f"initialised {len(keep)} of {len(dst)} tensors from {folder}", flush=True)


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train (or resume) one reference model; writes ``out_dir/{checkpoint.pt,train_log.jsonl,model/}``."""
    t_start = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.pt", out / "train_log.jsonl"
    torch.manual_seed(cfg.seed)
    model, processor = build_model(cfg.arch, seed=cfg.seed, text_overrides=cfg.text_overrides or None)
    if cfg.init_from and not (resume and ckpt_path.is_file()):
        init_from(model, cfg.init_from, cfg.init_skip)
    data = Path(cfg.data_dir)
    images = torch.from_numpy(np.load(data / "images.npy")).to(cfg.device)
    ex = encode_examples(cfg.arch, processor.tokenizer, json.loads((data / "texts.json").read_text()))
    ex = Examples(*(getattr(ex, k).to(cfg.device) for k in ("tokens", "length", "answer_start", "image")),
                  ex.image_pos, ex.pad_id, ex.image_token_id)
    lut = pixel_lut(processor).to(cfg.device)
    model.to(cfg.device).train()
    aux = _AuxVisionLoss(model, cfg, data) if cfg.aux_weight > 0 else None
    fast = _QwenTrainingSpeedups(model, ex, processor) if cfg.arch == "qwen2vl" else None
    glyphs = json.loads((data / "meta.json").read_text()).get("glyphs", "v1")  # data rendered before styles: v1
    probe = _ExistenceProbe(cfg.arch, processor, lut, cfg.device, glyphs, cfg.probe_scenes)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if aux is not None:
        groups.append({"params": list(aux.head.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=cfg.device.startswith("cuda"))
    step, trained_s = 0, 0.0
    gen = torch.Generator().manual_seed(cfg.seed)
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=cfg.device, weights_only=False)
        model.load_state_dict(state["model"])
        if aux is not None and "aux_head" in state:
            aux.head.load_state_dict(state["aux_head"])
        opt.load_state_dict(state["optim"])
        step, trained_s = state["step"], state["trained_s"]
        gen.set_state(state["gen"].cpu())
    elif log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log
    print(f"[{cfg.arch}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(ex.length)} "
          f"examples on {images.shape[0]} images, setup {time.time() - t_start:.1f}s, step {step}", flush=True)

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "trained_s": trained_s,
                    "gen": gen.get_state(), "config": cfg.__dict__,
                    **({"aux_head": aux.head.state_dict()} if aux is not None else {})}, tmp)
        os.replace(tmp, ckpt_path)

    use_amp = cfg.device.startswith("cuda")
    deadline = t_start + cfg.minutes * 60 - 25  # leave time to save
    last_ckpt, running, aux_running, t_seg, lr = time.time(), 0.0, 0.0, time.time(), 0.0
    batches = _batches(len(ex.length), cfg.batch_size, gen, cfg.device)
    with open(log_path, "a") as log:
        while time.time() < deadline and trained_s < cfg.total_minutes * 60:
            idx = next(batches)
            inputs = batch_inputs(ex, idx, cfg.arch)
            pix = gpu_pixel_inputs(lut, processor, images[ex.image[idx]])
            if fast is not None:
                inputs["position_ids"] = fast.position_ids_for(inputs["input_ids"])
            lr = _lr(cfg, step, trained_s / (cfg.total_minutes * 60))
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = model(**inputs, **pix).loss
                if aux is not None and (cfg.aux_minutes <= 0 or trained_s < cfg.aux_minutes * 60):
                    aux_loss = aux.loss(ex.image[idx])
                    aux_running += aux_loss.detach()
                    loss = loss + cfg.aux_weight * aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            running += loss.detach()
            if step % cfg.log_every == 0:
                now = time.time()
                trained_s += now - t_seg
                t_seg = now
                rec = {"step": step, "loss": float(running) / cfg.log_every, "lr": lr, "time": round(trained_s, 2)}
                if aux is not None:
                    rec["aux_loss"] = float(aux_running) / cfg.log_every
                running, aux_running = 0.0, 0.0
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if step % (cfg.log_every * 20) == 0:
                    print(f"[{cfg.arch}] {rec}", flush=True)
                if now - last_ckpt > cfg.checkpoint_every_s:
                    print(f"[{cfg.arch}] step {step}: validation existence accuracy "
                          f"{probe.accuracy(model, fast):.3f}", flush=True)
                    save_checkpoint()
                    last_ckpt = now
        trained_s += time.time() - t_seg
        if step % cfg.log_every:
            n = step % cfg.log_every
            log.write(json.dumps({"step": step, "loss": float(running) / n, "lr": lr, "time": round(trained_s, 2)})
                      + "\n")
    save_checkpoint()
    print(f"[{cfg.arch}] step {step}: validation existence accuracy {probe.accuracy(model, fast):.3f}", flush=True)
    model.eval()
    final = save_reference(model, processor, out / "model")
    print(f"[{cfg.arch}] saved {final} after {step} steps, {trained_s / 60:.1f} min of training", flush=True)
    return final
