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
    system: str | None = None,
) -> BatchFeature:
    """Chat-format one user turn per sample (its images first, then its text) and run the processor.

    ``images[i]`` holds the images of sample ``i`` (may be empty); the batch is padded on ``padding_side``.
    ``system``: a system turn before each user turn (None, the default: none, the chat template's own if any).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"make_inputs: padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(texts) != len(images):
        raise ValueError(f"make_inputs: {len(texts)} texts but {len(images)} image lists; need one per sample")
    prompts = [chat_text(processor, text, len(imgs), system=system) for text, imgs in zip(texts, images)]
    flat = [img for imgs in images for img in imgs]
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side  # set on the tokenizer: works on every transformers version
    try:
        return processor(text=prompts, images=flat or None, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = old_side


def chat_text(processor: ProcessorMixin, text: str, n_images: int = 1, *, system: str | None = None) -> str:
    """The chat-template text of one user turn (``n_images`` images, then ``text``) with the generation prompt;
    with ``system``, a system turn first (None: none is added, the template may still write its default)."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
