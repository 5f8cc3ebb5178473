"""``mmeff eval``: run presets on POPE / CHAIR / MME and write results.json, results.md and a plot.

Data-parallel: ``accelerate launch [--cpu] --num_processes N -m mmeff_lab.cli eval ...`` (or ``torchrun
--nproc_per_node N -m mmeff_lab.cli eval ...``) gives the numbers of a single process (docs/evaluation.md).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer


def eval_command(
    model: str = typer.Option("reference-llava", "--model", help="Local dir, hub id, reference-llava/-qwen2vl, "
                              "or tiny-<family>."),
    preset: str = typer.Option("none", "--preset", help="Preset(s), comma-separated; 'none' always runs first."),
    tasks: str = typer.Option("pope,chair,mme", "--tasks", help="pope, pope_random, pope_popular, "
                              "pope_adversarial, chair, mme (comma-separated)."),
    data: str = typer.Option("synthetic", "--data", help="'synthetic' or a folder (see docs/evaluation.md)."),
    limit: int | None = typer.Option(None, "--limit", help="First N samples per task."),
    batch_size: int = typer.Option(1, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: float32 on "
                                     "cpu, bfloat16 on cuda)."),
    output: Path = typer.Option(Path("out"), "--output", help="Output folder."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Keep per-sample logs (DIR/samples/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --output (a finished one "
                                "is reported, not recomputed)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier evaluation in --output."),
    chair_max_new_tokens: int = typer.Option(512, "--chair-max-new-tokens"),
    chair_protocol: str = typer.Option("original", "--chair-protocol", help="CHAIR words: original (the "
                                       "standalone CHAIR script), opera (OPERA's chair.py) or wordnet."),
    chair_images: str = typer.Option("pope", "--chair-images", help="CHAIR images: pope (the 500 POPE images; "
                                     "synthetic data: its CHAIR set) or a file of image ids."),
    prompt_protocol: str = typer.Option("family", "--prompt-protocol", help="What is asked: family (each "
                                        "family's published evaluation: llava-1.5, qwen2-vl, ...), llava-1.5, "
                                        "qwen2-vl, lmms-eval, raw, mmeff-0, or a .toml protocol file "
                                        "(docs/evaluation.md, Prompt protocols)."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the confidence intervals."),
    clipscore: str | None = typer.Option(None, "--clipscore", help="CLIPScore of the CHAIR captions with an "
                                         "open_clip model: MODEL:PRETRAINED (checkpoint file or tag), e.g. "
                                         "ViT-B-32:/path/weights.pt (pip install \"mmeff[clip]\")."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Decode from CUDA graphs (presets that allow "
                                     "it; the others decode eagerly). Needs --device cuda."),
) -> None:
    """Evaluate presets on POPE / CHAIR / MME (accuracy, hallucination and measured cost)."""
    from mmeff_lab.evaluation.runner import EvalConfig, run_eval
    from mmeff_lab.models.loading import resolve_device

    device = resolve_device(device)
    cfg = EvalConfig(model=model, presets=preset, tasks=tasks, data=data, limit=limit, batch_size=batch_size,
                     device=device, dtype=dtype, output=output, log_samples=log_samples, resume=resume,
                     overwrite=overwrite,
                     chair_max_new_tokens=chair_max_new_tokens, chair_protocol=chair_protocol,
                     chair_images=chair_images, prompt_protocol=prompt_protocol, n_boot=n_boot, progress=progress,
                     cuda_graphs=cuda_graphs, clipscore=clipscore)
    try:
        results = run_eval(cfg)
    except KeyboardInterrupt:
        from mmeff_lab.evaluation.runner import progress_report

        args = [a for a in sys.argv[1:] if a != "--overwrite"]
        command = "mmeff " + shlex.join(args + ([] if "--resume" in args else ["--resume"]))
        where = progress_report(cfg)
        hint = "" if where.startswith("before") else f"; continue with: {command}"
        typer.echo(f"interrupted {where}{hint}", err=True)
        raise typer.Exit(130) from None
    if results is not None and resume and results.get("_finished_before"):
        typer.echo(f"nothing to do: {output} holds a finished evaluation with these settings", err=True)
    if results is not None:
        from mmeff_lab.evaluation.results import RESULTS_MD

        typer.echo((output / RESULTS_MD).read_text())


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
