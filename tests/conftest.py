"""Fixtures of the package's tests: tiny Flux and SD3 transformers (built in :mod:`tiny_models`), a tiny shapes
model saved as weights (its architecture in :mod:`tiny_shapes`), and matplotlib made unimportable."""

from __future__ import annotations

import sys

import pytest
from tiny_models import tiny_flux, tiny_sd3
from tiny_shapes import save_tiny


@pytest.fixture
def flux():
    return tiny_flux()


@pytest.fixture
def sd3():
    return tiny_sd3()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random shapes model saved as weights (8x8 patches, 3 double-stream blocks)."""
    return save_tiny(tmp_path_factory.mktemp("tiny_shapes"))


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib cannot be imported (as when it is not installed); the cached colour-map lookups are dropped
    before and after, so no colour map found earlier (or a cached "missing") leaks in or out."""
    from conceptattention import viz

    viz._colormap.cache_clear()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    yield
    viz._colormap.cache_clear()
