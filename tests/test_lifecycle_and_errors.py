"""Attach/detach leaves no trace, also after errors; every user mistake gets one clear message."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TEXT_DIM, concepts, flux_inputs, hook_counts, processors, sd3_inputs, tiny_flux, tiny_sd3
from torch import nn

from conceptattention import ConceptAttention, ConceptAttentionError, Readout, UnsupportedModelError


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
    with pytest.raises(ConceptAttentionError, match="already attached"):
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


@pytest.mark.parametrize(
    "embeds, match",
    [
        (torch.zeros(0, TEXT_DIM), "concept list is empty"),
        (torch.zeros(2, 0, TEXT_DIM), "concept list is empty"),
        (torch.zeros(3, TEXT_DIM + 1), f"33 wide.*width {TEXT_DIM}.*own text encoder"),
        (torch.zeros(TEXT_DIM), r"\[K, D\] or \[B, K, D\]"),
        (torch.zeros(3, TEXT_DIM, dtype=torch.long), "floating point"),
        ([[0.0] * TEXT_DIM], "must be a torch.Tensor"),
    ],
)
def test_bad_concept_embeddings(embeds, match):
    with pytest.raises(ConceptAttentionError, match=match):
        ConceptAttention(tiny_flux(), embeds)


@pytest.mark.parametrize(
    "layers, match",
    [
        ([3], r"layer 3 is out of range: this transformer has 3 double-stream blocks \(valid indices -3..2\)"),
        ([-4], "layer -4 is out of range"),
        ([], "layers is empty"),
        (["1"], "must be ints"),
    ],
)
def test_bad_layers(layers, match):
    with pytest.raises(ConceptAttentionError, match=match):
        ConceptAttention(tiny_flux(layers=3), concepts(2), layers=layers)


def test_unsupported_transformer_names_the_supported_ones():
    with pytest.raises(
        UnsupportedModelError,
        match="no ConceptAttention adapter for Linear.*FluxTransformer2DModel.*SD3Transformer2DModel",
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


def test_other_bad_arguments():
    model = tiny_flux()
    with pytest.raises(ConceptAttentionError, match="unknown readout 'sharpest'.*concept_attention"):
        ConceptAttention(model, concepts(2), readouts="sharpest")
    with pytest.raises(ConceptAttentionError, match="unknown space"):
        Readout(space="keys")
    with pytest.raises(ConceptAttentionError, match="concept_pooled"):
        ConceptAttention(model, concepts(2), concept_pooled="clip")
    with pytest.raises(ConceptAttentionError, match="calls must be"):
        ConceptAttention(model, concepts(2), calls=3.5)
    with pytest.raises(ConceptAttentionError, match="attach first"):
        ConceptAttention(model, concepts(2)).forward_until_last_layer(**flux_inputs())
    with torch.no_grad(), ConceptAttention(model, concepts(2)) as ca:
        model(**flux_inputs())
    with pytest.raises(ConceptAttentionError, match="readout 'value' was not recorded"):
        ca.maps("value")


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
