"""The lab's tests: the trainer, the surgery, the model card, the binding measure, the release and the GPU
script. They need the lab installed (``pip install -e lab``); without it none is collected."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from lab_helpers import TINY

from conceptattention.shapes.model import ShapesModel

LAB_INSTALLED = importlib.util.find_spec("conceptattention_lab") is not None
if not LAB_INSTALLED:  # a pytest.importorskip here would abort the whole run instead of skipping this folder
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if not LAB_INSTALLED:
        return "lab/tests skipped: the lab is not installed (pip install -e lab)"
    return None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random shapes model saved as weights (8x8 patches, 3 double-stream blocks)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_shapes")
    ShapesModel(TINY).save(directory)
    return directory
