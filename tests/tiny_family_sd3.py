"""SD3 / SD3.5 for the cross-family tests (tests/test_families.py): tiny real classes, built offline."""

from __future__ import annotations

from tiny_models import TEXT_DIM, sd3_inputs, tiny_sd3
from tiny_pipelines import tiny_sd3_pipeline

FAMILY = "sd3"
TEXT_WIDTH = TEXT_DIM
GENERATE = dict(height=32, width=48, steps=2, guidance=2.5)  # CFG on: [unconditional, conditional] batched
ENCODE = dict(size=(48, 32))


def transformer(seed: int = 0):
    return tiny_sd3(seed=seed)


def call_inputs(model, batch: int = 2, h: int = 3, w: int = 5, seed: int = 1) -> dict:
    return sd3_inputs(batch=batch, h=h, w=w, seed=seed)  # latents of 2h x 2w, patch 2


def pipeline(seed: int = 0):
    return tiny_sd3_pipeline(seed=seed)
