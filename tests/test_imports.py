"""Arrows point down: the installed package's modules import each other without cycles, the evaluation and
the shapes model import no training, and a fresh wheel holds no trainer (that is the lab's, ``lab/``).

The import graph is read from the source with ``ast``: every ``import`` and ``from ... import`` of a module,
those inside functions too (an import deferred into a function is still a dependency), relative imports
resolved. Its nodes are the package's modules other than packages' ``__init__``: an import of a package
(``from .. import __version__``, ``import conceptattention.shapes``) is no edge, so a package may re-export or
lazily import its own submodules. The rule: no cycle among those modules, through any number of steps.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import conceptattention

PACKAGE = "conceptattention"
ROOT = Path(__file__).resolve().parents[1]
#: Names of training modules; none may be in the installed package.
TRAINING_MODULES = ("train", "card", "binding", "surgery", "release", "gpu_train")


def package_modules() -> dict[str, tuple[str, bool]]:
    """Every module of the installed package: name -> (source, whether it is a package's ``__init__``)."""
    found = {PACKAGE: (Path(conceptattention.__file__).read_text(), True)}
    for info in pkgutil.walk_packages(conceptattention.__path__, PACKAGE + "."):
        spec = importlib.util.find_spec(info.name)
        found[info.name] = (Path(spec.origin).read_text(), info.ispkg)
    return found


def imported_names(name: str, source: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules that module ``name`` imports anywhere in ``source`` (relative imports resolved; for
    ``from X import Y``, X.Y when that is one of ``modules``, else X)."""
    package = name if is_package else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module
            for alias in node.names:
                child = f"{parent}.{alias.name}"
                names.add(child if child in modules else parent)
    return names


def import_graph(modules: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module -> the package's non-``__init__`` modules it imports (see the module's description)."""
    plain = {m for m, (_, is_package) in modules.items() if not is_package}
    return {
        m: {n for n in imported_names(m, source, is_package, set(modules)) if n in plain and n != m}
        for m, (source, is_package) in modules.items()
        if not is_package
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_rule_catches_an_import_deferred_into_a_function():
    """The old eval <-> shapes cycle: the shapes report imported the eval runner inside a function, and the eval
    datasets imported the shapes benchmark's constants inside a method."""
    old = {
        "conceptattention.shapes.benchmark": (
            (
                "def map_quality():\n    from ..eval.datasets import ShapesDataset\n"
                "    from ..eval.runner import evaluate\n"
            ),
            False,
        ),
        "conceptattention.eval.runner": ("from .datasets import Dataset\nfrom .. import __version__\n", False),
        "conceptattention.eval.datasets": (
            ("class ShapesDataset:\n    def __init__(self):\n        from ..shapes.benchmark import CONCEPTS\n"),
            False,
        ),
        "conceptattention.eval": ("from . import runner\n", True),  # a package importing its submodule: fine
        "conceptattention": ("from .eval import runner\n", True),
    }
    graph = import_graph(old)
    assert graph["conceptattention.shapes.benchmark"] == {
        "conceptattention.eval.datasets",
        "conceptattention.eval.runner",
    }
    assert graph["conceptattention.eval.runner"] == {"conceptattention.eval.datasets"}  # the package is no edge
    assert import_cycles(graph) == [
        ["conceptattention.eval.datasets", "conceptattention.eval.runner", "conceptattention.shapes.benchmark"]
    ]
    old["conceptattention.eval.datasets"] = ("from ..shapes import world\n", False)
    assert import_cycles(import_graph(old)) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycle_and_its_evaluation_and_model_import_no_training():
    modules = package_modules()
    assert "conceptattention.eval.shapes_report" in modules and "conceptattention.shapes.world" in modules
    assert import_cycles(import_graph(modules)) == []
    trainers = [m for m in modules if m.rpartition(".")[2] in TRAINING_MODULES]
    assert trainers == [], f"training modules belong to the lab: {trainers}"
    for name, (source, is_package) in modules.items():
        imported = imported_names(name, source, is_package, set(modules))
        lab = {n for n in imported if n.split(".")[0] == "conceptattention_lab"}
        # only train-shapes, the CLI's front end of the lab's trainer, reaches into the lab
        assert not lab or name == "conceptattention.cli", (name, lab)
        if name.startswith(("conceptattention.eval", "conceptattention.shapes")):
            training = {n for n in imported if n.rpartition(".")[2] in TRAINING_MODULES} | lab
            assert not training, (name, training)
        if name.startswith("conceptattention.shapes"):  # the model and its world are below the evaluation
            assert not {n for n in imported if n.startswith("conceptattention.eval")}, name


def test_a_fresh_wheel_holds_the_model_but_no_trainer_nor_experiments(tmp_path):
    """Built from a copy of the project's files (so that no build folder lands in the working tree)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for extra in ROOT.glob("LICEN[CS]E*"):
        shutil.copy(extra, source / extra.name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ".",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if run.returncode != 0 and "No module named pip" in run.stderr:
        pytest.skip("pip is not available to build a wheel")
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("conceptattention-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "conceptattention/shapes/weights/model.safetensors" in names
    assert "conceptattention/eval/shapes_report.py" in names
    parts = [Path(n).parts for n in names]
    assert not [
        n
        for n, p in zip(names, parts)
        if p[-1] in ("train.py", "card.py", "binding.py")
        or "experiments" in p
        or p[0].startswith("conceptattention_lab")
    ]
