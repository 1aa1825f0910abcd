"""Checks that need a CUDA device; skipped (not faked) without one."""

from __future__ import annotations

import warnings

import pytest
import torch

from conceptattention import READOUTS, ConceptAttention

from conftest import concepts, flux_inputs, sd3_inputs, tiny_flux, tiny_sd3

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def sync_warnings(fn) -> int:
    """Number of host synchronisations torch reports while ``fn`` runs."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@cuda
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_hooks_add_no_host_sync(family):
    model = (tiny_flux() if family == "flux" else tiny_sd3()).cuda().to(torch.bfloat16)
    make = flux_inputs if family == "flux" else sd3_inputs
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make(dtype=torch.bfloat16).items()}
    with torch.no_grad():
        plain = sync_warnings(lambda: model(**inputs))
        with ConceptAttention(model, concepts(4).cuda(), layers=[0, 1, 2], readouts=list(READOUTS)) as ca:
            model(**inputs)  # the first call copies the concepts to the device once
            hooked = sync_warnings(lambda: model(**inputs))
    assert hooked == plain
    assert ca.maps().is_cuda and torch.isfinite(ca.maps()).all()
