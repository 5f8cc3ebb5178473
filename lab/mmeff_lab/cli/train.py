"""``mmeff train dyvte|explain``: train a method's head on a frozen model and write checkpoint + presets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

train_app = typer.Typer(no_args_is_help=True, help="Train the small heads of trained pruners (DyVTE, explain).")

MODEL = typer.Option("reference-llava", "--model", help="local dir, reference-llava|reference-qwen2vl, tiny-<family>")
DATA = typer.Option("synthetic", "--data", help="'synthetic' (reference training split) or a JSON-lines file")
OUTPUT = typer.Option(..., "--output", help="directory for the checkpoint and preset file(s)")


def _bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)


def _callback(progress: Progress, task: Any):
    def update(done: int, total: int, info: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.4g}" for k, v in info.items())
        progress.update(task, completed=done, total=total, info=text)

    return update


@train_app.command()
def dyvte(model: str = MODEL, data: str = DATA, steps: int = typer.Option(200, "--steps"), output: Path = OUTPUT,
          batch_size: int = typer.Option(4, "--batch-size"), lr: float = typer.Option(6e-5, "--lr"),
          width: int = typer.Option(2048, "--width", help="router hidden width"),
          min_layer: int = typer.Option(1, "--min-layer"), seed: int = typer.Option(0, "--seed"),
          abs_tol: float = typer.Option(0.0, "--abs-tol", help="label slack in nats added to 1.03 x the full "
                                        "answer loss (0: the paper's rule)"),
          warmup: float = typer.Option(0.0, "--warmup", help="share of the steps with a linear LR warm-up before "
                                       "the cosine decay (0: ours; the paper's released code: 0.03)"),
          exit_layers: str = typer.Option("all", "--exit-layers", help="'all': every exit layer labelled per batch "
                                          "(ours); 'one': one layer drawn per step (the paper)"),
          device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
          dtype: str | None = typer.Option(None, "--dtype")) -> None:
    """Train DyVTE routers; writes DIR/dyvte.safetensors and the preset DIR/dyvte.toml.

    The paper's settings (released code DoubtedSteam/DyVTE): --lr 6e-5 --width 2048 --warmup 0.03 --exit-layers one
    --abs-tol 0 --batch-size 128 (8 GPUs x 16), one epoch over 1% of the instruction data."""
    from mmeff.errors import MmeffError
    from mmeff.heads import save_head
    from mmeff.methods.dyvte import DyVTEConfig
    from mmeff.methods.dyvte.train import EXIT_LAYERS, head_tensors, train_dyvte, warmup_cosine
    from mmeff.presets import write_preset
    from mmeff_lab.models.loading import load_model, resolve_device
    from mmeff_lab.training.data import examples_from

    if exit_layers not in EXIT_LAYERS:  # before loading the model: a typo fails at once
        raise MmeffError(f"train dyvte: --exit-layers must be one of {', '.join(EXIT_LAYERS)}, got {exit_layers!r}")
    warmup_cosine(steps, warmup)  # checks --steps / --warmup before loading the model
    console = Console()
    vlm, processor, family = load_model(model, device=resolve_device(device), dtype=dtype)
    output.mkdir(parents=True, exist_ok=True)
    with _bar(console) as progress:
        task = progress.add_task("dyvte routers", total=steps, info="")
        routers, report = train_dyvte(vlm, processor, examples_from(data, seed), steps=steps, batch_size=batch_size,
                                      lr=lr, width=width, min_layer=min_layer, seed=seed, abs_tol=abs_tol,
                                      warmup=warmup, exit_layers=exit_layers, progress=_callback(progress, task))
    meta = {"kind": "dyvte", "family": family, "model": model, "hidden_size": routers.hidden_size,
            "num_layers": routers.num_layers, "width": width, "data": data, "abs_tol": abs_tol,
            "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
                         "exit_layers": exit_layers, "min_layer": min_layer, "seed": seed},
            "report": report}
    ckpt = save_head(output / "dyvte.safetensors", head_tensors(routers), meta)
    write_preset(output / "dyvte.toml", "dyvte", DyVTEConfig(checkpoint=str(ckpt.resolve()), min_layer=min_layer),
                 f"DyVTE routers trained on {model}")
    console.print_json(json.dumps(report))
    console.print(f"wrote {ckpt} and {output / 'dyvte.toml'} (use: mmeff eval --preset {output / 'dyvte.toml'})")


@train_app.command()
def explain(model: str = MODEL, data: str = DATA, steps: int = typer.Option(500, "--steps"), output: Path = OUTPUT,
            samples: int = typer.Option(256, "--samples", help="examples whose relevance maps are collected"),
            batch_size: int = typer.Option(4, "--batch-size"), lr: float = typer.Option(3e-3, "--lr"),
            width: int = typer.Option(16, "--width"), depth: int = typer.Option(3, "--depth"),
            seed: int = typer.Option(0, "--seed"),
            target: str = typer.Option("per-token", "--target", help="relevance target: 'per-token' (Chefer et al.: "
                                       "one backward per answer token, default) or 'summed' (ours, fast: one "
                                       "backward of the summed answer logits; the shipped heads' target)"),
            answer: str = typer.Option("teacher", "--answer", help="'teacher': the data's answer, teacher-forced; "
                                       "'greedy': the model's own greedy answer"),
            max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="length bound of a greedy answer"),
            device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
            dtype: str | None = typer.Option(None, "--dtype")) -> None:
    """Train the relevance mapper; writes DIR/explain.safetensors and presets DIR/explain-{50,75,90}.toml."""
    from mmeff.families import adapter_for
    from mmeff.heads import save_head
    from mmeff.methods.explain import ExplainConfig
    from mmeff.methods.explain.train import ANSWERS, TARGETS, check_choice, head_tensors, train_explain
    from mmeff.presets import write_preset
    from mmeff_lab.models.loading import load_model, resolve_device
    from mmeff_lab.training.data import examples_from

    check_choice("--target", target, TARGETS)  # before loading the model: a typo fails at once
    check_choice("--answer", answer, ANSWERS)
    console = Console()
    vlm, processor, family = load_model(model, device=resolve_device(device), dtype=dtype)
    output.mkdir(parents=True, exist_ok=True)
    with _bar(console) as progress:
        collect = progress.add_task("relevance maps", total=samples, info="")
        fit = progress.add_task("mapper fit", total=steps, info="")
        mapper, report = train_explain(vlm, processor, examples_from(data, seed), steps=steps, samples=samples,
                                       batch_size=batch_size, lr=lr, width=width, depth=depth, seed=seed,
                                       target=target, answer=answer, max_new_tokens=max_new_tokens,
                                       progress=_callback(progress, fit),
                                       collect_progress=_callback(progress, collect))
    adapter = adapter_for(vlm)
    meta = {"kind": "explain", "family": family, "model": model, "hidden_size": int(adapter.text_config.hidden_size),
            "num_layers": len(adapter.layers), "width": width, "depth": depth, "data": data,
            "settings": {"samples": samples, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                         "target": target, "answer": answer, "max_new_tokens": max_new_tokens},
            "report": report}
    ckpt = save_head(output / "explain.safetensors", head_tensors(mapper), meta)
    for pct in (50, 75, 90):
        write_preset(output / f"explain-{pct}.toml", f"explain-{pct}",
                     ExplainConfig(ratio=pct / 100, checkpoint=str(ckpt.resolve())),
                     f"explainability-guided pruning of {pct}% visual tokens at the LLM input "
                     f"(mapper trained on {model})")
    console.print_json(json.dumps(report))
    console.print(f"wrote {ckpt} and {output}/explain-{{50,75,90}}.toml")


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
