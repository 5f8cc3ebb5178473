"""The tree's architecture, enforced: the library (``mmeff``) never imports the lab (``mmeff_lab``), no import cycle
anywhere, ``wrap`` loads nothing of the lab or of the trainers, methods install no torch hooks of their own and
hold no family-specific branch, and nothing reads the shared folder that sits beside a developer's checkout."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import mmeff
from mmeff.engine.method import Method, lookup
from mmeff.presets import available_presets

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mmeff": ROOT / "mmeff", "mmeff_lab": ROOT / "lab" / "mmeff_lab"}
# the `mmeff` console script lives in the library so a library-only install can say what to install; it only
# forwards to the lab's command line (mmeff/cli.py)
ENTRY_POINT = "mmeff.cli"
# method modules that are never loaded by wrap: trainers and tuners, run by the lab's command line
OFFLINE = ("mmeff.methods.dyvte.train", "mmeff.methods.explain.train", "mmeff.methods.vflowopt.tune",
           "mmeff.methods._teacher")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [pkg, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of ours that ``name`` imports anywhere (module level, TYPE_CHECKING or inside functions)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _is_lab(module: str) -> bool:
    return module.split(".")[0] == "mmeff_lab"


def test_library_never_imports_the_lab() -> None:
    bad = sorted((m, t) for m, targets in GRAPH.items() if not _is_lab(m) and m != ENTRY_POINT
                 for t in targets if _is_lab(t))
    assert not bad, f"library modules importing the lab: {bad}"
    assert {t for t in GRAPH[ENTRY_POINT] if _is_lab(t)} == {"mmeff_lab.cli"}


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_checker_sees_imports() -> None:  # the graph is not vacuous: known edges are found
    assert "mmeff.engine.pipeline" in GRAPH["mmeff.api"]
    assert "mmeff.engine.method" in GRAPH["mmeff.methods.fastv"]
    assert "mmeff.api" in GRAPH["mmeff"]
    assert any(_is_lab(t) for t in GRAPH["mmeff_lab.evaluation.runner"])


def test_methods_install_no_hooks_and_hold_no_family_branch() -> None:
    methods = [m for m in MODULES if m.startswith("mmeff.methods")]
    for name in methods:
        text = MODULES[name].read_text()
        assert "register_forward" not in text, f"{name} installs torch hooks itself"
        assert "prepend=" not in text, name
        assert ".family ==" not in text and "family in (" not in text and 'fam == "' not in text, name
        assert "sys.modules" not in text, name
    for cls in Method.__subclasses__():
        assert "attach" not in vars(cls), f"{cls.__name__} overrides attach"


SHARED_PATH = re.compile(r"""["']shared["']\s*/|/\s*["']shared["']|\.\./shared|shared[/]data|MMEFF_SHARED""")


def test_nothing_reads_the_shared_folder_beside_the_checkout() -> None:
    for path in [*ROOT.joinpath("mmeff").rglob("*.py"), *ROOT.joinpath("lab").rglob("*.py"),
                 *ROOT.joinpath("tests").rglob("*.py")]:
        if path.name == Path(__file__).name:
            continue
        assert not SHARED_PATH.search(path.read_text()), path


WRAP_SCRIPT = """
import json, sys
from transformers import AutoModelForImageTextToText
import mmeff
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], attn_implementation="sdpa")
before = set(sys.modules)
for preset in json.loads(sys.argv[2]):
    with mmeff.wrap(model, preset, **json.loads(sys.argv[3]).get(preset, {})):
        pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith("mmeff"))))
"""


def test_wrap_loads_no_lab_module(tiny_model_dir, tmp_path) -> None:
    """Every preset is wrapped in a fresh interpreter; afterwards no lab, trainer or tuner module is loaded."""
    from mmeff.heads import save_head
    from mmeff.methods.dyvte.method import DyVTERouters
    from mmeff.methods.dyvte.train import head_tensors as dyvte_tensors
    from mmeff.methods.explain.method import RelevanceMapper
    from mmeff.methods.explain.train import head_tensors as explain_tensors

    path = tiny_model_dir("llava")
    adapter = mmeff.families.adapter_for(
        __import__("transformers").AutoModelForImageTextToText.from_pretrained(path))
    hidden, layers = int(adapter.text_config.hidden_size), len(adapter.layers)
    meta = {"family": "llava", "model": "tiny", "hidden_size": hidden, "num_layers": layers}
    heads = {
        "dyvte": save_head(tmp_path / "d.safetensors", dyvte_tensors(DyVTERouters(hidden, layers, 8)),
                           {**meta, "kind": "dyvte", "width": 8}),
        "explain": save_head(tmp_path / "e.safetensors", explain_tensors(RelevanceMapper()),
                             {**meta, "kind": "explain"}),
    }
    overrides = {}
    presets = []
    for p in available_presets():
        method = lookup(mmeff.presets.get_preset(p).method)[0].method
        if method == "vflowopt-vit":  # Qwen2-VL only: refused on LLaVA (wrapped in tests/methods/test_vflowopt_vit.py)
            continue
        if method == "var":  # the tiny decoder has no sink dimensions: VAR is refused on it (tested elsewhere)
            overrides[p] = {"sink_dims": [0]}
            overrides[p]["tau"] = 2.0
        if method in heads:
            overrides[p] = {"checkpoint": str(heads[method])}
        presets.append(p)
    out = subprocess.run([sys.executable, "-c", WRAP_SCRIPT, str(path), json.dumps(presets), json.dumps(overrides)],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "mmeff.methods.vflowopt.method" in loaded  # the presets really were wrapped
    bad = [m for m in loaded if _is_lab(m) or m in OFFLINE]
    assert not bad, f"wrap loaded {bad}"


def test_library_imports_no_lab_dependency() -> None:
    lab_only = ["optuna", "matplotlib", "pycocotools", "nltk", "typer", "rich"]  # transformers may load PIL, scipy
    code = (f"import sys, mmeff, mmeff.methods; print([m for m in {lab_only!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
