"""The lab's tests: the trainer, the surgery, the model card, the binding measure, the release and the GPU
script. They need the lab installed (``pip install -e lab``); without it none is collected."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the package's tiny models, shared
from tiny_shapes import save_tiny  # noqa: E402

LAB_INSTALLED = importlib.util.find_spec("conceptattention_lab") is not None
if not LAB_INSTALLED:  # a pytest.importorskip here would abort the whole run instead of skipping this folder
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if not LAB_INSTALLED:
        return "lab/tests skipped: the lab is not installed (pip install -e lab)"
    return None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random shapes model saved as weights (tests/tiny_shapes.py)."""
    return save_tiny(tmp_path_factory.mktemp("tiny_shapes"))
