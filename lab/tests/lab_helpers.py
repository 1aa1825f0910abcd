"""What the lab's tests share: a tiny architecture, stage files written on the fly, and short CLI runs."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conceptattention.cli import app
from conceptattention.shapes.model import ShapesConfig

TINY = ShapesConfig(
    text_dim=32,
    text_layers=1,
    text_heads=2,
    num_layers=3,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    axes_dims_rope=(4, 6, 6),
)


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
