"""The shapes pipeline (pipelines/shapes.py) on a tiny model: generate and encode, batched noise draws equal
the mean of single runs, the sampler's noise levels, a non-square image centre-cropped, bad input; the raw maps of
the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptattention import ConceptAttentionError
from conceptattention.pipelines import load_pipeline
from conceptattention.pipelines.shapes import ShapesPipeline


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


def test_the_sampler_calls_the_model_at_the_shifted_noise_levels(tiny_dir):
    # the sampler calls the model at exactly sampling_times' noise levels: given shift, else the model's default
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


def test_raw_maps_are_the_scores_before_the_softmax():
    """With one layer read, the saliency is exactly the softmax over concepts of the raw scores."""
    pipe = load_pipeline("shapes")
    res = pipe.encode(
        torch.rand(3, 64, 64), ["circle", "square", "sky"], caption="a red circle in the sky", layers=[4], samples=1
    )
    grid = pipe.model.grid  # tokens per side of the shipped model (16 at 4x4 patches)
    assert res.raw_token_maps.shape == res.token_maps.shape == (3, grid, grid)
    torch.testing.assert_close(res.raw_token_maps.softmax(0), res.token_maps, rtol=1e-5, atol=1e-6)


# ----- bad input -------------------------------------------------------------------------------------------------
def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _one_pixel(path: Path) -> Path:
    Image.new("RGB", (1, 1)).save(path)
    return path


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda pipe, tmp: pipe.generate("a red circle", []), "concept list is empty", id="no-concepts"),
        pytest.param(
            lambda pipe, tmp: pipe.generate("a red circle", ["dog"]), "does not know 'dog'", id="unknown-word"
        ),
        pytest.param(
            lambda pipe, tmp: pipe.encode(_file(tmp / "broken.png", b"not an image at all"), ["circle"]),
            "cannot read .*broken.png as an image",
            id="not-an-image",
        ),
        pytest.param(
            lambda pipe, tmp: pipe.encode(_file(tmp / "empty.png", b""), ["circle"]), "image file is empty", id="empty"
        ),
        pytest.param(lambda pipe, tmp: pipe.encode(tmp / "missing.png", ["circle"]), "not found", id="missing"),
        pytest.param(
            lambda pipe, tmp: pipe.encode(_one_pixel(tmp / "one.png"), ["circle"]), "1x1 pixels", id="one-pixel"
        ),
        pytest.param(lambda pipe, tmp: ShapesPipeline.from_pretrained(tmp), "no shapes model in", id="no-model"),
    ],
)
def test_bad_inputs(call, match, tiny_dir, tmp_path):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    with pytest.raises(ConceptAttentionError, match=match):
        call(pipe, tmp_path)


def test_gray_and_transparent_images_are_encoded(tiny_dir, tmp_path):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    gray, rgba = tmp_path / "gray.png", tmp_path / "rgba.png"
    Image.new("L", (30, 50), 128).save(gray)
    Image.new("RGBA", (70, 40), (255, 0, 0, 128)).save(rgba)
    for path in (gray, rgba):
        assert pipe.encode(path, ["circle"]).maps.shape == (1, 64, 64)
