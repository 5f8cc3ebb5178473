"""Is the last token's attention on the asked object *selection* or just objectness? (per reference model)

`object_attention_ratio` (the acceptance criterion) divides the last prompt token's attention on the asked object's
visual tokens by its mean over all visual tokens; objects draw more attention than background whatever is asked.
This adds controls on the same POPE "yes" questions (images with a second category present): the same ratio for
the cells of *another* present object (not asked), for the first text token after the image (it has not read the
question yet), for the asked object's name in the question (its last token), and for every token of the prompt's
tail from the question mark on (the same tokens for every question). Selection shows as asked >> other;
objectness as asked ~ other > 1.

    python experiments/attention_control.py --arch llava --bench BENCH_DIR [--n 50] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from mmeff_lab.evaluation.pope import load_questions
from mmeff_lab.evaluation.tasks import POPE_SUFFIX
from mmeff_lab.reference.model import chat_prompt, load_reference, object_token_mask
from mmeff_lab.reference.scenes import make_scene
from mmeff_lab.reference.synthetic import MANIFEST, image_seed, pope_object


def _visual_attention(attentions: tuple[torch.Tensor, ...], row: int, visual: torch.Tensor) -> torch.Tensor:
    """[L, 256]: query ``row``'s attention over the visual tokens, per layer, mean over heads (batch of one)."""
    return torch.stack([a[0, :, row, :].float().mean(0)[visual] for a in attentions])


def _ratio(att: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[L, 256] head-mean attention over the visual tokens -> [L + 1]: per layer, then over the layer-mean attention
    (the criterion's number), each the mean on ``mask`` over the mean on all visual tokens."""
    att = torch.cat([att, att.mean(0, keepdim=True)])
    return att[:, mask].mean(1) / att.mean(1)


def _last_position(ids: torch.Tensor, pattern: list[int]) -> int:
    """Position of the last token of the last occurrence of ``pattern`` in ``ids``."""
    n = len(pattern)
    for start in range(len(ids) - n, -1, -1):
        if ids[start:start + n].tolist() == pattern:
            return start + n - 1
    raise ValueError(f"token pattern {pattern} not in the prompt")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("llava", "qwen2vl"), required=True)
    ap.add_argument("--bench", type=Path, required=True)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    model, processor = load_reference(arch=a.arch, attn_implementation="eager")
    glyphs = json.loads((a.bench / MANIFEST).read_text())["params"].get("glyphs", "v1")
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "last token, asked object", "last token, other present object", "first token after the image, asked object",
        "asked object's name in the question, asked object", "asked object's name, other present object")}
    tail: dict[int, list[torch.Tensor]] = {}  # offset from the prompt's end -> [asked, other] per question
    tokens: dict[int, str] = {}
    for q in load_questions(a.bench / "pope" / "coco_pope_random.json"):
        if len(rows["last token, asked object"]) == a.n:
            break
        if q.label != "yes":
            continue
        asked = pope_object(q.text)
        scene = make_scene(image_seed(q.image), glyphs)
        others = sorted({o.category for o in scene.objects} - {asked})
        if not others:
            continue
        m_asked = object_token_mask(scene.objects_of(asked))
        m_other = object_token_mask(scene.objects_of(others[0])) & ~m_asked
        if not m_other.any() or not m_asked.any():
            continue
        image = Image.open(a.bench / "images" / q.image).convert("RGB")
        inputs = processor(text=[chat_prompt(a.arch, q.text + POPE_SUFFIX)], images=[image], return_tensors="pt")
        out = model(**inputs, output_attentions=True)
        visual = inputs["input_ids"][0] == model.config.image_token_id
        after = int(torch.nonzero(visual).max()) + 1

        name = _last_position(inputs["input_ids"][0], processor.tokenizer.encode(" " + asked, add_special_tokens=False))
        last, first, word = (_visual_attention(out.attentions, r, visual) for r in (-1, after, name))
        rows["last token, asked object"].append(_ratio(last, m_asked))
        rows["last token, other present object"].append(_ratio(last, m_other))
        rows["first token after the image, asked object"].append(_ratio(first, m_asked))
        rows["asked object's name in the question, asked object"].append(_ratio(word, m_asked))
        rows["asked object's name, other present object"].append(_ratio(word, m_other))
        ids = inputs["input_ids"][0]
        for pos in range(_last_position(ids, processor.tokenizer.encode("?", add_special_tokens=False)), len(ids)):
            att = _visual_attention(out.attentions, pos, visual)  # same prompt tail for every question
            pair = torch.stack([_ratio(att, m_asked)[-1], _ratio(att, m_other)[-1]])
            tail.setdefault(pos - len(ids), []).append(pair)
            tokens[pos - len(ids)] = processor.tokenizer.convert_ids_to_tokens([int(ids[pos])])[0]
    report = {"arch": a.arch, "bench": str(a.bench), "questions": len(rows["last token, asked object"])}
    for name, v in rows.items():
        r = torch.stack(v).mean(0)
        report[name] = {"ratio": float(r[-1]), "per_layer": [round(float(x), 3) for x in r[:-1]]}
        print(f"{a.arch:8s} {name:42s} {float(r[-1]):.2f}  per layer " + " ".join(f"{x:.2f}" for x in r[:-1].tolist()))
    report["prompt tail, asked / other object"] = {}
    for off in sorted(tail):
        asked_r, other_r = torch.stack(tail[off]).mean(0).tolist()
        report["prompt tail, asked / other object"][f"{off} {tokens[off]!r}"] = [round(asked_r, 3), round(other_r, 3)]
        print(f"{a.arch:8s} prompt tail {off:+d} {tokens[off]!r:16s} asked {asked_r:.2f}  other {other_r:.2f}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
