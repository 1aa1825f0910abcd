"""The shapes model (shapes/model.py) on a tiny config: the word-level text encoder, patches, the sampler's
timestep shift, sample prediction, saved weights. Its pipeline is test_pipelines_shapes.py, the CLI on it
test_cli.py; its training lives in the lab (lab/tests)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny_shapes import TINY

from conceptattention import ConceptAttentionError
from conceptattention.shapes.model import WORD_TO_ID, ShapesModel, pack, sampling_times, tokenize, unpack


def test_tokenize_and_unknown_words():
    ids = tokenize(["a red circle", "grass"], 6)
    assert ids.shape == (2, 6) and ids[1, 1:].eq(0).all()
    with pytest.raises(ConceptAttentionError, match="does not know 'dog'.*vocabulary is: a an and .*background"):
        tokenize(["a dog"], 6)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 3, 64, 64)
    for p in (4, 8):
        tokens = pack(x, p)
        assert tokens.shape == (2, (64 // p) ** 2, 3 * p * p)
        assert torch.equal(unpack(tokens, p), x)
    # token (row 1, col 2) of an 8x8 patching holds pixels [8:16, 16:24]
    assert torch.equal(pack(x, 8)[0, 1 * 8 + 2].view(3, 8, 8), x[0, :, 8:16, 16:24])


def test_concepts_are_encoded_alone_as_first_token():
    model = ShapesModel(TINY).eval()
    with torch.no_grad():
        embeds = model.encode_concepts(["circle", "red"])
        tokens, _ = model.encode_text(["circle"])
    assert embeds.shape == (2, TINY.text_dim)
    torch.testing.assert_close(embeds[0], tokens[0, 0])
    with pytest.raises(ConceptAttentionError, match="not one word"):
        model.encode_concepts(["red circle"])


def test_sampling_times_follow_the_timestep_shift():
    assert torch.equal(sampling_times(4), torch.linspace(1.0, 0.0, 5))  # shift 1: evenly spaced, as before
    # shift s maps u to s u / (1 + (s - 1) u): u = 1/2 -> s / (s + 1), u = 1/4 -> s / (s + 3)
    assert sampling_times(4, 3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


@pytest.mark.parametrize(
    "bad, message",
    [
        pytest.param((0, 1.0), "at least 1", id="no-steps"),
        pytest.param((4, 0.0), "must be positive", id="zero-shift"),
        pytest.param((4, float("nan")), "must be positive", id="nan-shift"),
    ],
)
def test_sampling_times_refuse_bad_arguments(bad, message):
    with pytest.raises(ConceptAttentionError, match=message):
        sampling_times(*bad)


def test_sample_prediction_turns_the_clean_image_guess_into_the_flow_velocity(tiny_dir, tmp_path):
    """A sample-predicting model's velocity is (x_t - x0_hat) / t: one Euler step from t to 0 lands on its guess."""
    from conceptattention.shapes.model import SAMPLE_T_MIN

    torch.manual_seed(0)
    model = ShapesModel(replace(TINY, prediction="sample")).eval()
    tokens, pooled = model.encode_text(["a red circle", "grass"])
    x_t = torch.randn(2, model.grid**2, 3 * TINY.patch**2)
    t = torch.tensor([0.6, 0.01])
    with torch.no_grad():
        guess = model.transformer(**model.transformer_inputs(x_t, t, tokens, pooled))[0]
        v = model.velocity(x_t, t, tokens, pooled)
    torch.testing.assert_close(x_t[0] - 0.6 * v[0], guess[0])  # t above the floor: exact
    torch.testing.assert_close(v[1], (x_t[1] - guess[1]) / SAMPLE_T_MIN)  # below it: divided by the floor
    # a velocity model's output is its velocity
    plain = ShapesModel.load(tiny_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain.velocity(x_t, t, tokens, pooled),
            plain.transformer(**plain.transformer_inputs(x_t, t, tokens, pooled))[0],
        )


def test_a_model_without_word_mixing_makes_each_prompt_token_its_word_plus_its_position():
    """``text_layers=0``: a prompt token is norm(embedding + position), whatever the other words, and a concept
    alone equals the same word at position 0 of a caption; prompt tokens' position ids are zeros, as in Flux."""
    from conceptattention.shapes.model import text_ids

    torch.manual_seed(0)
    model = ShapesModel(replace(TINY, text_layers=0)).eval()
    assert isinstance(model.text_encoder.layers, torch.nn.Identity)
    assert not any(k.startswith("text_encoder.layers.") for k in model.state_dict())
    enc = model.text_encoder
    with torch.no_grad():
        tokens, pooled = model.encode_text(["a red circle", "red"])
        ids = tokenize(["a red circle"], TINY.max_tokens)[0, :3]
        expected = torch.nn.functional.layer_norm(
            enc.embed.weight[ids] + enc.position[:3], (TINY.text_dim,), enc.norm.weight, enc.norm.bias
        )
        torch.testing.assert_close(tokens[0, :3], expected)
        torch.testing.assert_close(pooled[0], expected.mean(0))
        torch.testing.assert_close(model.encode_concepts(["red"])[0], tokens[1, 0])
        mixed, _ = ShapesModel(TINY).eval().encode_text(["a red", "a blue"])  # with mixing, "a" sees its neighbour
        assert not torch.allclose(mixed[0, 0], mixed[1, 0])
        x_t = torch.randn(1, model.grid**2, 3 * TINY.patch**2)
        ids = model.transformer_inputs(x_t, torch.tensor([0.5]), tokens[:1], pooled[:1])["txt_ids"]
    assert torch.equal(ids, torch.zeros(TINY.max_tokens, 3)) and torch.equal(text_ids(4), torch.zeros(4, 3))
    with pytest.raises(ConceptAttentionError, match="cannot be negative, not -1"):
        replace(TINY, text_layers=-1)


def test_neighbour_maps_add_the_words_beside_each_prompt_token_and_leave_a_concept_alone():
    """``text_neighbours``: each prompt token adds learned maps of the words just before and after it (zero in a
    new model); padding neither lends nor borrows, and a word alone (a concept) has no neighbours."""
    torch.manual_seed(0)
    plain_model = ShapesModel(replace(TINY, text_layers=0)).eval()
    model = ShapesModel(replace(TINY, text_layers=0, text_neighbours=True)).eval()
    model.load_state_dict(plain_model.state_dict(), strict=False)  # the same words, positions and norm
    captions = ["a red circle and a blue square", "circle"]
    enc = model.text_encoder
    with torch.no_grad():
        plain, plain_pooled = plain_model.encode_text(captions)
        zero, zero_pooled = model.encode_text(captions)
        assert not enc.before.weight.any() and not enc.after.weight.any()
        assert torch.equal(plain, zero) and torch.equal(plain_pooled, zero_pooled)  # the maps start at zero
        g = torch.Generator().manual_seed(1)
        enc.before.weight.copy_(torch.randn(enc.before.weight.shape, generator=g) * 0.1)
        enc.after.weight.copy_(torch.randn(enc.after.weight.shape, generator=g) * 0.1)
        tokens, _ = model.encode_text(captions)
        concepts = model.encode_concepts(["circle", "red"])
        e, pos = enc.embed.weight, enc.position
        ids = [WORD_TO_ID[w] for w in captions[0].split()]
        for i, word in enumerate(ids):  # each word by hand: itself, its position, the maps of its neighbours
            x = e[word] + pos[i]
            if i > 0:
                x = x + enc.before.weight @ e[ids[i - 1]]
            if i + 1 < len(ids):
                x = x + enc.after.weight @ e[ids[i + 1]]
            torch.testing.assert_close(tokens[0, i], enc.norm(x))
        torch.testing.assert_close(tokens[0, len(ids) :], plain[0, len(ids) :])
        torch.testing.assert_close(tokens[1], plain[1])
        torch.testing.assert_close(concepts[0], plain[1, 0])
        assert (tokens[0, : len(ids)] - plain[0, : len(ids)]).abs().amax() > 1e-2


def test_saved_weights_load_as_they_were_saved_and_a_foreign_config_is_one_clear_error(tmp_path):
    torch.manual_seed(0)
    model = ShapesModel(replace(TINY, text_layers=0, text_neighbours=True, prediction="sample", rope_scale=0.5)).eval()
    model.save(tmp_path / "m")
    again = ShapesModel.load(tmp_path / "m")
    assert again.config == model.config and again.text_encoder.after is not None
    assert all(torch.equal(v.to(torch.bfloat16).float(), again.state_dict()[k]) for k, v in model.state_dict().items())
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["text_positions"] = True  # a setting this version does not have
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConceptAttentionError, match="is not a valid shapes-model config"):
        ShapesModel.load(tmp_path / "m")
