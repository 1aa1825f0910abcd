"""AuraFlow against an independent recomputation (tests/reference_auraflow.py), and what is particular to it:
register tokens before the prompt, no text mask, post-norm text stream, timestep-only modulation, batched
CFG, a Llama-style tokenizer with ``</s>`` appended, fused q/k/v projections."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tiny_family_auraflow as tiny
import torch
from reference_auraflow import reference_maps, reference_prompt_attention
from tiny_models import hook_counts

from conceptattention import ConceptAttention, PromptAttention
from conceptattention.errors import ConceptAttentionError
from conceptattention.families import family_for_transformer
from conceptattention.pipelines.mmdit import MMDiTPipeline
from conceptattention.readouts import READOUTS

LAYERS = [0, 2]  # block 1 runs unread in between
LENGTH = 32  # max_sequence_length of the pipeline tests (the model takes any)


def embeds(k: int = 3, seed: int = 2, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(() if batch is None else (batch,)), k, tiny.TEXT_WIDTH, generator=g)


def assert_relative(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= tol * expected.abs().max(), (got - expected).abs().max()


@pytest.fixture(scope="module")
def model():
    return tiny.transformer()


@pytest.fixture(scope="module")
def calls(model):
    return [tiny.call_inputs(model, batch=2, h=3, w=5, seed=s) for s in (1, 7)]


@pytest.fixture(scope="module")
def recorded(model, calls):
    """Every readout recorded in one session over two calls."""
    with torch.no_grad(), ConceptAttention(model, embeds(), layers=LAYERS, readouts=list(READOUTS)) as ca:
        for inputs in calls:
            model(**inputs)
    return ca


@pytest.fixture(scope="module")
def wrapped():
    pipe = tiny.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name="tiny-auraflow")


# ----- the transformer side against the reference --------------------------------------------------------------
@pytest.mark.parametrize("name", list(READOUTS))
def test_every_readout_equals_the_reference_over_layers_and_calls(model, calls, recorded, name):
    r = READOUTS[name]
    expected = reference_maps(model, calls, embeds(), LAYERS, r.stream, r.space, r.softmax, r.concept_norm)
    assert_relative(recorded.token_maps(name), expected)


def test_per_item_concepts_equal_the_reference(model, calls):
    concepts = embeds(batch=2)
    with torch.no_grad(), ConceptAttention(model, concepts, layers=[1, 2]) as ca:
        model(**calls[0])
    expected = reference_maps(model, calls[:1], concepts, [1, 2], "cross+self", "output", True)
    assert_relative(ca.token_maps(), expected)


def test_prompt_attention_spans_registers_and_prompt_and_equals_the_reference(model, calls):
    inputs = calls[0]
    before, hooks = model(**inputs)[0], hook_counts(model)
    with torch.no_grad(), PromptAttention(model, layers=LAYERS) as pa:
        out = model(**inputs)[0]
    assert torch.equal(out, before) and hook_counts(model) == hooks
    got = pa.maps()
    assert got.shape == (2, tiny.REGISTERS + 7, 3, 5)  # the text sequence: 8 registers, then the 7 prompt tokens
    assert_relative(got.flatten(-2), reference_prompt_attention(model, inputs, LAYERS))
    torch.testing.assert_close(got.sum(1), torch.ones(2, 3, 5))  # no token masked: softmax over all of them


def test_the_concept_stream_never_attends_to_register_or_prompt_tokens(calls):
    """Block 0's image keys and values do not depend on the text, so with a read-only concept stream the
    value-space and cross-attention maps of block 0 cannot change when registers and prompt change."""
    model, other = tiny.transformer(), tiny.transformer()
    with torch.no_grad():
        other.register_tokens.add_(torch.randn_like(other.register_tokens))
    changed = dict(calls[0], encoder_hidden_states=torch.randn_like(calls[0]["encoder_hidden_states"]))
    readouts = ["value_no_softmax", "cross_attention"]
    with torch.no_grad():
        with ConceptAttention(model, embeds(), layers=[0], readouts=readouts) as a:
            out_a = model(**calls[0])[0]
        with ConceptAttention(other, embeds(), layers=[0], readouts=readouts) as b:
            out_b = other(**changed)[0]
    assert not torch.allclose(out_a, out_b)
    for name in readouts:
        assert torch.equal(a.maps(name), b.maps(name))


def test_prompt_attention_sees_the_registers(calls):
    model, other = tiny.transformer(), tiny.transformer()
    with torch.no_grad():
        other.register_tokens.mul_(5.0)
        with PromptAttention(model, layers=[0]) as a:
            model(**calls[0])
        with PromptAttention(other, layers=[0]) as b:
            other(**calls[0])
    assert not torch.allclose(a.maps()[:, : tiny.REGISTERS], b.maps()[:, : tiny.REGISTERS])


def test_the_concept_stream_is_modulated_like_the_prompt(model, calls):
    family = family_for_transformer(model)
    assert family.name == "auraflow" and not family.pooled_text and family.rope({"temb": None}) is None
    with torch.no_grad():
        with ConceptAttention(model, embeds(), layers=LAYERS, concept_pooled="zero") as zero:
            model(**calls[0])
        with ConceptAttention(model, embeds(), layers=LAYERS, concept_pooled="prompt") as prompt:
            model(**calls[0])
    assert torch.equal(zero.maps(), prompt.maps())  # no pooled text vector to zero


def test_fused_qkv_projections_give_the_same_maps(calls):
    plain, fused = tiny.transformer(), tiny.transformer()
    fused.fuse_qkv_projections()
    assert type(fused.joint_transformer_blocks[0].attn.processor).__name__ == "FusedAuraFlowAttnProcessor2_0"
    with torch.no_grad():
        before = fused(**calls[0])[0]
        with ConceptAttention(plain, embeds(), layers=LAYERS, readouts=["concept_attention", "value"]) as a:
            plain(**calls[0])
        with ConceptAttention(fused, embeds(), layers=LAYERS, readouts=["concept_attention", "value"]) as b:
            during = fused(**calls[0])[0]
    assert torch.equal(before, during)
    for name in ("concept_attention", "value"):
        torch.testing.assert_close(b.maps(name), a.maps(name), rtol=1e-5, atol=1e-6)


def test_bfloat16_outputs_are_unchanged_and_maps_are_finite():
    model = tiny.transformer(dtype=torch.bfloat16)
    inputs = tiny.call_inputs(model, batch=2, h=4, w=2)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, embeds(), layers=LAYERS) as ca:
            ours = model(**inputs)[0]
    assert ours.dtype == torch.bfloat16 and torch.equal(plain, ours)
    maps = ca.maps()
    assert maps.shape == (2, 3, 4, 2) and torch.isfinite(maps).all()
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 4, 2), rtol=1e-3, atol=1e-3)


# ----- the pipeline side ------------------------------------------------------------------------------------------
def lone_word_states(pipe, word: str, length: int = LENGTH) -> torch.Tensor:
    """The text encoder run by hand on the word alone, tokenized as the pipeline tokenizes a prompt."""
    ids = pipe.tokenizer(word, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask)[0][0]


def test_a_concept_is_the_lone_words_state_at_its_first_token(wrapped):
    pipe = wrapped.pipe
    assert wrapped.model_family.concept_tokenizer(pipe)[1] == 0  # no start token: the word comes first
    got = wrapped.encode_concepts(["dog", "tree"], max_length=LENGTH)
    for k, word in enumerate(["dog", "tree"]):
        torch.testing.assert_close(got[k], lone_word_states(pipe, word)[0], rtol=1e-6, atol=1e-6)
        by_pipeline = pipe.encode_prompt(word, do_classifier_free_guidance=False, max_sequence_length=LENGTH)[0]
        torch.testing.assert_close(got[k], by_pipeline[0, 0], rtol=1e-6, atol=1e-6)


def test_a_start_token_moves_the_concept_and_word_positions_by_one():
    pipe = tiny.pipeline(add_bos=True)
    wrapped = MMDiTPipeline(pipe)
    assert wrapped.model_family.concept_tokenizer(pipe)[1] == 1
    got = wrapped.encode_concepts(["dog"], max_length=LENGTH)
    states = lone_word_states(pipe, "dog")
    assert pipe.tokenizer("dog").input_ids[0] == pipe.tokenizer.bos_token_id
    torch.testing.assert_close(got[0], states[1], rtol=1e-6, atol=1e-6)
    assert wrapped.word_positions("a red dog", "dog", LENGTH) == [tiny.REGISTERS + 3]


def test_a_left_padding_tokenizer_gives_the_same_concepts_and_refuses_word_positions(wrapped):
    left = MMDiTPipeline(tiny.pipeline(padding_side="left"))
    words = ["dog", "background", "a"]
    torch.testing.assert_close(
        left.encode_concepts(words, max_length=LENGTH), wrapped.encode_concepts(words, max_length=LENGTH)
    )
    with pytest.raises(ConceptAttentionError, match="pads on the right"):
        left.word_positions("a dog", "dog", LENGTH)


def test_a_multi_token_concept_warns_and_mean_averages_its_tokens(wrapped):
    n = len(wrapped.pipe.tokenizer("skyscraper", add_special_tokens=False).input_ids)
    assert n > 1
    with pytest.warns(UserWarning, match=r"\['skyscraper'\] are several tokens"):
        first = wrapped.encode_concepts(["skyscraper"], max_length=LENGTH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = wrapped.encode_concepts(["skyscraper"], concept_tokens="mean", max_length=LENGTH)
    states = lone_word_states(wrapped.pipe, "skyscraper")
    torch.testing.assert_close(first[0], states[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean[0], states[:n].mean(0), rtol=1e-6, atol=1e-6)


def caption_ids(pipe, caption: str, length: int) -> list[int]:
    """The token ids the pipeline's own encode_prompt feeds the text encoder for ``caption``."""
    seen = []
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    try:
        pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=length)
    finally:
        handle.remove()
    return seen[0]


def test_word_positions_find_a_captions_tokens_after_the_registers(wrapped):
    pipe, caption = wrapped.pipe, "a photo of a red dog on the grass near a skyscraper"
    ids = caption_ids(pipe, caption, LENGTH)
    text = [None] * tiny.REGISTERS + ids  # the transformer's text sequence: registers, then the prompt tokens
    for word in ("dog", "a", "skyscraper", "grass"):
        positions = wrapped.word_positions(caption, word, LENGTH)
        word_ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
        hits = [p for p in range(len(text)) if text[p : p + len(word_ids)] == word_ids]
        assert positions == [p + j for p in hits for j in range(len(word_ids))] and positions
    assert wrapped.word_positions(caption, "tree", LENGTH) == []


def test_word_positions_drop_what_truncation_cuts_and_the_end_token_slot(wrapped):
    caption = "a red dog on the grass"
    ids = caption_ids(wrapped.pipe, caption, 4)  # ▁a ▁red ▁dog </s>: "on" gave its slot to </s>
    assert ids[-1] == wrapped.pipe.tokenizer.eos_token_id and len(ids) == 4
    assert wrapped.word_positions(caption, "dog", 4) == [tiny.REGISTERS + 2]
    assert wrapped.word_positions(caption, "on", 4) == [] and wrapped.word_positions(caption, "grass", 4) == []


def test_generate_with_guidance_is_the_plain_pipelines_and_reads_the_conditional_half(wrapped):
    pipe, prompt = wrapped.pipe, "a red dog on grass"
    kwargs = dict(height=32, width=24, num_inference_steps=2, max_sequence_length=LENGTH)
    assert wrapped.model_family.calls_per_step(pipe, {"guidance_scale": 4.0}) == 1  # CFG is batched
    res = wrapped.generate(prompt, ["dog", "grass"], guidance=4.0, seed=1, layers=[1, 2], progress=False, **kwargs)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kw: seen.append((args[0].shape[0], kw["encoder_hidden_states"], kw["timestep"])),
        with_kwargs=True,
    )
    try:
        with ConceptAttention(pipe.transformer, wrapped.encode_concepts(["dog", "grass"]), layers=[1, 2]) as ca:
            plain = pipe(prompt, guidance_scale=4.0, generator=torch.Generator().manual_seed(1), **kwargs).images[0]
    finally:
        handle.remove()
    assert np.array_equal(np.asarray(res.image), np.asarray(plain))
    assert [b for b, _, _ in seen] == [2, 2]  # [unconditional, conditional] in one call per step
    cond = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=LENGTH)[0]
    uncond = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=LENGTH)[0]
    torch.testing.assert_close(seen[0][1], torch.cat([uncond, cond]))
    maps = ca.maps()
    torch.testing.assert_close(res.token_maps, maps[-1], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(maps[0], maps[-1])
    # the timestep the pipeline passes is the flow time sigma in [0, 1], as transformer_inputs passes t
    torch.testing.assert_close(torch.stack([t[0] for _, _, t in seen]), pipe.scheduler.sigmas[:2].float())


def test_generate_without_guidance_calls_the_transformer_with_the_prompt_alone(wrapped):
    pipe, seen = wrapped.pipe, []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        res = wrapped.generate(
            "a dog", ["dog", "sky"], height=24, width=32, steps=1, guidance=1.0, progress=False, max_sequence_length=8
        )
    finally:
        handle.remove()
    assert seen == [1] and res.maps.shape == (2, 24, 32) and torch.isfinite(res.token_maps).all()


def test_real_image_inputs_follow_the_pipelines_conventions(wrapped):
    pipe, family = wrapped.pipe, wrapped.model_family
    assert family.size_multiple(pipe) == 4 and family.default_size(pipe) == 32  # VAE 2 x patch 2; sample 16 x 2
    pixels = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(3))
    pipe.vae.register_to_config(shift_factor=0.25)  # the pipeline decodes latents / scaling_factor, never shifting
    try:
        latents = family.latents(pipe, pixels)
    finally:
        pipe.vae.register_to_config(shift_factor=None)
    with torch.no_grad():
        mean = pipe.vae.encode(pixels[None] * 2 - 1).latent_dist.mean
    torch.testing.assert_close(latents, mean * pipe.vae.config.scaling_factor)
    noisy = torch.randn(2, 4, 8, 12)
    inputs = family.transformer_inputs(pipe, noisy, 0.3, "a dog", 0.0, LENGTH)
    cond = pipe.encode_prompt("a dog", do_classifier_free_guidance=False, max_sequence_length=LENGTH)[0]
    assert torch.equal(inputs["hidden_states"], noisy) and torch.equal(inputs["timestep"], torch.full((2,), 0.3))
    assert torch.equal(inputs["encoder_hidden_states"], cond.expand(2, -1, -1))
    assert family.read_call(pipe.transformer, inputs).grid() == (4, 6)
