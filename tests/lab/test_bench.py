"""``mmeff bench`` on CPU: the whole measuring path runs (small and quick) so it never rots."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mmeff_lab.cli import app
from mmeff_lab.evaluation import speed


def test_architectures_are_listed():
    assert {"llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b", "qwen3-vl-8b"} <= set(speed.architectures())
    spec = speed.arch_spec("llava-1.5-7b")
    assert spec["config"]["text_config"]["num_hidden_layers"] == 32


def test_bench_cli_on_cpu(tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(app, [
        "bench", "--model", "tiny-llava", "--preset", "fastv", "--device", "cpu", "--dtype", "fp32",
        "--batch-size", "1,2", "--repeats", "1", "--warmup", "1", "--new-tokens", "3", "--output", str(out),
        "--cuda-graphs", "both",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    assert [r["batch_size"] for r in data] == [1, 2]
    rows = data[1]["rows"]
    assert [r["preset"] for r in rows] == ["none", "fastv"]
    none, fastv = rows
    assert fastv["visual_tokens_kept"] < none["visual_tokens_kept"] == none["visual_tokens_in"]
    assert fastv["kv_cache_bytes"] < none["kv_cache_bytes"]
    assert fastv["kv_visual_ratio"] < 1.0 and none["kv_visual_ratio"] == 1.0
    assert all(r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["generate_ms"] > 0 for r in rows)
    # the graph rows need CUDA: on CPU each is a named error, and the eager rows are all still there
    errors = data[1]["errors"]
    assert sorted(errors) == ["fastv [graphs]", "none [graphs]"]
    assert all("one CUDA device" in e for e in errors.values())
    result = CliRunner().invoke(app, ["bench", "--model", "tiny-llava", "--device", "cpu", "--cuda-graphs", "on"])
    assert result.exit_code == 2 and "needs --device cuda" in result.output
    assert (out / "bench.png").stat().st_size > 0 and "| fastv" in (out / "bench.md").read_text()


def test_bench_synthesises_inputs_for_every_family(tiny_model_dir):
    import torch

    from mmeff.families import adapter_for
    from mmeff_lab.models.factory import FAMILIES, load_tiny

    for family in FAMILIES:
        model, _ = load_tiny(tiny_model_dir(family))
        size = (64, 96) if family != "llava" else None
        inputs = speed.synth_inputs(model, batch=2, images=2, size=size)
        spans = adapter_for(model).spans(inputs["input_ids"], inputs)
        assert [len(s) for s in spans] == [2, 2], family
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all(), family


def test_rows_slower_than_none_in_their_mode_are_flagged():
    def row(preset, ms, graphs, mode=""):
        return dict(preset=preset, prefill_ms=ms, cuda_graphs=graphs, prefill_graph=mode, visual_tokens_kept=1.0,
                    visual_tokens_in=1.0, vision_ms=1.0, ideal_prefill_ms=1.0, speedup=0.0, ideal_speedup=1.0,
                    decode_tokens_per_s=1.0, peak_memory_bytes=None, kv_cache_bytes=0, kv_visual_ratio=1.0)
    rows = [row("none", 10.0, False), row("fastv", 12.0, False), row("none", 5.0, True, "replayed"),
            row("fastv", 4.0, True, "replayed"), row("dyvte", 6.0, True, "eager: the capture failed (x)")]
    for r in rows:  # the ratios bench() computes: against `none` of the same mode
        base = next(b for b in rows if b["preset"] == "none" and b["cuda_graphs"] == r["cuda_graphs"])
        r["speedup"] = base["prefill_ms"] / r["prefill_ms"]
    md = speed.to_markdown(dict(model="M", random_weights=True, device="cpu", dtype="bf16", batch_size=1,
                                sequence_length=9, new_tokens=1, repeats=1, rows=rows))
    assert "| fastv **slower than none** |" in md and "| fastv [graphs] |" in md
    assert "| dyvte [graphs] (prefill eager: the capture failed (x)) **slower than none** |" in md
    assert "**Slower than `none` in the same mode (prefill)**: fastv, dyvte [graphs]" in md
    assert "*ideal*: the unwrapped vision encoder" in md and "Timed on the CPU" in md


def test_a_vision_side_stage_row_says_its_ideal_counts_the_whole_tower(tiny_model_dir):
    """vflowopt-vit prunes inside the tower; the ideal (unpruned tower + shortened decoder) is no limit for it."""
    from mmeff_lab.models.factory import load_tiny

    model, _ = load_tiny(tiny_model_dir("qwen2_vl"))
    result = speed.bench(model, ["vflowopt-vit-90", "fastv"], image_size=(112, 112), new_tokens=2, repeats=1,
                         warmup=1)
    rows = {r["preset"]: r for r in result["rows"]}
    vit = rows["vflowopt-vit-90"]["extra"]
    assert vit["vision_block"] == 0 and 0.0 < vit["vision_units_kept"] < 0.2
    assert "vision_units_kept" not in rows["fastv"]["extra"] and "vision_units_kept" not in rows["none"]["extra"]
    md = speed.to_markdown(result)
    assert md.count("†") == 3  # the vit row's two ideal cells and its footnote
    assert "- † `vflowopt-vit-90` drops merged tokens inside the vision tower (after block 0," in md
