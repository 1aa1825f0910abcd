"""A tiny shapes-model architecture (8x8 patches, 3 double-stream blocks) for the tests of the shapes model, its
pipeline, the CLI on it and the lab's trainer; the ``tiny_dir`` fixtures (tests/conftest.py, lab/tests/conftest.py)
save one with random weights. Imported by name, as :mod:`tiny_models` (lab/tests puts this folder on its path)."""

from __future__ import annotations

from pathlib import Path

import torch

from conceptattention.shapes.model import ShapesConfig, ShapesModel

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


def save_tiny(directory: Path) -> Path:
    """A random-weight ``TINY`` shapes model (seed 0) saved as weights in ``directory``."""
    torch.manual_seed(0)
    ShapesModel(TINY).save(directory)
    return directory
