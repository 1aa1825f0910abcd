"""The DAAM-style prompt attention (prompt_attention.py) against a hand computation (Flux with RoPE on prompt
positions, SD3); early stopping, and one session at a time."""

from __future__ import annotations

import pytest
import torch
from reference import reference_prompt_attention
from tiny_models import concepts as concept_embeds
from tiny_models import flux_inputs, hook_counts, sd3_inputs, tiny_flux, tiny_sd3

from conceptattention.errors import ConceptAttentionError
from conceptattention.prompt_attention import PromptAttention


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_prompt_attention_matches_hand_computation(family):
    model = tiny_flux() if family == "flux" else tiny_sd3()
    inputs = flux_inputs() if family == "flux" else sd3_inputs()
    if family == "flux":
        inputs["txt_ids"] = torch.rand(inputs["txt_ids"].shape) * 3  # non-zero prompt positions: RoPE on keys too
    before, hooks = model(**inputs)[0], hook_counts(model)
    with torch.no_grad(), PromptAttention(model, layers=[0, 2]) as pa:
        out = model(**inputs)[0]
    assert torch.equal(out, before) and hook_counts(model) == hooks
    expected = reference_prompt_attention(family, model, inputs, [0, 2])  # [B, S, N]
    got = pa.maps().flatten(-2)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones_like(got.sum(1)))  # softmax over prompt tokens


def test_prompt_attention_early_stop_and_one_session_at_a_time(flux):
    from conceptattention import ConceptAttention

    inputs = flux_inputs()
    with torch.no_grad(), PromptAttention(flux, layers=[1]) as full:
        flux(**inputs)
    with torch.no_grad(), PromptAttention(flux, layers=[1]) as early:
        early.forward_until_last_layer(**inputs)
    assert torch.equal(full.maps(), early.maps())
    with (
        ConceptAttention(flux, concept_embeds(2)),
        pytest.raises(ConceptAttentionError, match="another session is attached"),
    ):
        PromptAttention(flux, layers=[1]).__enter__()
