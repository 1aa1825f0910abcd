"""HunyuanVideo-1.5 (families/hunyuanvideo15.py) against an independent recomputation (reference_hunyuanvideo15.py)
on a frames x rows x columns grid, and its particular choices: concepts as lone one-token prompts through the token
refiner plus the Qwen type embedding, Qwen2.5-VL's chat template and the pipeline's dropped prefix, the model's text
order with image, ByT5 glyph and padding tokens, byte-level word positions, the pipeline's denoising inputs, its
VAE latents and its guider's calls per step."""

from __future__ import annotations

import warnings

import pytest
import tiny_video_hunyuanvideo15 as tiny
import torch
from reference_hunyuanvideo15 import embed_concepts, reference_maps, reference_prompt_attention, rope_tables
from tiny_models import hook_counts

from conceptattention import READOUTS, ConceptAttention, ConceptAttentionError, PromptAttention
from conceptattention.errors import UnsupportedModelError
from conceptattention.families import family_for_pipeline, family_for_transformer
from conceptattention.pipelines.mmdit import MMDiTPipeline

FAMILY = family_for_transformer(tiny.transformer())
CAPTION = "a red dog on grass, and a skyscraper"
PREFIX = 108  # the chat-template prefix the pipeline drops


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


def block_inputs(model, inputs: dict) -> dict:
    """The arguments block 0 is called with (positional: the model's own text order and mask)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(encoder_hidden_states=args[1], attention_mask=args[3])

    handle = model.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen


def templated(pipe, prompt: str) -> list[int]:
    """The pipeline's Qwen token ids of ``prompt`` in its chat template, unpadded and uncropped."""
    chat = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": prompt}]
    return pipe.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


# ----- the transformer side: every readout equals the reference ----------------------------------------------------
@pytest.mark.parametrize(
    "layers, variant",
    [
        pytest.param([0], "text-to-video", id="layer0"),
        pytest.param([1, -1], "text-to-video", id="layers1-last"),
        pytest.param([0, 1, 2], "image-tokens", id="all-layers-with-image-tokens"),
        pytest.param([0, 2], "per-item", id="per-item-concepts-meanflow"),
    ],
)
def test_every_readout_matches_the_reference_over_two_calls(layers, variant):
    model = tiny.transformer(use_meanflow=variant == "per-item")
    calls = [tiny.call_inputs(model, batch=2, f=2, h=3, w=5, seed=s, image=variant == "image-tokens") for s in (1, 7)]
    calls[1]["timestep"] = calls[1]["timestep"] + 100.0
    if variant == "per-item":
        for c in calls:
            c["timestep_r"] = c["timestep"] - 50.0
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
        assert ca.token_maps(name).shape == maps.shape == (2, 3, 30)
        assert rel_err(ca.token_maps(name), maps) <= 1e-5, name
    assert ca.maps().shape == (2, 3, 2, 3, 5)
    torch.testing.assert_close(ca.maps().flatten(-3), ca.token_maps())


def test_bfloat16_outputs_are_bit_identical_and_maps_finite():
    model = tiny.transformer().to(torch.bfloat16)
    inputs = {
        k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in tiny.call_inputs(model).items()
    }
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ConceptAttention(model, concepts(3), layers=[0, 2], readouts=list(READOUTS)) as ca:
            hooked = model(**inputs)[0]
    assert torch.equal(plain, hooked)
    assert all(torch.isfinite(m).all() and m.shape == (2, 3, 2, 3, 5) for m in ca.all_maps().values())


def test_the_reference_rope_tables_are_the_models_and_the_grid_is_frames_rows_columns():
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=1, f=3, h=4, w=2)
    cos, sin = model.rope(inputs["hidden_states"])
    ref_cos, ref_sin = rope_tables(model, 3, 4, 2)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    call = FAMILY.read_call(model, inputs)
    assert call.grid() == (3, 4, 2) and call.num_image_tokens == 24
    assert FAMILY.read_call(model, {"hidden_states": torch.zeros(1, 9, 4, 4)}).grid is None


def test_stopping_after_the_last_layer_gives_the_full_pass_maps():
    model = tiny.transformer()
    inputs, embeds = tiny.call_inputs(model, batch=1, f=2, h=4, w=3), concepts(3)
    with torch.no_grad():
        with ConceptAttention(model, embeds, layers=[0, 1]) as full:
            model(**inputs)
        with ConceptAttention(model, embeds, layers=[0, 1]) as early:
            early.forward_until_last_layer(**inputs)
    torch.testing.assert_close(early.maps(), full.maps(), rtol=1e-6, atol=1e-7)
    assert early.maps().shape == (1, 3, 2, 4, 3)


def test_no_hook_is_left_after_an_exception():
    model = tiny.transformer()
    before = hook_counts(model)
    inputs = tiny.call_inputs(model, batch=1)
    block = FAMILY.double_blocks(model)[1]

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    handle = block.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with ConceptAttention(model, concepts(3), layers=[0, 2]):
            model(**inputs)
    handle.remove()
    handle = block.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with PromptAttention(model, layers=[0, 2]):
            model(**inputs)
    handle.remove()
    assert hook_counts(model) == before


@pytest.mark.parametrize("image", [False, True], ids=["text-to-video", "image-tokens"])
def test_prompt_attention_matches_the_reference_and_skips_what_the_model_masks(image):
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=2, image=image)
    before = hook_counts(model)
    with torch.no_grad(), PromptAttention(model, layers=[0, 2]) as pa:
        model(**inputs)
    assert hook_counts(model) == before
    got, expected = pa.maps().flatten(-3), reference_prompt_attention(model, inputs, [0, 2])
    assert pa.maps().shape == (2, 3 + 6 + 7, 2, 3, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 30))
    valid = torch.tensor([2 + 5, 3 + 7]) + (3 if image else 0)  # [image,] glyph and prompt tokens, first
    for b in range(2):
        assert torch.count_nonzero(got[b, valid[b] :]) == 0 and (got[b, : valid[b]] > 0).all()


@pytest.mark.parametrize("image", [False, True], ids=["text-to-video", "image-tokens"])
def test_prompt_mask_is_the_models_own_after_its_reordering(image):
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=2, image=image)
    model_mask = block_inputs(model, inputs)["attention_mask"]
    assert model_mask.shape == (2, 16)
    assert torch.equal(FAMILY.prompt_mask(inputs, model_mask.shape[1]), model_mask)


# ----- concepts: lone one-token prompts through the token refiner, plus the Qwen type embedding -------------------
def test_concepts_go_through_the_refiner_alone_at_each_items_timestep_with_the_qwen_type():
    model = tiny.transformer()
    inputs = tiny.call_inputs(model, batch=2)  # timesteps 400 and 700
    embeds = concepts(3)[None]
    got = FAMILY.embed_concepts(model, embeds, inputs)
    assert got.shape == (2, 3, 16)
    with torch.no_grad():
        qwen_type = model.cond_type_embed(torch.zeros(1, dtype=torch.long))[0]
        for b in range(2):
            for k in range(3):
                alone = model.context_embedder(
                    embeds[:, k : k + 1], inputs["timestep"][b : b + 1], torch.ones(1, 1, dtype=torch.long)
                )
                torch.testing.assert_close(got[b, k], alone[0, 0] + qwen_type, rtol=1e-6, atol=1e-6)
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
    ids = torch.tensor([templated(pipe, word)])
    with torch.no_grad():
        out = pipe.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return out.hidden_states[-3][0, position]


def test_a_concept_is_its_words_first_token_right_after_the_dropped_template_prefix(wrapped):
    pipe = wrapped.pipe
    assert family_for_pipeline(pipe) is FAMILY and FAMILY.video and FAMILY.frames_argument == "num_frames"
    tokenizer, first = FAMILY.concept_tokenizer(pipe)
    assert tokenizer is pipe.tokenizer and first == 0 and pipe.prompt_template_encode_start_idx == PREFIX
    ids = templated(pipe, "dog")
    assert pipe.tokenizer.convert_ids_to_tokens(ids[PREFIX - 3 : PREFIX + 1]) == ["<|im_start|>", "user", "Ċ", "dog"]
    embeds = wrapped.encode_concepts(["dog", "sky"])
    for k, word in enumerate(["dog", "sky"]):
        torch.testing.assert_close(embeds[k], lone_word_state(pipe, word, PREFIX), rtol=1e-5, atol=1e-6)


def test_a_shorter_drop_moves_the_concept_index_a_longer_one_and_left_padding_are_refused():
    pipe = tiny.pipeline()
    pipe.prompt_template_encode_start_idx = PREFIX - 4
    p = MMDiTPipeline(pipe)
    assert FAMILY.concept_tokenizer(pipe)[1] == 4
    torch.testing.assert_close(
        p.encode_concepts(["tree"])[0], lone_word_state(pipe, "tree", PREFIX), rtol=1e-5, atol=1e-6
    )
    assert p.word_positions("a dog", "dog") == [5]
    pipe.prompt_template_encode_start_idx = PREFIX + 2
    with pytest.raises(ConceptAttentionError, match="prompts are cut"):
        p.encode_concepts(["tree"])
    pipe.tokenizer.padding_side = "left"
    with pytest.raises(ConceptAttentionError, match="pads on the left"):
        MMDiTPipeline(pipe)


def test_a_several_token_concept_warns_and_mean_averages_its_tokens(wrapped):
    pipe = wrapped.pipe
    n = len(pipe.tokenizer("skyscraper", add_special_tokens=False).input_ids)
    assert n > 1
    with pytest.warns(UserWarning, match=r"\['skyscraper'\] are several tokens"):
        first = wrapped.encode_concepts(["dog", "skyscraper"])
    torch.testing.assert_close(first[1], lone_word_state(pipe, "skyscraper", PREFIX), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = wrapped.encode_concepts(["skyscraper"], concept_tokens="mean")
    states = torch.stack([lone_word_state(pipe, "skyscraper", PREFIX + i) for i in range(n)])
    torch.testing.assert_close(mean[0], states.mean(0), rtol=1e-5, atol=1e-6)


# ----- captions: byte-level counts and word positions in the transformer's text sequence ------------------------
@pytest.mark.parametrize("caption", [CAPTION, "skyscraper dog's grass", "the sky: 42 trees"])
def test_caption_token_counts_split_the_pipelines_own_tokenization(wrapped, caption):
    tokenizer = wrapped.pipe.tokenizer
    words = caption.split()
    counts = FAMILY.caption_token_counts(tokenizer, words)
    ids = templated(wrapped.pipe, caption)[PREFIX:-5]  # the caption's tokens, before <|im_end|> and the assistant turn
    assert sum(counts) == len(ids)
    pieces = [tokenizer.decode(ids[sum(counts[:i]) : sum(counts[: i + 1])]) for i in range(len(words))]
    assert [p.strip() for p in pieces] == words


def test_word_positions_index_the_captions_tokens_in_the_transformers_text_sequence(wrapped):
    pipe, model = wrapped.pipe, wrapped.transformer
    noisy = torch.randn(1, tiny.LATENT, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    inputs = FAMILY.transformer_inputs(pipe, noisy, 0.5, CAPTION, 0.0, 256)
    assert inputs["encoder_attention_mask_2"].sum() == 0  # nothing quoted: no glyph tokens
    text = block_inputs(model, inputs)["encoder_hidden_states"]  # [1, 24 + 16 + 4, D] in the model's order
    with torch.no_grad():
        qwen = (
            model.context_embedder(
                inputs["encoder_hidden_states"], inputs["timestep"], inputs["encoder_attention_mask"]
            )
            + model.cond_type_embed.weight[0]
        )
    ids = templated(pipe, CAPTION)[PREFIX:]
    spelled = {"dog": "dog", "grass": "grass,", "skyscraper": "skyscraper", "a": "aa"}  # whole words, both "a"s
    for word, tokens in spelled.items():
        positions = wrapped.word_positions(CAPTION, word)
        assert "".join(pipe.tokenizer.decode(ids[p]) for p in positions).replace(" ", "") == tokens
        torch.testing.assert_close(text[0, positions], qwen[0, positions])
    assert wrapped.word_positions(CAPTION, "tree") == []


def test_word_positions_follow_quoted_glyph_text_and_stop_where_the_pipeline_truncates(wrapped):
    pipe, model = wrapped.pipe, wrapped.transformer
    caption = 'a dog holding a sign that says "hi"'
    noisy = torch.randn(1, tiny.LATENT, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    inputs = FAMILY.transformer_inputs(pipe, noisy, 0.5, caption, 0.0, 256)
    glyphs = int(inputs["encoder_attention_mask_2"].sum())
    assert glyphs == len('Text "hi". ') + 1  # ByT5: one token a byte, and its end token
    [position] = wrapped.word_positions(caption, "dog")
    assert position == glyphs + 1
    text = block_inputs(model, inputs)["encoder_hidden_states"]
    with torch.no_grad():
        qwen = (
            model.context_embedder(
                inputs["encoder_hidden_states"], inputs["timestep"], inputs["encoder_attention_mask"]
            )
            + model.cond_type_embed.weight[0]
        )
    torch.testing.assert_close(text[0, position], qwen[0, 1])
    long = " ".join(["grass"] * 30 + ["dog"])
    assert wrapped.word_positions(long, "grass") == list(range(pipe.tokenizer_max_length))
    assert wrapped.word_positions(long, "dog") == []


# ----- the pipeline side ------------------------------------------------------------------------------------------
def calls_of(pipe, prompt: str, **kwargs) -> list[dict]:
    """The keyword arguments of every transformer call of one pipeline run (a step's: the prompt's, the negative's)."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        pipe(prompt, generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs)
    finally:
        handle.remove()
    return seen


def test_transformer_inputs_are_the_pipelines_denoising_inputs(wrapped):
    pipe = wrapped.pipe
    prompt = 'a red dog, "hi"'
    call = calls_of(pipe, prompt, height=16, width=24, num_frames=5, num_inference_steps=2)[0]
    assert call["hidden_states"].shape == (1, 2 * tiny.LATENT + 1, 3, 4, 6)
    t = float(call["timestep"][0]) / 1000
    latents = call["hidden_states"][:, : tiny.LATENT]
    with torch.no_grad():
        ours = FAMILY.transformer_inputs(pipe, latents, t, prompt, 0.0, 256)
    assert ours["encoder_attention_mask_2"].sum() > 0  # the quoted text has glyph tokens
    assert set(ours) == set(call) - {"attention_kwargs"}
    for key in set(ours) - {"timestep", "return_dict"}:
        assert torch.equal(ours[key], call[key]), key
    torch.testing.assert_close(ours["timestep"], call["timestep"])
    two = FAMILY.transformer_inputs(pipe, torch.cat([latents, latents]), t, prompt, 0.0, 256)
    assert all(two[k].shape[0] == 2 for k in two if k != "return_dict")  # S noise draws in one call


def test_latents_are_the_vae_mean_scaled_as_the_pipeline_decodes_them(wrapped):
    pipe = wrapped.pipe
    pixels = torch.rand(3, 5, 16, 24, generator=torch.Generator().manual_seed(3))  # [3, T, H, W]
    latents = FAMILY.latents(pipe, pixels)
    assert latents.shape == pipe.prepare_latents(1, tiny.LATENT, 16, 24, 5, torch.float32, "cpu").shape
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None] * 2 - 1).latent_dist.mean
    torch.testing.assert_close(latents / pipe.vae.config.scaling_factor, z)  # the pipeline decodes latents / scaling
    assert FAMILY.size_multiple(pipe) == 4 and FAMILY.valid_frames(pipe, 8) == 7 and FAMILY.valid_frames(pipe, 5) == 5
    height, width = pipe.video_processor.calculate_default_height_width(9, 16, pipe.target_size)
    assert FAMILY.default_size(pipe) == max(height, width) and width > height


def test_calls_per_step_follow_the_guider_and_the_prompts_call_comes_first(wrapped):
    from diffusers import ClassifierFreeGuidance

    pipe = wrapped.pipe
    before = pipe.guider.get_state()
    assert FAMILY.calls_per_step(pipe, {"num_inference_steps": 3}) == 2
    assert FAMILY.calls_per_step(pipe, {}) == 2  # the pipeline's default steps
    assert pipe.guider.get_state() == before  # the pipeline's guider is left as it was
    calls = calls_of(pipe, "a dog", height=8, width=8, num_frames=1, num_inference_steps=2)
    assert len(calls) == 4
    prompt = pipe.encode_prompt("a dog")[0]
    assert torch.equal(calls[0]["encoder_hidden_states"], prompt) and torch.equal(
        calls[2]["encoder_hidden_states"], prompt
    )
    assert not torch.equal(calls[1]["encoder_hidden_states"], prompt)
    assert FAMILY.calls_per_step(tiny.pipeline(guidance_scale=1.0), {}) == 1
    partial = tiny.pipeline()
    partial.guider = ClassifierFreeGuidance(guidance_scale=6.0, stop=0.5)
    with pytest.raises(ConceptAttentionError, match="different number of times"):
        FAMILY.calls_per_step(partial, {"num_inference_steps": 4})
    with pytest.raises(ConceptAttentionError, match="guider"):
        FAMILY.calls_per_step(pipe, {"guidance_scale": 3.0})


def test_maps_of_a_pipeline_run_come_from_the_prompts_calls(wrapped):
    pipe = wrapped.pipe
    embeds = wrapped.encode_concepts(["dog", "grass"])
    run = dict(height=16, width=24, num_frames=5, num_inference_steps=2, output_type="latent")
    with torch.no_grad(), ConceptAttention(pipe.transformer, embeds, calls=lambda c: c % 2 == 0) as ca:
        pipe("a dog", generator=torch.Generator().manual_seed(2), **run)
    assert ca.num_calls == 4 and ca.recorded_calls == 2 and ca.maps().shape == (1, 2, 3, 4, 6)
    torch.testing.assert_close(ca.maps().sum(1), torch.ones(1, 3, 4, 6))


def test_image_to_video_is_refused_by_class():
    image_to_video = type("HunyuanVideo15ImageToVideoPipeline", (), {})()
    with pytest.raises(UnsupportedModelError, match="HunyuanVideo15Pipeline"):
        family_for_pipeline(image_to_video)
