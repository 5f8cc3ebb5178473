"""``mmeff tune vflowopt``: search a VFlowOpt config for a token budget and write it as a preset file."""

from __future__ import annotations

from pathlib import Path

import typer

tune_app = typer.Typer(no_args_is_help=True, help="Tune a method's hyper-parameters on training data.")


@tune_app.command("vflowopt")
def vflowopt(
    model: str = typer.Option(..., help="a checkpoint folder, reference-llava / reference-qwen2vl, tiny-<family> or a "
                              "hub id (what eval accepts)"),
    budget: float = typer.Option(..., help="fraction of visual tokens removed, averaged over the decoder layers"),
    output: Path = typer.Option(..., help="preset file to write (TOML)"),
    trials: int = typer.Option(300, help="Bayesian-optimisation trials (the paper: 300)"),
    samples: int = typer.Option(30, help="tuning samples (the paper: 30)"),
    data: Path | None = typer.Option(None, help="JSON-lines file of {image, text}; default: reference TRAIN scenes"),
    seed: int = typer.Option(42, help="sampler seed"),
    batch_size: int = typer.Option(8, help="samples per forward pass (left-padded batches)"),
    timeout: float | None = typer.Option(None, help="stop starting trials after this many seconds"),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda or cuda:N"),
) -> None:
    """Maximise the summed cosine of the first generation step's last hidden state (full vs pruned)."""
    from mmeff.families.prompt import make_inputs
    from mmeff.methods.vflowopt.tune import tune_vflowopt
    from mmeff.presets import write_preset
    from mmeff_lab.models.loading import load_model, resolve_device
    from mmeff_lab.training.data import load_tuning_jsonl, reference_samples

    if batch_size < 1:
        raise typer.BadParameter(f"--batch-size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    items = load_tuning_jsonl(data, samples) if data is not None else reference_samples(samples)
    net, processor, _ = load_model(model, device=device, dtype="float32")
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    batches = [make_inputs(processor, [s.text for s in c], [[s.image] for s in c]).to(device) for c in chunks]
    cfg, score = tune_vflowopt(net, batches, budget=budget, trials=trials, seed=seed, timeout=timeout,
                               progress=typer.echo)
    name = output.stem
    write_preset(output, name, cfg, f"VFlowOpt tuned for budget {budget} on {len(items)} samples "
                                    f"(objective {score:.4f} of {len(items)})")
    typer.echo(f"wrote {output} (objective {score:.4f})")


def register(app: typer.Typer) -> None:
    app.add_typer(tune_app, name="tune")
