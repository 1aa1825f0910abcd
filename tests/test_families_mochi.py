"""Mochi against an independent recomputation on the (frames, rows, columns) grid (tests/reference_mochi.py), and
what is particular to it: the narrower text stream and its sandwich norms, the ``context_pre_only`` last block, the
pooled caption term of the modulation (zeroed for concepts), per-head RoPE on video tokens only, the per-item text
mask, T5 concepts at index 0, batched CFG, the pipeline's latent normalisation and inverted timesteps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tiny_video_mochi as tiny
import torch
from reference_mochi import reference_maps, reference_prompt_attention, rope_tables
from tiny_models import hook_counts

from conceptattention import ConceptAttention, PromptAttention
from conceptattention.families import family_for_pipeline, family_for_transformer
from conceptattention.pipelines.mmdit import MMDiTPipeline
from conceptattention.readouts import READOUTS

LAYERS = [0, 2]  # block 1 runs unread in between; block 2 is the context_pre_only last block
LENGTH = 16  # max_sequence_length of the pipeline tests
CAPTION = "a red dog on the grass and a cat"
GRID = dict(f=2, h=3, w=5)  # all three different


def embeds(k: int = 3, seed: int = 2, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(() if batch is None else (batch,)), k, tiny.TEXT_WIDTH, generator=g)


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to ``rel`` relative to the reference's largest entry."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())
    assert err <= rel, f"relative error {err:.2e}"


#: MochiRoPE asks for a float32 CPU autocast, which torch declines with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny.transformer()


@pytest.fixture(scope="module")
def calls(model):
    return [tiny.call_inputs(model, batch=2, seed=s, **GRID) for s in (1, 7)]


@pytest.fixture(scope="module")
def recorded(model, calls):
    """Every readout recorded in one session over two calls, and the outputs with and without it."""
    with torch.no_grad():
        plain = [model(**inputs)[0] for inputs in calls]
        with ConceptAttention(model, embeds(), layers=LAYERS, readouts=list(READOUTS)) as ca:
            ours = [model(**inputs)[0] for inputs in calls]
    return ca, plain, ours


@pytest.fixture(scope="module")
def wrapped():
    pipe = tiny.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name="tiny-mochi")


def record_calls(pipe):
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    return calls, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


# ----- the transformer side against the reference ----------------------------------------------------------------
def test_outputs_are_bit_identical_and_maps_are_frames_by_rows_by_columns(recorded):
    ca, plain, ours = recorded
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))
    assert ca.grid() == (2, 3, 5) and ca.maps().shape == (2, 3, 2, 3, 5)
    torch.testing.assert_close(ca.maps().sum(1), torch.ones(2, 2, 3, 5))
    assert torch.equal(ca.maps().flatten(2), ca.token_maps())  # tokens are frame-major, then row-major


@pytest.mark.parametrize("name", list(READOUTS))
def test_every_readout_equals_the_reference_over_layers_and_two_calls(model, calls, recorded, name):
    r = READOUTS[name]
    expected = reference_maps(model, calls, embeds(), LAYERS, r.stream, r.space, r.softmax, r.concept_norm)
    close(recorded[0].token_maps(name), expected)


def test_per_item_concepts_and_the_prompts_pooled_term_equal_the_reference(model, calls):
    concepts = embeds(batch=2)
    with torch.no_grad():
        with ConceptAttention(model, concepts, layers=[1, 2], concept_pooled="prompt") as prompt:
            model(**calls[0])
        with ConceptAttention(model, concepts, layers=[1, 2], concept_pooled="zero") as zero:
            model(**calls[0])
    for session, pooled in ((prompt, "prompt"), (zero, "zero")):
        ref = reference_maps(model, calls[:1], concepts, [1, 2], "cross+self", "output", True, pooled=pooled)
        close(session.token_maps(), ref)
    assert not torch.allclose(prompt.maps(), zero.maps())  # the pooled caption term reaches the concept stream


def test_the_modulation_is_the_timestep_embedding_plus_the_caption_pool(model, calls):
    """``zero`` gives the concept stream the timestep embedder's output: the model's ``temb`` less its pooled
    caption term (the reference recomputes that split by hand)."""
    family = family_for_transformer(model)
    assert family.name == "mochi" and family.pooled_text and family.video
    assert family.text_dim(model) == tiny.TEXT_WIDTH
    assert family.embed_concepts(model, embeds(), {}).shape == (3, 12)  # the text stream is narrower than 16
    inputs, embed = calls[0], model.time_embed
    assert family.time_embedder(model) is embed.timestep_embedder
    with torch.no_grad():
        temb, caption = embed(inputs["timestep"], inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
        time = embed.timestep_embedder(embed.time_proj(inputs["timestep"]))
        pooled = embed.pooler(inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
    torch.testing.assert_close(temb, time + pooled)
    assert caption.shape == (2, 7, 12)


def test_the_last_block_has_no_text_stream_update(model, calls):
    family = family_for_transformer(model)
    last = family.double_blocks(model)[-1]
    assert last.context_pre_only and not hasattr(last.attn1, "to_add_out")
    hidden = family.embed_concepts(model, embeds(batch=1), {})
    step = family.text_step(last, hidden, torch.zeros(1, 16))
    assert step.query.shape == (1, 2, 3, 8) and step.finish(torch.zeros(1, 3, 16)) is None
    with torch.no_grad(), ConceptAttention(model, embeds(), layers=[2]) as ca:  # the last block alone reads
        model(**calls[0])
    close(ca.token_maps(), reference_maps(model, calls[:1], embeds(), [2], "cross+self", "output", True))


def test_rope_tables_are_the_models_per_head_video_only_tables(model):
    cos, sin = model.rope(model.pos_frequencies, 2, 3, 5, device="cpu", dtype=torch.float32)
    assert cos.shape == (30, 2, 4)  # [frames x rows x columns, heads, Dh / 2]
    ref_cos, ref_sin = rope_tables(model, 2, 3, 5)
    torch.testing.assert_close(cos, ref_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, ref_sin, rtol=1e-5, atol=1e-5)
    family = family_for_transformer(model)
    assert family.text_rope((cos, sin), 7, torch.float32) is None  # prompt and concept tokens have no position
    assert family.concept_rope(model, (cos, sin), torch.float32, None) is None


def test_maps_depend_on_the_rope_frequencies(model, calls):
    other = tiny.transformer()
    with torch.no_grad():
        other.pos_frequencies.zero_()
        with ConceptAttention(model, embeds(), layers=[0], readouts=["cross_attention"]) as a:
            model(**calls[0])
        with ConceptAttention(other, embeds(), layers=[0], readouts=["cross_attention"]) as b:
            other(**calls[0])
    assert not torch.allclose(a.maps("cross_attention"), b.maps("cross_attention"))


def test_stopping_after_the_last_layer_gives_the_full_pass_maps(model, calls):
    with torch.no_grad():
        with ConceptAttention(model, embeds(), layers=[0, 1]) as full:
            model(**calls[0])
        with ConceptAttention(model, embeds(), layers=[0, 1]) as early:
            early.forward_until_last_layer(**calls[0])
    torch.testing.assert_close(early.maps(), full.maps(), rtol=1e-6, atol=1e-7)


def test_no_hook_is_left_after_an_exception(model, calls):
    before = hook_counts(model)
    bad = dict(calls[0], encoder_hidden_states=calls[0]["encoder_hidden_states"][..., :5])
    with pytest.raises(RuntimeError), torch.no_grad(), ConceptAttention(model, embeds(), layers=LAYERS):
        model(**bad)
    with pytest.raises(RuntimeError), torch.no_grad(), PromptAttention(model, layers=LAYERS):
        model(**bad)
    assert hook_counts(model) == before


def test_prompt_attention_equals_the_reference_and_skips_the_masked_tokens(model, calls):
    inputs = calls[0]
    before = model(**inputs)[0]
    with torch.no_grad(), PromptAttention(model, layers=LAYERS) as pa:
        out = model(**inputs)[0]
    assert torch.equal(out, before)
    got = pa.maps()
    assert got.shape == (2, 7, 2, 3, 5)
    close(got.flatten(-3), reference_prompt_attention(model, inputs, LAYERS))
    assert torch.equal(got[1, 4:], torch.zeros(3, 2, 3, 5))  # the second item's last 3 tokens are masked
    torch.testing.assert_close(got.sum(1), torch.ones(2, 2, 3, 5))


def test_bfloat16_outputs_are_unchanged_and_maps_are_finite():
    model = tiny.transformer(dtype=torch.bfloat16)
    inputs = tiny.call_inputs(model, batch=2, f=3, h=2, w=4)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, embeds(), layers=LAYERS) as ca:
            ours = model(**inputs)[0]
    assert ours.dtype == torch.bfloat16 and torch.equal(plain, ours)
    maps = ca.maps()
    assert maps.shape == (2, 3, 3, 2, 4) and torch.isfinite(maps).all()
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 3, 2, 4), rtol=1e-3, atol=1e-3)


# ----- the pipeline side -----------------------------------------------------------------------------------------
def lone_word_states(pipe, word: str, length: int = LENGTH) -> torch.Tensor:
    """T5 run by hand on the word alone, tokenized as the pipeline tokenizes a prompt (padded, with its mask)."""
    ids = pipe.tokenizer(word, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids, attention_mask=ids.attention_mask.bool())[0][0]


def test_the_family_is_found_and_declares_the_pipelines_video_conventions(wrapped):
    pipe, family = wrapped.pipe, wrapped.model_family
    assert family_for_pipeline(pipe).name == "mochi" and wrapped.family == "mochi"
    assert family.frames_argument == "num_frames" and family.fps == 30
    assert [family.valid_frames(pipe, n) for n in (0, 1, 6, 7, 12, 13, 19)] == [0, 1, 1, 7, 7, 13, 19]
    assert family.size_multiple(pipe) == 16 and family.default_size(pipe) == 848  # 480 x 848 by default
    assert family.calls_per_step(pipe, {"guidance_scale": 4.5}) == 1 and family.prompt_batch_index == -1


def test_a_concept_is_the_lone_words_t5_state_at_index_zero(wrapped):
    pipe = wrapped.pipe
    assert wrapped.model_family.concept_tokenizer(pipe)[1] == 0  # T5 puts nothing before the word
    got = wrapped.encode_concepts(["dog", "tree"], max_length=LENGTH)
    for k, word in enumerate(["dog", "tree"]):
        torch.testing.assert_close(got[k], lone_word_states(pipe, word)[0], rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            by_pipeline = pipe.encode_prompt(word, do_classifier_free_guidance=False, max_sequence_length=LENGTH)[0]
        torch.testing.assert_close(got[k], by_pipeline[0, 0], rtol=1e-6, atol=1e-6)


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


def test_word_positions_are_the_captions_t5_tokens_and_stop_at_the_end_token_slot(wrapped):
    pipe = wrapped.pipe
    ids = pipe.tokenizer(CAPTION, padding="max_length", max_length=LENGTH, truncation=True).input_ids
    for word in ("dog", "a", "grass"):
        (piece,) = pipe.tokenizer(word, add_special_tokens=False).input_ids
        assert wrapped.word_positions(CAPTION, word, LENGTH) == [p for p, i in enumerate(ids) if i == piece]
    assert wrapped.word_positions(CAPTION, "tree", LENGTH) == []
    short = pipe.tokenizer(CAPTION, max_length=4, truncation=True).input_ids  # ▁a ▁red ▁dog </s>
    assert short[-1] == pipe.tokenizer.eos_token_id
    assert wrapped.word_positions(CAPTION, "dog", 4) == [2] and wrapped.word_positions(CAPTION, "on", 4) == []


def test_latents_are_the_inverse_of_what_the_pipeline_decodes(wrapped):
    pipe, family = wrapped.pipe, wrapped.model_family
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    pixels = torch.rand(3, 7, 32, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latents = family.latents(pipe, pixels)
        z = pipe.vae.encode(pixels[None] * 2 - 1).latent_dist.mean
    assert latents.shape == (1, tiny.CHANNELS, 2, 4, 6)  # 7 frames -> 2 latent frames, 8x smaller
    torch.testing.assert_close(latents, (z - mean) * config.scaling_factor / std)
    # what the pipeline hands the VAE after its last step: latents * std / scaling_factor + mean
    final, decoded = [], []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda m, args: decoded.append(args[0].clone()))
    try:
        pipe(
            CAPTION,
            height=32,
            width=48,
            num_frames=7,
            num_inference_steps=2,  # the pipeline's schedule needs two
            guidance_scale=1.0,
            max_sequence_length=LENGTH,
            output_type="np",
            callback_on_step_end=lambda p, i, t, kw: final.append(kw["latents"].clone()) or kw,
        )
    finally:
        handle.remove()
    torch.testing.assert_close((decoded[0] - mean) * config.scaling_factor / std, final[-1], rtol=1e-5, atol=1e-5)


def test_transformer_inputs_are_the_pipelines_prompt_call_at_its_noise_level(wrapped):
    pipe, family = wrapped.pipe, wrapped.model_family
    assert pipe.scheduler.config.invert_sigmas  # Mochi's scheduler: timestep = (1 - noise level) * 1000
    calls, handle = record_calls(pipe)
    try:
        pipe(CAPTION, height=32, width=48, num_frames=7, num_inference_steps=2, guidance_scale=1.0,
             max_sequence_length=LENGTH, output_type="latent")  # fmt: skip
    finally:
        handle.remove()
    assert len(calls) == 2
    for i, theirs in enumerate(calls):
        noise = 1.0 - float(pipe.scheduler.sigmas[i])  # the scheduler stores 1 - noise level
        with torch.no_grad():  # as MMDiTPipeline calls it
            ours = family.transformer_inputs(pipe, theirs["hidden_states"], noise, CAPTION, 0.0, LENGTH)
        for key in ("hidden_states", "encoder_hidden_states", "encoder_attention_mask"):
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
        torch.testing.assert_close(ours["timestep"], theirs["timestep"], rtol=1e-6, atol=1e-4)
        assert family.read_call(pipe.transformer, ours).grid() == (2, 2, 3)
    noisy = torch.randn(3, tiny.CHANNELS, 2, 4, 6)
    with torch.no_grad():
        batched = family.transformer_inputs(pipe, noisy, 0.25, CAPTION, 0.0, LENGTH)
    assert batched["timestep"].tolist() == [750.0] * 3 and batched["encoder_attention_mask"].shape == (3, LENGTH)


def test_a_real_videos_pass_equals_the_reference(wrapped):
    """latents -> noise at t -> transformer_inputs -> a pass stopped after the last read block, as encode runs it."""
    pipe, family = wrapped.pipe, wrapped.model_family
    pixels = torch.rand(3, 7, 32, 48, generator=torch.Generator().manual_seed(5))
    concepts = wrapped.encode_concepts(["dog", "grass", "sky"], max_length=LENGTH)
    with torch.no_grad():
        latents = family.latents(pipe, pixels)
        noise = torch.randn(2, *latents.shape[1:], generator=torch.Generator().manual_seed(0))
        inputs = family.transformer_inputs(pipe, 0.5 * noise + 0.5 * latents, 0.5, CAPTION, 0.0, LENGTH)
        with ConceptAttention(pipe.transformer, concepts, layers=[0, 1]) as ca:
            ca.forward_until_last_layer(**inputs)
    assert ca.maps().shape == (2, 3, 2, 2, 3)
    close(ca.token_maps(), reference_maps(pipe.transformer, [inputs], concepts, [0, 1], "cross+self", "output", True))


def test_guided_generation_is_unchanged_and_the_prompts_maps_are_the_batchs_last_item(wrapped):
    pipe, prompt = wrapped.pipe, "a red dog on grass"
    run = dict(height=32, width=48, num_frames=7, num_inference_steps=2, max_sequence_length=LENGTH, output_type="np")
    plain = pipe(prompt, guidance_scale=4.5, generator=torch.Generator().manual_seed(1), **run).frames
    concepts = wrapped.encode_concepts(["dog", "grass"], max_length=LENGTH)
    calls, handle = record_calls(pipe)
    try:
        with ConceptAttention(pipe.transformer, concepts, layers=[0, 2]) as ca:
            ours = pipe(prompt, guidance_scale=4.5, generator=torch.Generator().manual_seed(1), **run).frames
    finally:
        handle.remove()
    assert np.array_equal(plain, ours) and ours.shape == (1, 7, 32, 48, 3)
    assert [c["hidden_states"].shape[0] for c in calls] == [2, 2]  # [unconditional, conditional], once per step
    with torch.no_grad():
        cond = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=LENGTH)[0]
        uncond = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=LENGTH)[0]
    assert torch.equal(calls[0]["encoder_hidden_states"], torch.cat([uncond, cond]))
    maps = ca.maps()
    assert maps.shape == (2, 2, 2, 2, 3) and not torch.allclose(maps[0], maps[-1])
    close(ca.token_maps(), reference_maps(pipe.transformer, calls, concepts, [0, 2], "cross+self", "output", True))
