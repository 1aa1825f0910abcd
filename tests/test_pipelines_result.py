"""A result (pipelines/result.py): indexed by concept, shown as a picture, plotted with matplotlib; saved as a
folder with file names safe for any concept and the raw maps beside the saliency."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conceptattention.errors import ConceptAttentionError
from conceptattention.pipelines import load_pipeline
from conceptattention.pipelines.result import ConceptResult, overlay_names
from conceptattention.viz import concept_grid

# Concepts neither in alphabetical nor in any other natural order, so that a map picked by a wrong index
# (sorted names, reversed, off by one) is another concept's map.
CONCEPTS = ["zebra", "apple", "mango", "kiwi"]
H, W, h, w = 24, 40, 3, 5


def made_result() -> ConceptResult:
    g = torch.Generator().manual_seed(0)
    maps = torch.stack([torch.full((H, W), float(k)) + torch.rand(H, W, generator=g) for k in range(4)])
    token_maps = torch.stack([torch.full((h, w), 10.0 * k) + torch.rand(h, w, generator=g) for k in range(4)])
    image = Image.fromarray((np.arange(H * W * 3).reshape(H, W, 3) % 251).astype(np.uint8))
    return ConceptResult(
        image=image, maps=maps, token_maps=token_maps, concepts=list(CONCEPTS), settings={"model": "made-up"}
    )


def test_indexing_by_concept_gives_that_concepts_map():
    result = made_result()
    for k, concept in enumerate(CONCEPTS):
        m = result[concept]
        assert m.shape == (H, W) and m.dtype == torch.float32
        assert torch.equal(m, result.maps[k])
        assert k <= float(m.min()) and float(m.max()) < k + 1  # built so: map k lies in [k, k + 1)
        t = result.token_map(concept)
        assert t.shape == (h, w) and torch.equal(t, result.token_maps[k])
    assert result["mango"].mean() == pytest.approx(2.5, abs=0.1)  # the third concept, not the third in sorted order
    assert "kiwi" in result and "Kiwi" not in result and "dog" not in result and 1 not in result
    assert len(result) == 4
    assert list(result) == CONCEPTS and [c for c in result] == CONCEPTS
    assert {c: float(result[c].mean()) for c in result}.keys() == set(CONCEPTS)


def test_an_unknown_concept_is_a_key_error_listing_the_concepts():
    result = made_result()
    with pytest.raises(KeyError) as err:
        result["dog"]
    message = str(err.value)
    assert "'dog'" in message and all(f"'{c}'" in message for c in CONCEPTS)
    with pytest.raises(KeyError, match="zebra"):
        result.token_map("Zebra")  # names are matched exactly
    with pytest.raises(TypeError, match=r"result\.maps\[k\]"):
        result[0]  # by name only; an index says where the k-th map is


def test_indexing_a_generated_result():
    pipe = load_pipeline("shapes")
    concepts = ["grass", "square", "circle"]
    res = pipe.generate("a red circle and a blue square on grass", concepts, steps=2)
    assert len(res) == 3 and list(res) == concepts
    for k, concept in enumerate(concepts):
        assert res[concept].shape == (res.image.size[1], res.image.size[0])
        assert torch.equal(res[concept], res.maps[k]) and torch.equal(res.token_map(concept), res.token_maps[k])
    assert not torch.equal(res["grass"], res["circle"])
    text = repr(res)
    assert "'grass'" in text and "model='shapes'" in text and "64x64" in text


def test_repr_is_short_and_shows_no_tensors():
    result = made_result()
    text = repr(result)
    assert text == (
        "ConceptResult(concepts=['zebra', 'apple', 'mango', 'kiwi'], image=40x24, token_grid=3x5, model='made-up')"
    )
    many = ConceptResult(
        Image.new("RGB", (8, 8)), torch.rand(30, 8, 8), torch.rand(30, 2, 2), [f"concept {k}" for k in range(30)]
    )
    text = repr(many)
    assert "(30 concepts)" in text and "'concept 29'" in text and "'concept 12'" not in text
    assert "tensor" not in text and len(text) < 200 and "model=None" in text


def _decode_png(data: bytes) -> Image.Image:
    assert isinstance(data, bytes) and data[:8] == b"\x89PNG\r\n\x1a\n"
    picture = Image.open(io.BytesIO(data))
    picture.load()
    assert picture.format == "PNG"
    return picture


def test_repr_png_is_the_concept_grid():
    result = made_result()
    picture = _decode_png(result._repr_png_())
    grid = concept_grid(result.image, result.maps, result.concepts)
    assert picture.size == grid.size == (5 * (192 + 4), 192 * H // W + 22)  # the image and 4 overlays, one row
    assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(grid))


def test_repr_png_needs_no_matplotlib(no_matplotlib):
    result = made_result()
    picture = _decode_png(result._repr_png_())
    assert picture.size == concept_grid(result.image, result.maps, result.concepts).size


def test_plot_is_a_figure_of_titled_panels():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    pyplot_before = "matplotlib.pyplot" in sys.modules
    result = made_result()
    fig = result.plot()
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1 + len(CONCEPTS)
    assert [ax.get_title() for ax in fig.axes] == ["image", *CONCEPTS]
    for ax, concept in zip(fig.axes[1:], CONCEPTS):  # each overlay is that concept's map over the image
        assert len(ax.images) == 2
        np.testing.assert_array_equal(np.asarray(ax.images[1].get_array()), result[concept].numpy())
    assert fig.axes[0].get_subplotspec().get_geometry()[:2] == (2, 4)  # 5 panels, up to 4 a row

    some = result.plot(concepts=["mango", "zebra"], cols=1, cmap="magma")
    assert [ax.get_title() for ax in some.axes] == ["image", "mango", "zebra"]
    assert some.axes[0].get_subplotspec().get_geometry()[:2] == (3, 1)
    assert some.axes[1].images[1].get_cmap().name == "magma"
    np.testing.assert_array_equal(np.asarray(some.axes[1].images[1].get_array()), result.maps[2].numpy())
    one = result.plot("kiwi")  # one name, not its letters
    assert [ax.get_title() for ax in one.axes] == ["image", "kiwi"]

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # renders without any GUI backend
    assert _decode_png(buffer.getvalue()).size[0] > 0
    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules  # no pyplot: no backend chosen, no global figure state
    with pytest.raises(KeyError, match="apple"):
        result.plot(concepts=["dog"])
    with pytest.raises(ConceptAttentionError, match="cols"):
        result.plot(cols=0)


def test_plot_without_matplotlib_says_how_to_install_it(no_matplotlib):
    with pytest.raises(ConceptAttentionError) as err:
        made_result().plot()
    assert str(err.value) == 'result.plot() needs matplotlib: pip install "conceptattention[plot]"'


# ----- the output folder -----------------------------------------------------------------------------------------
def test_overlay_names_are_safe_distinct_and_avoid_reserved_files():
    names = overlay_names(["dog", "image", "a/b", "a_b", "café", "...", "Dog", "grid"])
    assert names[0] == "dog.png" and names[2] == "a_b.png" and names[4] == "café.png"
    assert len({n.lower() for n in names}) == len(names)  # also distinct on case-insensitive file systems
    assert not {n[:-4] for n in names} & {"image", "maps", "maps_raw", "grid", "segmentation", "result"}
    assert all("/" not in n and not n.startswith(".") for n in names)


def test_save_writes_every_file_for_awkward_concepts(tmp_path):
    concepts = ["sky", "image", "a/b", "a b"]
    maps = torch.rand(4, 48, 80).softmax(0)
    result = ConceptResult(
        Image.new("RGB", (80, 48), "gray"),
        maps,
        torch.rand(4, 3, 5),
        concepts,
        {"model": "test"},
        raw_token_maps=torch.randn(4, 3, 5),
    )
    written = result.save(tmp_path)
    info = json.loads((tmp_path / "result.json").read_text())
    for concept in concepts:
        assert (tmp_path / info["files"][f"overlay:{concept}"]).is_file()
    assert len({info["files"][f"overlay:{c}"] for c in concepts}) == 4
    np.testing.assert_array_equal(np.load(tmp_path / "maps_raw.npy"), result.raw_token_maps.numpy())
    assert Image.open(written["image"]).size == (80, 48)  # the image itself is untouched
