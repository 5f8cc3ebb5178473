"""The two shipped reference VLMs: builders, offline word-level tokenizers, processors, save and load.

Both are stock transformers classes, so everything that works on a hub checkpoint works on them:

* ``llava``: ``LlavaForConditionalGeneration`` = CLIP vision tower (224 px, patch 14, 4 x 192) + LLaVA-1.5
  two-layer GELU projector + Llama decoder (6 x 256); the "default" feature strategy drops CLS, giving
  16 x 16 = 256 visual tokens. LLaVA-1.5 chat format ``USER: <image>\\n... ASSISTANT:``.
* ``qwen2vl``: ``Qwen2VLForConditionalGeneration`` = Qwen2-VL vision tower (patch 7, 2x2 merge, 4 x 192) +
  Qwen2 decoder with M-RoPE (6 x 256). Images are fixed at 224 x 224 (min_pixels = max_pixels), i.e. a
  32 x 32 patch grid merged to 16 x 16 = 256 visual tokens: the same token grid as the LLaVA model, at the
  resolution of the shipped benchmark images (no resampling). Qwen ChatML with the default system prompt.

The tokenizer is word-level (``tokenizers`` WordLevel): a word keeps its leading space (" cup" and "cup"
are different tokens, like GPT-2 pieces) and the decoder fuses pieces, so decoding reproduces the text
exactly. Its vocabulary is every piece of our corpus: the reference training text, the benchmark prompts
and the chat templates.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from mmeff_lab.models.templates import LLAVA_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE

from ..models.factory import Qwen2VLProcessorNoVideo
from .scenes import make_scene
from .synthetic import MME_SUFFIX, POPE_TEMPLATE, TRAIN_SEEDS
from .text import CAPTION_PROMPTS, SHORT_PROMPTS, YES_NO_SUFFIXES, training_examples
from .vocab import CATEGORIES, COLORS, NUMBER_WORDS, article, plural

__all__ = [
    "ARCHS",
    "BENCHMARK_PROMPTS",
    "IMAGE_SIZE",
    "NUM_VISUAL_TOKENS",
    "TOKEN_GRID",
    "answer_text",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "chat_prompt",
    "load_reference",
    "object_attention_ratio",
    "object_token_mask",
    "reference_dir",
    "save_reference",
]

ARCHS: tuple[str, ...] = ("llava", "qwen2vl")
IMAGE_SIZE = 224
TOKEN_GRID = 16  # both models: a 16 x 16 grid of visual tokens, each covering 14 x 14 pixels
NUM_VISUAL_TOKENS = TOKEN_GRID * TOKEN_GRID
MAX_SHARD = "16MB"
WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"

BENCHMARK_PROMPTS = ("Answer the question using a single word or phrase.", "Please describe this image in detail.",
                     "Please answer yes or no.")

# Pieces: an optional space plus a word, an optional space plus one symbol, a newline, or a lone space.
_PIECE = r" ?[A-Za-z0-9]+| ?[^A-Za-z0-9\s]|\n| "
_UNK = "<unk>"
_LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_QWEN_SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

_QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

# Model sizes (see module docstring); ~7M parameters each, ~14 MB in fp16.
_TEXT = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 6, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6}
_CLIP = {"model_type": "clip_vision_model", "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 3, "image_size": IMAGE_SIZE, "patch_size": 14, "projection_dim": 192}
_QWEN_PATCH, _QWEN_MERGE = 7, 2
_QWEN_VISION = {"depth": 4, "embed_dim": 192, "num_heads": 3, "mlp_ratio": 4, "in_channels": 3,
                "patch_size": _QWEN_PATCH, "spatial_merge_size": _QWEN_MERGE, "temporal_patch_size": 2}
_MROPE_SECTION = [8, 12, 12]  # head_dim 64 -> 32 rotary frequencies over (temporal, height, width)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown reference architecture {arch!r}; expected one of {', '.join(ARCHS)}")


def reference_dir(arch: str) -> Path:
    """Folder of the shipped weights of ``arch`` (``mmeff/reference/weights/<arch>``)."""
    _check_arch(arch)
    return WEIGHTS_ROOT / arch


# ---------------------------------------------------------------- text format


def chat_prompt(arch: str, question: str) -> str:
    """The single-turn prompt (image first) exactly as the saved chat template renders it."""
    _check_arch(arch)
    if arch == "llava":
        return f"USER: <image>\n{question} ASSISTANT:"
    return f"{_QWEN_SYSTEM}<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n" \
           "<|im_start|>assistant\n"


def answer_text(arch: str, answer: str) -> str:
    """Answer text as it follows the generation prompt (LLaVA puts a space after 'ASSISTANT:')."""
    _check_arch(arch)
    return " " + answer if arch == "llava" else answer


def _corpus(arch: str, n_scenes: int = 3000) -> list[str]:
    """Every text the models may meet: training examples of many scenes and every benchmark question form."""
    texts: list[str] = []
    rng = np.random.default_rng(12345)
    for seed in range(n_scenes):
        for q, a in training_examples(make_scene(TRAIN_SEEDS[seed]), rng, p_halluc=1.0):
            texts += [chat_prompt(arch, q), answer_text(arch, a)]
    qs = list(CAPTION_PROMPTS + SHORT_PROMPTS + BENCHMARK_PROMPTS)
    for c in CATEGORIES:
        for ask in (POPE_TEMPLATE.format(article(c), c), f"Is there {article(c)} {c} in this image?"):
            qs += [ask + s for s in (*YES_NO_SUFFIXES, MME_SUFFIX)]
        qs += [f"Is there only one {c} in the image?", f"How many {plural(c)} are there?",
               f"There is also {article(c)} {c} nearby.", f"{c.capitalize()}."]
        qs += [f"Are there {n} {plural(c)} in the image?" for n in NUMBER_WORDS[2:]]
        qs += [f"Is there {article(col)} {col} {c} in the image?" for col in COLORS]
        qs += [f"Is the {c} {side} of the image?" for side in ("on the left side", "on the right side",
                                                                "at the top", "at the bottom")]
    qs += [f"{w.capitalize()} {w}." for w in NUMBER_WORDS + COLORS] + [str(i) for i in range(11)]
    answers = ["Yes", "No", "Yes.", "No."] + [str(i) for i in range(11)] + [c.capitalize() for c in COLORS]
    texts += [chat_prompt(arch, q) for q in qs] + [answer_text(arch, a) for a in answers]
    return texts


def build_tokenizer(arch: str, n_scenes: int = 3000) -> PreTrainedTokenizerFast:
    """Word-level tokenizer trained on our corpus (special tokens are added tokens, matched first)."""
    _check_arch(arch)
    specials = _LLAVA_SPECIALS if arch == "llava" else _QWEN_SPECIALS
    tok = Tokenizer(models.WordLevel(unk_token=_UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # The trainer sees no added-token matching: cut the special tokens out of the corpus first.
    pieces: list[str] = []
    for text in _corpus(arch, n_scenes):
        for s in specials:
            text = text.replace(s, "\x00")
        pieces += [p for p in text.split("\x00") if p]
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1, show_progress=False)
    tok.train_from_iterator(sorted(set(pieces)), trainer=trainer)
    if arch == "llava":  # Llama tokenizers prepend BOS
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=_UNK,
                                       pad_token="<pad>", padding_side="left", clean_up_tokenization_spaces=False,
                                       extra_special_tokens={"image_token": "<image>"})
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=_UNK, padding_side="left", clean_up_tokenization_spaces=False,
                                   extra_special_tokens={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>"})


def build_processor(arch: str, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
    _check_arch(arch)
    if arch == "llava":
        ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=_CLIP["patch_size"],
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_CHAT_TEMPLATE)
    pixels = IMAGE_SIZE * IMAGE_SIZE  # min = max: every image becomes 224 x 224 -> 256 merged tokens
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=_QWEN_PATCH,
                                  merge_size=_QWEN_MERGE, temporal_patch_size=2)
    # Image processing is the stock Qwen2-VL code; only the torchvision-bound video processor is left out.
    return Qwen2VLProcessorNoVideo(image_processor=ip, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)


def _config(arch: str, tok: PreTrainedTokenizerFast, text_overrides: dict | None = None
            ) -> LlavaConfig | Qwen2VLConfig:
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    sizes = {**_TEXT, **(text_overrides or {})}
    if arch == "llava":
        text = {"model_type": "llama", "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, **ids, **sizes}
        # Layer -1 (not LLaVA-1.5's -2): with 4 vision layers a skipped last layer would be dead weight.
        return LlavaConfig(text_config=text, vision_config=dict(_CLIP), image_token_id=tok.convert_tokens_to_ids(
            "<image>"), vision_feature_select_strategy="default", vision_feature_layer=-1,
            projector_hidden_act="gelu", image_seq_length=NUM_VISUAL_TOKENS, tie_word_embeddings=False, **ids)
    text = {"model_type": "qwen2_vl_text", "vocab_size": len(tok), "bos_token_id": tok.pad_token_id, **ids,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _MROPE_SECTION},
            **sizes}
    vision = {**_QWEN_VISION, "hidden_size": sizes["hidden_size"]}
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                         video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                         vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                         vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), **ids)


_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration, "qwen2vl": Qwen2VLForConditionalGeneration}
_MODEL_TYPES = {"llava": "llava", "qwen2_vl": "qwen2vl"}


def build_model(arch: str, *, seed: int = 0, n_scenes: int = 3000, text_overrides: dict | None = None
                ) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A freshly initialised reference model (fp32) and its processor; ``text_overrides`` changes decoder sizes
    (e.g. ``{"num_hidden_layers": 12}``) for experiments."""
    tokenizer = build_tokenizer(arch, n_scenes)
    processor = build_processor(arch, tokenizer)
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[arch](_config(arch, tokenizer, text_overrides))
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=128, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    return model, processor


def save_reference(model: PreTrainedModel, processor: ProcessorMixin, out_dir: str | Path,
                   dtype: torch.dtype = torch.float16) -> Path:
    """Save model (safetensors, ``dtype``, shards <= 16 MB) + processor; replaces ``out_dir`` atomically."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        copy.deepcopy(model).to(dtype).save_pretrained(tmp, safe_serialization=True, max_shard_size=MAX_SHARD)
        processor.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the folder is package data
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_reference(path: str | Path | None = None, *, arch: str | None = None, dtype: torch.dtype = torch.float32,
                   attn_implementation: str = "sdpa", device: str | torch.device = "cpu"
                   ) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a reference model folder (default: the shipped weights of ``arch``) with ``from_pretrained``.

    The Qwen2-VL processor is loaded as :class:`Qwen2VLProcessorNoVideo` (same image path, no torchvision).
    """
    if path is None:
        if arch is None:
            raise ValueError("load_reference needs a path or an arch")
        path = reference_dir(arch)
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no config.json; not a saved reference model folder")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"{cfg_file}: model_type {model_type!r} is not a reference architecture "
                         f"({', '.join(_MODEL_TYPES)})")
    kind = _MODEL_TYPES[model_type]
    proc_cls = LlavaProcessor if kind == "llava" else Qwen2VLProcessorNoVideo
    processor = proc_cls.from_pretrained(path)
    model = _MODEL_CLASSES[kind].from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                 use_safetensors=True)
    return model.to(device).eval(), processor


# ---------------------------------------------------------------- attention check


def object_token_mask(objects, grid: int = TOKEN_GRID) -> torch.Tensor:
    """(grid * grid,) bool: visual tokens (row-major cells) whose square touches any of ``objects``' bboxes."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    for o in objects:
        x0, y0, x1, y1 = o.bbox
        mask[int(y0 * grid):max(int(np.ceil(y1 * grid)), int(y0 * grid) + 1),
             int(x0 * grid):max(int(np.ceil(x1 * grid)), int(x0 * grid) + 1)] = True
    return mask.reshape(-1)


@torch.no_grad()
def object_attention_ratio(model: PreTrainedModel, processor: ProcessorMixin, arch: str, image, objects,
                           question: str) -> tuple[float, list[float]]:
    """Attention of the prompt's last token to the visual tokens of ``objects`` over its mean visual attention.

    The model must use eager attention. Attention is averaged over heads (and layers for the first value);
    the second value lists the ratio per layer. A ratio of 1 means the asked object gets no special attention.
    """
    inputs = processor(text=[chat_prompt(arch, question)], images=[image], return_tensors="pt").to(model.device)
    out = model(**inputs, output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("no attention weights returned: load the model with attn_implementation='eager'")
    visual = inputs["input_ids"][0] == model.config.image_token_id
    if int(visual.sum()) != NUM_VISUAL_TOKENS:
        raise RuntimeError(f"expected {NUM_VISUAL_TOKENS} visual tokens, found {int(visual.sum())}")
    per_layer = torch.stack([a[0, :, -1, :].float().mean(0)[visual] for a in out.attentions]).cpu()  # (layers, 256)
    mask = object_token_mask(objects)
    ratios = (per_layer[:, mask].mean(1) / per_layer.mean(1)).tolist()
    mean = per_layer.mean(0)
    return float(mean[mask].mean() / mean.mean()), ratios
