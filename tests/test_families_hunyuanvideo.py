"""HunyuanVideo (families/hunyuanvideo.py) against an independent recomputation (reference_hunyuanvideo.py) on a
3-D (frames x rows x columns) grid, and its particular choices: the 3-axis RoPE on video tokens only, the model's
count-based text mask, the pooled CLIP vector zeroed for the concept stream, concepts as lone one-token prompts
through the token refiner, the Llama template's cropped prefix, byte-level word positions, the pipeline's denoising
inputs and true CFG's calls per step."""

from __future__ import annotations

import warnings

import pytest
import tiny_video_hunyuanvideo as tiny
import torch
from reference_hunyuanvideo import embed_concepts, reference_maps, reference_prompt_attention, rope_tables
from tiny_models import hook_counts

from conceptattention import READOUTS, ConceptAttention, ConceptAttentionError, PromptAttention
from conceptattention.families import family_for_pipeline, family_for_transformer
from conceptattention.pipelines.mmdit import MMDiTPipeline

FAMILY = family_for_transformer(tiny.transformer())
CAPTION = "a red dog on grass, and a skyscraper"
CROP = 95  # the real template's crop_start: exactly the tiny tokenizer's template prefix


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wrapped():
    pipe = tiny.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def concepts(k: int = 3, batch: int | None = None, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(() if batch is None else (batch,)), k, tiny.TEXT_WIDTH, generator=g)


def template(pipe) -> str:
    return FAMILY.template(pipe)["template"]


def first_call(pipe, prompt: str = "a red dog", **kwargs) -> dict:
    """The keyword arguments of the pipeline's first transformer call (with true CFG: the prompt's)."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        pipe(prompt, generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs)
    finally:
        handle.remove()
    return seen[0]


# ----- the family ---------------------------------------------------------------------------------------------------
def test_the_family_is_found_by_transformer_and_pipeline_class_and_makes_videos(wrapped):
    assert FAMILY.name == tiny.FAMILY and family_for_pipeline(wrapped.pipe) is FAMILY
    assert FAMILY.video and FAMILY.frames_argument == "num_frames" and FAMILY.pooled_text
    assert FAMILY.valid_frames(wrapped.pipe, 7) == 5 and FAMILY.valid_frames(wrapped.pipe, 9) == 9


# ----- every readout equals the reference ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layers, variant",
    [
        pytest.param([0], "plain", id="layer0"),
        pytest.param([1, -1], "plain", id="layers1-last"),
        pytest.param([0, 1, 2], "no-guidance-embeds", id="all-layers-no-guidance"),
        pytest.param([0, 2], "prompt-pooled", id="concept-pooled-prompt"),
        pytest.param([1, 2], "per-item", id="per-item-concepts"),
    ],
)
def test_every_readout_matches_the_reference_over_two_calls(layers, variant):
    model = tiny.transformer(guidance_embeds=variant != "no-guidance-embeds")
    calls = [tiny.call_inputs(model, batch=2, f=2, h=3, w=5, seed=s) for s in (1, 7)]
    calls[1]["timestep"] = calls[1]["timestep"] + 100.0
    pooled = "prompt" if variant == "prompt-pooled" else "zero"
    embeds = concepts(3, batch=2 if variant == "per-item" else None)
    with torch.no_grad():
        plain = [model(**c)[0] for c in calls]
        with ConceptAttention(model, embeds, layers=layers, readouts=list(READOUTS), concept_pooled=pooled) as ca:
            hooked = [model(**c)[0] for c in calls]
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
    chosen = sorted({layer % len(model.transformer_blocks) for layer in layers})
    expected = reference_maps(model, calls, embeds, chosen, READOUTS, pooled=pooled)
    assert set(expected) == set(READOUTS)
    for name, maps in expected.items():
        assert ca.token_maps(name).shape == maps.shape == (2, 3, 30)
        assert rel_err(ca.token_maps(name), maps) <= 1e-5, name
    assert ca.maps().shape == (2, 3, 2, 3, 5)
    torch.testing.assert_close(ca.maps().sum(1), torch.ones(2, 2, 3, 5))


def test_the_zeroed_pooled_vector_changes_the_concept_stream():
    model = tiny.transformer()
    inputs, embeds = tiny.call_inputs(model), concepts(3)
    with torch.no_grad():
        with ConceptAttention(model, embeds, layers=[0, 2], concept_pooled="zero") as zero:
            model(**inputs)
        with ConceptAttention(model, embeds, layers=[0, 2], concept_pooled="prompt") as prompt:
            model(**inputs)
    assert not torch.allclose(zero.maps(), prompt.maps())


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
    assert all(torch.isfinite(m).all() and m.shape == (2, 3, 2, 3, 5) for m in ca.all_maps().values())


def test_stopping_after_the_last_layer_gives_the_full_pass_maps():
    model = tiny.transformer()
    inputs, embeds = tiny.call_inputs(model, batch=1, f=3, h=4, w=2), concepts(3)
    with torch.no_grad():
        with ConceptAttention(model, embeds, layers=[0, 1]) as full:
            model(**inputs)
        with ConceptAttention(model, embeds, layers=[0, 1]) as early:
            early.forward_until_last_layer(**inputs)
    assert early.maps().shape == (1, 3, 3, 4, 2)
    torch.testing.assert_close(early.maps(), full.maps(), rtol=1e-6, atol=1e-7)


def test_no_hook_is_left_after_an_exception():
    model = tiny.transformer()
    before = hook_counts(model)
    inputs = tiny.call_inputs(model, batch=1)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    block = FAMILY.double_blocks(model)[1]
    for session in (lambda: ConceptAttention(model, concepts(3)), lambda: PromptAttention(model, layers=[0, 2])):
        handle = block.register_forward_pre_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), session():
                model(**inputs)
        finally:
            handle.remove()
    assert hook_counts(model) == before


def test_the_reference_rope_tables_are_the_models_and_the_grid_divides_by_the_patches():
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=1, f=3, h=4, w=2)
    cos, sin = model.rope(inputs["hidden_states"])
    ref_cos, ref_sin = rope_tables(model, 3, 4, 2)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    assert FAMILY.read_call(model, inputs).grid() == (3, 4, 2)
    temporal = tiny.transformer(patch_size_t=2)
    call = FAMILY.read_call(temporal, tiny.call_inputs(temporal, batch=1, f=3, h=4, w=2))
    assert call.grid() == (3, 4, 2) and call.num_image_tokens == 24


def test_a_token_replace_transformer_is_read_unchanged():
    model = tiny.transformer(image_condition_type="token_replace")
    inputs = tiny.call_inputs(model)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, concepts(3), layers=[0, 2]) as ca:
            hooked = model(**inputs)[0]
    assert torch.equal(plain, hooked) and torch.isfinite(ca.maps()).all() and ca.maps().shape == (2, 3, 2, 3, 5)


# ----- the prompt: the model's text mask and the DAAM-style baseline -----------------------------------------------
def test_prompt_attention_matches_the_reference_and_skips_padding():
    model = tiny.transformer()
    inputs = tiny.call_inputs(model)
    with torch.no_grad(), PromptAttention(model, layers=[0, 2]) as pa:
        model(**inputs)
    got, expected = pa.maps().flatten(-3), reference_prompt_attention(model, inputs, [0, 2])
    assert pa.maps().shape == (2, 7, 2, 3, 5) and got.shape == expected.shape == (2, 7, 30)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 30))
    for b, valid in enumerate([5, 7]):
        assert torch.count_nonzero(got[b, valid:]) == 0 and (got[b, :valid] > 0).all()


@pytest.mark.parametrize("padding", ["right", "left"])
def test_prompt_mask_is_the_models_own(padding):
    """The model attends to the first ``mask.sum()`` text tokens, wherever the mask's ones are."""
    model = tiny.transformer()
    inputs = tiny.call_inputs(model)
    if padding == "left":
        inputs["encoder_attention_mask"] = inputs["encoder_attention_mask"].flip(1)
    seen = {}
    handle = model.transformer_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(mask=a[3]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    model_mask = seen["mask"][:, 0, 0, 30:]
    assert torch.equal(FAMILY.prompt_mask(inputs, 7), model_mask)
    assert model_mask.sum(1).tolist() == [5, 7]


# ----- concepts: lone one-token prompts through the token refiner ------------------------------------------------
def test_concepts_go_through_the_refiner_alone_at_each_items_timestep():
    model = tiny.transformer()
    inputs = tiny.call_inputs(model)  # timesteps 400 and 700
    embeds = concepts(3)[None]
    got = FAMILY.embed_concepts(model, embeds, inputs)
    assert got.shape == (2, 3, 32) and FAMILY.text_dim(model) == tiny.TEXT_WIDTH
    with torch.no_grad():
        for b in range(2):
            for k in range(3):
                alone = model.context_embedder(
                    embeds[:, k : k + 1], inputs["timestep"][b : b + 1], torch.ones(1, 1, dtype=torch.long)
                )
                torch.testing.assert_close(got[b, k], alone[0, 0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, embed_concepts(model, embeds[0], inputs["timestep"]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], got[1])  # the refiner is conditioned on the timestep


def lone_word_state(pipe, word: str, position: int) -> torch.Tensor:
    """The Llama state the pipeline reads (third-last hidden state) at ``position`` of the templated word, by hand."""
    ids = pipe.tokenizer(template(pipe).format(word), return_tensors="pt")
    with torch.no_grad():
        out = pipe.text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask, output_hidden_states=True)
    return out.hidden_states[-3][0, position]


def test_a_concept_is_its_words_first_token_right_after_the_cropped_template_prefix(wrapped):
    pipe = wrapped.pipe
    tokenizer, first = FAMILY.concept_tokenizer(pipe)
    assert tokenizer is pipe.tokenizer and first == 0  # the prefix is exactly the 95 tokens the pipeline crops
    ids = tokenizer(template(pipe).format("dog")).input_ids
    assert ids[CROP] == tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert FAMILY.concept_position(pipe, 256) is None  # no RoPE on text: no position to give
    embeds = wrapped.encode_concepts(["dog", "sky"])
    for k, word in enumerate(["dog", "sky"]):
        torch.testing.assert_close(embeds[k], lone_word_state(pipe, word, CROP), rtol=1e-5, atol=1e-6)


def test_a_shorter_crop_moves_the_concept_index_and_a_longer_one_is_refused(wrapped, monkeypatch):
    pipe, real = wrapped.pipe, FAMILY.template(wrapped.pipe)
    monkeypatch.setattr(FAMILY, "template", lambda pipe: {**real, "crop_start": 90})
    assert FAMILY.concept_tokenizer(pipe)[1] == 5
    torch.testing.assert_close(wrapped.encode_concepts(["tree"])[0], lone_word_state(pipe, "tree", CROP))
    assert wrapped.word_positions("a dog", "dog") == [6]
    monkeypatch.setattr(FAMILY, "template", lambda pipe: {**real, "crop_start": 96})
    with pytest.raises(ConceptAttentionError, match="prompts are cut"):
        wrapped.encode_concepts(["tree"])


def test_a_several_token_concept_warns_and_mean_averages_its_tokens(wrapped):
    pipe = wrapped.pipe
    n = len(pipe.tokenizer("skyscraper", add_special_tokens=False).input_ids)
    assert n > 1
    with pytest.warns(UserWarning, match=r"\['skyscraper'\] are several tokens"):
        first = wrapped.encode_concepts(["dog", "skyscraper"])
    torch.testing.assert_close(first[1], lone_word_state(pipe, "skyscraper", CROP), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = wrapped.encode_concepts(["skyscraper"], concept_tokens="mean")
    states = torch.stack([lone_word_state(pipe, "skyscraper", CROP + i) for i in range(n)])
    torch.testing.assert_close(mean[0], states.mean(0), rtol=1e-5, atol=1e-6)


# ----- captions: byte-level counts and word positions in the transformer's text sequence ------------------------
@pytest.mark.parametrize("caption", [CAPTION, "skyscraper dog's grass", "the sky: 42 trees"])
def test_caption_token_counts_split_the_pipelines_own_tokenization(wrapped, caption):
    tokenizer = wrapped.pipe.tokenizer
    words = caption.split()
    counts = FAMILY.caption_token_counts(tokenizer, words)
    ids = tokenizer(template(wrapped.pipe).format(caption)).input_ids[CROP:-1]  # the caption's tokens
    assert sum(counts) == len(ids)
    pieces = [tokenizer.decode(ids[sum(counts[:i]) : sum(counts[: i + 1])]) for i in range(len(words))]
    assert [p.strip() for p in pieces] == words


def test_word_positions_index_the_captions_tokens_and_stop_where_the_pipeline_truncates(wrapped):
    pipe = wrapped.pipe
    embeds, mask = pipe._get_llama_prompt_embeds(CAPTION, FAMILY.template(pipe), max_sequence_length=32)
    ids = pipe.tokenizer(template(pipe).format(CAPTION)).input_ids[CROP:]
    assert embeds.shape[1] == 32 and int(mask.sum()) == len(ids)  # the caption and its end-of-turn token
    spelled = {"dog": "dog", "grass": "grass,", "skyscraper": "skyscraper", "a": "aa"}  # whole words, both "a"s
    for word, tokens in spelled.items():
        positions = wrapped.word_positions(CAPTION, word, 32)
        assert "".join(pipe.tokenizer.decode(ids[p]) for p in positions).replace(" ", "") == tokens
    assert wrapped.word_positions(CAPTION, "tree") == []
    long = " ".join(["grass"] * 40 + ["dog"])
    assert wrapped.word_positions(long, "grass", 32) == list(range(32))
    assert wrapped.word_positions(long, "dog", 32) == []


# ----- the pipeline side ------------------------------------------------------------------------------------------
def test_transformer_inputs_are_the_pipelines_denoising_inputs_and_give_its_maps(wrapped):
    pipe = wrapped.pipe
    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=4.5)
    call = first_call(pipe, **kwargs)
    t = float(call["timestep"][0]) / 1000
    with torch.no_grad():
        ours = FAMILY.transformer_inputs(pipe, call["hidden_states"], t, "a red dog", 4.5, 256)
    assert call["hidden_states"].shape == (1, 4, 2, 8, 12)
    for key in ["hidden_states", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections", "guidance"]:
        assert torch.equal(ours[key], call[key]), key
    assert ours["timestep"].dtype == call["timestep"].dtype == torch.float32
    torch.testing.assert_close(ours["timestep"], call["timestep"])
    embeds = wrapped.encode_concepts(["dog", "grass"])
    with torch.no_grad():
        with ConceptAttention(pipe.transformer, embeds, calls=[0], layers=[0, 2]) as during:
            pipe("a red dog", generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs)
        with ConceptAttention(pipe.transformer, embeds, layers=[0, 2]) as alone:
            alone.forward_until_last_layer(**ours)
    assert during.maps().shape == (1, 2, 2, 4, 6)
    torch.testing.assert_close(alone.maps(), during.maps(), rtol=1e-5, atol=1e-6)


def test_latents_are_the_vae_mean_scaled_as_the_pipeline_decodes_them(wrapped):
    pipe = wrapped.pipe
    pixels = torch.rand(3, 5, 16, 24, generator=torch.Generator().manual_seed(3))  # [3, T, H, W]
    latents = FAMILY.latents(pipe, pixels)
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None] * 2 - 1).latent_dist.mean
    assert latents.shape == (1, 4, 2, 4, 6)
    torch.testing.assert_close(latents / pipe.vae.config.scaling_factor, z)  # the pipeline decodes latents / scaling
    assert FAMILY.size_multiple(pipe) == 8 and FAMILY.default_size(pipe) == 1280


def test_true_cfg_calls_the_transformer_twice_a_step_and_maps_come_from_the_prompts_calls(wrapped):
    pipe = wrapped.pipe
    assert FAMILY.calls_per_step(pipe, {}) == 1
    assert FAMILY.calls_per_step(pipe, {"negative_prompt": "blurry"}) == 1  # true_cfg_scale defaults to 1
    cfg = {"negative_prompt": "blurry", "true_cfg_scale": 3.0}
    assert FAMILY.calls_per_step(pipe, cfg) == 2
    embeds = wrapped.encode_concepts(["dog", "grass"])
    kwargs = dict(height=16, width=16, num_frames=1, num_inference_steps=2, **cfg)
    with torch.no_grad(), ConceptAttention(pipe.transformer, embeds, calls=lambda c: c % 2 == 0) as ca:
        call = first_call(pipe, "a dog", **kwargs)
    assert ca.num_calls == 4 and ca.recorded_calls == 2
    assert call["pooled_projections"].shape == (1, tiny.POOLED_WIDTH) and ca.maps().shape == (1, 2, 1, 2, 2)
