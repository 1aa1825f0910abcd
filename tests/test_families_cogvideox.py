"""CogVideoX against an independent recomputation (tests/reference_cogvideox.py), and what is particular to it:
shared text/video weights with expert adaLN, projections on [text; video] sliced by ``image_part``, RoPE applied
in place by the processor (so keys are copied when captured), absolute and learned positions (2B, I2V), the
temporal patch of 1.5, no text mask, batched CFG, a DDPM (v-prediction) schedule for real videos."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_video_cogvideox as tiny
import torch
from reference_cogvideox import reference_maps, reference_prompt_attention
from tiny_models import hook_counts

from conceptattention import ConceptAttention, PromptAttention
from conceptattention.families import family_for_pipeline, family_for_transformer
from conceptattention.families.cogvideox import text_length
from conceptattention.pipelines.mmdit import MMDiTPipeline
from conceptattention.readouts import READOUTS

LAYERS = [0, 2]  # block 1 runs unread in between
GRID = (2, 3, 5)  # latent frames x rows x columns, all different
PROMPT = "a red dog on grass"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    return [tiny.call_inputs(model, batch=2, f=2, h=3, w=5, seed=s) for s in (1, 7)]


@pytest.fixture(scope="module")
def recorded(model, calls):
    """Every readout recorded in one session over two calls, and the outputs with and without it."""
    with torch.no_grad():
        before, hooks = [model(**inputs)[0] for inputs in calls], hook_counts(model)
    with torch.no_grad(), ConceptAttention(model, embeds(), layers=LAYERS, readouts=list(READOUTS)) as ca:
        during = [model(**inputs)[0] for inputs in calls]
    return ca, before, during, hooks


@pytest.fixture(scope="module")
def wrapped():
    pipe = tiny.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name="tiny-cogvideox")


# ----- the transformer side against the reference --------------------------------------------------------------
def test_outputs_are_bit_identical_with_every_readout_and_no_hook_is_left(model, recorded):
    ca, before, during, hooks = recorded
    assert all(torch.equal(a, b) for a, b in zip(before, during)) and hook_counts(model) == hooks
    assert ca.maps().shape == (2, 3, *GRID) and ca.grid() == GRID
    torch.testing.assert_close(ca.maps().sum(1), torch.ones(2, *GRID))


@pytest.mark.parametrize("name", list(READOUTS))
def test_every_readout_equals_the_reference_over_layers_and_calls(model, calls, recorded, name):
    r = READOUTS[name]
    expected = reference_maps(model, calls, embeds(), LAYERS, r.stream, r.space, r.softmax, r.concept_norm)
    assert_relative(recorded[0].token_maps(name), expected)


@pytest.mark.parametrize("variant", ["2b", "1.5", "i2v"])
def test_absolute_learned_and_temporally_patched_positions_equal_the_reference(variant):
    """2B: sin-cos positions in the patch embedding, no RoPE; 1.5: RoPE and two latent frames per token;
    I2V: RoPE and a learned table whose text row 0 the concept tokens get."""
    model = tiny.transformer(variant=variant)
    inputs = [tiny.call_inputs(model, f=2, h=3, w=5, seed=s) for s in (1, 7)]
    assert inputs[0]["hidden_states"].shape[1] == (4 if variant == "1.5" else 2)
    readouts = ["concept_attention", "cross_attention", "value"]
    with torch.no_grad():
        before = [model(**x)[0] for x in inputs]
        with ConceptAttention(model, embeds(), layers=LAYERS, readouts=readouts) as ca:
            during = [model(**x)[0] for x in inputs]
    assert all(torch.equal(a, b) for a, b in zip(before, during)) and ca.grid() == GRID
    for name in readouts:
        r = READOUTS[name]
        assert_relative(
            ca.token_maps(name), reference_maps(model, inputs, embeds(), LAYERS, r.stream, r.space, r.softmax)
        )


def test_a_learned_position_row_is_added_only_when_the_model_uses_its_table():
    model = tiny.transformer(variant="i2v")
    family = family_for_transformer(model)
    own, other = tiny.call_inputs(model, f=2), tiny.call_inputs(model, f=3)  # 3 latent frames: sin-cos rows instead
    c, proj = embeds(), model.patch_embed.text_proj
    with torch.no_grad():
        torch.testing.assert_close(
            family.embed_concepts(model, c, own), proj(c) + model.patch_embed.pos_embedding[0, 0].float()
        )
        assert torch.equal(family.embed_concepts(model, c, other), proj(c))
        with ConceptAttention(model, c, layers=LAYERS) as ca:
            model(**other)
    assert_relative(ca.token_maps(), reference_maps(model, [other], c, LAYERS, "cross+self", "output", True))


def test_per_item_concepts_equal_the_reference(model, calls):
    concepts = embeds(batch=2)
    with torch.no_grad(), ConceptAttention(model, concepts, layers=[1, 2]) as ca:
        model(**calls[0])
    assert_relative(ca.token_maps(), reference_maps(model, calls[:1], concepts, [1, 2], "cross+self", "output", True))


def test_stopping_after_the_last_layer_gives_the_full_pass_maps(model):
    inputs = tiny.call_inputs(model, batch=1, f=3, h=4, w=2)
    with torch.no_grad():
        with ConceptAttention(model, embeds(), layers=[0, 1]) as full:
            model(**inputs)
        with ConceptAttention(model, embeds(), layers=[0, 1]) as early:
            early.forward_until_last_layer(**inputs)
    assert early.maps().shape == (1, 3, 3, 4, 2)
    torch.testing.assert_close(early.maps(), full.maps(), rtol=1e-6, atol=1e-7)


def test_no_hook_is_left_after_an_exception(model):
    before, inputs = hook_counts(model), tiny.call_inputs(model, batch=1)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    for session in (lambda: ConceptAttention(model, embeds()), lambda: PromptAttention(model, layers=[0])):
        handle = model.transformer_blocks[0].register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), session():
                model(**inputs)
        finally:
            handle.remove()
    assert hook_counts(model) == before


def test_prompt_attention_spans_every_text_token_and_equals_the_reference(model, calls):
    inputs = calls[0]
    before, hooks = model(**inputs)[0], hook_counts(model)
    with torch.no_grad(), PromptAttention(model, layers=LAYERS) as pa:
        out = model(**inputs)[0]
    assert torch.equal(out, before) and hook_counts(model) == hooks
    got = pa.maps()
    assert got.shape == (2, 7, *GRID)
    assert_relative(got.flatten(-3), reference_prompt_attention(model, inputs, LAYERS))
    torch.testing.assert_close(got.sum(1), torch.ones(2, *GRID))  # no token masked: softmax over all of them


def test_the_concept_stream_never_attends_to_prompt_tokens(model, calls):
    """Block 0's video keys and values do not depend on the text, so with a read-only concept stream the value
    and cross-attention maps of block 0 cannot change when the prompt changes."""
    changed = dict(calls[0], encoder_hidden_states=torch.randn_like(calls[0]["encoder_hidden_states"]))
    readouts = ["value_no_softmax", "cross_attention"]
    with torch.no_grad():
        with ConceptAttention(model, embeds(), layers=[0], readouts=readouts) as a:
            out_a = model(**calls[0])[0]
        with ConceptAttention(model, embeds(), layers=[0], readouts=readouts) as b:
            out_b = model(**changed)[0]
    assert not torch.allclose(out_a, out_b)
    for name in readouts:
        assert torch.equal(a.maps(name), b.maps(name))


def test_the_concept_stream_is_modulated_like_the_prompt(model, calls):
    family = family_for_transformer(model)
    assert family.name == "cogvideox" and family.video and not family.pooled_text and family.prompt_batch_index == -1
    with torch.no_grad():
        with ConceptAttention(model, embeds(), layers=LAYERS, concept_pooled="zero") as zero:
            model(**calls[0])
        with ConceptAttention(model, embeds(), layers=LAYERS, concept_pooled="prompt") as prompt:
            model(**calls[0])
    assert torch.equal(zero.maps(), prompt.maps())  # the timestep alone: no pooled text vector to zero


def test_fused_qkv_projections_give_the_same_maps(calls):
    plain, fused = tiny.transformer(), tiny.transformer()
    fused.fuse_qkv_projections()
    assert type(fused.transformer_blocks[0].attn1.processor).__name__ == "FusedCogVideoXAttnProcessor2_0"
    readouts = ["concept_attention", "value", "cross_attention"]
    with torch.no_grad():
        before = fused(**calls[0])[0]
        with ConceptAttention(plain, embeds(), layers=LAYERS, readouts=readouts) as a:
            plain(**calls[0])
        with ConceptAttention(fused, embeds(), layers=LAYERS, readouts=readouts) as b:
            during = fused(**calls[0])[0]
    assert torch.equal(before, during)
    for name in readouts:
        torch.testing.assert_close(b.maps(name), a.maps(name), rtol=1e-5, atol=1e-6)


def test_bfloat16_outputs_are_unchanged_and_maps_are_finite():
    model = tiny.transformer(dtype=torch.bfloat16)
    inputs = tiny.call_inputs(model, batch=2, f=3, h=4, w=2)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, embeds(), layers=LAYERS) as ca:
            ours = model(**inputs)[0]
    assert ours.dtype == torch.bfloat16 and torch.equal(plain, ours)
    maps = ca.maps()
    assert maps.shape == (2, 3, 3, 4, 2) and torch.isfinite(maps).all()
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 3, 4, 2), rtol=1e-3, atol=1e-3)


# ----- the pipeline side ------------------------------------------------------------------------------------------
def lone_word_states(pipe, word: str, length: int = 226) -> torch.Tensor:
    """T5 run by hand on the word alone, padded to ``length`` and unmasked, as the pipeline encodes a prompt."""
    ids = pipe.tokenizer(word, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids)[0][0], pipe.text_encoder(**ids)[0][0]


def test_a_concept_is_the_lone_words_unmasked_state_at_its_first_token(wrapped):
    pipe = wrapped.pipe
    assert family_for_pipeline(pipe).name == "cogvideox" and wrapped.model_family.concept_tokenizer(pipe)[1] == 0
    got = wrapped.encode_concepts(["dog", "tree"])  # the shared default length 256 is capped at the model's 226
    for k, word in enumerate(["dog", "tree"]):
        unmasked, masked = lone_word_states(pipe, word)
        torch.testing.assert_close(got[k], unmasked[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[k], masked[0])  # the padding is attended to, as for a prompt
        by_pipeline = pipe.encode_prompt(word, do_classifier_free_guidance=False)[0]
        torch.testing.assert_close(got[k], by_pipeline[0, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        wrapped.encode_concepts(["dog"], max_length=16)[0], lone_word_states(pipe, "dog", 16)[0][0]
    )


def test_the_text_length_is_capped_and_fixed_with_absolute_positions():
    def pipe(rope: bool, learned: bool = False):
        config = dict(use_rotary_positional_embeddings=rope, use_learned_positional_embeddings=learned)
        return SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(max_text_seq_length=226, **config)))

    assert text_length(pipe(True), 256) == 226 and text_length(pipe(True), 64) == 64
    assert text_length(pipe(False), 64) == 226 and text_length(pipe(True, learned=True), 64) == 226


def test_a_multi_token_concept_warns_and_mean_averages_its_tokens(wrapped):
    n = len(wrapped.pipe.tokenizer("skyscraper", add_special_tokens=False).input_ids)
    assert n > 1
    with pytest.warns(UserWarning, match=r"\['skyscraper'\] are several tokens"):
        first = wrapped.encode_concepts(["skyscraper"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = wrapped.encode_concepts(["skyscraper"], concept_tokens="mean")
    states = lone_word_states(wrapped.pipe, "skyscraper")[0]
    torch.testing.assert_close(first[0], states[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean[0], states[:n].mean(0), rtol=1e-5, atol=1e-5)


def test_word_positions_index_the_prompt_tokens_and_drop_the_end_token_slot(wrapped):
    tok, caption = wrapped.pipe.tokenizer, "a photo of a red dog on the grass"
    ids = tok(caption, padding="max_length", max_length=226, truncation=True).input_ids
    for word in ("dog", "a", "grass"):
        (word_id,) = tok(word, add_special_tokens=False).input_ids
        assert wrapped.word_positions(caption, word) == [p for p, i in enumerate(ids) if i == word_id]
    assert wrapped.word_positions(caption, "dog", 4) == [] and wrapped.word_positions(caption, "a", 4) == [0]
    assert wrapped.word_positions(caption, "tree") == []


def test_generate_is_the_plain_pipelines_video_and_reads_the_conditional_half(wrapped):
    pipe, gen = wrapped.pipe, dict(tiny.GENERATE)
    assert wrapped.model_family.calls_per_step(pipe, {"guidance_scale": 4.0}) == 1  # CFG is batched
    res = wrapped.generate(PROMPT, ["dog", "grass"], seed=1, layers=[1, 2], progress=False, **gen)
    kwargs = dict(height=32, width=64, num_frames=9, num_inference_steps=2, guidance_scale=4.0)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, args, kw: seen.append(kw), with_kwargs=True)
    try:
        with ConceptAttention(pipe.transformer, wrapped.encode_concepts(["dog", "grass"]), layers=[1, 2]) as ca:
            plain = pipe(PROMPT, generator=torch.Generator().manual_seed(1), output_type="np", **kwargs).frames[0]
    finally:
        handle.remove()
    assert np.array_equal(res.frames, (np.clip(plain, 0, 1) * 255).round().astype(np.uint8))
    assert res.frames.shape == (9, 32, 64, 3) and res.maps.shape == (2, 9, 32, 64) and res.fps == 8
    assert [kw["hidden_states"].shape[0] for kw in seen] == [2, 2]  # [unconditional, conditional], one call a step
    cond = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)[0]
    uncond = pipe.encode_prompt("", do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(seen[0]["encoder_hidden_states"], torch.cat([uncond, cond]))
    maps = ca.maps()
    assert maps.shape == (2, 2, 3, 2, 4)  # 9 frames -> 3 latent frames; 32 x 64 -> 4 x 8 latents -> 2 x 4 tokens
    torch.testing.assert_close(res.token_maps, maps[-1], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(maps[0], maps[-1])


def test_real_video_inputs_are_the_pipelines_denoising_step_inputs(wrapped):
    """For each timestep the pipeline denoises at, the flow time of the same signal-to-noise ratio gives that
    timestep and exactly the scheduler's noisy latents; prompt embeddings and RoPE tables are the pipeline's."""
    pipe, family = wrapped.pipe, wrapped.model_family
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, args, kw: seen.append(kw), with_kwargs=True)
    try:
        pipe(PROMPT, height=32, width=64, num_frames=9, num_inference_steps=3, output_type="latent")
    finally:
        handle.remove()
    g = torch.Generator().manual_seed(0)
    z, noise = torch.randn(1, 3, 4, 4, 8, generator=g), torch.randn(2, 3, 4, 4, 8, generator=g)
    for kw in seen:
        step = int(kw["timestep"][0])
        a = float(pipe.scheduler.alphas_cumprod[step])
        t = math.sqrt(1 - a) / (math.sqrt(a) + math.sqrt(1 - a))
        with torch.no_grad():  # as the shared code calls it
            inputs = family.transformer_inputs(pipe, t * noise + (1 - t) * z, t, PROMPT, 0.0, 256)
        assert inputs["timestep"].dtype == kw["timestep"].dtype and inputs["timestep"].tolist() == [step, step]
        expected = pipe.scheduler.add_noise(z.expand(2, -1, -1, -1, -1), noise, torch.tensor([step, step]))
        torch.testing.assert_close(inputs["hidden_states"], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(inputs["encoder_hidden_states"], kw["encoder_hidden_states"][1:].expand(2, -1, -1))
        assert all(torch.equal(x, y) for x, y in zip(inputs["image_rotary_emb"], kw["image_rotary_emb"]))
        assert family.read_call(pipe.transformer, inputs).grid() == (3, 2, 4)
    assert [int(kw["timestep"][0]) for kw in seen][0] == 999  # zero terminal SNR: t = 1 is the last timestep
    with torch.no_grad():
        mid = family.transformer_inputs(pipe, noise, 0.5, PROMPT, 0.0, 256)["timestep"][0]
    assert abs(float(pipe.scheduler.alphas_cumprod[mid]) - 0.5) < 2e-3  # t = 0.5: signal and noise in equal parts


def test_real_video_latents_are_the_vae_mean_scaled_with_frames_second(wrapped):
    pipe, family = wrapped.pipe, wrapped.model_family
    pixels = torch.rand(3, 9, 32, 48, generator=torch.Generator().manual_seed(3))
    latents = family.latents(pipe, pixels)
    with torch.no_grad():
        mean = pipe.vae.encode(pixels[None] * 2 - 1).latent_dist.mean
    torch.testing.assert_close(latents, mean.permute(0, 2, 1, 3, 4) * pipe.vae.config.scaling_factor)
    shape = pipe.prepare_latents(1, 4, 9, 32, 48, torch.float32, "cpu", torch.Generator().manual_seed(0)).shape
    assert latents.shape == shape == (1, 3, 4, 4, 6)
    assert family.size_multiple(pipe) == 16 and family.default_size(pipe) == 64  # VAE 8 x patch 2; 8 latents wide


def test_valid_frames_give_latent_counts_the_temporal_patch_divides():
    family = family_for_transformer(tiny.transformer(layers=1))

    def pipe(patch_t):
        return SimpleNamespace(
            vae_scale_factor_temporal=4, transformer=SimpleNamespace(config=SimpleNamespace(patch_size_t=patch_t))
        )

    assert [family.valid_frames(pipe(None), n) for n in (0, 1, 4, 5, 9, 12)] == [0, 1, 1, 5, 9, 9]
    assert [family.valid_frames(pipe(2), n) for n in (1, 5, 9, 12, 13)] == [0, 5, 5, 5, 13]
    assert family.video_fps(pipe(None)) == 8 and family.video_fps(pipe(2)) == 16  # CogVideoX 1.0 / 1.5


def test_encode_a_video_with_batched_noise_draws_is_the_mean_of_single_draws(wrapped):
    video = np.random.default_rng(4).random((11, 40, 72, 3))  # 11 frames: cut to 9, the VAE's 4k + 1
    kwargs = dict(caption="a dog", t=0.5, **tiny.ENCODE)
    batched = wrapped.encode(video, ["dog", "sky"], samples=3, seed=5, **kwargs)
    singles = [wrapped.encode(video, ["dog", "sky"], samples=1, seed=5 + s, **kwargs).token_maps for s in range(3)]
    torch.testing.assert_close(batched.token_maps, torch.stack(singles).mean(0), rtol=1e-4, atol=1e-5)
    assert batched.frames.shape == (9, 32, 64, 3) and batched.token_maps.shape == (2, 3, 2, 4)
    assert batched.maps.shape == (2, 9, 32, 64) and batched.settings["family"] == "cogvideox"


def test_cogvideox_1_5_generates_with_its_padded_latent_frames():
    """CogVideoX 1.5 pads the latent frames to a multiple of its temporal patch (here 3 -> 4: two token frames);
    the plain pipeline's video is unchanged and the maps cover the padded grid."""
    pipe = tiny.pipeline(variant="1.5")
    pipe.set_progress_bar_config(disable=True)
    wrapped = MMDiTPipeline(pipe)
    res = wrapped.generate(PROMPT, ["dog", "grass"], seed=2, progress=False, **tiny.GENERATE)
    kwargs = dict(height=32, width=64, num_frames=9, num_inference_steps=2, guidance_scale=4.0)
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(2), output_type="np", **kwargs).frames[0]
    assert np.array_equal(res.frames, (np.clip(plain, 0, 1) * 255).round().astype(np.uint8))
    assert res.token_maps.shape == (2, 2, 2, 4) and torch.isfinite(res.maps).all()
