"""The command line on bad and odd input: one ``error:`` line and exit 2, nothing half-written, or
(for legal input) the right result. One table, one parametrized test; then interrupts and --help; then
generate, encode and --shift on a tiny shapes model, and a table of refused calls run with typer's CliRunner."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conceptattention.cli import app, expand_greedy, main

PROMPT = "a red circle on grass"
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "conceptattention" / "shapes" / "weights"


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one in-process ``conceptattention`` call."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(stop.value.code or 0), out, err


def earlier_result(folder: Path, capsys) -> dict[str, bytes]:
    """An earlier result in ``folder`` (three concepts), as {file name: bytes}."""
    code, _, err = run(
        ["generate", PROMPT, "-c", "circle", "square", "grass", "--steps", "2", "-o", folder, "-q"], capsys
    )
    assert code == 0, err
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def damaged_model(tmp: Path, part: str) -> Path:
    folder = tmp / f"damaged-{part}"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        data = (SHIPPED / name).read_bytes()
        (folder / name).write_bytes(data[:500] if name.startswith(part) else data)
    return folder


def gray16(tmp: Path) -> Path:
    """A 16-bit grayscale PNG: a horizontal ramp over the whole 16-bit range."""
    ramp = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (80, 1))
    path = tmp / "gray16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    return path


def raise_on_write(exc: BaseException):
    """A stand-in for numpy.save that fails like a full disk (or an interrupt) halfway through the outputs."""

    def fail(*args, **kwargs):
        raise exc

    return fail


# (case id, arguments, what happens): "error: <text>" means exit 2 with exactly that in one error line;
# a callable checks a legal call's result. {out}, {tmp} and friends are filled in by the test.
TABLE = [
    # wrong results with exit 0, before
    ("options-first", ["generate", "-c", "circle", "grass", "--out", "{out}", PROMPT, "--steps", "2", "-q"], "ok"),
    (
        "misspelled-option",
        ["generate", PROMPT, "-c", "circle", "--stepz", "5", "-o", "{out}"],
        "error: No such option: --stepz",
    ),
    (
        "stray-argument",
        ["generate", "a", "red", "circle", "-c", "circle", "-o", "{out}"],
        "error: Got unexpected extra argument",
    ),
    (
        "prompt-after-concepts",
        ["generate", "-c", "circle", "grass", PROMPT, "-o", "{out}"],
        "error: Missing argument 'prompt'",
    ),
    (
        "16-bit-gray-image",
        ["encode", "{gray16}", "-c", "circle", "grass", "--samples", "1", "-o", "{out}", "-q"],
        "gray-ok",
    ),
    (
        "guidance-nan",
        ["generate", PROMPT, "-c", "circle", "--guidance", "nan", "-o", "{out}"],
        "error: Invalid value for '--guidance': 'nan' is not a finite number",
    ),
    ("guidance-inf", ["generate", PROMPT, "-c", "circle", "--guidance", "inf", "-o", "{out}"], "error: not a finite"),
    ("t-out-of-range", ["encode", "{gray16}", "-c", "circle", "--t", "1.5", "-o", "{out}"], "error: 1.5 is above 1"),
    (
        "samples-zero",
        ["encode", "{gray16}", "-c", "circle", "--samples", "0", "-o", "{out}"],
        "error: Invalid value for '--samples'",
    ),
    (
        "steps-zero",
        ["generate", PROMPT, "-c", "circle", "--steps", "0", "-o", "{out}"],
        "error: Invalid value for '--steps'",
    ),
    (
        "seed-huge",
        ["generate", PROMPT, "-c", "circle", "--seed", str(2**70), "-o", "{out}"],
        "error: Invalid value for '--seed'",
    ),
    (
        "seed-negative",
        ["generate", PROMPT, "-c", "circle", "--seed", "-1", "-o", "{out}"],
        "error: Invalid value for '--seed'",
    ),
    (
        "duplicate-concepts",
        ["generate", PROMPT, "-c", "circle", "circle", "grass", "-o", "{out}"],
        "error: the concept 'circle' is given twice",
    ),
    (
        "duplicate-concepts-case",
        ["generate", PROMPT, "-c", "grass,Grass", "-o", "{out}"],
        "error: the concept 'Grass' is given twice",
    ),
    ("no-concepts", ["generate", PROMPT, "-c", ",", "-o", "{out}"], "error: no concepts given"),
    # tracebacks, before
    (
        "device-cuda-missing",
        ["generate", PROMPT, "-c", "circle", "--device", "cuda", "-o", "{out}"],
        "error: device 'cuda' asked for, but",
    ),
    (
        "device-nonsense",
        ["generate", PROMPT, "-c", "circle", "--device", "gpu9000", "-o", "{out}"],
        "error: unknown device 'gpu9000'",
    ),
    (
        "dtype-nonsense",
        ["generate", PROMPT, "-c", "circle", "--dtype", "float8", "-o", "{out}"],
        "error: --dtype must be one of",
    ),
    ("out-is-a-file", ["generate", PROMPT, "-c", "circle", "-o", "{a_file}"], "error: --out {a_file} is a file"),
    (
        "out-holds-other-files",
        ["generate", PROMPT, "-c", "circle", "-o", "{other_files}"],
        "error: already holds other files",
    ),
    (
        "disk-full",
        ["generate", PROMPT, "-c", "circle", "--steps", "2", "-o", "{out}"],
        "error: could not write the results to",
    ),
    (
        "read-only",
        ["generate", PROMPT, "-c", "circle", "--steps", "2", "-o", "{out}"],
        "error: could not write the results to",
    ),
    (
        "corrupt-weights",
        ["generate", PROMPT, "-c", "circle", "--model", "{bad_weights}", "-o", "{out}"],
        "error: {bad_weights}/model.safetensors cannot be read as this model's weights",
    ),
    (
        "corrupt-config",
        ["generate", PROMPT, "-c", "circle", "--model", "{bad_config}", "-o", "{out}"],
        "error: {bad_config}/config.json is not a valid shapes-model config",
    ),
    (
        "not-a-model",
        ["generate", PROMPT, "-c", "circle", "--model", "{tmp}/nowhere/deeper", "-o", "{out}"],
        "error: --model",
    ),
    # poor messages, before
    (
        "huge-prompt",
        ["generate", "purple " * 10000, "-c", "circle", "-o", "{out}"],
        "error: the shapes model does not know 'purple'",
    ),
    ("huge-valid-prompt", ["generate", "a red circle " * 5000, "-c", "circle", "-o", "{out}"], "error: "),
    ("image-is-a-directory", ["encode", "{tmp}", "-c", "circle", "-o", "{out}"], "error: is a directory"),
    ("image-missing", ["encode", "{tmp}/no.png", "-c", "circle", "-o", "{out}"], "error: image file not found"),
    ("image-not-an-image", ["encode", "{a_file}", "-c", "circle", "-o", "{out}"], "error: cannot read"),
    # the output folder, before
    ("rerun-replaces-whole", ["generate", PROMPT, "-c", "circle", "--steps", "2", "-o", "{earlier}", "-q"], "rerun-ok"),
    ("out-checked-before-loading", ["generate", PROMPT, "-c", "circle", "-o", "{a_file}"], "error: is a file"),
    # the rest
    ("eval-out-is-a-file", ["eval", "--dataset", "shapes", "--images", "2", "-o", "{a_file}"], "error: is a file"),
    ("eval-unknown-method", ["eval", "--method", "nope", "-o", "{out}"], "error: "),
    ("unknown-command", ["generat", PROMPT], "error: No such command"),
]


@pytest.mark.parametrize("case, args, expected", TABLE, ids=[row[0] for row in TABLE])
def test_cli_input_table(case, args, expected, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (tmp_path / "a_file.txt").write_text("not an image, not a folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    names = {
        "out": out,
        "tmp": tmp_path,
        "a_file": tmp_path / "a_file.txt",
        "other_files": tmp_path / "other",
        "earlier": tmp_path / "earlier",
    }
    if "{gray16}" in args:
        names["gray16"] = gray16(tmp_path)
    if case == "corrupt-weights":
        names["bad_weights"] = damaged_model(tmp_path, "model")
    if case == "corrupt-config":
        names["bad_config"] = damaged_model(tmp_path, "config")
    before = earlier_result(names["earlier"], capsys) if case == "rerun-replaces-whole" else None
    if case == "disk-full":
        monkeypatch.setattr(np, "save", raise_on_write(OSError(errno.ENOSPC, "No space left on device")))
    if case == "read-only":
        monkeypatch.setattr("tempfile.mkdtemp", raise_on_write(OSError(errno.EROFS, "Read-only file system")))
    if case == "out-checked-before-loading":
        import conceptattention.pipelines as pipelines

        def planted(*a, **k):
            raise AssertionError("the model was loaded before --out was checked")

        monkeypatch.setattr(pipelines, "load_pipeline", planted)

    filled = [str(a).format(**names) if isinstance(a, str) else a for a in args]
    code, stdout, stderr = run(filled, capsys)

    assert "Traceback" not in stderr + stdout
    if expected.startswith("error:"):
        want = expected.format(**{k: str(v) for k, v in names.items()})
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, (code, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert want[len("error: ") :] in lines[0], (want, lines[0])
        assert len(lines[0]) <= 400
        assert not out.exists() or not any(out.iterdir()), "an error left files in --out"
        assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name], "a half-written folder was left"
        assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
        return

    assert code == 0, stderr
    target = names["earlier"] if case == "rerun-replaces-whole" else out
    info = json.loads((target / "result.json").read_text())
    assert sorted(p.name for p in target.iterdir()) == sorted(info["files"].values())  # nothing else is there
    maps = np.load(target / "maps.npy")
    assert np.isfinite(maps).all() and np.allclose(maps.sum(0), 1.0, atol=1e-4)
    if case == "options-first":
        assert info["concepts"] == ["circle", "grass"] and info["prompt"] == PROMPT
    if case == "gray-ok":
        image = np.asarray(Image.open(target / "image.png").convert("L"), dtype=float)
        assert image.std() > 30 and image.min() < 40 and image.max() > 215  # the ramp, not a white page
    if case == "rerun-replaces-whole":
        assert set(before) > {p.name for p in target.iterdir()}  # square.png and grass.png are gone
        assert info["concepts"] == ["circle"] and not (target / "square.png").exists()


PLANTED = """
import logging, sys, warnings
import conceptattention.pipelines as pipelines
from conceptattention.cli import main
from conceptattention.errors import ConceptAttentionError

def planted(*args, **kwargs):
    warnings.warn("a library warning nobody asked for")
    logging.getLogger("accelerate").warning("an accelerate log line")
    raise ConceptAttentionError("a planted error")

pipelines.load_pipeline = planted
main(sys.argv[1:])
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_library_warnings_are_shown_only_with_verbose(verbose, tmp_path):
    args = ["generate", PROMPT, "-c", "circle", "-o", str(tmp_path / "o")] + (["--verbose"] if verbose else [])
    r = subprocess.run([sys.executable, "-c", PLANTED, *args], capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and lines[-1] == "error: a planted error", r.stderr
    if verbose:
        assert "a library warning nobody asked for" in r.stderr and "an accelerate log line" in r.stderr
    else:
        assert lines == ["error: a planted error"]


def test_an_interrupt_while_writing_keeps_the_earlier_result(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "res"
    before = earlier_result(folder, capsys)
    monkeypatch.setattr(np, "save", raise_on_write(KeyboardInterrupt()))
    code, _, err = run(["generate", PROMPT, "-c", "circle", "--steps", "2", "-o", folder], capsys)
    assert code == 130 and "interrupted" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"])
def test_a_generate_killed_mid_run_leaves_nothing_and_the_earlier_result_intact(sig, tmp_path, capsys):
    folder = tmp_path / "res"
    before = earlier_result(folder, capsys)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conceptattention",
            "generate",
            PROMPT,
            "-c",
            "circle",
            "grass",
            "--steps",
            "1000",
            "-o",
            str(folder),
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(8)  # imports and loading take about 3 s here; 1000 steps take a minute
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig != signal.SIGKILL:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_greedy_concepts_stop_at_the_next_option_or_double_dash():
    assert expand_greedy(["-c", "a", "b", "--out", "d", "p"]) == ["-c", "a", "--concepts", "b", "--out", "d", "p"]
    assert expand_greedy(["p", "--concepts=a", "b"]) == ["p", "--concepts", "a", "--concepts", "b"]
    assert expand_greedy(["-c", "a", "--", "p"]) == ["-c", "a", "--", "p"]
    assert expand_greedy(["-o", "x", "p"]) == ["-o", "x", "p"]


def test_help_and_version_import_no_torch():
    probe = (
        "import sys; from conceptattention.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    for args in (["--help"], ["--version"], ["generate", "--help"], ["app", "--help"]):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "False", (args, r.stdout, r.stderr)
    r = subprocess.run([sys.executable, "-m", "conceptattention", "app", "--help"], capture_output=True, text=True)
    assert 'pip install "conceptattention[app]"' in " ".join(r.stdout.split())  # [app] shown, not eaten as markup


# ----- on a tiny shapes model, with CliRunner --------------------------------------------------------------------
def test_generate_and_encode_on_a_tiny_model(tiny_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli_gen"
    r = runner.invoke(
        app,
        [
            "generate",
            "a red circle and a blue square on grass",
            "--concepts",
            "circle",
            "square",
            "grass",
            "--out",
            str(out),
            "--model",
            str(tiny_dir),
            "--steps",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert np.load(out / "maps.npy").shape == (3, 64, 64)
    for name in ("image.png", "grid.png", "segmentation.png", "maps_raw.npy", "result.json", "circle.png", "grass.png"):
        assert (out / name).is_file()
    r = runner.invoke(
        app,
        [
            "encode",
            str(out / "image.png"),
            "--concepts",
            "circle",
            "--caption",
            "a red circle",
            "--out",
            str(tmp_path / "cli_enc"),
            "--model",
            str(tiny_dir),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cli_enc" / "result.json").read_text())["mode"] == "encode"


@pytest.mark.parametrize("command", ["generate", "encode"])
def test_method_picks_the_map_and_its_settings_are_recorded(command, tiny_dir, tmp_path):
    runner, image = CliRunner(), tmp_path / "image.png"
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(image)
    first = ["generate", "a red circle on grass"] if command == "generate" else ["encode", str(image)]
    common = [
        "-c",
        "circle",
        "grass",
        "--model",
        str(tiny_dir),
        "-q",
        *(["--steps", "2"] if command == "generate" else []),
    ]
    maps = {}
    for method in ("concept_attention", "bounce_2:heads=lambda2"):
        out = tmp_path / method.replace(":", "_")
        r = runner.invoke(app, [*first, *common, "--method", method, "-o", str(out)])
        assert r.exit_code == 0, r.output
        settings = json.loads((out / "result.json").read_text())
        settings = settings.get("settings", settings)
        assert settings["readout"] == method
        maps[method] = np.load(out / "maps.npy")
    assert settings["readout_settings"]["bounces"] == 2 and settings["readout_settings"]["heads"] == "lambda2"
    assert not np.allclose(maps["concept_attention"], maps["bounce_2:heads=lambda2"])
    np.testing.assert_allclose(maps["bounce_2:heads=lambda2"].sum(0), 1.0, atol=1e-4)


def test_shift_reaches_the_sampler_and_result_json(tiny_dir, tmp_path):
    # for a diffusers model it is refused before loading (test_a_refused_call_exits_2_with_its_message)
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "generate",
            "a red circle",
            "--concepts",
            "circle",
            "--model",
            str(tiny_dir),
            "--steps",
            "2",
            "--shift",
            "3",
            "--out",
            str(tmp_path / "g"),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g" / "result.json").read_text())["shift"] == 3.0


# (case id, arguments, message): exit 2 and the message in the output. {tiny} is a tiny shapes model and {tmp}
# the test's folder; without --model the shipped model runs.
REFUSED = [
    (
        "unknown-word",
        ["generate", "a red dog", "--concepts", "circle", "--model", "{tiny}", "--out", "{tmp}/x"],
        "error: the shapes model does not know 'dog'",
    ),
    (
        "image-not-found",
        ["encode", "{tmp}/nope.png", "--concepts", "circle", "--model", "{tiny}"],
        "image file not found",
    ),
    (
        "shift-for-a-diffusers-model",
        ["generate", "a dog", "--concepts", "dog", "--model", "{tmp}/no-such-flux", "--shift", "3", "--out", "{tmp}/x"],
        "--shift sets the shapes model's sampler",
    ),
    (
        "height-for-the-shipped-model",
        ["generate", "a red circle", "--concepts", "circle", "--height", "128"],
        "--height does not apply to the 'shapes' model",
    ),
    ("no-concepts-shipped-model", ["generate", "a red circle", "--concepts", ","], "no concepts given"),
    (
        "method-not-a-map",
        ["generate", "a red circle", "-c", "circle", "--method", "daam", "--model", "{tiny}", "--out", "{tmp}/x"],
        "--method takes one map of the concept stream",
    ),
    (
        "method-unknown",
        ["encode", "{tmp}/no.png", "-c", "circle", "--method", "bounce_3", "--model", "{tiny}", "--out", "{tmp}/x"],
        "unknown method(s) bounce_3",
    ),
    (
        "method-bad-setting",
        [
            "generate",
            "a red circle",
            "-c",
            "circle",
            "-m",
            "bounce_2:bounces=two",
            "--model",
            "{tiny}",
            "-o",
            "{tmp}/x",
        ],
        "readout setting bounces is a whole number",
    ),
    (
        "image-not-found-shipped-model",
        ["encode", "{tmp}/missing.png", "--concepts", "circle"],
        "image file not found",
    ),
]


@pytest.mark.parametrize("case, args, message", REFUSED, ids=[row[0] for row in REFUSED])
def test_a_refused_call_exits_2_with_its_message(case, args, message, tiny_dir, tmp_path):
    r = CliRunner().invoke(app, [a.format(tiny=tiny_dir, tmp=tmp_path) for a in args])
    assert r.exit_code == 2 and message in r.output
    if case == "shift-for-a-diffusers-model":
        assert not (tmp_path / "x").exists()


def test_train_shapes_without_the_lab_is_one_clear_error(tmp_path, monkeypatch):
    """A pip install of conceptattention has no trainer: train-shapes says how to get it, in one line."""
    monkeypatch.setitem(sys.modules, "conceptattention_lab", None)  # as if the lab were not installed
    config = tmp_path / "stage.json"
    config.write_text("{}")
    r = CliRunner().invoke(app, ["train-shapes", "--config", str(config), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert r.output == (
        "error: train-shapes needs the lab, which a pip install of conceptattention does not include: "
        "from a clone of the repository, pip install -e lab\n"
    )
    assert not (tmp_path / "run").exists()


def test_a_video_for_an_image_model_is_refused_before_anything_runs(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("imageio_ffmpeg")
    path = tmp_path / "clip.mp4"
    iio.imwrite(path, np.full((3, 16, 16, 3), 90, np.uint8), fps=4, codec="libx264", macro_block_size=1)
    r = CliRunner().invoke(app, ["encode", str(path), "-c", "circle", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "is a video, but 'shapes' is an image model" in r.output
    assert not (tmp_path / "out").exists()
    broken = tmp_path / "broken.webm"
    broken.write_bytes(b"not a video")
    r = CliRunner().invoke(app, ["encode", str(broken), "-c", "circle", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.startswith("error: could not read the video") and r.output.count("\n") == 1
