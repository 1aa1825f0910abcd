"""FLUX.2 ([dev] and [klein]) against an independent recomputation (tests/reference_flux2.py), and what is
particular to the family: the shared text modulation with guidance, four RoPE axes with real prompt
positions and the concept tokens' position, concepts inside the two chat templates (Mistral's pads on the
left, Qwen3's on the right), caption words tokenized with their space, the pipelines' latents and
transformer inputs, [klein]'s true CFG, and reference images refused."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tiny_family_flux2 as tiny
import torch
from reference_flux2 import reference_maps, reference_prompt_attention, rope_tables

from conceptattention import ConceptAttention, PromptAttention
from conceptattention.errors import ConceptAttentionError
from conceptattention.families import family_for_transformer
from conceptattention.pipelines.mmdit import MMDiTPipeline
from conceptattention.readouts import READOUTS

LENGTH = 64  # max_sequence_length of the pipeline runs here
FAMILY = family_for_transformer(tiny.transformer())


def concept_embeds(k: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(k, tiny.TEXT_WIDTH, generator=torch.Generator().manual_seed(seed))


def two_calls(model, h: int = 3, w: int = 4) -> list[dict]:
    """Two calls of batch 2 on an h x w grid, with different timesteps, prompts and guidance."""
    first = tiny.call_inputs(model, batch=2, h=h, w=w, seed=1, t=0.7)
    second = tiny.call_inputs(model, batch=2, h=h, w=w, seed=5, t=0.3)
    if "guidance" in second:
        second["guidance"] = torch.tensor([1.0, 6.0])
    return [first, second]


@pytest.fixture(scope="module")
def dev():
    pipe = tiny.dev_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name="tiny-flux2-dev")


@pytest.fixture(scope="module")
def klein():
    pipe = tiny.klein_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name="tiny-flux2-klein")


def text_encoder_ids(pipe, prompt: str) -> torch.Tensor:
    """The token ids the pipeline's own encode_prompt feeds its text encoder for one prompt ``[L]``."""
    seen = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    try:
        pipe.encode_prompt(prompt=prompt, device="cpu", max_sequence_length=LENGTH)
    finally:
        hook.remove()
    return seen[0][0]


def find(ids: torch.Tensor, tokens: list[int]) -> list[int]:
    """Positions of every occurrence of the token run ``tokens`` in ``ids``."""
    ids, n = ids.tolist(), len(tokens)
    return [p for i in range(len(ids) - n + 1) if ids[i : i + n] == tokens for p in range(i, i + n)]


# ----- every readout against the reference ------------------------------------------------------------
@pytest.mark.parametrize(
    "guidance, layers", [(True, [0, 1, 2]), (False, [1, 2])], ids=["dev-guidance-layers-0-1-2", "klein-layers-1-2"]
)
def test_every_readout_matches_the_reference_over_two_calls(guidance, layers):
    model = tiny.transformer(guidance=guidance)
    calls, embeds = two_calls(model), concept_embeds()
    with torch.no_grad():
        plain = [model(**inputs)[0] for inputs in calls]
        with ConceptAttention(model, embeds, layers=layers, readouts=list(READOUTS)) as ca:
            ours = [model(**inputs)[0] for inputs in calls]
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))
    expected = reference_maps(model, calls, embeds, layers, READOUTS)
    for name in READOUTS:
        torch.testing.assert_close(ca.token_maps(name), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert ca.maps().shape == (2, 3, 3, 4)


def test_fused_projections_give_the_same_maps():
    model, embeds = tiny.transformer(), concept_embeds()
    inputs, maps = tiny.call_inputs(model), []
    for fuse in (False, True):
        if fuse:
            model.fuse_qkv_projections()
            assert hasattr(model.transformer_blocks[0].attn, "to_added_qkv")
        with torch.no_grad(), ConceptAttention(model, embeds, readouts=["concept_attention", "value"]) as ca:
            model(**inputs)
        maps.append(ca.all_maps())
    for name in maps[0]:
        torch.testing.assert_close(maps[1][name], maps[0][name], rtol=1e-5, atol=1e-6)


def test_guidance_reaches_the_concept_stream():
    """The concept stream is modulated by the model's shared ``temb_mod_txt``, guidance included."""
    model = tiny.transformer()
    maps = []
    for scale in (1.0, 6.0):
        inputs = tiny.call_inputs(model, batch=1)
        inputs["guidance"] = torch.tensor([scale])
        with torch.no_grad(), ConceptAttention(model, concept_embeds(), layers=[2]) as ca:
            model(**inputs)
        maps.append(ca.maps())
    assert not torch.allclose(maps[0], maps[1])


def test_rope_tables_are_text_then_image_from_four_axes():
    model = tiny.transformer()
    inputs, seen = tiny.call_inputs(model, batch=1, h=2, w=3), {}
    block = model.transformer_blocks[0]
    hook = block.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    ids = torch.cat([inputs["txt_ids"][0], inputs["img_ids"][0]])
    for got, expected in zip(seen["image_rotary_emb"], rope_tables(ids, (4, 4, 4, 4), 2000)):
        torch.testing.assert_close(got, expected)
    assert inputs["txt_ids"][0, :, 3].tolist() == list(range(7))  # prompt tokens have real positions along l


def test_a_concept_position_rotates_concept_tokens_as_the_reference():
    model = tiny.transformer()
    calls, embeds = two_calls(model), concept_embeds()
    names = ["concept_attention", "cross_attention", "value"]
    with torch.no_grad(), ConceptAttention(model, embeds, layers=[0, 2], readouts=names, concept_position=9) as ca:
        for inputs in calls:
            model(**inputs)
    chosen = {name: READOUTS[name] for name in names}
    expected = reference_maps(model, calls, embeds, [0, 2], chosen, concept_position=9)
    for name in names:
        torch.testing.assert_close(ca.token_maps(name), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    unrotated = reference_maps(model, calls, embeds, [0, 2], chosen)["concept_attention"]
    assert not torch.allclose(ca.token_maps(), unrotated, atol=1e-4)


def test_prompt_attention_matches_the_reference_over_every_prompt_token():
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=2, h=3, w=4)
    with torch.no_grad(), PromptAttention(model, layers=[0, 2]) as pa:
        model(**inputs)
    got, expected = pa.maps().flatten(-2), reference_prompt_attention(model, inputs, [0, 2])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones_like(got.sum(1)))  # no prompt token masked


def test_reference_image_tokens_are_refused(klein):
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=1, h=2, w=3)
    reference = torch.cartesian_prod(torch.tensor([10]), torch.arange(2), torch.arange(2), torch.arange(1))
    inputs["img_ids"] = torch.cat([inputs["img_ids"], reference[None]], 1)
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], torch.randn(1, 4, 16)], 1)
    with torch.no_grad(), ConceptAttention(model, concept_embeds()) as ca:
        model(**inputs)
    with pytest.raises(ConceptAttentionError, match="reference-image tokens"):
        ca.maps()
    from PIL import Image

    with pytest.raises(ConceptAttentionError, match="text-to-image only"):
        klein.generate("a dog", ["dog"], image=Image.new("RGB", (48, 32)), progress=False, **tiny.GENERATE)


# ----- concepts in the chat templates ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dev", "klein"])
def test_a_concept_is_the_lone_word_prompts_state_at_its_first_token(which, request):
    wrapped = request.getfixturevalue(which)
    pipe = wrapped.pipe
    tokenizer, first = FAMILY.concept_tokenizer(pipe)
    embeds = wrapped.encode_concepts(["dog", "sky"], max_length=LENGTH)
    for k, word in enumerate(["dog", "sky"]):
        ids = text_encoder_ids(pipe, word)
        (at,) = find(ids, tokenizer(word, add_special_tokens=False).input_ids)
        states = pipe.encode_prompt(prompt=word, device="cpu", max_sequence_length=LENGTH)[0][0]
        assert torch.equal(embeds[k], states[at])
        pad = int((ids == tokenizer.pad_token_id).sum())
        if which == "dev":  # left padding; the word follows the system message and [INST]
            assert pad > 0 and ids[:pad].eq(tokenizer.pad_token_id).all()
            unpadded = ids[pad:].tolist()
            assert first == unpadded.index(tokenizer.convert_tokens_to_ids("[INST]")) + 1 > 20
            assert at == pad + first
        else:  # right padding; the word follows <|im_start|>, "user", "\n"
            assert first == at == 3


@pytest.mark.parametrize("which", ["dev", "klein"])
def test_concept_tokens_take_the_rope_position_of_a_lone_one_token_word(which, request):
    wrapped = request.getfixturevalue(which)
    pipe = wrapped.pipe
    ids, tokenizer = text_encoder_ids(pipe, "dog"), FAMILY.concept_tokenizer(pipe)[0]
    (at,) = find(ids, tokenizer("dog", add_special_tokens=False).input_ids)
    txt_ids = pipe.encode_prompt(prompt="dog", device="cpu", max_sequence_length=LENGTH)[1][0]
    position = FAMILY.concept_position(pipe, LENGTH)
    assert position == int(txt_ids[at, 3]) and txt_ids[at, :3].eq(0).all()
    assert position == (LENGTH - 2 if which == "dev" else 3)  # dev: "dog" then [/INST] end the prompt
    assert (
        wrapped._session(
            wrapped.encode_concepts(["dog"], max_length=LENGTH), None, ["concept_attention"], max_length=LENGTH
        ).concept_position
        == position
    )
    rope = (torch.zeros(1, 16), torch.zeros(1, 16))
    cos, sin = FAMILY.concept_rope(pipe.transformer, rope, torch.float32, position)
    expected = pipe.transformer.pos_embed(txt_ids[at : at + 1])
    torch.testing.assert_close((cos[:, 0], sin[:, 0]), (expected[0], expected[1][:, 0::2]))


def test_a_multi_token_concept_warns_and_mean_averages_its_tokens(dev):
    tokenizer = FAMILY.concept_tokenizer(dev.pipe)[0]
    n = len(tokenizer("skyscraper", add_special_tokens=False).input_ids)
    assert n > 1
    with pytest.warns(UserWarning, match="several tokens"):
        first_token = dev.encode_concepts(["skyscraper", "dog"], max_length=LENGTH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = dev.encode_concepts(["skyscraper", "dog"], concept_tokens="mean", max_length=LENGTH)
    states = dev.pipe.encode_prompt(prompt="skyscraper", device="cpu", max_sequence_length=LENGTH)[0][0]
    at = LENGTH - 1 - n  # left padded: the word's n tokens, then [/INST]
    assert torch.equal(first_token[0], states[at])
    torch.testing.assert_close(mean[0], states[at : at + n].mean(0))
    torch.testing.assert_close(mean[1], first_token[1])


# ----- caption words ---------------------------------------------------------------------------------------
CAPTION = "a red dog on grass, a skyscraper"


@pytest.mark.parametrize("concept, piece", [("dog", " dog"), ("red dog", " red dog"), ("skyscraper", " skyscraper")])
def test_word_positions_are_the_captions_tokens_in_the_text_sequence(klein, concept, piece):
    ids, tokenizer = text_encoder_ids(klein.pipe, CAPTION), klein.pipe.tokenizer
    expected = find(ids, tokenizer(piece, add_special_tokens=False).input_ids)
    assert expected and klein.word_positions(CAPTION, concept, LENGTH) == expected
    assert klein.word_positions(CAPTION, "tree", LENGTH) == []


def test_a_left_padded_captions_words_are_where_its_tokens_are(dev):
    """With the caption, prompt_tokenizer finds its start after the left padding; counting each later word
    with its space then lands every word on its tokens (word_positions' arithmetic)."""
    ids = text_encoder_ids(dev.pipe, CAPTION)
    tokenizer, start, limit = FAMILY.prompt_tokenizer(dev.pipe, LENGTH, CAPTION)
    words = CAPTION.split()
    counts = FAMILY.caption_token_counts(tokenizer, words)
    for word in ("a", "dog", "skyscraper"):
        i = words.index(word)
        piece = word if i == 0 else " " + word
        at = start + sum(counts[:i])
        assert (
            list(range(at, at + counts[i]))
            == find(ids, tokenizer(piece, add_special_tokens=False).input_ids)[: counts[i]]
        )
    assert limit == LENGTH and ids[start - 1] == tokenizer.convert_tokens_to_ids("[INST]")


def test_word_positions_in_a_left_padded_prompt(dev):
    ids = text_encoder_ids(dev.pipe, CAPTION)
    expected = find(ids, dev.pipe.tokenizer(" dog", add_special_tokens=False).input_ids)
    assert dev.word_positions(CAPTION, "dog", LENGTH) == expected


# ----- the pipelines' latents, transformer inputs and calls ---------------------------------------------
@pytest.mark.parametrize("which", ["dev", "klein"])
def test_latents_and_transformer_inputs_are_the_pipelines(which, request):
    wrapped = request.getfixturevalue(which)
    pipe = wrapped.pipe
    pixels = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(3))
    latents = FAMILY.latents(pipe, pixels)
    z = pipe.vae.encode(pixels[None] * 2 - 1).latent_dist.mode()  # [1, 4, 16, 24]
    patches = z.reshape(1, 4, 8, 2, 12, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 16, 8, 12)
    bn = pipe.vae.bn
    by_hand = (patches - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
    torch.testing.assert_close(latents, by_hand)
    packed, _ = pipe.prepare_image_latents([pixels[None] * 2 - 1], 1, None, "cpu", torch.float32)
    torch.testing.assert_close(pipe._pack_latents(latents), packed)

    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:  # one denoising step from these latents, as the pipeline drives it
        pipe(
            prompt="a dog",
            latents=latents,
            height=32,
            width=48,
            num_inference_steps=1,
            guidance_scale=2.5,
            max_sequence_length=LENGTH,
            output_type="latent",
        )
    finally:
        hook.remove()
    call = seen[0]
    ours = FAMILY.transformer_inputs(pipe, latents, float(call["timestep"][0]), "a dog", 2.5, LENGTH)
    for key in ("hidden_states", "encoder_hidden_states", "txt_ids", "img_ids", "timestep"):
        torch.testing.assert_close(ours[key], call[key], msg=key)
    if which == "dev":
        torch.testing.assert_close(ours["guidance"], call["guidance"])
    else:
        assert "guidance" not in ours and call["guidance"] is None


def test_klein_true_cfg_runs_the_prompt_first(klein):
    pipe = klein.pipe
    assert FAMILY.calls_per_step(pipe, {"guidance_scale": 3.0}) == 2 == FAMILY.calls_per_step(pipe, {})
    assert FAMILY.calls_per_step(pipe, {"guidance_scale": 1.0}) == 1
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        call = dict(height=32, width=48, num_inference_steps=2, guidance_scale=3.0, output_type="latent")
        pipe(prompt="a dog", max_sequence_length=LENGTH, **call)
    finally:
        hook.remove()
    prompt = pipe.encode_prompt(prompt="a dog", device="cpu", max_sequence_length=LENGTH)[0]
    assert len(seen) == 4 and all(torch.equal(seen[i]["encoder_hidden_states"], prompt) for i in (0, 2))
    assert not torch.equal(seen[1]["encoder_hidden_states"], prompt)
    pipe.register_to_config(is_distilled=True)
    try:
        assert FAMILY.calls_per_step(pipe, {"guidance_scale": 3.0}) == 1
    finally:
        pipe.register_to_config(is_distilled=False)


def test_dev_makes_one_call_per_step_with_guidance_embedded(dev):
    assert FAMILY.calls_per_step(dev.pipe, {"guidance_scale": 3.0}) == 1


def test_a_dev_generation_is_unchanged_by_the_concept_stream(dev):
    pipe = dev.pipe
    embeds = dev.encode_concepts(["dog", "grass", "sky"], max_length=LENGTH)
    call = dict(prompt="a red dog on grass", height=32, width=48, num_inference_steps=2, output_type="np")
    call.update(max_sequence_length=LENGTH, guidance_scale=4.0)
    plain = pipe(generator=torch.Generator().manual_seed(3), **call).images
    with ConceptAttention(pipe.transformer, embeds) as ca:
        ours = pipe(generator=torch.Generator().manual_seed(3), **call).images
    assert np.array_equal(plain, ours)
    maps = ca.maps()
    assert maps.shape == (1, 3, 8, 12) and torch.isfinite(maps).all()
    assert ca.recorded_calls == 2


def test_a_saved_dev_pipeline_loads_and_encodes_concepts_alike(dev, tmp_path):
    from diffusers import DiffusionPipeline

    dev.pipe.save_pretrained(tmp_path)
    loaded = MMDiTPipeline(DiffusionPipeline.from_pretrained(tmp_path))
    assert loaded.family == "flux2" and loaded.pipe.tokenizer.padding_side == "left"
    words = ["dog", "skyscraper"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(
            loaded.encode_concepts(words, max_length=LENGTH), dev.encode_concepts(words, max_length=LENGTH)
        )
