"""HunyuanImage 2.1 (families/hunyuanimage.py) against an independent recomputation (reference_hunyuanimage.py),
and its particular choices: concepts as lone one-token prompts through the token refiner, the Qwen template's
dropped prefix, the model's text order with ByT5 glyph tokens and padding, byte-level word positions, the
pipeline's denoising inputs and its guider's calls per step."""

from __future__ import annotations

import warnings

import pytest
import tiny_family_hunyuanimage as tiny
import torch
from reference_hunyuanimage import embed_concepts, reference_maps, reference_prompt_attention, rope_tables
from tiny_models import hook_counts

from conceptattention import READOUTS, ConceptAttention, ConceptAttentionError, PromptAttention
from conceptattention.families import family_for_transformer
from conceptattention.pipelines.mmdit import MMDiTPipeline

FAMILY = family_for_transformer(tiny.transformer())
CAPTION = "a red dog on grass, and a skyscraper"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def concepts(k: int = 3, batch: int | None = None, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(() if batch is None else (batch,)), k, tiny.TEXT_WIDTH, generator=g)


def without_glyphs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if not k.endswith("_2")}


def block_inputs(model, inputs: dict) -> dict:
    """The bound arguments block 0 is called with (the model's own text order and mask)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(encoder_hidden_states=args[1], attention_mask=kwargs["attention_mask"])

    handle = model.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen


@pytest.fixture(scope="module")
def wrapped():
    pipe = tiny.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe)


# ----- every readout equals the reference ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layers, variant",
    [
        pytest.param([0], "glyphs", id="layer0-glyphs"),
        pytest.param([1, -1], "glyphs", id="layers1-last-glyphs"),
        pytest.param([0, 1, 2], "no-glyphs", id="all-layers-no-glyph-states"),
        pytest.param([1, 2], "distilled", id="guidance-and-meanflow"),
        pytest.param([0, 2], "per-item", id="per-item-concepts"),
    ],
)
def test_every_readout_matches_the_reference_over_two_calls(layers, variant):
    model = tiny.transformer(guidance_embeds=variant == "distilled", use_meanflow=variant == "distilled")
    calls = [tiny.call_inputs(model, batch=2, h=3, w=5, seed=s) for s in (1, 7)]
    calls[1]["timestep"] = calls[1]["timestep"] + 100.0
    if variant == "no-glyphs":
        calls = [without_glyphs(c) for c in calls]
    if variant == "distilled":
        for c in calls:
            c.update(guidance=torch.tensor([3500.0, 2000.0]), timestep_r=c["timestep"] - 50.0)
    embeds = concepts(3, batch=2 if variant == "per-item" else None)
    with torch.no_grad():
        plain = [model(**c)[0] for c in calls]
        with ConceptAttention(model, embeds, layers=layers, readouts=list(READOUTS)) as ca:
            hooked = [model(**c)[0] for c in calls]
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
    chosen = sorted({layer % len(model.transformer_blocks) for layer in layers})
    expected = reference_maps(model, calls, embeds, chosen, READOUTS)
    assert set(expected) == set(READOUTS)
    for name, maps in expected.items():
        assert ca.token_maps(name).shape == maps.shape == (2, 3, 15)
        assert rel_err(ca.token_maps(name), maps) <= 1e-5, name
    assert ca.maps().shape == (2, 3, 3, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_outputs_are_bit_identical_and_maps_finite(dtype):
    model = tiny.transformer().to(dtype)
    inputs = {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in tiny.call_inputs(model).items()
    }
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, concepts(3), layers=[0, 2], readouts=list(READOUTS)) as ca:
            hooked = model(**inputs)[0]
    assert torch.equal(plain, hooked)
    assert all(torch.isfinite(m).all() and m.shape == (2, 3, 3, 5) for m in ca.all_maps().values())


def test_the_reference_rope_tables_are_the_models_and_the_grid_divides_by_the_patch():
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=1, h=4, w=3)
    cos, sin = model.rope(inputs["hidden_states"])
    ref_cos, ref_sin = rope_tables(model, 4, 3)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    assert FAMILY.read_call(model, inputs).grid() == (4, 3)


def test_prompt_attention_matches_the_reference_and_skips_padding():
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=2, h=3, w=5)
    before = hook_counts(model)
    with torch.no_grad(), PromptAttention(model, layers=[0, 2]) as pa:
        model(**inputs)
    assert hook_counts(model) == before
    got, expected = pa.maps().flatten(-2), reference_prompt_attention(model, inputs, [0, 2])
    assert got.shape == expected.shape == (2, 13, 15)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 15))
    valid = torch.tensor([2 + 5, 3 + 7])  # glyph + prompt tokens, first in the model's order
    for b in range(2):
        assert torch.count_nonzero(got[b, valid[b] :]) == 0 and (got[b, : valid[b]] > 0).all()


@pytest.mark.parametrize("glyphs", [True, False])
def test_prompt_mask_is_the_models_own_after_its_reordering(glyphs):
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=2)
    inputs = inputs if glyphs else without_glyphs(inputs)
    seen = block_inputs(model, inputs)
    n = 15
    model_mask = seen["attention_mask"][:, 0, 0, n:]
    assert torch.equal(FAMILY.prompt_mask(inputs, model_mask.shape[1]), model_mask)


# ----- concepts: lone one-token prompts through the token refiner ------------------------------------------------
def test_concepts_go_through_the_refiner_alone_at_each_items_timestep():
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=2)  # timesteps 400 and 700
    embeds = concepts(3)[None]
    got = FAMILY.embed_concepts(model, embeds, inputs)
    assert got.shape == (2, 3, 16)
    with torch.no_grad():
        for b in range(2):
            for k in range(3):
                alone = model.context_embedder(
                    embeds[:, k : k + 1], inputs["timestep"][b : b + 1], torch.ones(1, 1, dtype=torch.long)
                )
                torch.testing.assert_close(got[b, k], alone[0, 0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, embed_concepts(model, embeds[0], inputs["timestep"]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], got[1])  # the refiner is conditioned on the timestep


def test_no_pooled_text_so_the_concept_stream_is_modulated_like_the_prompt():
    model = tiny.transformer()
    inputs, embeds = tiny.call_inputs(model, batch=2), concepts(3)
    with torch.no_grad():
        with ConceptAttention(model, embeds, layers=[0, 2], concept_pooled="zero") as zero:
            model(**inputs)
        with ConceptAttention(model, embeds, layers=[0, 2], concept_pooled="prompt") as prompt:
            model(**inputs)
    assert torch.equal(zero.maps(), prompt.maps())


def lone_word_state(pipe, word: str, position: int) -> torch.Tensor:
    """The Qwen state the pipeline reads (third-last hidden state) at ``position`` of the templated word, by hand."""
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(word), return_tensors="pt")
    with torch.no_grad():
        out = pipe.text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask, output_hidden_states=True)
    return out.hidden_states[-3][0, position]


def test_a_concept_is_its_words_first_token_right_after_the_dropped_template_prefix(wrapped):
    pipe = wrapped.pipe
    tokenizer, first = FAMILY.concept_tokenizer(pipe)
    assert tokenizer is pipe.tokenizer and first == 0  # the prefix is exactly the 34 tokens the pipeline drops
    ids = tokenizer(pipe.prompt_template_encode.format("dog")).input_ids
    assert ids[34] == tokenizer("dog", add_special_tokens=False).input_ids[0]
    embeds = wrapped.encode_concepts(["dog", "sky"])
    for k, word in enumerate(["dog", "sky"]):
        torch.testing.assert_close(embeds[k], lone_word_state(pipe, word, 34), rtol=1e-5, atol=1e-6)


def test_a_shorter_drop_moves_the_concept_index_and_a_longer_one_is_refused():
    pipe = tiny.pipeline()
    pipe.prompt_template_encode_start_idx = 30
    p = MMDiTPipeline(pipe)
    assert FAMILY.concept_tokenizer(pipe)[1] == 4
    torch.testing.assert_close(p.encode_concepts(["tree"])[0], lone_word_state(pipe, "tree", 34), rtol=1e-5, atol=1e-6)
    assert p.word_positions("a dog", "dog") == [5]
    pipe.prompt_template_encode_start_idx = 36
    with pytest.raises(ConceptAttentionError, match="prompts are cut"):
        p.encode_concepts(["tree"])


def test_a_several_token_concept_warns_and_mean_averages_its_tokens(wrapped):
    pipe = wrapped.pipe
    n = len(pipe.tokenizer("skyscraper", add_special_tokens=False).input_ids)
    assert n > 1
    with pytest.warns(UserWarning, match=r"\['skyscraper'\] are several tokens"):
        first = wrapped.encode_concepts(["dog", "skyscraper"])
    torch.testing.assert_close(first[1], lone_word_state(pipe, "skyscraper", 34), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = wrapped.encode_concepts(["skyscraper"], concept_tokens="mean")
    states = torch.stack([lone_word_state(pipe, "skyscraper", 34 + i) for i in range(n)])
    torch.testing.assert_close(mean[0], states.mean(0), rtol=1e-5, atol=1e-6)


# ----- captions: byte-level counts and word positions in the transformer's text sequence ------------------------
@pytest.mark.parametrize("caption", [CAPTION, "skyscraper dog's grass", "the sky: 42 trees"])
def test_caption_token_counts_split_the_pipelines_own_tokenization(wrapped, caption):
    tokenizer = wrapped.pipe.tokenizer
    words = caption.split()
    counts = FAMILY.caption_token_counts(tokenizer, words)
    ids = tokenizer(wrapped.pipe.prompt_template_encode.format(caption)).input_ids[34:-1]  # the caption's tokens
    assert sum(counts) == len(ids)
    pieces = [tokenizer.decode(ids[sum(counts[:i]) : sum(counts[: i + 1])]) for i in range(len(words))]
    assert [p.strip() for p in pieces] == words


def test_word_positions_index_the_captions_tokens_in_the_transformers_text_sequence(wrapped):
    pipe, model = wrapped.pipe, wrapped.transformer
    noisy = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    inputs = FAMILY.transformer_inputs(pipe, noisy, 0.5, CAPTION, 0.0, 256)
    assert inputs["encoder_attention_mask_2"].sum() == 0  # glyph states present, all masked: a reorder nonetheless
    text = block_inputs(model, inputs)["encoder_hidden_states"]  # [1, 64 + 32, D] in the model's order
    with torch.no_grad():
        refined = model.context_embedder(
            inputs["encoder_hidden_states"], inputs["timestep"], inputs["encoder_attention_mask"]
        )
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(CAPTION)).input_ids[34:]
    spelled = {"dog": "dog", "grass": "grass,", "skyscraper": "skyscraper", "a": "aa"}  # whole words, both "a"s
    for word, tokens in spelled.items():
        positions = wrapped.word_positions(CAPTION, word)
        assert "".join(pipe.tokenizer.decode(ids[p]) for p in positions).replace(" ", "") == tokens
        torch.testing.assert_close(text[0, positions], refined[0, positions])
    assert wrapped.word_positions(CAPTION, "tree") == []


def test_word_positions_stop_where_the_pipeline_truncates(wrapped):
    caption = " ".join(["grass"] * 70 + ["dog"])
    assert wrapped.word_positions(caption, "grass") == list(range(64))
    assert wrapped.word_positions(caption, "dog") == []


def test_word_positions_after_quoted_glyph_text(wrapped):
    caption = 'a dog holding a sign that says "hi"'
    _, _, _, glyph_mask = wrapped.pipe.encode_prompt(caption)
    assert wrapped.word_positions(caption, "dog") == [int(glyph_mask.sum()) + 1]


# ----- the pipeline side ------------------------------------------------------------------------------------------
def first_call(pipe, **kwargs) -> dict:
    """The keyword arguments of the pipeline's first transformer call (with a guider: the prompt's, before the
    negative prompt's)."""
    seen = []

    def hook(module, args, kw):
        seen.append(dict(kw))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe('a red dog, "hi"', generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("distilled", [False, True])
def test_transformer_inputs_are_the_pipelines_denoising_inputs(distilled):
    pipe = tiny.pipeline(distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    call = first_call(pipe, height=16, width=24, num_inference_steps=2, distilled_guidance_scale=3.25)
    t = float(call["timestep"][0]) / 1000
    with torch.no_grad():
        ours = FAMILY.transformer_inputs(pipe, call["hidden_states"], t, 'a red dog, "hi"', 3.25, 256)
    assert ours["encoder_attention_mask_2"].sum() > 0  # the quoted text has glyph tokens
    for key in ["hidden_states", "encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2"]:
        assert torch.equal(ours[key], call[key]), key
    assert torch.equal(ours["encoder_attention_mask_2"], call["encoder_attention_mask_2"])
    torch.testing.assert_close(ours["timestep"], call["timestep"])
    if distilled:
        assert torch.equal(ours["guidance"], call["guidance"])
        assert torch.equal(ours["timestep_r"], ours["timestep"])  # the instantaneous velocity at t
    else:
        assert "guidance" not in ours and "timestep_r" not in ours and call["guidance"] is None


def test_latents_are_the_vae_mean_scaled_as_the_pipeline_decodes_them(wrapped):
    pipe = wrapped.pipe
    pixels = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(3))
    latents = FAMILY.latents(pipe, pixels)
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None] * 2 - 1).latent_dist.mean
    torch.testing.assert_close(latents / pipe.vae.config.scaling_factor, z)  # the pipeline decodes latents / scaling
    assert FAMILY.size_multiple(pipe) == 4 and FAMILY.default_size(pipe) == 128


def test_calls_per_step_follow_the_guider_and_maps_come_from_the_prompts_calls(wrapped):
    from diffusers import AdaptiveProjectedMixGuidance

    pipe = wrapped.pipe
    before = pipe.guider.get_state()
    assert FAMILY.calls_per_step(pipe, {"num_inference_steps": 3}) == 2
    assert FAMILY.calls_per_step(pipe, {}) == 2  # the pipeline's default steps
    assert pipe.guider.get_state() == before  # the pipeline's guider is left as it was
    embeds = wrapped.encode_concepts(["dog", "grass"])
    with torch.no_grad(), ConceptAttention(pipe.transformer, embeds, calls=lambda c: c % 2 == 0) as ca:
        pipe("a dog", height=16, width=24, num_inference_steps=2, generator=torch.Generator().manual_seed(2))
    assert ca.num_calls == 4 and ca.recorded_calls == 2
    res = wrapped.generate("a dog", ["dog", "grass"], height=16, width=24, steps=2, seed=2, progress=False)
    torch.testing.assert_close(res.token_maps, ca.maps()[0])
    distilled = tiny.pipeline(distilled=True)
    assert FAMILY.calls_per_step(distilled, {}) == 1
    partial = tiny.pipeline()
    partial.guider = AdaptiveProjectedMixGuidance(stop=0.5)
    with pytest.raises(ConceptAttentionError, match="different number of times"):
        FAMILY.calls_per_step(partial, {"num_inference_steps": 4})
