"""What the lab's tests share: the package tests' tiny architecture, stage files written on the fly, and short
CLI runs."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_shapes import TINY  # tests/tiny_shapes.py (lab/tests/conftest.py puts tests/ on the path)
from typer.testing import CliRunner

from conceptattention.cli import app

__all__ = ["TINY", "generate_briefly", "run_meta", "stage_file", "train_briefly"]


def stage_file(path: Path, **settings) -> Path:
    """A stage config at ``path``: a short float32 run at batch 2 (2 steps) with ``settings`` on top."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"steps": 2, "batch": 2, "warmup": 1, "bf16": False, **settings}))
    return path


def train_briefly(out: Path, config: Path, *options: str):
    """``conceptattention train-shapes --config CONFIG --out OUT --quiet`` (the CLI result)."""
    return CliRunner().invoke(app, ["train-shapes", "--config", str(config), "--out", str(out), *options, "--quiet"])


def run_meta(run: Path) -> dict:
    """The metadata a train-shapes run exports next to its weights (config, steps, train_config)."""
    return json.loads((run / "weights" / "config.json").read_text())


def generate_briefly(model: Path, out: Path):
    """``generate`` of one short caption in two steps with ``model`` (the CLI result)."""
    return CliRunner().invoke(
        app,
        [
            "generate",
            "a red circle",
            "--concepts",
            "circle",
            "red",
            "--model",
            str(model),
            "--steps",
            "2",
            "--out",
            str(out),
            "--quiet",
        ],
    )
