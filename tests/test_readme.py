"""Every command in the README is run: the two set-up commands by .ci/run, every other one here.

The commands are read from the README's fenced ``bash`` blocks (lines ending in ``\\`` joined,
comments skipped). A ``conceptattention`` command runs in a temporary folder through the real
command-line entry point, with the substitutions of ``plan``: real-model hub ids become tiny random
pipelines of the same diffusers classes saved to disk, ``cuda``/``bfloat16`` become ``cpu``/``float32``,
the sizes are the tiny models', the two 500-image benchmarks run on fewer images, and ``app`` is
checked with ``--help`` only (tests/test_app.py drives the page itself). A command the table does not
cover fails the test, so a new README command needs a rule here.

The README's Python blocks run as written in a temporary folder (a method one registers is
unregistered afterwards), except those that load real hub weights, which are compiled only.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conceptattention.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"

#: Hub ids of the README -> the tiny stand-in pipeline the test saves to disk (tests/tiny_pipelines.py).
HUB_STANDINS = {"black-forest-labs/FLUX.1-": "flux", "stabilityai/stable-diffusion-3": "sd3"}
#: Option values the CPU-only test machine cannot use -> what it runs instead.
SWAPS = {("--device", "cuda"): "cpu", ("--dtype", "bfloat16"): "float32"}
#: Options added to commands that would take minutes as written: (command, option) -> value.
CHEAPER = {
    ("eval", "--images"): "10",
    ("shapes-benchmark", "--images"): "10",
    ("shapes-benchmark", "--sample-images"): "2",
}
#: Size options added to a real-model command, for the tiny pipelines (32x32 px).
TINY_SIZE = {"generate": ["--height", "32", "--width", "32"], "encode": ["--size", "32x32"]}
#: Commands that take --quiet (no progress bars in the test log).
QUIET = {"generate", "encode", "eval", "shapes-benchmark", "train-shapes"}
#: Files every generate / encode result holds.
RESULT_FILES = ("image.png", "maps.npy", "maps_raw.npy", "grid.png", "segmentation.png", "result.json")


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def bash_commands(text: str) -> list[str]:
    """Every command of the fenced bash blocks: continuation lines joined, comment lines skipped."""
    commands = []
    for block in fenced_blocks(text, "bash"):
        pending = ""
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].rstrip() + " "
                continue
            commands.append((pending + line.strip()).strip())
            pending = ""
        assert not pending, f"a bash block of the README ends in a continuation line: {pending!r}"
    return commands


COMMANDS = bash_commands(README.read_text())
SETUP, CI_COMMAND = COMMANDS[0], "bash .ci/run"
CLI_COMMANDS = [c for c in COMMANDS if c not in (SETUP, CI_COMMAND)]


def test_the_two_commands_come_first_and_ci_runs_them():
    assert SETUP.startswith("python3 -m venv .venv && ") and " && conceptattention generate " in SETUP, SETUP
    assert COMMANDS[1] == CI_COMMAND
    ci = CI.read_text()
    assert "python -m pytest" in ci
    # .ci/run runs the README's first command verbatim, read from the README itself (its first line that
    # starts like this one: the set-up command must be that line)
    assert "README.md" in ci, ".ci/run must run the README's set-up command (read from README.md)"
    first = next(line for line in README.read_text().splitlines() if line.startswith("python3 -m venv .venv && "))
    assert first == SETUP


def test_every_other_command_is_a_conceptattention_command():
    others = [c for c in CLI_COMMANDS if shlex.split(c, comments=True)[0] != "conceptattention"]
    assert not others, f"README commands that no test runs (add a rule to tests/test_readme.py): {others}"


def picture(path: Path) -> Path:
    """A small photo-like picture (not square, so the shapes model's crop is exercised)."""
    img = Image.new("RGB", (96, 80), (40, 140, 40))
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 20, 40, 50), fill=(220, 30, 30))
    draw.rectangle((55, 25, 85, 55), fill=(30, 60, 220))
    img.save(path)
    return path


def plan(argv: list[str], standins: dict[str, Path]) -> tuple[list[str], str]:
    """The README command ``argv`` (without ``conceptattention``) as this test runs it, and its kind."""
    if argv in (["--version"], ["--help"]):
        return argv, "info"
    command, args = argv[0], list(argv[1:])
    if command not in {"generate", "encode", "eval", "shapes-benchmark", "app", "train-shapes"}:
        pytest.fail(f"no rule for README command 'conceptattention {command}': add one to tests/test_readme.py")
    real_model = None
    for i, arg in enumerate(args):
        previous = args[i - 1] if i else None
        if previous == "--model" and (ROOT / arg / "config.json").is_file():
            args[i] = str(ROOT / arg)  # a model folder of the clone (lab/weights/...), relative to its root
        elif previous == "--model" and arg != "shapes":
            real_model = next((kind for prefix, kind in HUB_STANDINS.items() if arg.startswith(prefix)), None)
            if real_model is None:
                pytest.fail(f"no tiny stand-in for the README's --model {arg}: add one to HUB_STANDINS")
            args[i] = str(standins[real_model])
        elif (previous, arg) in SWAPS:
            args[i] = SWAPS[(previous, arg)]
        elif previous in ("--device", "--dtype") and arg not in ("cpu", "float32", "auto"):
            pytest.fail(f"no CPU substitute for the README's {previous} {arg}: add one to SWAPS")
        elif previous in ("--data", "--class-map"):
            pytest.fail(f"the README's {previous} {arg} needs files this test does not have")
    dataset = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--dataset", "-d")), "shapes")
    if command == "eval" and dataset != "shapes":
        pytest.fail("only the shapes dataset can be evaluated offline; real datasets belong in docs/benchmarks.md")
    for (cmd, option), value in CHEAPER.items():
        if cmd == command and option not in args:
            args += [option, value]
    if real_model and command in TINY_SIZE:
        args += TINY_SIZE[command]
    if command == "app":
        return ["app", "--help"], "help"
    if command == "train-shapes":
        if "--config" not in args:
            pytest.fail("the README trains from stage files only (train-shapes --config ...)")
        args += ["--stop-after", "1"]
    if command in QUIET:
        args.append("--quiet")
    return [command, *args], command


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        main(args)
    out, err = capsys.readouterr()
    return int(stop.value.code or 0), out + err


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """Tiny random FLUX.1 / SD3 pipelines saved to disk, built only for the README commands that need them."""
    from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

    base = tmp_path_factory.mktemp("tiny-pipelines")

    class Lazy(dict):
        def __missing__(self, kind: str) -> Path:
            path = base / kind
            (tiny_flux_pipeline if kind == "flux" else tiny_sd3_pipeline)().save_pretrained(path)
            self[kind] = path
            return path

    return Lazy()


def out_dir(args: list[str]) -> Path | None:
    for flag in ("--out", "-o"):
        if flag in args:
            return Path(args[args.index(flag) + 1])
    return None


@pytest.mark.parametrize("command", CLI_COMMANDS, ids=[" ".join(shlex.split(c)[1:3])[:40] for c in CLI_COMMANDS])
def test_readme_command_runs(command, standins, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command, comments=True)[1:]
    args, kind = plan(argv, standins)
    if kind == "encode":
        picture(tmp_path / args[1])  # the README's photo.png / dog.jpg
    if kind == "train-shapes":
        pytest.importorskip("conceptattention_lab", reason="the lab is not installed (pip install -e lab)")
        config = args.index("--config") + 1
        # the README's path is relative to the clone's root
        args[config] = str(ROOT / args[config])
    code, output = run_cli(args, capsys)
    assert code == 0, f"conceptattention {' '.join(args)} exited {code}:\n{output[-3000:]}"
    out = out_dir(args)
    if kind in ("generate", "encode"):
        concepts = argv[argv.index("-c" if "-c" in argv else "--concepts") + 1 :]
        concepts = concepts[: next((i for i, a in enumerate(concepts) if a.startswith("-")), len(concepts))]
        for name in RESULT_FILES:
            assert (out / name).is_file(), f"{name} missing from {out}"
        maps = np.load(out / "maps.npy")
        assert maps.shape[0] == len(concepts) and np.isfinite(maps).all()
        assert json.loads((out / "result.json").read_text())["concepts"] == concepts
    elif kind == "eval":
        assert (out / "results.json").is_file() and (out / "results.md").is_file()
        assert "concept_attention" in (out / "results.md").read_text()
    elif kind == "shapes-benchmark":
        assert "concept_attention" in (out / "shapes_benchmark.md").read_text()
    elif kind == "train-shapes":
        assert any(out.rglob("model.safetensors")), f"no weights exported under {out}"
    elif kind == "help":
        assert "--allow-model-choice" in output
    elif argv == ["--version"]:
        assert output.startswith("conceptattention ")


def python_blocks() -> list[str]:
    return fenced_blocks(README.read_text(), "python")


def is_real_model_block(block: str) -> bool:
    return bool(re.search(r"from_pretrained\(\s*[\"'](black-forest-labs|stabilityai)/", block))


def test_python_blocks_are_known():
    for block in python_blocks():
        runnable = 'load_pipeline("shapes")' in block or "register_method(" in block
        assert runnable or is_real_model_block(block), f"no rule for this README Python block:\n{block}"


def test_real_model_python_blocks_compile():
    blocks = [b for b in python_blocks() if is_real_model_block(b)]
    assert blocks, "the README's core-API example (FLUX.1) is expected to be found"
    for i, block in enumerate(blocks):
        compile(block, f"README.md python block {i} (real model)", "exec")


@pytest.mark.parametrize("index", [i for i, b in enumerate(python_blocks()) if not is_real_model_block(b)])
def test_python_block_runs(index, tmp_path, monkeypatch):
    """Each README Python block that uses the shapes model (or registers a method) runs as written, in a
    temporary folder holding a ``photo.png``; a method it registers is unregistered afterwards."""
    from conceptattention.eval.methods import METHODS

    block = python_blocks()[index]
    monkeypatch.chdir(tmp_path)
    picture(tmp_path / "photo.png")
    registered = dict(METHODS)
    try:
        code = compile(block, f"README.md python block {index}", "exec")
        exec(code, {"__name__": "__readme__"})  # noqa: S102 - running the README's own example is the test
    finally:
        METHODS.clear()
        METHODS.update(registered)
