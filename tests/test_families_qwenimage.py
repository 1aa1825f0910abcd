"""Qwen-Image's numbers against an independent recomputation (tests/reference_qwenimage.py), and what is
particular to the family: the chat-template concept encoding, the concept RoPE position, the padding mask,
byte-level word positions, true CFG's call order, zero_cond_t, and the inputs it refuses."""

from __future__ import annotations

import warnings

import pytest
import tiny_family_qwenimage as spec
import torch
from reference_qwenimage import (
    angles,
    reference_maps,
    reference_prompt_attention,
    reference_readouts,
    rotate,
    text_positions,
)

from conceptattention import ConceptAttention, PromptAttention
from conceptattention.errors import ConceptAttentionError
from conceptattention.families import family_for_transformer
from conceptattention.families.qwenimage import QwenImage
from conceptattention.pipelines.mmdit import MMDiTPipeline
from conceptattention.readouts import READOUTS

LAYERS = [0, 2]  # block 1 is not read but still advances the concept tokens


def concepts(k: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(k, spec.TEXT_WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (no per-op thread synchronisation); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return spec.transformer()


@pytest.fixture(scope="module")
def wrapped():
    pipe = spec.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return MMDiTPipeline(pipe, name="tiny-qwenimage")


def two_calls(model):
    """Two calls of one 3 x 5 grid, batch 2 (the second item's last two prompt tokens padded)."""
    return [spec.call_inputs(model, seed=1, t=0.7), spec.call_inputs(model, seed=5, text=9, t=0.3)]


def test_every_readout_equals_the_reference_over_layers_and_two_calls(model):
    calls, embeds = two_calls(model), concepts()
    with torch.no_grad(), ConceptAttention(model, embeds, layers=LAYERS, readouts=list(READOUTS)) as ca:
        for inputs in calls:
            model(**inputs)
    refs = reference_readouts(model, calls, embeds, LAYERS, READOUTS)
    assert refs.keys() == READOUTS.keys()
    for name, ref in refs.items():
        torch.testing.assert_close(ca.token_maps(name), ref, rtol=1e-5, atol=1e-6, msg=name)


def test_prompt_attention_equals_a_reference_that_masks_padding(model):
    inputs = spec.call_inputs(model, seed=3)
    with torch.no_grad(), PromptAttention(model, layers=LAYERS) as pa:
        model(**inputs)
    ours = pa.maps().flatten(2)  # [B, S, N]
    torch.testing.assert_close(ours, reference_prompt_attention(model, inputs, LAYERS), rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(ours[1, -2:]) == 0 and (ours[0, -2:] > 0).all()  # padded tokens get no weight
    torch.testing.assert_close(ours[1, :-2].sum(0), torch.ones(15))
    unmasked = dict(inputs, encoder_hidden_states_mask=None)
    assert QwenImage().prompt_mask(unmasked, 7) is None
    assert QwenImage().prompt_mask(inputs, 7).dtype == torch.bool


@pytest.mark.parametrize("h, w", [(3, 5), (4, 3), (2, 6)])
def test_concepts_take_the_first_text_position(model, h, w):
    family, inputs = family_for_transformer(model), spec.call_inputs(model, batch=1, h=h, w=w)
    seen = []
    block = family.double_blocks(model)[0]
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["image_rotary_emb"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    rope = seen[0]
    table = family.concept_rope(model, rope, torch.float32, None)
    assert torch.equal(table, rope[1][:1])  # what the first prompt token is rotated by
    expected = angles(model.config.axes_dims_rope, text_positions(h, w, 1))  # position max(h//2, w//2)
    torch.testing.assert_close(table, torch.polar(torch.ones_like(expected), expected).to(table.dtype))
    x = torch.randn(2, 4, 2, 16)  # [B, K, H, Dh]
    rotated = family.apply_rope(x, table)
    torch.testing.assert_close(rotated, rotate(x.transpose(1, 2), expected).transpose(1, 2))


def test_maps_depend_on_the_concept_position(model):
    """The reference rotates concepts at the first text position; another position gives other maps."""

    class Shifted(QwenImage):
        def concept_rope(self, transformer, rope, dtype, position):
            return rope[1][1:2]

    inputs, embeds = spec.call_inputs(model, seed=4), concepts()
    ref = reference_maps(model, [inputs], embeds, LAYERS, "cross+self", "output", True)
    with torch.no_grad(), ConceptAttention(model, embeds, layers=LAYERS, family=Shifted()) as ca:
        model(**inputs)
    assert not torch.allclose(ca.token_maps(), ref, rtol=1e-3, atol=1e-4)


def template_ids(pipe, text: str) -> list[int]:
    return pipe.tokenizer(pipe.prompt_template_encode.format(text)).input_ids


def test_a_concept_is_the_lone_word_prompts_first_state(wrapped):
    pipe = wrapped.pipe
    drop = pipe.prompt_template_encode_start_idx
    ids = template_ids(pipe, "dog")
    assert pipe.tokenizer.convert_ids_to_tokens(ids[drop - 3 : drop + 1]) == ["<|im_start|>", "user", "Ċ", "dog"]
    embeds = wrapped.encode_concepts(["dog", "grass"])
    with torch.no_grad():  # the text encoder's last states of the whole template, the word at index 34
        states = pipe.text_encoder(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
        lone, _ = pipe.encode_prompt("grass", device="cpu")
    torch.testing.assert_close(embeds[0], states[0, drop], rtol=1e-5, atol=1e-6)
    assert torch.equal(embeds[1], lone[0, 0])
    assert embeds.shape == (2, spec.TEXT_WIDTH)


def test_a_multi_token_concept_warns_and_mean_averages_its_tokens(wrapped):
    pipe = wrapped.pipe
    n = len(pipe.tokenizer("skyscraper", add_special_tokens=False).input_ids)
    assert n > 1
    with pytest.warns(UserWarning, match="skyscraper"):
        first = wrapped.encode_concepts(["skyscraper", "dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = wrapped.encode_concepts(["skyscraper", "dog"], concept_tokens="mean")
    with torch.no_grad():
        lone, _ = pipe.encode_prompt("skyscraper", device="cpu")
    assert torch.equal(first[0], lone[0, 0])
    torch.testing.assert_close(mean[0], lone[0, :n].mean(0))
    assert torch.equal(mean[1], first[1])


def test_word_positions_are_the_pipelines_own_tokens(wrapped):
    pipe = wrapped.pipe
    caption = "house and a dog near a red house, skyscraper dog"
    drop = pipe.prompt_template_encode_start_idx
    text = pipe.prompt_template_encode.format(caption)
    encoding = pipe.tokenizer(text, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"][drop:]
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(caption, device="cpu")
    assert embeds.shape[1] == len(offsets)  # the transformer's text sequence is the template's tail
    begin = text.index(caption)
    spans, at = [], 0
    for word in caption.split():  # each whitespace word's characters in the formatted prompt
        at = caption.index(word, at)
        spans.append((word.strip(","), begin + at, begin + at + len(word)))
        at += len(word)
    for concept in ["house", "dog", "skyscraper", "red"]:
        expected = [p for p, (s, e) in enumerate(offsets) for w, a, b in spans if w == concept and s < b and e > a]
        assert wrapped.word_positions(caption, concept) == expected, concept
    house = wrapped.word_positions(caption, "house")
    assert len(house) > 3  # "house" at the start is several tokens, " house" one (plus its comma)
    assert wrapped.word_positions(caption, "red dog") == []
    assert wrapped.word_positions(caption, "dog", max_sequence_length=6) == [
        p for p in wrapped.word_positions(caption, "dog") if p < 6
    ]


def test_true_cfg_runs_the_prompt_first_and_only_its_calls_count(wrapped):
    pipe, family = wrapped.pipe, wrapped.model_family
    assert family.calls_per_step(pipe, {}) == 1
    assert family.calls_per_step(pipe, {"negative_prompt": ""}) == 2  # the pipeline's default true_cfg_scale is 4
    assert family.calls_per_step(pipe, {"negative_prompt": "x", "true_cfg_scale": 1.0}) == 1
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True
    )
    embeds = wrapped.encode_concepts(["dog", "sky"])
    kwargs = dict(height=32, width=48, num_inference_steps=2, negative_prompt="blurry", true_cfg_scale=3.0)
    try:
        with torch.no_grad(), ConceptAttention(pipe.transformer, embeds, calls=[0, 2]) as ca:
            image = pipe("a red dog", generator=torch.Generator().manual_seed(7), output_type="np", **kwargs).images
    finally:
        hook.remove()
    with torch.no_grad():
        prompt, _ = pipe.encode_prompt("a red dog", device="cpu")
        negative, _ = pipe.encode_prompt("blurry", device="cpu")
    assert len(seen) == 4
    assert all(torch.equal(s, prompt) for s in seen[0::2]) and all(torch.equal(s, negative) for s in seen[1::2])
    kwargs = dict(height=32, width=48, negative_prompt="blurry")  # generate's guidance is true_cfg_scale
    res = wrapped.generate("a red dog", ["dog", "sky"], steps=2, seed=7, progress=False, guidance=3.0, **kwargs)
    torch.testing.assert_close(res.token_maps, ca.maps()[0], rtol=1e-5, atol=1e-6)
    assert image.shape[1:3] == (32, 48)


def test_real_image_inputs_are_what_the_pipeline_gives_the_transformer(wrapped):
    pipe, family = wrapped.pipe, wrapped.model_family
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe("a dog", height=32, width=48, num_inference_steps=1, output_type="latent")
    finally:
        hook.remove()
    noisy = torch.randn(2, 4, 16, 24)
    with torch.no_grad():
        ours = family.transformer_inputs(pipe, noisy, 0.5, "a dog", 0.0, 512)
    theirs = seen[0]
    assert ours["img_shapes"] == [theirs["img_shapes"][0]] * 2 == [[(1, 8, 12)]] * 2
    assert ours["hidden_states"].shape == (2,) + theirs["hidden_states"].shape[1:]
    assert torch.equal(ours["encoder_hidden_states"][1], theirs["encoder_hidden_states"][0])
    assert ours["encoder_hidden_states_mask"] is theirs["encoder_hidden_states_mask"] is None
    assert 0 < float(theirs["timestep"][0]) <= 1 and torch.equal(ours["timestep"], torch.full((2,), 0.5))
    # latents: the inverse of the pipeline's decode normalisation (z = latents * std + mean)
    pixels = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None, :, None] * 2 - 1).latent_dist.mean[:, :, 0]
        latents = family.latents(pipe, pixels)
    std, mean = (torch.tensor(pipe.vae.config[k]).view(1, -1, 1, 1) for k in ("latents_std", "latents_mean"))
    torch.testing.assert_close(latents * std + mean, z)
    assert family.size_multiple(pipe) == 4 and family.default_size(pipe) == 256


def test_zero_cond_t_models_give_the_plain_models_maps(model):
    twin = spec.transformer(zero_cond_t=True)
    twin.load_state_dict(model.state_dict())
    inputs, embeds = spec.call_inputs(model, seed=6), concepts()
    with torch.no_grad():
        plain = twin(**inputs)[0]
        with ConceptAttention(twin, embeds, layers=LAYERS, readouts=["concept_attention", "value"]) as ours:
            out = twin(**inputs)[0]
        with ConceptAttention(model, embeds, layers=LAYERS, readouts=["concept_attention", "value"]) as base:
            model(**inputs)
    assert torch.equal(plain, out)
    for name in ("concept_attention", "value"):
        torch.testing.assert_close(ours.token_maps(name), base.token_maps(name), rtol=1e-5, atol=1e-6)


def test_additional_t_cond_models_match_the_reference():
    model = spec.transformer(seed=3, use_additional_t_cond=True)
    inputs, embeds = dict(spec.call_inputs(model, seed=7), additional_t_cond=torch.tensor([0, 1])), concepts()
    with torch.no_grad(), ConceptAttention(model, embeds, layers=LAYERS) as ca:
        model(**inputs)
    ref = reference_maps(model, [inputs], embeds, LAYERS, "cross+self", "output", True)
    torch.testing.assert_close(ca.token_maps(), ref, rtol=1e-5, atol=1e-6)


def test_edit_inputs_with_condition_images_are_refused(model):
    inputs = spec.call_inputs(model, batch=1, h=3, w=5)
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"]] * 2, dim=1)
    inputs["img_shapes"] = [[(1, 3, 5), (1, 3, 5)]]
    with pytest.raises(ConceptAttentionError, match="edit and layered"), torch.no_grad():
        with ConceptAttention(model, concepts()):
            model(**inputs)
    with torch.no_grad(), ConceptAttention(model, concepts()) as ca:  # the session let go of the model
        model(**spec.call_inputs(model, batch=1))
    assert ca.maps().shape == (1, 3, 3, 5)
