"""The shipped shapes weights load, and the main job writes every promised file."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from conceptattention.cli import app
from conceptattention.pipelines import load_pipeline
from conceptattention.pipelines.shapes import WEIGHTS_DIR, ShapesPipeline


def test_shipped_weights_are_small_and_documented():
    weights = WEIGHTS_DIR / "model.safetensors"
    assert weights.is_file(), "the package must ship the shapes model"
    assert weights.stat().st_size <= 25 * 2**20
    card = (WEIGHTS_DIR / "MODEL_CARD.md").read_text()
    for needle in ("## Architecture", "## Data and training", "## Held-out quality", "loss_curve.png"):
        assert needle in card
    config = json.loads((WEIGHTS_DIR / "config.json").read_text())
    assert config["config"]["map_layers"], "the default layers must be recorded"


def test_main_job_generate_writes_every_file(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(
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
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    image = Image.open(out / "image.png")
    assert image.size == (64, 64) and image.mode == "RGB"
    maps = np.load(out / "maps.npy")
    assert maps.dtype == np.float32 and maps.shape == (3, 64, 64)
    np.testing.assert_allclose(maps.sum(0), 1.0, rtol=1e-4)  # softmax over concepts, kept by bilinear upsampling
    for word in ["circle", "square", "grass"]:
        w, h = Image.open(out / f"{word}.png").size  # overlay at 384 px plus a colour bar and a title
        assert w > 384 and h > 384
    assert Image.open(out / "grid.png").size[0] == 4 * (192 + 4)
    raw = np.load(out / "maps_raw.npy")
    grid = 64 // json.loads((WEIGHTS_DIR / "config.json").read_text())["config"]["patch"]
    assert raw.dtype == np.float32 and raw.shape == (3, grid, grid)  # before the softmax, on the token grid
    assert not np.allclose(raw.sum(0), 1.0)
    seg = np.asarray(Image.open(out / "segmentation.png").convert("RGB"))
    assert seg.shape[0] == 384 and seg.shape[1] > 384  # the legend sits right of the image
    info = json.loads((out / "result.json").read_text())
    assert info["model"] == "shapes" and info["concepts"] == ["circle", "square", "grass"]
    assert info["layers"] and info["steps"] == 20 and info["seconds"] > 0
    from conceptattention import __version__

    assert info["version"] == __version__ and info["files"]["overlay:grass"] == "grass.png"
    assert info["files"]["maps_raw"] == "maps_raw.npy" and info["files"]["segmentation"] == "segmentation.png"


def test_main_job_encode_writes_the_maps(tmp_path):
    pipe = load_pipeline("shapes")
    assert isinstance(pipe, ShapesPipeline)
    from conceptattention.shapes import world

    scenes = world.sample_scenes(1, seed=5)
    images, _ = world.render(scenes)
    path = tmp_path / "scene.png"
    Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "encode",
            str(path),
            "--concepts",
            "circle",
            "square",
            "triangle",
            "background",
            "--caption",
            world.captions(scenes)[0],
            "--out",
            str(tmp_path / "enc"),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "enc" / "maps.npy").shape == (4, 64, 64)
