"""``results.json`` (schema below), ``results.md`` and the per-preset files of an evaluation run.

Schema ``mmeff.eval/1`` (fractions for POPE and CHAIR, MME scores in points)::

    {"schema": "mmeff.eval/1", "model": str, "family": str, "data": "synthetic:<path>" | "real:<path>",
     "limit": int | null, "batch_size": int, "dtype": str | null, "device": str,
     "generation": {"pope_max_new_tokens": 16, "chair_max_new_tokens": int, "mme_max_new_tokens": 16,
                    "do_sample": false, "num_beams": 1},
     "tasks": [task, ...], "bootstrap": {"n_boot": int, "confidence": 0.95, "seed": 0},
     "timing_fields": ["prefill_ms", "tokens_per_s", "peak_memory_bytes"],
     "chair": {"protocol": "original" | "opera" | "wordnet", "protocol_is": str,    # only when CHAIR ran
               "images": "pope" | "synthetic" | <ids file>, "n_images": int},
     "clipscore": {"model", "weights", "w": 2.5, "prefix", "context_length", "dtype"} | null,  # when CHAIR ran
     "prompt_protocol": {"requested": "family" | name | file, "name", "description", "source", "file",
                         "system": str | null, "system_added": bool,
                         "tasks": {"pope" | "mme" | "chair": {"template", "remove", "source"}},
                         "rendered": {task: the chat text of its first sample}},   # prompt_protocols.py
     "runs": [{"preset": str,
               "tasks": {"pope_random": {"accuracy", "precision", "recall", "f1", "yes_ratio", "n", "non_yes_no",
                                         "cost"}, ...,
                         "chair": {"chair_s", "chair_i", "recall", "len", "n", "cost",
                                   "clip_s"},   # mean CLIPScore (Hessel et al. 2021), with --clipscore only
                         "mme": {"perception", "cognition",   # null unless their subtask group is complete
                                 "totals_missing": {total: why}, "subtasks": {name: {acc, acc_plus, score, ...}},
                                 "n", "unparsed", "cost"}},
               "cost": {"visual_tokens_in", "visual_tokens_kept", "kv_cache_bytes", "prefill_ms",
                        "tokens_per_s", "peak_memory_bytes", "new_tokens", "n"},
               "delta": {task: {metric: {"delta", "lo", "hi"}}}}]}   # absent on the "none" row

``non_yes_no``: POPE answers that say neither yes nor no (scored as yes, the official rule); ``unparsed``: MME
answers the official parser reads as neither (scored wrong). ``cost``: means per sample over all the run's
samples (per task under each task), except tokens_per_s (generated tokens / generation time) and
peak_memory_bytes (the maximum; null on CPU). ``delta``: preset minus ``none`` with the 95% paired-bootstrap
interval over the same samples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmeff.io import atomic_write_text

from .bootstrap import paired_bootstrap
from .tasks import HEADLINE, POPE_TASKS, SHORT_ANSWER_TOKENS, Sample, Scored

SCHEMA = "mmeff.eval/1"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "accuracy_vs_tokens.png"
TIMING_FIELDS = ("prefill_ms", "tokens_per_s", "peak_memory_bytes")


def cost_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)
    gen_s = sum(r["generate_ms"] / r["batch_size"] for r in records) / 1000
    peaks = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes") is not None]
    prefill = [r["prefill_ms"] for r in records if r.get("prefill_ms") is not None]
    return {
        "visual_tokens_in": float(np.mean([r["visual_tokens_in"] for r in records])),
        "visual_tokens_kept": float(np.mean([r["visual_tokens_kept"] for r in records])),
        "kv_cache_bytes": float(np.mean([r["kv_cache_bytes"] for r in records])),
        "prefill_ms": float(np.mean(prefill)) if prefill else None,
        "tokens_per_s": sum(r["new_tokens"] for r in records) / gen_s if gen_s > 0 else None,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "new_tokens": float(np.mean([r["new_tokens"] for r in records])),
        "n": n,
    }


def deltas(task: str, base: Scored, other: Scored, n_boot: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, metric in HEADLINE[task].items():
        if base.metrics.get(name, 0.0) is None:  # an MME total over an incomplete group is not reported
            continue
        if name not in base.metrics:  # an optional metric not computed in this run (clip_s without --clipscore)
            continue
        d, lo, hi = paired_bootstrap(base.matrix, other.matrix, metric, n_boot=n_boot, seed=0)
        out[name] = {"delta": d, "lo": lo, "hi": hi}
    return out


def _chair_settings(cfg: Any, data: str, rows: Sequence[Any]) -> dict[str, Any]:
    """``{"chair": {"protocol", "protocol_is", "images", "n_images"}}`` when CHAIR ran: which words and images
    its numbers come from (protocols differ by tenths of a point; docs/evaluation.md)."""
    if not rows or "chair" not in rows[0][1]:
        return {}
    from .chair import PROTOCOLS

    protocol = getattr(cfg, "chair_protocol", "original")
    images = getattr(cfg, "chair_images", "pope")
    if images == "pope" and data.startswith("synthetic"):
        images = "synthetic"  # the synthetic benchmark's own CHAIR images
    return {"chair": {"protocol": protocol, "protocol_is": PROTOCOLS[protocol], "images": images,
                      "n_images": len(rows[0][1]["chair"][1])}}


def build_results(cfg: Any, family: str, data: str,
                  rows: Sequence[tuple[str, dict[str, tuple[Scored, list[dict[str, Any]]]]]],
                  n_boot: int) -> dict[str, Any]:
    """``rows``: per preset (``none`` first), per task the scored answers and the sample-log records."""
    if not rows or rows[0][0] != "none":
        raise ValueError("the first row must be the 'none' baseline")
    base = rows[0][1]
    runs = []
    for preset, per_task in rows:
        tasks = {t: {**scored.metrics, "cost": cost_summary(recs)} for t, (scored, recs) in per_task.items()}
        run: dict[str, Any] = {"preset": preset, "tasks": tasks,
                               "cost": cost_summary([r for _, recs in per_task.values() for r in recs])}
        if preset != "none":
            run["delta"] = {t: deltas(t, base[t][0], scored, n_boot) for t, (scored, _) in per_task.items()}
        runs.append(run)
    return {
        "schema": SCHEMA, "model": cfg.model, "family": family, "data": data, "limit": cfg.limit,
        "batch_size": cfg.batch_size, "dtype": cfg.dtype, "device": cfg.device,
        "generation": {"pope_max_new_tokens": SHORT_ANSWER_TOKENS, "chair_max_new_tokens": cfg.chair_max_new_tokens,
                       "mme_max_new_tokens": SHORT_ANSWER_TOKENS, "do_sample": False, "num_beams": 1},
        "tasks": list(rows[0][1]), "bootstrap": {"n_boot": n_boot, "confidence": 0.95, "seed": 0},
        "timing_fields": list(TIMING_FIELDS), **_chair_settings(cfg, data, rows),
        **({"clipscore": getattr(cfg, "clipscore_info", None)} if rows and "chair" in rows[0][1] else {}),
        **({"prompt_protocol": cfg.prompt_record} if getattr(cfg, "prompt_record", None) else {}),
        "runs": runs,
        "_details": {preset: {t: s.details for t, (s, _) in pt.items() if s.details is not None}
                     for preset, pt in rows},
    }


def strip_timing(obj: Any) -> Any:
    """A copy without the timing fields (for comparing runs)."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


# -- markdown --------------------------------------------------------------------------------------------------
def _headline(task: str, m: dict[str, Any]) -> list[tuple[str, str]]:
    if task in POPE_TASKS:
        short = task.removeprefix("pope_")
        return [(f"POPE {short} acc", f"{100 * m['accuracy']:.1f}"), (f"POPE {short} F1", f"{100 * m['f1']:.1f}")]
    if task == "chair":
        return [("CHAIR_S", f"{100 * m['chair_s']:.1f}"), ("CHAIR_I", f"{100 * m['chair_i']:.1f}"),
                ("CHAIR recall", f"{100 * m['recall']:.1f}"),
                *([("CLIP-S", f"{100 * m['clip_s']:.1f}")] if "clip_s" in m else [])]
    return [("MME perception", _fmt(m["perception"])), ("MME cognition", _fmt(m["cognition"]))]


def _column_notes(results: dict[str, Any]) -> list[str]:
    device = results.get("device", "")
    notes = [
        "- *visual tokens kept*: visual tokens each decoder layer attends to, averaged over the layers and the "
        "samples / visual tokens in the prompt.",
        "- *prefill (ms)*, *tokens/s*: wall times of this run"
        + (" on the GPU." if device.startswith("cuda") else
           " on the CPU: they move severalfold with the machine's load; GPU figures need --device cuda."),
    ]
    if "chair" in results["runs"][0]["tasks"]:
        clip = results.get("clipscore")
        notes.append(
            f"- *CLIP-S*: CLIPScore (Hessel et al. 2021) × 100, mean over the captions, with `{clip['model']}` "
            f"(\"{clip['prefix']}\" + caption, its first {clip['context_length']} tokens): how well the caption "
            "matches the image, to read beside CHAIR_S and recall." if clip else
            "- *CLIP-S* (CLIPScore: does a shorter caption still describe the image?) not computed: add "
            "`--clipscore MODEL:PRETRAINED` (an open_clip model and its weights, e.g. `ViT-B-32:openai` or "
            "`ViT-B-32:/path/to/weights.pt`; docs/evaluation.md).")
    odd = []
    for run in results["runs"]:
        for task, m in run["tasks"].items():
            if m.get("non_yes_no"):
                odd.append(f"{run['preset']} / {task}: {m['non_yes_no']} of {m['n']} answers neither yes nor no "
                           "(scored as yes, the official rule)")
            if m.get("unparsed"):
                odd.append(f"{run['preset']} / mme: {m['unparsed']} of {m['n']} answers unparsed (scored wrong, "
                           "the official rule)")
    if odd:
        notes.append("- **Answers outside the protocol**: " + "; ".join(odd) + ".")
    first = results["runs"][0]["tasks"].get("mme", {})
    for total, why in first.get("totals_missing", {}).items():
        notes.append(f"- **MME {total} total not reported** (–): {why}; the subtask scores are in results.json.")
    return notes


def _fmt(v: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if v is None else f"{v * scale:.{digits}f}"


def _prompt_line(results: dict[str, Any]) -> str:
    """The header sentence naming the prompt protocol (results.json ``prompt_protocol`` has the templates)."""
    p = results.get("prompt_protocol")
    if not p:
        return ""
    system = "system prompt added" if p["system_added"] else "no system prompt added"
    asked = "" if p["requested"] == p["name"] else f", from `--prompt-protocol {p['requested']}`"
    return f"Prompt protocol `{p['name']}` ({p['description']}; {system}{asked}). "


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# mmeff eval: {results['model']} ({results['family']})", "",
             f"Data: `{results['data']}`; limit: {results['limit']}; batch size {results['batch_size']}; "
             f"CHAIR max new tokens {results['generation']['chair_max_new_tokens']}. "
             + (f"CHAIR protocol `{results['chair']['protocol']}` ({results['chair']['protocol_is']}), images "
                f"`{results['chair']['images']}` ({results['chair']['n_images']}). " if "chair" in results else "")
             + _prompt_line(results) + "POPE/CHAIR in %, MME in points; cost = mean per sample.", ""]
    head: list[str] = ["preset"]
    table = []
    for run in results["runs"]:
        cells = [run["preset"]]
        cols = ["preset"]
        for task, m in run["tasks"].items():
            for name, value in _headline(task, m):
                cols.append(name)
                cells.append(value)
        c = run["cost"]
        cols += ["visual tokens kept", "KV cache (MB)", "prefill (ms)", "tokens/s"]
        cells += [f"{c['visual_tokens_kept']:.1f} / {c['visual_tokens_in']:.1f}", _fmt(c["kv_cache_bytes"], 1e-6, 3),
                  _fmt(c["prefill_ms"]), _fmt(c["tokens_per_s"])]
        head = cols
        table.append(cells)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += ["", *_column_notes(results)]
    delta_rows = [r for r in results["runs"] if "delta" in r]
    if delta_rows:
        lines += ["", f"## Change vs `none` (95% paired-bootstrap CI, {results['bootstrap']['n_boot']} resamples)", ""]
        cols = [(t, k) for t, ms in delta_rows[0]["delta"].items() for k in ms]
        lines += ["| preset | " + " | ".join(f"{t} {k}" for t, k in cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for r in delta_rows:
            cells = []
            for t, k in cols:
                d = r["delta"][t][k]
                scale = 1.0 if t == "mme" else 100.0
                cells.append(f"{d['delta'] * scale:+.1f} [{d['lo'] * scale:+.1f}, {d['hi'] * scale:+.1f}]")
            lines.append(f"| {r['preset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- writing ---------------------------------------------------------------------------------------------------
def log_path(output: Path, preset: str, task: str) -> Path:
    """Where a preset's sample log of a task lives in an output folder."""
    safe = preset.replace("/", "_").replace(os.sep, "_")
    return output / "samples" / safe / f"{task}.jsonl"


def write_all(output: Path, results: dict[str, Any], samples: dict[str, list[Sample]] | None = None) -> None:
    """results.json, results.md and the plot; with ``samples`` (``--log-samples``) also the CHAIR per-caption
    word lists as ``samples/<preset>/chair_words.json`` in the official evaluator's output format."""
    from .plots import plot_accuracy_vs_tokens

    details = results.pop("_details", {})
    if samples is not None:
        for preset, per_task in details.items():
            if "chair" in per_task:
                run = next(r for r in results["runs"] if r["preset"] == preset)
                m = run["tasks"]["chair"]
                doc = {"overall_metrics": {"CHAIRs": m["chair_s"], "CHAIRi": m["chair_i"], "Recall": m["recall"],
                                           "Len": m["len"]}, "sentences": per_task["chair"],
                       "protocol": results.get("chair", {}).get("protocol")}
                atomic_write_text(log_path(output, preset, "chair").with_name("chair_words.json"),
                                  json.dumps(doc, indent=1) + "\n")
    atomic_write_text(output / RESULTS_JSON, json.dumps(results, indent=1) + "\n")
    atomic_write_text(output / RESULTS_MD, render_markdown(results))
    plot_accuracy_vs_tokens(results, output / PLOT_PNG)
