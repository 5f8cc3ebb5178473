"""Model inputs from (text, images) with a model's own processor and chat template (family-independent)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BatchFeature, ProcessorMixin


def make_inputs(
    processor: ProcessorMixin,
    texts: list[str],
    images: list[list[Image.Image]],
    *,
    padding_side: str = "left",
) -> BatchFeature:
    """Chat-format one user turn per sample (its images first, then its text) and run the processor.

    ``images[i]`` holds the images of sample ``i`` (may be empty); the batch is padded on ``padding_side``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"make_inputs: padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(texts) != len(images):
        raise ValueError(f"make_inputs: {len(texts)} texts but {len(images)} image lists; need one per sample")
    prompts = []
    for text, imgs in zip(texts, images):
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": text}]
        prompts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                     add_generation_prompt=True, tokenize=False))
    flat = [img for imgs in images for img in imgs]
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side  # set on the tokenizer: works on every transformers version
    try:
        return processor(text=prompts, images=flat or None, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = old_side
