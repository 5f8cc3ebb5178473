"""``mmeff bench``: speed and memory of presets against the unwrapped model, in one run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from mmeff.io import atomic_write_text

ARCH_HELP = "a model id/path, 'tiny-<family>', a shipped reference, or a full-size architecture with random weights"


def bench(
    model: str = typer.Option("llava-1.5-7b", help=ARCH_HELP),
    preset: str = typer.Option("none,fastv", help="comma-separated presets; 'none' is always measured first"),
    batch_size: str = typer.Option("1", help="one or several batch sizes, comma-separated"),
    images: int = typer.Option(1, help="images per prompt"),
    image_size: str = typer.Option("", help="HxW of the synthesised images (LLaVA-NeXT / Qwen: sets the tokens)"),
    new_tokens: int = typer.Option(32, help="tokens generated for the decode measurement"),
    dtype: str = typer.Option("auto", help="bf16, fp16, fp32, or auto (bf16 on CUDA, fp32 on the CPU, as eval)"),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda or cuda:N"),
    repeats: int = typer.Option(5, help="timed repeats (median)"),
    warmup: int = typer.Option(2, help="untimed warm-up runs"),
    cuda_graphs: str = typer.Option(
        "off", help="decode steps: off (eager hooked steps), on (static KV + CUDA graph replay), both"
    ),
    output: Path = typer.Option(Path("bench-out"), help="folder for bench.json, bench.md, bench.png"),
) -> None:
    """Measure vision ms, prefill ms (= time to first token), decode tokens/s, peak memory, KV-cache bytes and
    visual tokens kept for each preset, with speed-ups against `none` and the ideal of the shortened sequence."""
    import torch

    from mmeff_lab.evaluation import speed
    from mmeff_lab.models.loading import resolve_device

    console = Console()
    modes = {"off": (False,), "on": (True,), "both": (False, True)}
    if cuda_graphs not in modes:
        raise typer.BadParameter(f"--cuda-graphs must be one of {', '.join(modes)}, got {cuda_graphs!r}")
    device = resolve_device(device)
    if cuda_graphs == "on" and not device.startswith("cuda"):  # (with 'both', the graph rows are reported as errors)
        raise typer.BadParameter("--cuda-graphs on needs --device cuda")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in dtypes:
        raise typer.BadParameter(f"--dtype must be auto, {', '.join(dtypes)}; got {dtype!r}")
    torch_dtype = dtypes[dtype]
    if model in speed.architectures():
        console.print(f"[bold]{model}[/]: full-size architecture with [red]random weights[/] (timing only)")
        net = speed.build_random(model, device, torch_dtype)
        size = speed.arch_spec(model).get("image", {}).get("size")
    else:
        from mmeff_lab.models.loading import load_model

        net, _, _ = load_model(model, device=device, dtype=torch_dtype)
        size = None
    if image_size:
        size = [int(x) for x in image_size.lower().split("x")]
    results = []
    for b in [int(x) for x in batch_size.split(",")]:
        res = speed.bench(
            net, [p.strip() for p in preset.split(",") if p.strip()], batch_size=b, images=images,
            image_size=tuple(size) if size else None, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
            cuda_graphs=modes[cuda_graphs], progress=lambda p, b=b: console.print(f"  batch {b}: {p}"),
        )
        res["command"] = "mmeff " + " ".join(sys.argv[1:])
        results.append(res)
        console.print(speed.to_markdown(res))
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "bench.json", json.dumps(results, indent=2))
    atomic_write_text(output / "bench.md", "\n".join(speed.to_markdown(r) for r in results))
    speed.plot(results, str(output / "bench.png"))
    console.print(f"wrote {output}/bench.json, bench.md, bench.png")


def register(app: typer.Typer) -> None:
    app.command()(bench)
