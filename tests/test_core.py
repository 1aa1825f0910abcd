"""The ConceptAttention session (core.py) on tiny Flux and SD3 transformers: the concept stream leaves the
model's own outputs bit-for-bit unchanged; every readout equals the independent reference of tests/reference.py
to 1e-5 relative (fp32); attach/detach leaves no trace, also after errors; every user mistake gets one clear
message."""

from __future__ import annotations

import pytest
import torch
from reference import reference_maps
from reference_followups import reference_followup_maps
from tiny_models import TEXT_DIM, concepts, flux_inputs, hook_counts, processors, sd3_inputs, tiny_flux, tiny_sd3
from torch import nn

from conceptattention import FOLLOWUPS, READOUTS, ConceptAttention, ConceptAttentionError, UnsupportedModelError
from conceptattention.readouts import parse_readout

ALL = list(READOUTS)


# ----- the model's own outputs are bit-for-bit unchanged ---------------------------------------------------------
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


# ----- every readout equals the reference of tests/reference.py --------------------------------------------------
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


# ----- the follow-up readouts equal explicit N x N matrix algebra (tests/reference_followups.py) ------------------
SPECS = [
    *FOLLOWUPS,
    "concept_attention:bounces=inf",
    "concept_attention:anchors=3:spread=2:heads=lambda2",
    "output_no_softmax:bounces=2:heads=entropy",
    "cross_attention:heads=entropy:layer_weight=confidence",
    "concept_attention_linear_norm:heads=entropy",
]


@pytest.mark.parametrize(
    "family, make, inputs",
    # N image tokens <= head width + 1, so the second eigenvalue is exact
    [("flux", tiny_flux, flux_inputs(batch=2, h=3, w=5)), ("sd3", tiny_sd3, sd3_inputs(batch=2, h=3, w=3))],
)
def test_followups_match_explicit_attention_matrices(family, make, inputs):
    model, embeds = make(layers=3), concepts(4)
    with torch.no_grad(), ConceptAttention(model, embeds, layers=[0, 1], readouts=SPECS) as ca:
        model(**inputs)
    for spec in SPECS:
        readout = parse_readout(spec)
        expected = reference_followup_maps(family, model, [inputs], embeds, readout, [0, 1])
        assert rel_err(ca.token_maps(spec), expected) <= 1e-4, spec


def test_followups_leave_the_output_unchanged_and_read_every_block_when_asked():
    model, inputs = tiny_flux(layers=3), flux_inputs(batch=1)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, concepts(3), layers=[0], readouts=["concept_attention", *FOLLOWUPS]) as ca:
            ours = model(**inputs)[0]
    assert torch.equal(plain, ours)
    assert ca.last_block == 2  # layers_confidence reads all three blocks, the paper's map only block 0
    torch.testing.assert_close(ca.maps("bounce_2").sum(1), torch.ones(1, 3, 5))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("concept_attention:bounces=-1", "bounces is a whole number"),
        ("concept_attention:bounces=1.5", "bounces is a whole number"),
        ("concept_attention:heads=max", "heads is one of"),
        ("concept_attention:anchors=2:bounces=2", "two methods"),
        ("concept_attention:spread=0", "spread is an int >= 1"),
        ("concept_attention:depth=2", "not KEY=VALUE"),
        ("concept_attention:softmax=maybe", "true or false"),
        ("bounce_3", "unknown readout 'bounce_3'"),
    ],
)
def test_bad_followup_settings(spec, match):
    with pytest.raises(ConceptAttentionError, match=match):
        ConceptAttention(tiny_flux(), concepts(2), readouts=[spec])


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


# ----- attach and detach leave no trace --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_exit_removes_every_hook(family):
    model = tiny_flux() if family == "flux" else tiny_sd3()
    inputs = flux_inputs() if family == "flux" else sd3_inputs()
    before_hooks, before_procs = hook_counts(model), processors(model)
    with torch.no_grad():
        with ConceptAttention(model, concepts(3), layers=[0, 1, 2]) as ca:
            assert hook_counts(model) != before_hooks  # attached for real
            model(**inputs)
        assert hook_counts(model) == before_hooks
        assert processors(model) == before_procs
        assert ca.maps().shape[1] == 3  # results survive the exit


def test_exception_inside_forward_detaches_and_model_still_works():
    model = tiny_flux()
    inputs = flux_inputs(batch=2)
    before = hook_counts(model)
    with torch.no_grad():
        plain = model(**inputs)[0]
        boom = model.transformer_blocks[1].attn.to_out[0].register_forward_hook(lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            with ConceptAttention(model, concepts(3)):
                model(**inputs)
        boom.remove()
        assert hook_counts(model) == before
        assert torch.equal(model(**inputs)[0], plain)
        # the model can be attached again right away
        with ConceptAttention(model, concepts(3)) as ca:
            assert torch.equal(model(**inputs)[0], plain)
        assert ca.recorded_calls == 1


def test_our_own_error_inside_forward_detaches():
    model = tiny_flux()
    before = hook_counts(model)
    with torch.no_grad(), pytest.raises(ConceptAttentionError, match="batch 3.*batch 2"):
        with ConceptAttention(model, concepts(3, batch=3)):
            model(**flux_inputs(batch=2))
    assert hook_counts(model) == before


def test_attach_detach_without_with_block_and_double_attach():
    model = tiny_flux()
    before = hook_counts(model)
    ca = ConceptAttention(model, concepts(2)).attach()
    with pytest.raises(ConceptAttentionError, match="another session is attached"):
        ConceptAttention(model, concepts(2)).attach()
    ca.detach()
    ca.detach()  # idempotent
    assert hook_counts(model) == before


def test_reading_maps_before_any_call_says_what_to_do():
    model = tiny_flux()
    with ConceptAttention(model, concepts(2), calls=[5]) as ca:
        with torch.no_grad():
            model(**flux_inputs())
    with pytest.raises(ConceptAttentionError, match="no maps were recorded.*calls seen: 1"):
        ca.maps()


def test_reset_and_size_change():
    model = tiny_flux()
    with torch.no_grad(), ConceptAttention(model, concepts(2)) as ca:
        model(**flux_inputs(h=3, w=5))
        with pytest.raises(ConceptAttentionError, match="reset"):
            model(**flux_inputs(h=4, w=4))
        ca.reset()
        model(**flux_inputs(h=4, w=4))
        assert ca.maps().shape == (2, 2, 4, 4)
        assert ca.num_calls == 1


def test_grid_override_and_unknown_grid():
    model = tiny_flux()
    inputs = flux_inputs(h=3, w=5)
    with torch.no_grad(), ConceptAttention(model, concepts(2), grid=(5, 3)) as ca:
        model(**inputs)
    assert ca.maps().shape == (2, 2, 5, 3)
    with torch.no_grad(), ConceptAttention(model, concepts(2), grid=(4, 4)) as bad:
        model(**inputs)
    with pytest.raises(ConceptAttentionError, match="does not hold the 15 image tokens"):
        bad.maps()


def test_default_layers_follow_the_paper_on_flux_depth():
    from conceptattention import default_layers

    assert default_layers(19) == (14, 15, 16, 17)
    assert default_layers(1) == (0,)
    assert default_layers(3) == (2,)
    assert all(0 <= layer < n for n in range(1, 40) for layer in default_layers(n))


# ----- every user mistake gets one clear message -----------------------------------------------------------------
@pytest.mark.parametrize(
    "embeds, match",
    [
        pytest.param(torch.zeros(0, TEXT_DIM), "concept list is empty", id="no-concepts"),
        pytest.param(torch.zeros(2, 0, TEXT_DIM), "concept list is empty", id="no-concepts-per-item"),
        pytest.param(
            torch.zeros(3, TEXT_DIM + 1), f"33 wide.*width {TEXT_DIM}.*own text encoder", id="wider-than-the-text"
        ),
        pytest.param(torch.zeros(TEXT_DIM), r"\[K, D\] or \[B, K, D\]", id="one-dimensional"),
        pytest.param(torch.zeros(3, TEXT_DIM, dtype=torch.long), "floating point", id="integers"),
        pytest.param([[0.0] * TEXT_DIM], "must be a torch.Tensor", id="not-a-tensor"),
    ],
)
def test_bad_concept_embeddings(embeds, match):
    with pytest.raises(ConceptAttentionError, match=match):
        ConceptAttention(tiny_flux(), embeds)


@pytest.mark.parametrize(
    "arguments, match",
    [
        pytest.param(
            {"layers": [3]},
            r"layer 3 is out of range: this transformer has 3 double-stream blocks \(valid indices -3..2\)",
            id="layer-past-the-last",
        ),
        pytest.param({"layers": [-4]}, "layer -4 is out of range", id="layer-before-the-first"),
        pytest.param({"layers": []}, "layers is empty", id="no-layers"),
        pytest.param({"layers": ["1"]}, "must be ints", id="layer-not-an-int"),
        pytest.param({"readouts": "sharpest"}, "unknown readout 'sharpest'.*concept_attention", id="unknown-readout"),
        pytest.param({"concept_pooled": "clip"}, "concept_pooled", id="unknown-concept-pooled"),
        pytest.param({"calls": 3.5}, "calls must be", id="calls-a-float"),
    ],
)
def test_bad_arguments(arguments, match):
    with pytest.raises(ConceptAttentionError, match=match):
        ConceptAttention(tiny_flux(layers=3), concepts(2), **arguments)


def test_unsupported_transformer_names_the_supported_ones():
    with pytest.raises(
        UnsupportedModelError,
        match=r"no ConceptAttention family for Linear; supported families: .*FLUX\.1 \(FluxTransformer2DModel\).*SD3 / SD3\.5 \(SD3Transformer2DModel\)",
    ):
        ConceptAttention(nn.Linear(2, 2), concepts(2))
    from diffusers import UNet2DModel

    with pytest.raises(UnsupportedModelError, match="UNet2DModel"):
        ConceptAttention(
            UNet2DModel(
                sample_size=8,
                block_out_channels=(8, 16),
                norm_num_groups=4,
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"),
            ),
            concepts(2),
        )


def test_using_a_session_wrongly_says_what_to_do():
    model = tiny_flux()
    with pytest.raises(ConceptAttentionError, match="attach first"):
        ConceptAttention(model, concepts(2)).forward_until_last_layer(**flux_inputs())
    with torch.no_grad(), ConceptAttention(model, concepts(2)) as ca:
        model(**flux_inputs())
    with pytest.raises(ConceptAttentionError, match="readout 'value' was not recorded"):
        ca.maps("value")
