"""Tiny random-weight models of the real transformers multimodal classes, built fully offline.

Each family gets a real ``*ForConditionalGeneration`` with a few-layer text decoder and vision tower, a
byte-level BPE tokenizer trained on a small built-in corpus, and the family's real processor with a chat
template. Everything is written with ``save_pretrained`` (safetensors) and read back with
``from_pretrained``, so tests exercise the same loading path as real checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.utils import is_torchvision_available

from mmeff_lab.models.templates import LLAVA_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE

# LLaVA-OneVision (Qwen2 ChatML) as the llava-hf checkpoints write it: images first, then "\n" + text.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'video' %}{{ '<video>' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ '\n' + c['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen3_vl")

_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}

# Text decoder shared by all families: GQA (4 query heads, 2 KV heads), head_dim 16.
_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}

# LLaVA CLIP tower: 32 px / patch 8 -> 4x4 = 16 patch tokens (+CLS, dropped by the "default" strategy).
_CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "projection_dim": 32}
_NEXT_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]

# LLaVA-OneVision SigLIP tower (no CLS token, "full" features of the last layer): 32 px / patch 8 -> 16 tokens a
# tile, LLaVA-NeXT's pinpoints; anyres_max_2 (released: anyres_max_9 of 27x27 tiles) so the tiny test images
# hit both rules: an unpadded grid above 1.1^2 * 2 tiles' worth of patches is interpolated down, a smaller one
# is kept. SigLIP's normalisation (mean = std = 0.5), as the released processor.
_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "vision_use_head": False}
_OV_ASPECT = "anyres_max_2"

# Qwen: patch 4 and merge 2 -> one merged token per 8x8 px; min/max pixels give 4x4..8x8 merged tokens.
_QWEN_PATCH, _QWEN_MERGE = 4, 2
_QWEN_MIN_PIXELS, _QWEN_MAX_PIXELS = 32 * 32, 64 * 64
# M-RoPE splits head_dim/2 = 8 rotary frequencies over (temporal, height, width).
_MROPE_SECTION = [2, 3, 3]
# Qwen3-VL interleaves them (T H W T H W T T: frequencies 1, 4 are H, 2, 5 are W), as the released [24, 20, 20]
# does over 64; its tower has 3 blocks of which 0 and 1 feed DeepStack (added after decoder layers 0 and 1) and a
# learned 4x4 position grid interpolated to each image's patch grid.
_QWEN3_MROPE_SECTION = [4, 2, 2]
_QWEN3_DEEPSTACK = [0, 1]

_LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_OV_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


# Small English corpus (COCO objects + POPE/CHAIR-style prompts) so common words become few BPE tokens.
_OBJECTS = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign "
    "parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
    "tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis "
    "racket bottle wine glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot "
    "pizza donut cake chair couch potted plant bed dining table toilet tv laptop mouse remote keyboard "
    "cell phone microwave oven toaster sink refrigerator book clock vase scissors teddy hair drier toothbrush"
)
_SENTENCES = (
    "Is there a {o} in the image? Please answer yes or no.",
    "Describe this image in detail. There is a {o} on the left and a {o} near the table.",
    "A photo of a {o}. The {o} is next to a man and a woman in the street.",
    "Yes, there is a {o}. No, I do not see any {o} in the picture.",
)


def _corpus() -> list[str]:
    words = _OBJECTS.split()
    return [s.format(o=w) for w in words for s in _SENTENCES]


def _build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) plus the special tokens the family's processor expects."""
    llava = family in ("llava", "llava_next")
    specials = _LLAVA_SPECIALS if llava else _OV_SPECIALS if family == "llava_onevision" else _QWEN_SPECIALS
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if llava:  # Llama tokenizers prepend BOS.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="<pad>", padding_side="left",
                                       extra_special_tokens={"image_token": "<image>"})
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if family == "llava_onevision":  # a Qwen2 tokenizer with LLaVA's <image> / <video> placeholders
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       padding_side="left",
                                       extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left",
                                   extra_special_tokens={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>"})


class Qwen2VLProcessorNoVideo(Qwen2VLProcessor):
    """Qwen2-VL processor without its video processor.

    Every transformers video processor needs torchvision, and the stock Qwen processors refuse to be built
    without one. Leaving ``video_processor`` out of ``__init__`` drops it from the processor's attributes,
    so image + text processing (identical code path) works on machines without torchvision.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


class Qwen2_5_VLProcessorNoVideo(Qwen2_5_VLProcessor):
    """Qwen2.5-VL counterpart of :class:`Qwen2VLProcessorNoVideo`."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


class Qwen3VLProcessorNoVideo(Qwen3VLProcessor):
    """Qwen3-VL counterpart of :class:`Qwen2VLProcessorNoVideo`."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


_QWEN_NO_VIDEO: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": Qwen2VLProcessorNoVideo, "qwen2_5_vl": Qwen2_5_VLProcessorNoVideo,
    "qwen3_vl": Qwen3VLProcessorNoVideo}
_QWEN_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}


def _build_processor(family: str, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
    if family == "llava":
        ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_CHAT_TEMPLATE)
    if family == "llava_next":
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=_NEXT_PINPOINTS)
        return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=8,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=LLAVA_CHAT_TEMPLATE)
    if family == "llava_onevision":
        norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
        ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=_NEXT_PINPOINTS,
                                             **norm)
        video = None
        if is_torchvision_available():
            from transformers import LlavaOnevisionVideoProcessor

            video = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}, **norm)
        return LlavaOnevisionProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=video,
                                       num_image_tokens=16, vision_feature_select_strategy="full",
                                       vision_aspect_ratio=_OV_ASPECT, chat_template=ONEVISION_CHAT_TEMPLATE)
    # Pass `size` explicitly: 5.17's video processor mutates its class-level default `size` otherwise.
    vision = {"size": {"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS},
              "patch_size": _QWEN_PATCH, "merge_size": _QWEN_MERGE, "temporal_patch_size": 2}
    if family == "qwen3_vl":  # Qwen3-VL normalises with mean = std = 0.5, as the released processor
        vision.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    ip = Qwen2VLImageProcessorPil(**vision)
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor, Qwen3VLVideoProcessor

        video_cls = Qwen3VLVideoProcessor if family == "qwen3_vl" else Qwen2VLVideoProcessor
        return _QWEN_PROCESSORS[family](image_processor=ip, tokenizer=tokenizer, video_processor=video_cls(**vision),
                                        chat_template=QWEN_CHAT_TEMPLATE)
    return _QWEN_NO_VIDEO[family](image_processor=ip, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)


def _build_config(family: str, tok: PreTrainedTokenizerFast, num_layers: int) -> PreTrainedConfig:
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if family in ("llava", "llava_next"):
        text = {"model_type": "llama", "vocab_size": len(tok), "num_hidden_layers": num_layers,
                "bos_token_id": tok.bos_token_id, **ids, **_TEXT}
        common = {"text_config": text, "vision_config": dict(_CLIP),
                  "image_token_id": tok.convert_tokens_to_ids("<image>"),
                  "vision_feature_select_strategy": "default", "vision_feature_layer": -2,
                  "projector_hidden_act": "gelu", **ids}
        if family == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(image_grid_pinpoints=_NEXT_PINPOINTS, **common)
    if family == "llava_onevision":
        # Qwen2 decoder; Qwen's BOS is <|endoftext|>, which is also its pad token
        text = {"model_type": "qwen2", "vocab_size": len(tok), "num_hidden_layers": num_layers,
                "bos_token_id": tok.pad_token_id, **ids, **_TEXT}
        return LlavaOnevisionConfig(text_config=text, vision_config=dict(_SIGLIP), tie_word_embeddings=False,
                                    image_token_id=tok.convert_tokens_to_ids("<image>"),
                                    video_token_id=tok.convert_tokens_to_ids("<video>"),
                                    vision_feature_select_strategy="full", vision_feature_layer=-1,
                                    image_grid_pinpoints=_NEXT_PINPOINTS, vision_aspect_ratio=_OV_ASPECT,
                                    projector_hidden_act="gelu", **ids)
    if family == "qwen3_vl":
        return _qwen3_config(tok, num_layers, ids)
    # Qwen's BOS is <|endoftext|>, which is also its pad token.
    text = {"model_type": family + "_text", "vocab_size": len(tok), "num_hidden_layers": num_layers,
            "bos_token_id": tok.pad_token_id, **ids, **_TEXT,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _MROPE_SECTION}}
    vision = {"depth": 2, "num_heads": 2, "in_channels": 3, "patch_size": _QWEN_PATCH,
              "spatial_merge_size": _QWEN_MERGE, "temporal_patch_size": 2}
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=_TEXT["hidden_size"], mlp_ratio=2)
    else:
        # window_size in pixels: 16 px = 2x2 merged tokens per attention window; block 1 attends globally.
        vision.update(hidden_size=32, out_hidden_size=_TEXT["hidden_size"], intermediate_size=64,
                      window_size=16, fullatt_block_indexes=[1])
    cls = Qwen2VLConfig if family == "qwen2_vl" else Qwen2_5_VLConfig
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=False,
               image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), **ids)


def _qwen3_config(tok: PreTrainedTokenizerFast, num_layers: int, ids: dict[str, int]) -> PreTrainedConfig:
    """Qwen3-VL: a Qwen3 decoder (q/k norms, explicit head_dim) with interleaved M-RoPE, and a tower whose
    DeepStack mergers add features of early blocks to the first decoder layers' outputs at the visual tokens."""
    text = {"model_type": "qwen3_vl_text", "vocab_size": len(tok), "num_hidden_layers": num_layers,
            "bos_token_id": tok.pad_token_id, "head_dim": 16, **ids, **_TEXT,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": _QWEN3_MROPE_SECTION, "mrope_interleaved": True}}
    vision = {"depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "in_channels": 3,
              "patch_size": _QWEN_PATCH, "spatial_merge_size": _QWEN_MERGE, "temporal_patch_size": 2,
              "out_hidden_size": _TEXT["hidden_size"], "num_position_embeddings": 16,
              "deepstack_visual_indexes": _QWEN3_DEEPSTACK}
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                         video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                         vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                         vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), **ids)


def build_tiny(family: str, out_dir: str | Path, *, seed: int = 0, num_layers: int = 4) -> Path:
    """Build a tiny random model + processor of ``family`` and save both to ``out_dir``; return the path.

    ``out_dir`` must be absent or empty. Files are written to a sibling temp directory that is then renamed
    onto ``out_dir``, so a crash never leaves a half-written model behind.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: build_tiny needs a missing or empty directory")
    tokenizer = _build_tokenizer(family)
    processor = _build_processor(family, tokenizer)
    config = _build_config(family, tokenizer, num_layers)
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[family](config).eval()
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        os.replace(tmp, out)  # renaming onto an empty directory is allowed on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_tiny(
    path: str | Path, *, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a directory written by :func:`build_tiny` through the regular ``from_pretrained`` path."""
    path = Path(path)
    model_type = _read_model_type(path)
    if model_type in _QWEN_NO_VIDEO and (not is_torchvision_available() or not _has_video_processor(path)):
        processor = _QWEN_NO_VIDEO[model_type].from_pretrained(path)
    else:
        processor = AutoProcessor.from_pretrained(path)
    model = _MODEL_CLASSES[model_type].from_pretrained(path, attn_implementation=attn_implementation,
                                                       dtype=dtype, use_safetensors=True)
    return model.eval(), processor


def _has_video_processor(path: Path) -> bool:
    """Whether the saved processor has a video processor (one built without torchvision has none, and
    AutoProcessor would then fall back to the bare tokenizer on a machine that has torchvision)."""
    if (path / "video_preprocessor_config.json").is_file():
        return True
    config = path / "processor_config.json"
    return config.is_file() and "video_processor" in json.loads(config.read_text())


def _read_model_type(path: Path) -> str:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no config.json; was the directory written by build_tiny()?")
    model_type = json.loads(cfg_file.read_text())["model_type"]
    if model_type not in _MODEL_CLASSES:
        raise ValueError(f"{cfg_file}: model_type {model_type!r} is not one of {', '.join(FAMILIES)}")
    return model_type


def random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Deterministic RGB image (width, height): coloured background with a few random rectangles/ellipses."""
    rng = random.Random(seed)

    def color() -> tuple[int, int, int]:
        return rng.randrange(256), rng.randrange(256), rng.randrange(256)

    img = Image.new("RGB", size, color())
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(4):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, min(w, x0 + rng.randint(4, max(4, w // 2))), min(h, y0 + rng.randint(4, max(4, h // 2))))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=color())
    return img


