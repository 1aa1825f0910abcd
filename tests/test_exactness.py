"""Every readout equals the independent reference of tests/reference.py to 1e-5 relative (fp32)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_maps
from tiny_models import concepts, flux_inputs, sd3_inputs, tiny_flux, tiny_sd3

from conceptattention import READOUTS, ConceptAttention


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def check_all(family, model, runs, embeds, layers, pooled="zero", grid=(3, 5), **session):
    with (
        torch.no_grad(),
        ConceptAttention(model, embeds, layers=layers, readouts=list(READOUTS), concept_pooled=pooled, **session) as ca,
    ):
        for inputs in runs:
            model(**inputs)
    norm_layers = sorted({layer % len(model.transformer_blocks) for layer in layers})
    counted = [c for i, c in enumerate(runs) if session.get("calls") is None or i in session["calls"]]
    for name, r in READOUTS.items():
        expected = reference_maps(
            family, model, counted, embeds, norm_layers, r.stream, r.space, r.softmax, pooled, r.concept_norm
        )
        actual = ca.token_maps(name)
        assert actual.shape == expected.shape
        assert rel_err(actual, expected) <= 1e-5, name
        assert ca.maps(name).shape == (expected.shape[0], expected.shape[1], *grid)


@pytest.mark.parametrize("layers", [[0], [1, -1], [0, 1, 2]])
def test_flux_matches_reference(layers):
    model = tiny_flux(layers=3)
    check_all("flux", model, [flux_inputs(batch=2)], concepts(4), layers)


def test_flux_prompt_pooled_and_per_item_concepts():
    model = tiny_flux(layers=3)
    check_all("flux", model, [flux_inputs(batch=2)], concepts(3, batch=2), [1, 2], pooled="prompt")


def test_flux_several_calls_and_call_selection():
    model = tiny_flux(layers=3)
    calls = [flux_inputs(batch=1, t=t, seed=s) for s, t in [(1, 1.0), (2, 0.75), (3, 0.5)]]
    check_all("flux", model, calls, concepts(4), [1, 2], calls=[0, 2])


@pytest.mark.parametrize("layers", [[1], [0, -1]])  # -1: the context_pre_only block
def test_sd35_dual_attention_matches_reference(layers):
    model = tiny_sd3(layers=3, dual=(0, 1), qk_norm="rms_norm")
    check_all("sd3", model, [sd3_inputs(batch=2)], concepts(4), layers)


def test_sd3_without_qk_norm_matches_reference():
    model = tiny_sd3(layers=3, dual=(), qk_norm=None)
    check_all("sd3", model, [sd3_inputs(batch=2), sd3_inputs(batch=2, t=250.0, seed=5)], concepts(2), [0, 2])


def test_softmax_maps_are_distributions_over_concepts():
    model = tiny_flux()
    with torch.no_grad(), ConceptAttention(model, concepts(6), layers=[0, 1, 2]) as ca:
        model(**flux_inputs())
    sums = ca.maps().sum(dim=1)
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_concepts_change_maps_and_order_permutes_them():
    model = tiny_flux()
    embeds = concepts(4)
    with torch.no_grad():
        with ConceptAttention(model, embeds) as a:
            model(**flux_inputs())
        with ConceptAttention(model, embeds.flip(0)) as b:
            model(**flux_inputs())
    torch.testing.assert_close(a.maps(), b.maps().flip(1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.maps()[:, 0], a.maps()[:, 1])


def test_stopping_after_last_layer_gives_the_same_maps_and_skips_the_rest():
    model = tiny_flux(layers=3, single=2)
    inputs = flux_inputs()
    ran = []
    handle = model.single_transformer_blocks[0].register_forward_hook(lambda *a: ran.append(1))
    try:
        with torch.no_grad(), ConceptAttention(model, concepts(3), layers=[0, 1], readouts=list(READOUTS)) as full:
            model(**inputs)
        assert ran == [1]
        with torch.no_grad(), ConceptAttention(model, concepts(3), layers=[0, 1], readouts=list(READOUTS)) as early:
            assert early.forward_until_last_layer(**inputs) is None
        assert ran == [1]  # no single-stream block ran in the early-stopped pass
    finally:
        handle.remove()
    for name in READOUTS:
        assert torch.equal(full.maps(name), early.maps(name))


def test_fused_projections_give_the_same_maps():
    model = tiny_flux()
    inputs = flux_inputs()
    with torch.no_grad():
        with ConceptAttention(model, concepts(3), readouts=list(READOUTS)) as plain:
            model(**inputs)
        model.fuse_qkv_projections()
        ref = model(**inputs)[0]
        with ConceptAttention(model, concepts(3), readouts=list(READOUTS)) as fused:
            out = model(**inputs)[0]
    assert torch.equal(ref, out)
    for name in READOUTS:
        torch.testing.assert_close(fused.maps(name), plain.maps(name), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_maps_track_fp32(dtype):
    model = tiny_flux()
    with torch.no_grad():
        with ConceptAttention(model, concepts(4)) as ref:
            model(**flux_inputs())
        model.to(dtype)
        with ConceptAttention(model, concepts(4)) as low:
            model(**flux_inputs(dtype=dtype))
    assert (low.maps() - ref.maps()).abs().max() < 0.05


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_differentiable_sessions_give_the_same_maps_with_gradients(family):
    model = tiny_flux(layers=3) if family == "flux" else tiny_sd3(layers=3)
    inputs = flux_inputs(batch=2) if family == "flux" else sd3_inputs(batch=2)
    embeds = concepts(4)
    with torch.no_grad(), ConceptAttention(model, embeds, layers=[0, 2]) as plain:
        model(**inputs)
    assert not plain.token_maps().requires_grad
    leaf = embeds.clone().requires_grad_(True)
    with ConceptAttention(model, leaf, layers=[0, 2], differentiable=True) as ca:
        model(**inputs)
    maps = ca.token_maps()
    assert rel_err(maps.detach(), plain.token_maps()) <= 1e-6
    (maps[:, 0] * torch.linspace(0, 1, maps.shape[-1])).sum().backward()  # a map-shaped objective
    assert leaf.grad.abs().sum() > 0  # it reaches the concept embeddings ...
    assert next(model.transformer_blocks[0].parameters()).grad is not None  # ... and the transformer's weights
