"""Chroma's numbers against an independent recomputation (tests/reference_chroma.py), and what is particular to
the family: the text half of the pruned modulation, the pipeline's padding mask, T5 concepts at position 0, word
positions in the pipeline's own tokenization, and true CFG in separate calls."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_family_chroma as spec
import torch
from reference_chroma import modulations, reference_maps, reference_prompt_attention, rope_angles

from conceptattention import ConceptAttention, PromptAttention
from conceptattention.families import family_for_pipeline, family_for_transformer
from conceptattention.pipelines.mmdit import MMDiTPipeline
from conceptattention.readouts import READOUTS

CAPTION = "a red dog on the grass and a cat"


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to ``rel`` relative to the reference's largest entry."""
    assert ours.shape == ref.shape
    err = float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())
    assert err <= rel, f"relative error {err:.2e}"


def embeds(k: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(k, spec.TEXT_WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return spec.transformer()


@pytest.fixture(scope="module")
def wrapped():
    pipe = spec.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name="tiny-chroma")


def text_ids_seen(pipe, caption: str, max_length: int) -> torch.Tensor:
    """The token ids the pipeline's own encode_prompt path feeds T5 for ``caption``."""
    seen = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=max_length)
    finally:
        handle.remove()
    return seen[0][0]


# ----- the maps against the reference ------------------------------------------------------------------
def test_every_readout_equals_the_reference_over_layers_and_two_calls(model):
    calls = [spec.call_inputs(model, 2, 3, 5, seed=1, t=0.3), spec.call_inputs(model, 2, 3, 5, seed=4, t=0.8)]
    concepts, layers = embeds(), [0, 2]
    with torch.no_grad(), ConceptAttention(model, concepts, layers=layers, readouts=list(READOUTS)) as ca:
        for inputs in calls:
            model(**inputs)
    for name, r in READOUTS.items():
        ref = reference_maps(model, calls, concepts, layers, r.stream, r.space, r.softmax, r.concept_norm)
        close(ca.token_maps(name), ref)
    # the padding mask matters here: without it the image stream's outputs, hence the maps, differ
    unmasked = [{k: v for k, v in c.items() if k != "attention_mask"} for c in calls]
    assert not torch.allclose(
        ca.token_maps(), reference_maps(model, unmasked, concepts, layers, "cross+self", "output", True)
    )


def test_the_concept_stream_is_modulated_by_the_text_half_of_the_blocks_temb(model):
    inputs, family = spec.call_inputs(model, 2, 2, 3), family_for_transformer(model)
    seen: dict[str, list] = {"temb": [], "emb": []}
    handles = []
    for block in family.double_blocks(model):
        handles.append(
            block.register_forward_pre_hook(lambda m, a, k: seen["temb"].append(k["temb"]), with_kwargs=True)
        )
        handles.append(
            block.norm1_context.register_forward_pre_hook(
                lambda m, a, k: seen["emb"].append(k["emb"]), with_kwargs=True
            )
        )
    with torch.no_grad():
        model(**inputs)
        expected = modulations(model, inputs["timestep"] * 1.0)
    for h in handles:
        h.remove()
    for index, block in enumerate(family.double_blocks(model)):
        modulation = family.text_modulation(block, {"temb": seen["temb"][index]}, None)
        assert torch.equal(modulation, seen["emb"][index])  # what the prompt's own norm1_context gets
        torch.testing.assert_close(modulation, expected[index][1], rtol=0, atol=0)


def test_concept_pooled_changes_nothing_without_a_pooled_vector(model):
    inputs = spec.call_inputs(model, 2, 3, 4)
    maps = {}
    for pooled in ("zero", "prompt"):
        with torch.no_grad(), ConceptAttention(model, embeds(), layers=[1, 2], concept_pooled=pooled) as ca:
            model(**inputs)
        maps[pooled] = ca.maps()
    assert not family_for_transformer(model).pooled_text
    assert torch.equal(maps["zero"], maps["prompt"])


# ----- the padding mask and the image-to-prompt baseline ----------------------------------------------
def test_prompt_attention_equals_the_reference_with_padding_masked(model):
    inputs = spec.call_inputs(model, 2, 4, 3)  # prompts of 3 and 5 tokens of 8
    with torch.no_grad(), PromptAttention(model, layers=[0, 2]) as session:
        model(**inputs)
    maps = session.maps()  # [B, S, h, w]
    assert maps.shape == (2, spec.TEXT_TOKENS, 4, 3)
    close(maps.flatten(2), reference_prompt_attention(model, inputs, [0, 2]))
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 4, 3))
    for b, length in enumerate((3, 5)):  # the prompt's tokens and its first padding token are kept
        assert (maps[b, : length + 1] > 0).all() and torch.count_nonzero(maps[b, length + 1 :]) == 0


def test_prompt_mask_reads_the_pipelines_float_mask_and_a_boolean_one_alike(model):
    family = family_for_transformer(model)
    mask = spec.call_inputs(model, 2, 3, 5)["attention_mask"]
    assert mask.is_floating_point()  # as ChromaPipeline builds it
    kept = family.prompt_mask({"attention_mask": mask}, spec.TEXT_TOKENS)
    assert kept.dtype == torch.bool and kept.shape == (2, spec.TEXT_TOKENS)
    assert kept.sum(1).tolist() == [4, 6]
    assert torch.equal(family.prompt_mask({"attention_mask": mask.bool()}, spec.TEXT_TOKENS), kept)
    assert family.prompt_mask({}, spec.TEXT_TOKENS) is None


def test_diffusers_adds_the_float_mask_to_the_logits_so_padding_still_counts(model):
    """Documents diffusers' ChromaPipeline (issues #12116, #13619): its 0/1 float mask is added to the logits, so a
    padding token it means to drop still changes the model's output. If this fails, diffusers now drops padding
    (a boolean mask), which the family reads the same way; update the family's docstring."""
    inputs = spec.call_inputs(model, 1, 3, 5)  # a prompt of 3 tokens of 8: token 4 on is meant to be dropped
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][:, 6] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(**inputs)[0], model(**changed)[0])


# ----- concepts: T5 as the pipeline encodes a lone word, at text position 0 ---------------------------------
def test_a_concept_is_the_lone_word_prompts_first_token_state_at_position_zero(wrapped):
    pipe, family = wrapped.pipe, wrapped.model_family
    words = ["dog", "grass", "sky"]
    rows = wrapped.encode_concepts(words)
    for k, word in enumerate(words):
        with torch.no_grad():
            states, text_ids, mask, *_ = pipe.encode_prompt(
                word, do_classifier_free_guidance=False, max_sequence_length=256
            )
        torch.testing.assert_close(rows[k], states[0, 0], rtol=1e-6, atol=1e-6)
        assert text_ids_seen(pipe, word, 256)[0] == pipe.tokenizer(word, add_special_tokens=False).input_ids[0]
        assert torch.count_nonzero(text_ids) == 0  # every text token, the word's first included, at position 0
    # the model's own rotary tables at that position are the identity, and the concept tokens are not rotated
    rope = pipe.transformer.pos_embed(
        torch.cat([text_ids, pipe._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32)])
    )
    x = torch.randn(1, 1, pipe.transformer.config.num_attention_heads, pipe.transformer.config.attention_head_dim)
    assert torch.equal(family.apply_rope(x, family.text_rope(rope, 1, torch.float32)), x)
    assert family.concept_rope(None, rope, torch.float32, None) is None
    cos, sin = rope_angles(torch.zeros(1, 3), pipe.transformer.config.axes_dims_rope)  # the reference's tables agree
    assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))


def test_a_multi_token_concept_warns_and_mean_averages_its_tokens(wrapped):
    pipe = wrapped.pipe
    n = len(pipe.tokenizer("skyscraper", add_special_tokens=False).input_ids)
    assert n > 1
    with pytest.warns(UserWarning, match="several tokens"):
        first = wrapped.encode_concepts(["skyscraper", "dog"])
    mean = wrapped.encode_concepts(["skyscraper", "dog"], concept_tokens="mean")
    with torch.no_grad():
        lone = pipe.encode_prompt("skyscraper", do_classifier_free_guidance=False, max_sequence_length=256)[0][0]
    torch.testing.assert_close(first[0], lone[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean[0], lone[:n].mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean[1], first[1])


# ----- word positions in the pipeline's own tokenization --------------------------------------------------
def test_word_positions_are_the_words_tokens_in_the_pipelines_sequence(wrapped):
    pipe = wrapped.pipe
    ids = text_ids_seen(pipe, CAPTION, 32)
    for concept, count in (("dog", 1), ("grass", 1), ("red dog", 1), ("a", 2), ("skyscraper", 0)):
        positions = wrapped.word_positions(CAPTION, concept, 32)
        word_ids = pipe.tokenizer(concept, add_special_tokens=False).input_ids
        assert ids[positions].tolist() == word_ids * count
    caption = "a skyscraper and a dog"
    ids = text_ids_seen(pipe, caption, 32)
    positions = wrapped.word_positions(caption, "skyscraper", 32)
    assert (
        len(positions) > 1
        and ids[positions].tolist() == pipe.tokenizer("skyscraper", add_special_tokens=False).input_ids
    )
    assert (
        ids[wrapped.word_positions(caption, "dog", 32)].tolist()
        == pipe.tokenizer("dog", add_special_tokens=False).input_ids
    )


def test_word_positions_stop_where_truncation_puts_the_end_token(wrapped):
    pipe = wrapped.pipe
    ids = text_ids_seen(pipe, "a red dog on the grass", 6)  # 6 words and </s> cut to 5 words and </s>
    assert ids[-1] == pipe.tokenizer.eos_token_id
    assert wrapped.word_positions("a red dog on the grass", "the", 6) == [4]
    assert wrapped.word_positions("a red dog on the grass", "grass", 6) == []


# ----- the pipeline's calls: real-image inputs and true CFG ----------------------------------------------
def record_calls(pipe):
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    return calls, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_real_image_inputs_are_the_pipelines_prompt_call(wrapped):
    pipe = wrapped.pipe
    calls, handle = record_calls(pipe)
    try:
        pipe(CAPTION, height=32, width=48, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=16)
    finally:
        handle.remove()
    noisy = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # as MMDiTPipeline calls it (T5 kernels differ in the last bit with autograd on)
        ours = wrapped.model_family.transformer_inputs(pipe, noisy, 0.5, CAPTION, 0.0, 16)
    theirs = calls[0]
    for key in ("encoder_hidden_states", "txt_ids", "img_ids", "attention_mask"):
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key].expand_as(ours[key])), key
    assert ours["hidden_states"].shape == (2, 96, 16) and ours["timestep"].tolist() == [0.5, 0.5]


def test_guided_generate_is_the_plain_pipelines_and_its_maps_are_the_prompt_calls(wrapped):
    pipe, family = wrapped.pipe, wrapped.model_family
    assert family.calls_per_step(pipe, {}) == 2  # the pipeline's default guidance_scale 5.0 runs CFG
    assert family.calls_per_step(pipe, {"guidance_scale": 1.0}) == 1
    prompt, concepts, run = (
        "a red dog on grass",
        ["dog", "grass", "sky"],
        dict(height=32, width=48, max_sequence_length=16),
    )
    calls, handle = record_calls(pipe)
    try:
        generator = torch.Generator().manual_seed(3)
        plain = pipe(prompt, generator=generator, num_inference_steps=2, guidance_scale=3.0, **run).images[0]
    finally:
        handle.remove()
    res = wrapped.generate(prompt, concepts, steps=2, guidance=3.0, seed=3, layers=[0, 2], progress=False, **run)
    assert np.array_equal(np.asarray(res.image), np.asarray(plain))
    assert len(calls) == 4  # per step: the prompt's call, then the negative prompt's
    with torch.no_grad():  # as the pipeline runs it
        prompt_states = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=16)[0]
    for i, call in enumerate(calls):
        assert torch.equal(call["encoder_hidden_states"], prompt_states) == (i % 2 == 0)
    ref = reference_maps(
        pipe.transformer, [calls[0], calls[2]], wrapped.encode_concepts(concepts), [0, 2], "cross+self", "output", True
    )
    close(res.token_maps.flatten(1), ref[0])
    assert family_for_pipeline(pipe).prompt_batch_index == 0
