"""FLUX.1 for the cross-family tests (tests/test_families.py): tiny real classes, built offline."""

from __future__ import annotations

from tiny_models import TEXT_DIM, flux_inputs, tiny_flux
from tiny_pipelines import tiny_flux_pipeline

FAMILY = "flux"
TEXT_WIDTH = TEXT_DIM
#: MMDiTPipeline.generate / encode keyword arguments of a quick run (a non-square image).
GENERATE = dict(height=32, width=48, steps=2)
ENCODE = dict(size=(48, 32))


def transformer(seed: int = 0):
    return tiny_flux(seed=seed)


def call_inputs(model, batch: int = 2, h: int = 3, w: int = 5, seed: int = 1) -> dict:
    return flux_inputs(batch=batch, h=h, w=w, seed=seed)


def pipeline(seed: int = 0):
    return tiny_flux_pipeline(seed=seed)
