"""The evaluation runner: presets x tasks on one model, sample logs, resume, data parallelism, results.

Flow: load data and model; for each preset (``none`` always first) wrap the model, and for each task run
the batches not yet in the sample log ``DIR/samples/<preset>/<task>.jsonl`` (appended and fsynced per batch);
then the main process scores everything *from the logs*, so an interrupted run continued with ``resume``
gives the numbers of an uninterrupted one.

Batches are formed from the whole task before sharding, and under ``accelerate launch`` / ``torchrun`` each
process takes every ``world``-th pending batch; answers are gathered on the main process, which alone writes.
A batch is the same in any process count, so the numbers are the same too (timing fields aside).

Cost per sample (``handle.stats`` of the batch's prefill): visual tokens in / kept are the batch mean (mean
over decoder layers), KV-cache bytes the batch's measured cache divided by the batch size (left padding
included); prefill_ms the batch's prefill wall time; tokens/s = generated tokens / generate wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmeff.errors import MmeffError
from mmeff.io import atomic_write_text

from . import prompt_protocols as pp
from . import results as res
from .results import log_path
from .tasks import DataSource, Sample, add_clip_s, load_samples, parse_tasks, resolve_data, score

RUN_FILE = "run.json"


class ResumeError(MmeffError):
    """An output folder whose contents do not fit the requested run (or resume without a run)."""


@dataclass
class EvalConfig:
    model: str = "reference-llava"
    presets: list[str] = field(default_factory=lambda: ["none"])
    tasks: list[str] = field(default_factory=lambda: ["pope", "chair", "mme"])
    data: str = "synthetic"
    limit: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: str | None = None
    output: Path = Path("out")
    log_samples: bool = False
    resume: bool = False
    overwrite: bool = False  # replace an earlier evaluation in ``output`` (after every input is validated)
    chair_max_new_tokens: int = 512
    chair_protocol: str = "original"  # CHAIR words: original | opera | wordnet (chair.PROTOCOLS)
    chair_images: str = "pope"  # CHAIR image set: pope (the benchmark's own) or a file of image ids
    prompt_protocol: str = pp.DEFAULT  # family | a shipped protocol name | a .toml file (prompt_protocols.py)
    prompt_record: dict[str, Any] | None = None  # what results.json records about the prompts, once resolved
    n_boot: int = 1000
    progress: bool = True
    cuda_graphs: bool = False  # decode from CUDA graphs where a preset allows it (a speed setting only)
    clipscore: str | None = None  # open_clip MODEL[:PRETRAINED]: CLIPScore of the CHAIR captions (clipscore.py)
    clipscore_info: dict[str, Any] | None = None  # what results.json records about it, once loaded
    counts: dict[str, int] = field(default_factory=dict)  # samples per task, once loaded (progress reports)

    def settings(self) -> dict[str, Any]:
        """What must match for a resume to continue the same run."""
        return {"model": self.model, "presets": self.presets, "tasks": self.tasks, "data": str(self.data),
                "limit": self.limit, "batch_size": self.batch_size, "dtype": self.dtype,
                "chair_max_new_tokens": self.chair_max_new_tokens, "prompt_protocol": self.prompt_protocol,
                "prompt_protocol_digest": pp.digest(self.prompt_protocol),
                **({"chair_protocol": self.chair_protocol, "chair_images": self.chair_images}
                   if "chair" in self.tasks else {}),
                **({"clipscore": self.clipscore} if self.clipscore else {})}


def progress_report(cfg: EvalConfig) -> str:
    """Where a run stands, from its sample logs: the first preset / task with samples left."""
    if not (cfg.output / RUN_FILE).is_file():
        return "before the first result: nothing was written"
    for preset in cfg.presets:
        for task in cfg.tasks:
            done = len(read_log(log_path(cfg.output, preset, task)))
            total = cfg.counts.get(task)
            if total is None or done < total:
                return f"at {preset} / {task}, {done}{f' of {total}' if total is not None else ''} samples done"
    return "after every sample (scoring)"


def parse_presets(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated presets; ``none`` is always the first row (the baseline of every delta)."""
    names = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    from mmeff.presets import resolve

    for name in names:
        resolve(name, None, {})  # fail before any work on an unknown preset (message lists the valid ones)
    return ["none", *dict.fromkeys(n for n in names if n != "none")]


# -- distribution ------------------------------------------------------------------------------------------------
class Dist:
    """Process index / count and object gathering; a single process unless launched distributed."""

    def __init__(self, device: str = "cpu") -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            # cpu=True selects gloo: without it accelerate sees no GPU and stays single-process
            self.state = PartialState(cpu=device == "cpu")

    @property
    def rank(self) -> int:
        return self.state.process_index if self.state else 0

    @property
    def world(self) -> int:
        return self.state.num_processes if self.state else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state:
            self.state.wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        if not self.state:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def device(self, requested: str) -> str:
        if requested == "cuda" and self.state:
            return str(self.state.device)
        return requested


# -- sample logs -------------------------------------------------------------------------------------------------
def read_log(path: Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Records by sample id. A last line cut by a kill (no newline, bad JSON) is dropped (``repair`` rewrites
    the file without it); a bad line elsewhere is an error naming the line."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # the unterminated tail of an interrupted write
                if repair:
                    atomic_write_text(path, "\n".join(lines[:-1]) + "\n" if lineno > 1 else "")
                break
            raise ResumeError(f"{path}:{lineno}: corrupt sample log line ({e.msg})") from e
        out[rec["id"]] = rec
    return out


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    """One write per batch, fsynced, so a kill loses at most the batch being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_output(cfg: EvalConfig) -> str:
    """What to do with ``--output`` (nothing is written here): "new" (claimed at the first result), "resume"
    (an interrupted run with the same settings), "finished" (``--resume`` of a finished run: nothing to do) or
    "overwrite" (``--overwrite`` of an earlier evaluation: removed once every input is validated)."""
    out = cfg.output
    run_file = out / RUN_FILE
    settings = cfg.settings()
    held = run_file.exists() or (out / "samples").exists() or (out / res.RESULTS_JSON).exists()
    if cfg.resume and cfg.overwrite:
        raise MmeffError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise MmeffError(f"--output {out} is a file, not a folder")
    if cfg.overwrite:
        if not held and out.is_dir() and any(out.iterdir()):
            raise MmeffError(f"--overwrite: {out} holds files but no mmeff evaluation; choose another --output folder")
        return "overwrite" if held else "new"
    if cfg.resume:
        if not run_file.is_file():
            raise ResumeError(f"{out}: nothing to resume ({RUN_FILE} missing); run without --resume first")
        old = json.loads(run_file.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ResumeError(f"{run_file}: --resume with other settings than the interrupted run: "
                              + "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        return "finished" if old.get("finished") and (out / res.RESULTS_JSON).is_file() else "resume"
    if held:
        finished = run_file.is_file() and json.loads(run_file.read_text()).get("finished")
        what = "a finished evaluation" if finished else "an interrupted evaluation"
        raise ResumeError(f"{out} already holds {what}; --resume "
                          + ("reports it" if finished else "continues it")
                          + ", --overwrite starts again, or choose another --output folder")
    return "new"


class _Claim:
    """Claims ``--output`` at the first result: the folder and its run.json appear together (the run file is
    written atomically), so a run that fails before producing anything leaves no folder behind."""

    def __init__(self, cfg: EvalConfig, done: bool) -> None:
        self.cfg, self.done = cfg, done

    def __call__(self) -> None:
        if not self.done:
            self.cfg.output.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.cfg.output / RUN_FILE, json.dumps(self.cfg.settings(), indent=1) + "\n")
            self.done = True

    def finish(self) -> None:
        self()
        atomic_write_text(self.cfg.output / RUN_FILE,
                          json.dumps({**self.cfg.settings(), "finished": True}, indent=1) + "\n")


# -- generation --------------------------------------------------------------------------------------------------
@contextmanager
def _prefill_timer(model: torch.nn.Module, sync: bool) -> Iterator[dict[str, float]]:
    """Wall time of the first forward call (the prefill) of a ``generate``."""
    t: dict[str, float] = {}

    def pre(*_: Any) -> None:
        if "start" not in t:
            if sync:
                torch.cuda.synchronize()
            t["start"] = time.perf_counter()

    def post(*_: Any) -> None:
        if "ms" not in t:
            if sync:
                torch.cuda.synchronize()
            t["ms"] = 1000 * (time.perf_counter() - t["start"])

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        yield t
    finally:
        for h in handles:
            h.remove()


def _eos_ids(model: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@torch.no_grad()
def generate_batch(model: Any, processor: Any, handle: Any, batch: Sequence[Sample], batch_index: int,
                   system: str | None = None) -> list[dict[str, Any]]:
    """Greedy answers for one batch plus its measured cost, as sample-log records (``system``: the prompt
    protocol's system turn, when the chat template lacks it)."""
    from PIL import Image

    from mmeff.families.prompt import make_inputs

    images = []
    for s in batch:
        with Image.open(s.image) as im:
            images.append([im.convert("RGB")])
    inputs = make_inputs(processor, [s.prompt for s in batch], images, system=system).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    start = time.perf_counter()
    with _prefill_timer(model, cuda) as timer:
        out = model.generate(**inputs, max_new_tokens=batch[0].max_new_tokens, do_sample=False, num_beams=1)
    if cuda:
        torch.cuda.synchronize()
    gen_ms = 1000 * (time.perf_counter() - start)
    new = out[:, inputs["input_ids"].shape[1]:]
    texts = processor.batch_decode(new, skip_special_tokens=True)
    eos = _eos_ids(model)
    stats = handle.stats
    b = len(batch)
    records = []
    for s, row, text in zip(batch, new.tolist(), texts):
        n_new = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
        records.append({
            "id": s.id, "answer": text.strip(), "batch": batch_index, "batch_size": b, "new_tokens": n_new,
            "visual_tokens_in": stats["visual_tokens_in"], "visual_tokens_kept": stats["visual_tokens_kept"],
            "kv_cache_bytes": stats["kv_cache_bytes"] / b,
            "prefill_ms": stats.get("prefill_ms", timer.get("ms")), "generate_ms": gen_ms,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(model.device) if cuda else None,
        })
    return records


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text("-- smp/s" if task.speed is None else f"{task.speed:.2f} smp/s")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), SpeedColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)


def run_task(model: Any, processor: Any, handle: Any, samples: list[Sample], log: Path, batch_size: int,
             dist: Dist, progress: Any, description: str, claim: Any = None, system: str | None = None) -> None:
    """Run the batches of ``samples`` that the log lacks; only the main process writes the log."""
    done = read_log(log)
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    pending = [(i, [s for s in b if s.id not in done]) for i, b in enumerate(batches)]
    pending = [(i, b) for i, b in pending if b]
    bar = progress.add_task(description, total=len(samples), completed=len(samples) - sum(len(b) for _, b in pending))
    for r in range(0, len(pending), dist.world):
        mine = pending[r + dist.rank] if r + dist.rank < len(pending) else None
        records = generate_batch(model, processor, handle, mine[1], mine[0], system) if mine else []
        gathered = dist.gather(records)
        if dist.main:
            flat = [rec for part in gathered for rec in part]
            if flat:
                if claim is not None:
                    claim()
                _append(log, sorted(flat, key=lambda x: x["batch"]))
            progress.update(bar, advance=len(flat))
        dist.barrier()


# -- the whole run -----------------------------------------------------------------------------------------------
def collect(cfg: EvalConfig, samples: dict[str, list[Sample]], data: DataSource, family: str) -> dict[str, Any]:
    """Score every preset x task from the sample logs and build the results dictionary."""
    rows = []
    for preset in cfg.presets:
        per_task = {}
        for task, task_samples in samples.items():
            path = log_path(cfg.output, preset, task)
            logged = read_log(path)
            missing = [s.id for s in task_samples if s.id not in logged]
            if missing:
                raise ResumeError(f"{path}: {len(missing)} samples not logged (first: {missing[:3]}); "
                                  "run again with --resume")
            recs = [logged[s.id] for s in task_samples]
            answers = [r["answer"] for r in recs]
            scored = score(task, task_samples, answers, data.chair_ground_truth if task == "chair" else None,
                           data.mme_benchmark, cfg.chair_protocol)
            if task == "chair" and cfg.clipscore:
                unscored = [r["id"] for r in recs if "clip_s" not in r]
                if unscored:
                    raise ResumeError(f"{path}: {len(unscored)} captions without CLIP-S (first: {unscored[:3]}); "
                                      "run again with --resume")
                scored = add_clip_s(scored, [r["clip_s"] for r in recs])
            per_task[task] = (scored, recs)
        rows.append((preset, per_task))
    return res.build_results(cfg, family, data.describe(), rows, cfg.n_boot)


def _task_samples(task: str, data: DataSource, cfg: EvalConfig) -> list[Sample]:
    if task == "chair":
        from .chair_images import chair_samples

        return chair_samples(cfg.chair_images, data, cfg.limit, cfg.chair_max_new_tokens)
    return load_samples(task, data, cfg.limit, cfg.chair_max_new_tokens)


def run_eval(cfg: EvalConfig) -> dict[str, Any] | None:
    """Run the evaluation; writes results.json / results.md / plots on the main process and returns the
    results there (None on the other processes)."""
    import mmeff
    from mmeff_lab.models.loading import load_model, resolve_spec

    cfg.tasks = parse_tasks(cfg.tasks)
    cfg.presets = parse_presets(cfg.presets)
    pp.check(cfg.prompt_protocol)  # an unknown protocol or a malformed file: one error, before any work
    if cfg.batch_size < 1:
        raise MmeffError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.cuda_graphs and not cfg.device.startswith("cuda"):
        raise MmeffError(f"--cuda-graphs needs --device cuda, got --device {cfg.device}")
    if "chair" in cfg.tasks:  # an unknown protocol, opera without its nltk data, a bad image set: fail now
        from . import chair, chair_images

        chair.normaliser(cfg.chair_protocol)
        chair_images.check_spec(cfg.chair_images)
    cfg.output = Path(cfg.output)
    dist = Dist(cfg.device)
    mode = "new"
    scorer = None
    if dist.main:
        data = resolve_data(cfg.data)  # generates the synthetic set once, before the others read it
        samples = {t: _task_samples(t, data, cfg) for t in cfg.tasks}
        cfg.counts = {t: len(s) for t, s in samples.items()}
        resolve_spec(cfg.model)  # bad inputs fail before the output folder is claimed
        scorer = _clip_scorer(cfg)  # loaded on the CPU now (a bad model or missing package fails here)
        mode = _check_output(cfg)
        if mode == "finished":
            return {**json.loads((cfg.output / res.RESULTS_JSON).read_text()), "_finished_before": True}
    dist.barrier()
    if not dist.main:
        data = resolve_data(cfg.data)
        samples = {t: _task_samples(t, data, cfg) for t in cfg.tasks}
    model, processor, family = load_model(cfg.model, device=dist.device(cfg.device), dtype=cfg.dtype)
    samples, system = _apply_protocol(cfg, samples, family, processor)
    _validate(model, processor, family, cfg, samples, system)  # every preset on this model, the prompt, the images
    if dist.main:
        if mode == "overwrite":
            shutil.rmtree(cfg.output)
        for preset in cfg.presets:
            for task in cfg.tasks:
                read_log(log_path(cfg.output, preset, task), repair=True)
    dist.barrier()
    claim = _Claim(cfg, done=mode == "resume")
    with _progress(cfg.progress and dist.main) as progress:
        for preset in cfg.presets:
            with mmeff.wrap(model, preset, cuda_graphs=cfg.cuda_graphs and graphable(preset, family),
                            timing=True) as handle:
                for task, task_samples in samples.items():
                    run_task(model, processor, handle, task_samples, log_path(cfg.output, preset, task),
                             cfg.batch_size, dist, progress, f"{preset} / {task}", claim, system)
        if dist.main and scorer is not None:  # per-caption CLIP-S into the CHAIR sample logs
            from .clipscore import score_sample_logs

            score_sample_logs(scorer.to(dist.device(cfg.device)), cfg.presets, samples["chair"], cfg.output,
                              read_log, progress)
    if not dist.main:
        return None
    results = collect(cfg, samples, data, family)
    claim()
    res.write_all(cfg.output, results, samples if cfg.log_samples else None)
    if not cfg.log_samples:
        shutil.rmtree(cfg.output / "samples", ignore_errors=True)
    claim.finish()
    return results


def _apply_protocol(cfg: EvalConfig, samples: dict[str, list[Sample]], family: str, processor: Any
                    ) -> tuple[dict[str, list[Sample]], str | None]:
    """The samples with the prompts of the run's protocol (resolved for this family), the system turn to add
    (None: none), and ``cfg.prompt_record`` for results.json."""
    from mmeff.families.prompt import chat_text

    if getattr(processor, "chat_template", None) is None and getattr(
            getattr(processor, "tokenizer", None), "chat_template", None) is None:
        raise MmeffError(f"{cfg.model}: the processor has no chat template (chat_template.json or "
                         "tokenizer_config.json), which the prompts are built with")
    protocol = pp.resolve(cfg.prompt_protocol, family, cfg.model)
    samples = {t: protocol.apply(t, s) for t, s in samples.items()}
    try:
        system = pp.system_turn(protocol, processor)
        rendered = {t: chat_text(processor, s[0].prompt, system=system) for t, s in samples.items() if s}
    except pp.PromptProtocolError:
        raise
    except Exception as e:  # a template that cannot render is a property of the checkpoint
        raise MmeffError(f"{cfg.model}: the processor cannot build a prompt ({type(e).__name__}: {e})") from None
    cfg.prompt_record = pp.record(cfg.prompt_protocol, protocol, system, rendered)
    return samples, system


def _clip_scorer(cfg: EvalConfig) -> Any:
    """The CLIPScore model of ``--clipscore`` (None without it); the flag needs the chair task."""
    if not cfg.clipscore:
        return None
    if "chair" not in cfg.tasks:
        raise MmeffError(f"--clipscore scores the chair task's captions; --tasks {','.join(cfg.tasks)} has no chair")
    from .clipscore import load_scorer

    scorer = load_scorer(cfg.clipscore)
    cfg.clipscore_info = scorer.describe()
    return scorer


def _validate(model: Any, processor: Any, family: str, cfg: EvalConfig, samples: dict[str, list[Sample]],
              system: str | None = None) -> None:
    """Refuse now what would fail mid-run: a preset this model cannot run (wrapped and removed again, which checks
    families, configs and trained-head files), a processor that cannot build the prompt, a missing image (the
    chat template itself is checked by :func:`_apply_protocol`)."""
    import mmeff
    from mmeff.families.prompt import make_inputs

    for preset in cfg.presets:
        try:
            mmeff.wrap(model, preset, cuda_graphs=cfg.cuda_graphs and graphable(preset, family))
            mmeff.unwrap(model)
        except MmeffError as e:
            raise MmeffError(f"preset {preset!r} cannot run on this {family} model: {e}") from None
    missing = sorted({str(s.image) for task_samples in samples.values() for s in task_samples
                      if not Path(s.image).is_file()})
    if missing:
        raise MmeffError(f"{len(missing)} sample image(s) missing (first: {', '.join(missing[:5])})")
    first = next((task_samples[0] for task_samples in samples.values() if task_samples), None)
    if first is not None:
        from PIL import Image

        try:
            with Image.open(first.image) as im:
                make_inputs(processor, [first.prompt], [[im.convert("RGB")]], system=system)
        except Exception as e:  # any processor failure here is a property of the checkpoint
            raise MmeffError(f"{cfg.model}: the processor cannot build a prompt ({type(e).__name__}: {e})") from None


def graphable(preset: str, family: str) -> bool:
    """Whether every method of ``preset`` may decode from a CUDA graph (``Method.graphable``)."""
    from mmeff.engine.method import lookup
    from mmeff.presets import resolve

    return all(lookup(c.method)[1].graphable for c in resolve(preset, family, {}))


__all__ = ["EvalConfig", "ResumeError", "log_path", "parse_presets", "read_log", "run_eval"]
