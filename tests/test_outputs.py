"""The output folder: file names for any concept, raw maps consistent with the saliency, pictures."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from conceptattention.pipelines import load_pipeline
from conceptattention.pipelines.result import ConceptResult, overlay_names
from conceptattention.viz import label_colors, segmentation


def test_overlay_names_are_safe_distinct_and_avoid_reserved_files():
    names = overlay_names(["dog", "image", "a/b", "a_b", "café", "...", "Dog", "grid"])
    assert names[0] == "dog.png" and names[2] == "a_b.png" and names[4] == "café.png"
    assert len({n.lower() for n in names}) == len(names)  # also distinct on case-insensitive file systems
    assert not {n[:-4] for n in names} & {"image", "maps", "maps_raw", "grid", "segmentation", "result"}
    assert all("/" not in n and not n.startswith(".") for n in names)


def test_save_writes_every_file_for_awkward_concepts(tmp_path):
    concepts = ["sky", "image", "a/b", "a b"]
    maps = torch.rand(4, 48, 80).softmax(0)
    result = ConceptResult(Image.new("RGB", (80, 48), "gray"), maps, torch.rand(4, 3, 5), concepts,
                           {"model": "test"}, raw_token_maps=torch.randn(4, 3, 5))
    written = result.save(tmp_path)
    info = json.loads((tmp_path / "result.json").read_text())
    for concept in concepts:
        assert (tmp_path / info["files"][f"overlay:{concept}"]).is_file()
    assert len({info["files"][f"overlay:{c}"] for c in concepts}) == 4
    np.testing.assert_array_equal(np.load(tmp_path / "maps_raw.npy"), result.raw_token_maps.numpy())
    assert Image.open(written["image"]).size == (80, 48)  # the image itself is untouched


def test_segmentation_colours_follow_the_argmax():
    maps = torch.zeros(3, 4, 6)
    maps[0, :, :2], maps[1, :, 2:4], maps[2, :, 4:] = 1, 1, 1
    seg = np.asarray(segmentation(Image.new("RGB", (6, 4), "black"), maps, ["a", "b", "c"], longer=60, alpha=1.0))
    colors = label_colors(3)
    assert tuple(seg[20, 5]) == colors[0] and tuple(seg[20, 30]) == colors[1] and tuple(seg[20, 55]) == colors[2]


def test_raw_maps_are_the_scores_before_the_softmax():
    """With one layer read, the saliency is exactly the softmax over concepts of the raw scores."""
    pipe = load_pipeline("shapes")
    res = pipe.encode(torch.rand(3, 64, 64), ["circle", "square", "sky"], caption="a red circle in the sky",
                      layers=[4], samples=1)
    grid = pipe.model.grid  # tokens per side of the shipped model (16 at 4x4 patches)
    assert res.raw_token_maps.shape == res.token_maps.shape == (3, grid, grid)
    torch.testing.assert_close(res.raw_token_maps.softmax(0), res.token_maps, rtol=1e-5, atol=1e-6)
