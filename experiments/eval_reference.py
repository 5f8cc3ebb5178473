"""Quick evaluation of a reference VLM on the synthetic benchmarks (GPU machine right after training, or CPU).

    python experiments/eval_reference.py --model out/llava/model [--limit N] [--device cuda] \\
        [--json out/llava/eval.json]

Unwrapped model, greedy decoding. POPE random/popular/adversarial (question + "\\nAnswer the question using a
single word or phrase."), CHAIR ("Please describe this image in detail.", 128 new tokens), MME existence /
count / position / color, and the attention check: on POPE "yes" questions, attention of the last prompt
token to the asked object's visual tokens relative to its mean over all visual tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image

from mmeff_lab.evaluation.chair import evaluate_chair
from mmeff_lab.evaluation.mme import MMEResult, load_mme, mme_scores
from mmeff_lab.evaluation.pope import load_questions, pope_metrics
from mmeff_lab.evaluation.tasks import CHAIR_PROMPT, POPE_SUFFIX
from mmeff_lab.reference.model import chat_prompt, load_reference, object_attention_ratio
from mmeff_lab.reference.scenes import make_scene
from mmeff_lab.reference.synthetic import (
    MANIFEST,
    MME_SUBTASKS,
    POPE_STRATEGIES,
    ensure_benchmarks,
    image_seed,
    pope_object,
)


@torch.no_grad()
def generate(model, processor, arch: str, questions: list[str], images: list[Path], *, max_new_tokens: int,
             batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding."""
    out: list[str] = []
    processor.tokenizer.padding_side = "left"
    cache: dict[Path, Image.Image] = {}
    for i in range(0, len(questions), batch_size):
        imgs = []
        for p in images[i:i + batch_size]:
            if p not in cache:
                cache[p] = Image.open(p).convert("RGB")
            imgs.append(cache[p])
        prompts = [chat_prompt(arch, q) for q in questions[i:i + batch_size]]
        inputs = processor(text=prompts, images=imgs, padding=True, return_tensors="pt").to(model.device)
        ids = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        out += processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in out]


def attention_ratio(model_dir: str | Path, bench: Path, *, device: str, n_attention: int) -> dict[str, object]:
    """Mean attention of the last prompt token to the asked object's visual tokens over its mean over all visual
    tokens (``object_attention_ratio``), on the first ``n_attention`` "yes" questions of POPE random."""
    eager, processor = load_reference(model_dir, device=device, attn_implementation="eager")
    arch = "llava" if eager.config.model_type == "llava" else "qwen2vl"
    pos = [q for q in load_questions(bench / "pope" / "coco_pope_random.json") if q.label == "yes"][:n_attention]
    glyphs = json.loads((bench / MANIFEST).read_text())["params"].get("glyphs", "v1")
    ratios, layers = [], []
    for q in pos:
        obj = pope_object(q.text)
        scene = make_scene(image_seed(q.image), glyphs)
        image = Image.open(bench / "images" / q.image).convert("RGB")
        r, per_layer = object_attention_ratio(eager, processor, arch, image, scene.objects_of(obj),
                                              q.text + POPE_SUFFIX)
        ratios.append(r)
        layers.append(per_layer)
    return {"attention_ratio": sum(ratios) / len(ratios),
            "attention_ratio_per_layer": [round(sum(x) / len(x), 3) for x in zip(*layers)]}


def evaluate(model_dir: str | Path, bench: Path, *, device: str, limit: int | None, batch_size: int,
             n_attention: int, chair_limit: int | None = None) -> dict[str, object]:
    model, processor = load_reference(model_dir, device=device)
    arch = "llava" if model.config.model_type == "llava" else "qwen2vl"
    res: dict[str, object] = {"model": str(model_dir), "arch": arch}
    t0 = time.time()
    for split in POPE_STRATEGIES:
        qs = load_questions(bench / "pope" / f"coco_pope_{split}.json")[:limit]
        preds = generate(model, processor, arch, [q.text + POPE_SUFFIX for q in qs],
                         [bench / "images" / q.image for q in qs], max_new_tokens=4, batch_size=batch_size)
        res[f"pope_{split}"] = pope_metrics(preds, [q.label for q in qs])
    gt = {int(k): frozenset(v) for k, v in
          json.loads((bench / "chair" / "synth_image_objects.json").read_text()).items()}
    ids = sorted(gt)[:chair_limit or limit]
    caps = generate(model, processor, arch, [CHAIR_PROMPT] * len(ids),
                    [bench / "images" / f"synth_{i:012d}.jpg" for i in ids], max_new_tokens=128,
                    batch_size=batch_size)
    chair = evaluate_chair(list(zip(ids, caps)), gt)
    res["chair"] = chair.metrics
    res["chair_examples"] = [{"image_id": i, "caption": c} for i, c in list(zip(ids, caps))[:5]]
    mqs, _ = load_mme(bench / "mme" / "MME_Benchmark", MME_SUBTASKS)
    mqs = [q for s in MME_SUBTASKS for q in [x for x in mqs if x.subtask == s][:limit and 2 * (limit // 2)]]
    preds = generate(model, processor, arch, [q.question for q in mqs], [q.image_path for q in mqs],
                     max_new_tokens=4, batch_size=batch_size)
    results: dict[str, list[MMEResult]] = {}
    for q, p in zip(mqs, preds):
        results.setdefault(q.subtask, []).append(MMEResult(q.image, q.question, q.answer, p))
    mme = mme_scores(results)
    res["mme"] = {s: round(m["score"], 2) for s, m in mme["subtasks"].items()}  # type: ignore[index]
    res["mme"]["total"] = round(sum(res["mme"].values()), 2)  # type: ignore[index, union-attr]
    res["gen_seconds"] = round(time.time() - t0, 1)
    del model
    res.update(attention_ratio(model_dir, bench, device=device, n_attention=n_attention))
    return res


def table(res: dict[str, object]) -> str:
    rows = [f"model {res['model']} ({res['arch']})"]
    for split in POPE_STRATEGIES:
        m = res[f"pope_{split}"]
        rows.append(f"POPE {split:<12} acc {m['accuracy']:.3f}  F1 {m['f1']:.3f}  prec {m['precision']:.3f}  "
                    f"rec {m['recall']:.3f}  yes {m['yes_ratio']:.3f}  n {m['n']}")
    c = res["chair"]
    rows.append(f"CHAIR  CHAIR_S {c['CHAIRs']:.3f}  CHAIR_I {c['CHAIRi']:.3f}  Recall {c['Recall']:.3f}  "
                f"Len {c['Len']:.1f}  n {c['n']}")
    rows.append("MME    " + "  ".join(f"{k} {v:.1f}" for k, v in res["mme"].items()))
    rows.append(f"ATTN   object/mean visual attention of last token: {res['attention_ratio']:.2f}  per layer "
                f"{res['attention_ratio_per_layer']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="saved reference model folder")
    ap.add_argument("--bench", help="benchmark folder (default: ensure_benchmarks() cache)")
    ap.add_argument("--limit", type=int, help="questions per POPE split / captions / MME images per subtask")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chair-limit", type=int, help="captions to generate (default: --limit)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--attention-samples", type=int, default=50)
    ap.add_argument("--attention-only", action="store_true", help="only the attention ratio (no generation)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    bench = Path(args.bench) if args.bench else ensure_benchmarks()
    if args.attention_only:
        res = attention_ratio(args.model, bench, device=args.device, n_attention=args.attention_samples)
        print(json.dumps(res), flush=True)
    else:
        res = evaluate(args.model, bench, device=args.device, limit=args.limit, batch_size=args.batch_size,
                       n_attention=args.attention_samples, chair_limit=args.chair_limit)
        print(table(res), flush=True)
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
