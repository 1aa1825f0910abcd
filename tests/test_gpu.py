"""Checks that need a CUDA device; skipped (not faked) without one."""

from __future__ import annotations

import pytest
import torch
from tiny_models import concepts, flux_inputs, sd3_inputs, tiny_flux, tiny_sd3

from conceptattention import READOUTS, ConceptAttention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run_without_sync(fn) -> None:
    """Run ``fn`` with torch's sync debug mode set to error: a host synchronisation raises where it happens,
    so a failure's traceback names the line that synchronised."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_hooks_add_no_host_sync(family):
    model = (tiny_flux() if family == "flux" else tiny_sd3()).cuda().to(torch.bfloat16)
    make = flux_inputs if family == "flux" else sd3_inputs
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make(dtype=torch.bfloat16).items()}
    with torch.no_grad():
        model(**inputs)
        run_without_sync(lambda: model(**inputs))  # the plain model itself does not synchronise
        with ConceptAttention(model, concepts(4).cuda(), layers=[0, 1, 2], readouts=list(READOUTS)) as ca:
            model(**inputs)  # the first call copies the concepts to the device once
            run_without_sync(lambda: model(**inputs))
    assert ca.maps().is_cuda and torch.isfinite(ca.maps()).all()
