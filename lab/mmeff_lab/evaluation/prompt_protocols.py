"""Prompt protocols: what ``mmeff eval`` asks per benchmark, as data (``protocols/*.toml``, ``--prompt-protocol``).

A protocol names, per benchmark (``pope``, ``mme``, ``chair``), the text of the user turn built from the
benchmark's question (``template`` with ``{question}``, after ``remove``: an ending taken off the question when
it has it) and, optionally, a ``system`` prompt added as a system turn when the chat template does not write
that text already. Each file says where it comes from (``source``: a released script, an lmms-eval /
VLMEvalKit task, or ours) and which families (``families``) or model specs (``models``) it is the default of.

``--prompt-protocol``: ``family`` (default: the protocol whose ``models`` names the ``--model`` spec, else the
one whose ``families`` names the model's family, else ``raw``), a shipped name (:func:`shipped_names`) or the
path of a ``.toml`` file in the same format. The resolved protocol, its full content and the chat text of
each task's first sample are recorded in results.json (``prompt_protocol``) and named in results.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmeff.errors import MmeffError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PROTOCOL_DIR = Path(__file__).resolve().parent / "protocols"
DEFAULT = "family"
FALLBACK = "raw"
BENCHMARKS = ("pope", "mme", "chair")
_TOP_KEYS = {"name", "description", "source", "families", "models", "system", *BENCHMARKS}
_TASK_KEYS = {"template", "remove", "source"}


class PromptProtocolError(MmeffError):
    """An unknown protocol name or a malformed protocol file; the message lists the valid names."""


@dataclass(frozen=True)
class TaskPrompt:
    template: str  # "{question}" is replaced by the benchmark's question (after ``remove``)
    remove: str = ""
    source: str = ""

    def build(self, question: str | None) -> str:
        if "{question}" not in self.template:
            return self.template
        if question is None:
            raise ValueError(f"template {self.template!r} needs the benchmark's question")
        if self.remove and question.endswith(self.remove):
            question = question[: -len(self.remove)]
        return self.template.replace("{question}", question)


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    source: str
    system: str | None
    families: tuple[str, ...]
    models: tuple[str, ...]
    tasks: dict[str, TaskPrompt]
    file: str  # "shipped:<name>.toml" or the path given

    def prompt(self, task: str, question: str | None) -> str:
        """The user-turn text of ``task`` (``pope_random``... count as ``pope``) for ``question``."""
        return self.tasks[benchmark(task)].build(question)

    def apply(self, task: str, samples: list[Any]) -> list[Any]:
        """``samples`` (tasks.Sample) with their prompts built by this protocol from ``meta["question"]``."""
        return [replace(s, prompt=self.prompt(task, s.meta.get("question"))) for s in samples]

    def content(self) -> dict[str, Any]:
        """Everything the protocol says (recorded in results.json)."""
        return {"name": self.name, "description": self.description, "source": self.source, "file": self.file,
                "system": self.system,
                "tasks": {b: {"template": t.template, "remove": t.remove, "source": t.source}
                          for b, t in self.tasks.items()}}


def benchmark(task: str) -> str:
    return "pope" if task.startswith("pope") else task


def shipped_names() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.toml"))


def _valid() -> str:
    return f"{DEFAULT} (each family's published evaluation), {', '.join(shipped_names())}, or a .toml file"


def parse(text: str, file: str) -> Protocol:
    """A protocol from the text of its TOML file (``file`` names it in errors and in the record)."""
    def bad(why: str) -> PromptProtocolError:
        return PromptProtocolError(f"prompt protocol {file}: {why}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise bad(f"not valid TOML ({e})") from None
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise bad(f"unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(_TOP_KEYS))}")
    for key in ("name", "description", "source"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise bad(f"'{key}' must be a non-empty string")
    system = data.get("system")
    if system is not None and (not isinstance(system, str) or not system):
        raise bad("'system' must be a non-empty string (leave it out for none)")
    lists = {}
    for key in ("families", "models"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(f"'{key}' must be a list of strings")
        lists[key] = tuple(value)
    tasks = {}
    for b in BENCHMARKS:
        table = data.get(b)
        if not isinstance(table, dict):
            raise bad(f"no [{b}] table (every protocol gives pope, mme and chair)")
        extra = set(table) - _TASK_KEYS
        if extra:
            raise bad(f"[{b}]: unknown key(s) {', '.join(sorted(extra))}; expected {', '.join(sorted(_TASK_KEYS))}")
        if not all(isinstance(table.get(k, ""), str) for k in _TASK_KEYS) or not table.get("template"):
            raise bad(f"[{b}]: 'template' must be a non-empty string ('remove', 'source': strings)")
        if b != "chair" and "{question}" not in table["template"]:
            raise bad(f"[{b}]: the template must contain {{question}} (the benchmark's question)")
        tasks[b] = TaskPrompt(table["template"], table.get("remove", ""), table.get("source", ""))
    return Protocol(data["name"], data["description"], data["source"], system, lists["families"], lists["models"],
                    tasks, file)


def load(spec: str) -> Protocol:
    """A shipped protocol by name, or a protocol file by path (not ``family``: see :func:`resolve`)."""
    shipped = PROTOCOL_DIR / f"{spec}.toml"
    if "/" not in spec and shipped.is_file():
        return parse(shipped.read_text(encoding="utf-8"), f"shipped:{shipped.name}")
    path = Path(spec).expanduser()
    if path.suffix == ".toml" and path.is_file():
        return parse(path.read_text(encoding="utf-8"), str(path))
    if path.suffix == ".toml":
        raise PromptProtocolError(f"--prompt-protocol {spec}: file not found")
    raise PromptProtocolError(f"unknown prompt protocol {spec!r}; valid: {_valid()}")


def check(spec: str) -> None:
    """Fail now on an unknown name or a malformed file (before any work)."""
    if spec != DEFAULT:
        load(spec)
    else:
        for name in shipped_names():
            load(name)


def resolve(spec: str, family: str, model: str) -> Protocol:
    """The protocol ``spec`` means for a model of ``family`` loaded from ``model`` (its ``--model`` spec)."""
    if spec != DEFAULT:
        return load(spec)
    protocols = [load(n) for n in shipped_names()]
    for p in protocols:
        if model in p.models:
            return p
    for p in protocols:
        if family in p.families:
            return p
    return load(FALLBACK)


def digest(spec: str) -> str:
    """A short hash of what ``spec`` can resolve to (``family``: every shipped protocol), so a resume notices a
    protocol file that changed since the interrupted run."""
    names = shipped_names() if spec == DEFAULT else [spec]
    content = [load(n).content() | {"families": load(n).families, "models": load(n).models} for n in names]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def system_turn(protocol: Protocol, processor: Any) -> str | None:
    """The system prompt to add for ``processor``: None when the protocol has none or the chat template writes
    it already; an error when the template drops a system turn (the protocol could not be followed)."""
    from mmeff.families.prompt import chat_text

    if protocol.system is None or protocol.system in chat_text(processor, "?"):
        return None
    if protocol.system not in chat_text(processor, "?", system=protocol.system):
        raise PromptProtocolError(f"prompt protocol {protocol.name!r} has a system prompt, but this model's chat "
                                  "template drops system turns; choose --prompt-protocol raw, another protocol or "
                                  "a .toml file without 'system'")
    return protocol.system


def record(spec: str, protocol: Protocol, system: str | None, rendered: dict[str, str]) -> dict[str, Any]:
    """What results.json says about the prompts: the protocol asked for, the one used with its full content,
    whether the system prompt was added, and each task's first sample as the chat template wrote it."""
    return {"requested": spec, **protocol.content(), "system_added": system is not None, "rendered": rendered}


__all__ = ["DEFAULT", "PromptProtocolError", "Protocol", "TaskPrompt", "check", "digest", "load", "record",
           "resolve", "shipped_names", "system_turn"]
