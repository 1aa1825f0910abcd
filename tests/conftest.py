"""Fixtures of the package's tests: tiny Flux and SD3 transformers (built in :mod:`tiny_models`)."""

from __future__ import annotations

import pytest
from tiny_models import tiny_flux, tiny_sd3


@pytest.fixture
def flux():
    return tiny_flux()


@pytest.fixture
def sd3():
    return tiny_sd3()
