"""The installed shapes model: text encoder, loading, inference (generate, encode, sampling) and the CLI on it,
on a tiny config. Its training lives in the lab (lab/tests)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conceptattention import ConceptAttentionError
from conceptattention.cli import app
from conceptattention.pipelines.shapes import ShapesPipeline
from conceptattention.shapes import world
from conceptattention.shapes.model import WORD_TO_ID, ShapesConfig, ShapesModel, pack, tokenize, unpack

TINY = ShapesConfig(
    text_dim=32,
    text_layers=1,
    text_heads=2,
    num_layers=3,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    axes_dims_rope=(4, 6, 6),
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_shapes")
    ShapesModel(TINY).save(directory)
    return directory


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


def test_pipeline_generate_and_encode(tiny_dir, tmp_path):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    res = pipe.generate("a red circle on grass", ["circle", "grass", "red"], steps=3, seed=1)
    assert res.maps.shape == (3, 64, 64) and res.token_maps.shape == (3, 8, 8)
    torch.testing.assert_close(res.maps.sum(0), torch.ones(64, 64), rtol=1e-4, atol=1e-4)
    again = pipe.generate("a red circle on grass", ["circle", "grass", "red"], steps=3, seed=1)
    assert np.array_equal(np.asarray(res.image), np.asarray(again.image))
    files = res.save(tmp_path / "gen")
    maps = np.load(files["maps"])
    assert maps.dtype == np.float32 and maps.shape == (3, 64, 64)
    assert Image.open(files["grid"]).size[0] == 4 * (192 + 4)
    info = json.loads(files["result"].read_text())
    assert info["concepts"] == ["circle", "grass", "red"] and info["steps"] == 3

    enc = pipe.encode(files["image"], ["circle", "grass"], caption="a red circle on grass", samples=3, seed=2)
    singles = [
        pipe.encode(files["image"], ["circle", "grass"], caption="a red circle on grass", samples=1, seed=s)
        for s in (10, 11)
    ]
    assert enc.maps.shape == (2, 64, 64) and torch.isfinite(enc.maps).all()
    assert not torch.allclose(singles[0].token_maps, singles[1].token_maps)


def test_encode_batched_samples_equal_mean_of_single_runs(tiny_dir):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    # 8-bit pixel values, as from an image file (encode reads images as 8-bit RGB)
    image = (torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    caption, words = "a blue circle in the sky", ["circle", "sky"]
    batched = pipe.encode(image, words, caption=caption, samples=3, seed=4)
    singles = [pipe.encode(image, words, caption=caption, samples=1, seed=4 + i) for i in range(3)]
    assert batched.settings["layers"] == [2]
    mean = torch.stack([r.token_maps for r in singles]).mean(0)
    torch.testing.assert_close(batched.token_maps, mean, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(singles[0].token_maps, singles[1].token_maps)


def test_bad_inputs(tiny_dir, tmp_path):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    with pytest.raises(ConceptAttentionError, match="concept list is empty"):
        pipe.generate("a red circle", [])
    with pytest.raises(ConceptAttentionError, match="does not know 'dog'"):
        pipe.generate("a red circle", ["dog"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ConceptAttentionError, match="cannot read .*broken.png as an image"):
        pipe.encode(bad, ["circle"])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ConceptAttentionError, match="image file is empty"):
        pipe.encode(empty, ["circle"])
    with pytest.raises(ConceptAttentionError, match="not found"):
        pipe.encode(tmp_path / "missing.png", ["circle"])
    tiny = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(tiny)
    with pytest.raises(ConceptAttentionError, match="1x1 pixels"):
        pipe.encode(tiny, ["circle"])
    gray, rgba = tmp_path / "gray.png", tmp_path / "rgba.png"
    Image.new("L", (30, 50), 128).save(gray)
    Image.new("RGBA", (70, 40), (255, 0, 0, 128)).save(rgba)
    for path in (gray, rgba):
        assert pipe.encode(path, ["circle"]).maps.shape == (1, 64, 64)
    with pytest.raises(ConceptAttentionError, match="no shapes model in"):
        ShapesPipeline.from_pretrained(tmp_path)


def test_encode_center_crops_a_non_square_image_and_records_it(tiny_dir, tmp_path):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    wide = np.zeros((200, 300, 3), np.uint8)
    wide[:, :50], wide[:, 50:250], wide[:, 250:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)  # margins differ
    Image.fromarray(wide).save(tmp_path / "wide.png")
    res = pipe.encode(tmp_path / "wide.png", ["circle", "sky"], caption="a blue circle in the sky", samples=1)
    seen = np.asarray(res.image)
    assert seen.shape == (64, 64, 3) and (seen == (0, 0, 255)).all()  # the centre only, not squashed margins
    assert res.settings["input_fit"] == "center-crop 300x200 to 200x200, resized to 64x64"
    centre = pipe.encode(
        Image.fromarray(wide[:, 50:250]).resize((64, 64), Image.BICUBIC),
        ["circle", "sky"],
        caption="a blue circle in the sky",
        samples=1,
    )
    torch.testing.assert_close(res.token_maps, centre.token_maps)  # the maps are those of the centre
    assert centre.settings["input_fit"] == "unchanged (64x64)"
    big = pipe.encode(Image.new("RGB", (128, 128), "red"), ["circle"], samples=1)
    assert big.settings["input_fit"] == "resized 128x128 to 64x64"
    assert pipe.encode(torch.rand(3, 64, 64), ["circle"], samples=1).settings["input_fit"] == "unchanged (64x64)"
    info = json.loads(res.save(tmp_path / "out")["result"].read_text())
    assert info["input_fit"] == res.settings["input_fit"]


def test_cli_generate_encode_and_errors(tiny_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli_gen"
    r = runner.invoke(
        app,
        [
            "generate",
            "a red circle and a blue square on grass",
            "--concepts",
            "circle",
            "square",
            "grass",
            "--out",
            str(out),
            "--model",
            str(tiny_dir),
            "--steps",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert np.load(out / "maps.npy").shape == (3, 64, 64)
    for name in ("image.png", "grid.png", "segmentation.png", "maps_raw.npy", "result.json", "circle.png", "grass.png"):
        assert (out / name).is_file()
    r = runner.invoke(
        app,
        [
            "encode",
            str(out / "image.png"),
            "--concepts",
            "circle",
            "--caption",
            "a red circle",
            "--out",
            str(tmp_path / "cli_enc"),
            "--model",
            str(tiny_dir),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cli_enc" / "result.json").read_text())["mode"] == "encode"
    r = runner.invoke(
        app, ["generate", "a red dog", "--concepts", "circle", "--model", str(tiny_dir), "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 2 and "error: the shapes model does not know 'dog'" in r.output
    r = runner.invoke(app, ["encode", str(tmp_path / "nope.png"), "--concepts", "circle", "--model", str(tiny_dir)])
    assert r.exit_code == 2 and "image file not found" in r.output


def test_sampler_timestep_shift(tiny_dir, tmp_path):
    from conceptattention.shapes.model import sampling_times

    assert torch.equal(sampling_times(4), torch.linspace(1.0, 0.0, 5))  # shift 1: evenly spaced, as before
    # shift s maps u to s u / (1 + (s - 1) u): u = 1/2 -> s / (s + 1), u = 1/4 -> s / (s + 3)
    assert sampling_times(4, 3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    for bad, message in (
        ((0, 1.0), "at least 1"),
        ((4, 0.0), "must be positive"),
        ((4, float("nan")), "must be positive"),
    ):
        with pytest.raises(ConceptAttentionError, match=message):
            sampling_times(*bad)

    # the sampler calls the model at exactly those noise levels: given shift, else the model's default
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    seen = []

    def velocity(x_t, t, tokens, pooled):
        seen.append(sorted(set(t.tolist())))
        return torch.zeros_like(x_t)

    pipe.model.velocity = velocity
    pipe.sample(["a red circle"], [0], steps=2, shift=3.0)
    assert seen == [[1.0], [0.75]]
    seen.clear()
    pipe.model.config.default_shift = 7.0
    pipe.sample(["a red circle"], [0], steps=2)
    assert seen[1] == [pytest.approx(7 / 8)]

    # the CLI: --shift reaches the sampler and result.json; for a diffusers model it is refused before loading
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "generate",
            "a red circle",
            "--concepts",
            "circle",
            "--model",
            str(tiny_dir),
            "--steps",
            "2",
            "--shift",
            "3",
            "--out",
            str(tmp_path / "g"),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g" / "result.json").read_text())["shift"] == 3.0
    r = runner.invoke(
        app,
        [
            "generate",
            "a dog",
            "--concepts",
            "dog",
            "--model",
            str(tmp_path / "no-such-flux"),
            "--shift",
            "3",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert r.exit_code == 2 and "--shift sets the shapes model's sampler" in r.output
    assert not (tmp_path / "x").exists()
    r = runner.invoke(
        app,
        [
            "shapes-benchmark",
            "--model",
            str(tiny_dir),
            "--images",
            "3",
            "--sample-images",
            "3",
            "--shift",
            "3",
            "--out",
            str(tmp_path / "b"),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    samples = json.loads((tmp_path / "b" / "shapes_benchmark.json").read_text())["samples"]
    assert samples["shift"] == 3.0
    # the breakdowns partition the objects: by count in the caption, and each wrong shape has one reason
    groups = samples["by_objects"].values()
    assert sum(g["images"] for g in groups) == 3 and sum(g["objects"] for g in groups) == samples["objects"]
    right = sum(g["shapes_right"] for g in groups)
    assert right == round(samples["shape_accuracy"] * samples["objects"])
    assert sum(samples["shape_errors"].values()) == samples["objects"] - right
    # the no-binding baseline: every object of a one-object caption, and the groups add up to the total
    if "1" in samples["by_objects"]:
        assert samples["by_objects"]["1"]["unbound_shapes_right"] == samples["by_objects"]["1"]["objects"]
    assert sum(g["unbound_shapes_right"] for g in groups) == pytest.approx(
        samples["unbound_shape_accuracy"] * samples["objects"]
    )
    assert "Shapes right by objects in the caption: " in r.output
    assert "| steps 20, guidance 4.0, shift 3.0 | 3 |" in r.output
    n = samples["objects"]  # each accuracy is printed with its count, which a rounded share could hide
    assert f"% ({right} of {n}) |" in r.output and f"% ({round(samples['color_accuracy'] * n)} of {n}) |" in r.output


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


def test_true_concepts_are_the_words_whose_masks_are_not_empty():
    scenes = world.sample_scenes(64, seed=5)
    _, labels = world.render(scenes)
    expected = torch.stack([world.concept_mask(scenes, labels, word).flatten(1).any(1) for word in world.CONCEPTS], 1)
    assert torch.equal(world.true_concepts(scenes), expected)
    assert 0 < expected[:, :3].sum(1).float().mean() < 3  # some images hold one shape, some several


def test_coreferent_concepts_are_the_pairs_whose_masks_are_the_same():
    scenes = world.sample_scenes(96, seed=6)
    _, labels = world.render(scenes)
    masks = torch.stack([world.concept_mask(scenes, labels, word).flatten(1) for word in world.CONCEPTS], 1)
    same_mask = (masks[:, :, None] == masks[:, None]).all(-1) & masks.any(-1)[:, :, None]
    expected = same_mask & ~torch.eye(len(world.CONCEPTS), dtype=torch.bool)
    pairs = world.coreferent_concepts(scenes)
    assert torch.equal(pairs, expected)
    shape_colour = pairs[:, :3, 3:7].sum((1, 2))
    assert (shape_colour == 0).any() and (shape_colour >= 2).any()  # some images share a colour, some bind two


def test_train_shapes_without_the_lab_is_one_clear_error(tmp_path, monkeypatch):
    """A pip install of conceptattention has no trainer: train-shapes says how to get it, in one line."""
    import sys

    monkeypatch.setitem(sys.modules, "conceptattention_lab", None)  # as if the lab were not installed
    config = tmp_path / "stage.json"
    config.write_text("{}")
    r = CliRunner().invoke(app, ["train-shapes", "--config", str(config), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert r.output == (
        "error: train-shapes needs the lab, which a pip install of conceptattention does not include: "
        "from a clone of the repository, pip install -e lab\n"
    )
    assert not (tmp_path / "run").exists()
