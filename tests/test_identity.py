"""The concept stream must leave the model's own outputs bit-for-bit unchanged."""

from __future__ import annotations

import pytest
import torch
from tiny_models import concepts, flux_inputs, sd3_inputs, tiny_flux, tiny_sd3

from conceptattention import READOUTS, ConceptAttention

ALL = list(READOUTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_output_bit_identical(family, dtype):
    model = (tiny_flux() if family == "flux" else tiny_sd3()).to(dtype)
    inputs = (flux_inputs if family == "flux" else sd3_inputs)(batch=2, h=3, w=5, dtype=dtype)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(
            model, concepts(5), layers=list(range(len(model.transformer_blocks))), readouts=ALL
        ) as ca:
            hooked = model(**inputs)[0]
        after = model(**inputs)[0]
    assert torch.isfinite(plain).all()
    assert torch.equal(plain, hooked)
    assert torch.equal(plain, after)
    maps = ca.all_maps()
    assert set(maps) == set(ALL)
    for m in maps.values():
        assert m.shape == (2, 5, 3, 5) and m.dtype == torch.float32
        assert torch.isfinite(m).all()


def test_sd3_without_qk_norm_and_dual_attention_is_identical():
    model = tiny_sd3(layers=4, dual=(), qk_norm=None)
    inputs = sd3_inputs(batch=2, h=4, w=2)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, concepts(3), layers=[0, -1]) as ca:
            hooked = model(**inputs)[0]
    assert torch.equal(plain, hooked)
    assert ca.maps().shape == (2, 3, 4, 2)


def test_identity_holds_with_grad_enabled():
    model = tiny_flux()
    inputs = flux_inputs()
    plain = model(**inputs)[0]
    with ConceptAttention(model, concepts(3)) as ca:
        hooked = model(**inputs)[0]
    assert torch.equal(plain, hooked)
    assert not ca.maps().requires_grad
