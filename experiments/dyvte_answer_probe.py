"""Could any DyVTE router exit early? (per reference model)

The exit oracle (`experiments/exit_oracle.py`) lets "no" answers leave at layer 1: without the image the model says
"no". A router can only do that if the hidden states entering layer k already tell a "no" from a "yes". This
fits, per layer k, a logistic probe on the router's own input (`mmeff.methods.dyvte.method.router_features`: mean text
state after the image, last token state) to the unwrapped model's final POPE answer, and reports its accuracy
on held-out images (2-fold, split by image) beside the majority rate. An exit at layer 1 for every "no" with the
other answers kept to layer 5 gives mean exit 3.0 at 100% agreement; every "yes" the router takes for a "no" is
a wrong answer, so ~99% probe accuracy at layers 1-2 is what the DyVTE target (>= 97% kept, exit <= L/2) needs.

    python experiments/dyvte_answer_probe.py --arch llava --bench BENCH_DIR [--device cpu] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from mmeff.methods.dyvte.method import router_features, text_after_image
from mmeff_lab.evaluation.pope import load_questions
from mmeff_lab.evaluation.tasks import POPE_SUFFIX
from mmeff_lab.reference.model import chat_prompt, load_reference


@torch.no_grad()
def router_inputs(model, processor, arch: str, bench: Path, batch_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      list[str]]:
    """[N, L+1, 2d] router inputs per layer input, [N] final answer is yes, image name per question."""
    processor.tokenizer.padding_side = "left"
    image_id = model.config.image_token_id
    qs = [q for split in ("random", "popular", "adversarial")
          for q in load_questions(bench / "pope" / f"coco_pope_{split}.json")]
    yes_id = processor.tokenizer.encode(" Yes" if arch == "llava" else "Yes", add_special_tokens=False)[-1]
    no_id = processor.tokenizer.encode(" No" if arch == "llava" else "No", add_special_tokens=False)[-1]
    feats, yes = [], []
    for i in range(0, len(qs), batch_size):
        batch = qs[i:i + batch_size]
        imgs = [Image.open(bench / "images" / q.image).convert("RGB") for q in batch]
        inputs = processor(text=[chat_prompt(arch, q.text + POPE_SUFFIX) for q in batch], images=imgs,
                           padding=True, return_tensors="pt").to(model.device)
        out = model(**inputs, output_hidden_states=True)
        ids = inputs["input_ids"]
        text = text_after_image(ids == image_id, inputs["attention_mask"])
        last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)  # left padding: the last slot
        feats.append(torch.stack([router_features(h, text, last) for h in out.hidden_states], 1).cpu())
        logits = out.logits[:, -1]
        yes.append((logits[:, yes_id] > logits[:, no_id]).cpu())
    return torch.cat(feats), torch.cat(yes), [q.image for q in qs]


def _fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by L-BFGS: weights and bias."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y.float()) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, l2: float = 1e-2) -> float:
    """Held-out accuracy of the probe, 2 folds (features standardised on the training fold)."""
    correct = 0
    for f in (0, 1):
        tr, te = fold != f, fold == f
        mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
        w, b = _fit((x[tr] - mu) / sd, y[tr], l2)
        correct += int(((((x[te] - mu) / sd) @ w + b > 0) == y[te]).sum())
    return correct / len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("llava", "qwen2vl"), required=True)
    ap.add_argument("--bench", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    model, processor = load_reference(arch=a.arch, device=a.device)
    x, y, images = router_inputs(model, processor, a.arch, a.bench, a.batch_size)
    names = sorted(set(images))
    fold = torch.tensor([names.index(im) % 2 for im in images])
    majority = max(float(y.float().mean()), 1 - float(y.float().mean()))
    acc = {k: probe_accuracy(x[:, k], y, fold) for k in range(1, x.shape[1] - 1)}
    report = {"arch": a.arch, "bench": str(a.bench), "questions": len(y), "yes_rate": float(y.float().mean()),
              "majority": majority, "probe_accuracy_by_layer_input": acc}
    print(f"{a.arch}: {len(y)} POPE questions, answer 'yes' {report['yes_rate']:.1%}, majority {majority:.1%}")
    print("held-out probe accuracy, input of layer k: " + "  ".join(f"{k}: {v:.1%}" for k, v in acc.items()))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
