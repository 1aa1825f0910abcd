"""The output folder: file names for any concept, raw maps consistent with the saliency, pictures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conceptattention import viz
from conceptattention.errors import ConceptAttentionError
from conceptattention.pipelines import load_pipeline
from conceptattention.pipelines.images import fit_square, open_image
from conceptattention.pipelines.result import ConceptResult, overlay_names
from conceptattention.viz import concept_grid, label_colors, overlay_with_colorbar, segmentation


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


def test_segmentation_panel_is_solid_legend_colours_beside_the_image():
    maps = torch.zeros(3, 4, 6)
    maps[0, :, :2], maps[1, :, 2:4], maps[2, :, 4:] = 1, 1, 1
    image = Image.new("RGB", (6, 4), (30, 60, 90))
    seg = np.asarray(segmentation(image, maps, ["a", "b", "c"], longer=60))
    colors = label_colors(3)
    assert seg.shape[0] == 3 * 20 + 8 and seg.shape[1] > 128  # a legend row per concept, right of both panels
    assert (seg[:40, :60] == (30, 60, 90)).all()  # the image itself, untouched, on the left
    panel = seg[:40, 68:128]  # then the segmentation: exactly the label colours, no blend with the image
    assert (panel[:, :20] == colors[0]).all() and (panel[:, 20:40] == colors[1]).all()
    assert (panel[:, 40:] == colors[2]).all()
    for k, color in enumerate(colors):  # the legend: a solid swatch per concept, in the same colour
        swatch = seg[6 + 20 * k + 1 : 6 + 20 * k + 14, 128 + 7 : 128 + 20]
        assert (swatch == color).all(), k


def test_label_colours_stay_distinct_for_many_concepts():
    for k in (1, 18, 19, 40, 120):
        colors = label_colors(k)
        assert len(colors) == k and len(set(colors)) == k and (255, 255, 255) not in colors
        assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colors)
    forty = label_colors(40)
    assert forty[:18] == label_colors(18)  # the palette first, unchanged
    gaps = [np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(forty[18:], 18) for b in forty[:i]]
    assert min(gaps) >= 30  # the generated colours are well apart from every earlier one, not just unequal

    # a segmentation of 40 concepts, each winning one column: every column's colour is its legend colour
    maps = torch.eye(40)[:, None, :].repeat(1, 2, 1)  # [K=40, h=2, w=40]: concept k wins column k
    seg = np.asarray(segmentation(Image.new("RGB", (40, 2), "gray"), maps, [f"c{k}" for k in range(40)], longer=40))
    assert seg.shape[0] == 40 * 20 + 8  # the legend makes the canvas taller, one row per concept
    panel = seg[:2, 48:88]
    assert [tuple(panel[0, k]) for k in range(40)] == forty
    legend = [tuple(seg[6 + 20 * k + 7, 88 + 13]) for k in range(40)]
    assert legend == forty


def test_concept_grid_wraps_many_concepts_into_rows():
    image = Image.new("RGB", (64, 64), "gray")
    few = concept_grid(image, torch.rand(3, 8, 8), ["a", "b", "c"])
    assert few.size == (4 * (192 + 4), 192 + 22)  # a few concepts: one row, as before
    many = concept_grid(image, torch.rand(200, 8, 8), [f"concept number {k}" for k in range(200)])
    rows = -(-201 // 8)  # the image and 200 overlays, 8 tiles a row
    assert many.size == (8 * (192 + 4), rows * (192 + 22))
    grid = np.asarray(many)
    assert (grid[22 : 22 + 192, :192] == 128).all()  # the image first, top left
    last = 201 - 8 * (rows - 1)  # the last row holds one tile, the rest of it is blank
    x, y = last * (192 + 4), (rows - 1) * (192 + 22) + 22
    assert not (grid[y : y + 192, :192] == 255).all() and (grid[y:, x:] == 255).all()
    wide = concept_grid(Image.new("RGB", (128, 32)), torch.rand(9, 4, 16), list("abcdefghi"), columns=4)
    assert wide.size == (4 * (192 + 4), 3 * (48 + 22))  # aspect ratio kept, 10 tiles in rows of 4


def test_16_bit_and_float_images_keep_their_values(tmp_path):
    gradient = (np.arange(48 * 40).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246 across the image
    path = tmp_path / "gray16.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode == "I;16"  # a real 16-bit PNG
    expected = np.round(gradient / 257.0)
    for source in (
        path,
        Image.open(path),
        gradient,
        torch.from_numpy(gradient.astype(np.int32)),
        Image.frombytes("I;16B", (48, 40), gradient.astype(">u2").tobytes()),
        Image.fromarray(gradient.astype(np.int32)),  # PIL mode "I" (32-bit) with 16-bit values
        Image.fromarray((gradient / 65535.0).astype(np.float32)),
    ):  # mode "F" in [0, 1]
        rgb = np.asarray(open_image(source)).astype(int)
        assert rgb.shape == (40, 48, 3) and (rgb[..., 0] == rgb[..., 2]).all()
        assert np.abs(rgb[..., 0] - expected).max() <= 1, type(source)
        assert rgb.min() == 0 and rgb.max() >= 252  # not a constant (all white) image
    wide = Image.fromarray((gradient.astype(np.int32) - 40000) * 1000)  # "I" beyond 16 bits: min-max
    rgb = np.asarray(open_image(wide))[..., 0].astype(int)
    span = (gradient.astype(float) - gradient.min()) / (gradient.max() - gradient.min()) * 255
    assert np.abs(rgb - span).max() <= 1
    hdr = Image.fromarray((gradient / 1000.0 - 10).astype(np.float32))  # "F" outside [0, 1]: min-max
    assert np.abs(np.asarray(open_image(hdr))[..., 0].astype(int) - span).max() <= 1
    small = np.arange(64, dtype=np.int64).reshape(8, 8) * 4  # other integers with 8-bit values stay as they are
    assert (np.asarray(open_image(small))[..., 1] == small).all()
    assert (np.asarray(open_image(np.eye(4, dtype=bool)))[..., 0] == np.eye(4) * 255).all()
    floats = np.linspace(0, 1, 3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)  # [C, H, W] in [0, 1]
    assert np.abs(np.asarray(open_image(floats)).astype(int) - np.round(floats.transpose(1, 2, 0) * 255)).max() <= 1


def test_every_pil_mode_converts_to_rgb():
    def pixel(img):
        return tuple(int(v) for v in np.asarray(open_image(img))[0, 0])

    assert pixel(Image.new("CMYK", (4, 4), (0, 255, 255, 0))) == (255, 0, 0)  # no cyan ink: red
    assert pixel(Image.new("CMYK", (4, 4), (0, 0, 0, 255))) == (0, 0, 0)
    assert pixel(Image.new("1", (4, 4), 1)) == (255, 255, 255) and pixel(Image.new("1", (4, 4), 0)) == (0, 0, 0)
    assert pixel(Image.new("L", (4, 4), 77)) == (77, 77, 77)
    ycc = Image.new("RGB", (4, 4), (200, 30, 90)).convert("YCbCr")
    assert np.abs(np.subtract(pixel(ycc), (200, 30, 90))).max() <= 3
    assert pixel(Image.new("LA", (4, 4), (0, 0))) == (255, 255, 255)  # fully transparent: the white background
    assert pixel(Image.new("LA", (4, 4), (0, 255))) == (0, 0, 0)
    assert np.abs(np.subtract(pixel(Image.new("RGBA", (4, 4), (0, 0, 0, 128))), (127, 127, 127))).max() <= 1
    assert np.abs(np.subtract(pixel(Image.new("La", (4, 4), (0, 128))), (127, 127, 127))).max() <= 1
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    assert pixel(palette) == (0, 0, 255)
    palette.info["transparency"] = 1  # palette entry 1 transparent
    assert pixel(palette) == (255, 255, 255)
    rgba_palette = Image.new("P", (4, 4), 0)
    rgba_palette.putpalette([0, 0, 0, 0], "RGBA")  # a palette with alpha: entry 0 fully transparent
    assert pixel(rgba_palette) == (255, 255, 255)
    keyed = Image.new("RGB", (4, 4), (10, 20, 30))
    keyed.info["transparency"] = (10, 20, 30)  # a colour key (PNG tRNS)
    assert pixel(keyed) == (255, 255, 255)
    assert pixel(Image.new("HSV", (4, 4), (0, 255, 255))) == (255, 0, 0)
    assert min(pixel(Image.new("LAB", (4, 4), (255, 128, 128)))) >= 250  # L = 100, a = b = 0: white


def test_image_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(ConceptAttentionError, match="is a directory, not an image file: .*"):
        open_image(tmp_path)
    with pytest.raises(ConceptAttentionError, match="image file not found: .*missing.png"):
        open_image(tmp_path / "missing.png")


def test_a_photo_s_exif_rotation_is_applied(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    Image.fromarray(wide).save(tmp_path / "phone.png", exif=exif)
    shown = open_image(tmp_path / "phone.png")
    assert shown.size == (20, 40)  # displayed upright: 20 wide, 40 tall
    top = np.asarray(shown)[:20]
    assert (top == (255, 0, 0)).all()  # the red left half is now on top


def test_fit_square_center_crops_before_resizing():
    image = np.zeros((200, 300, 3), np.uint8)
    image[:, :50], image[:, 50:250], image[:, 250:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    pixels, done = fit_square(Image.fromarray(image), 64)
    assert pixels.shape == (3, 64, 64) and done == "center-crop 300x200 to 200x200, resized to 64x64"
    assert torch.equal(pixels, torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 64, 64))  # only the centre
    tall = fit_square(Image.fromarray(np.zeros((65, 64, 3), np.uint8)), 64)[1]
    assert tall == "center-crop 64x65 to 64x64"
    assert fit_square(Image.new("RGB", (128, 128)), 64)[1] == "resized 128x128 to 64x64"
    assert fit_square(Image.new("RGB", (64, 64)), 64)[1] == "unchanged (64x64)"


def test_raw_maps_are_the_scores_before_the_softmax():
    """With one layer read, the saliency is exactly the softmax over concepts of the raw scores."""
    pipe = load_pipeline("shapes")
    res = pipe.encode(
        torch.rand(3, 64, 64), ["circle", "square", "sky"], caption="a red circle in the sky", layers=[4], samples=1
    )
    grid = pipe.model.grid  # tokens per side of the shipped model (16 at 4x4 patches)
    assert res.raw_token_maps.shape == res.token_maps.shape == (3, grid, grid)
    torch.testing.assert_close(res.raw_token_maps.softmax(0), res.token_maps, rtol=1e-5, atol=1e-6)


def _bar_and_overlay(cmap):
    """overlay_with_colorbar of a left-to-right ramp over a gray 64x64 image: its colour bar ``[64, 16, 3]``
    (y 26.., x 72..) and its overlay ``[64, 64, 3]`` (y 26.., x 0..), as ints."""
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))
    canvas = np.asarray(
        overlay_with_colorbar(Image.new("RGB", (64, 64), (128, 128, 128)), ramp, "x", longer=64, cmap=cmap)
    ).astype(int)
    return canvas[26:90, 72:88], canvas[26:90, :64]


def _check_bar_and_overlay(cmap, colours_of):
    """The colour bar runs from the top colour (the map's maximum) down to the bottom one, and the overlay is
    the image blended (0.55) with the same colours: ``colours_of(values)`` -> ``[N, 3]`` floats in 0..255."""
    bar, heat = _bar_and_overlay(cmap)
    assert (bar == bar[:, :1]).all()  # one colour per row
    assert np.abs(bar[:, 0] - colours_of(np.linspace(1.0, 0.0, 64))).max() <= 1
    expected = 0.45 * 128 + 0.55 * colours_of(np.linspace(0.0, 1.0, 64))  # column j holds the value j / 63
    assert np.abs(heat - expected[None]).max() <= 2
    return bar


def test_colour_bar_uses_the_overlays_colour_map():
    matplotlib = pytest.importorskip("matplotlib")

    def colours(name):
        return lambda v: matplotlib.colormaps[name](v)[:, :3] * 255.0

    magma = _check_bar_and_overlay("magma", colours("magma"))
    default = _check_bar_and_overlay(None, colours("viridis"))
    assert np.abs(magma - default).max() > 50  # the colour map named is the one drawn


def test_colour_bar_without_matplotlib_is_the_five_point_ramp(monkeypatch):
    viz._colormap.cache_clear()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    try:
        bar = _check_bar_and_overlay(
            None, lambda v: np.stack([np.interp(v, np.linspace(0, 1, 5), anchors[:, c]) for c in range(3)], -1)
        )
    finally:
        viz._colormap.cache_clear()
    assert bar[0, 0].tolist() == [253, 231, 37] and bar[-1, 0].tolist() == [68, 1, 84]


def test_importing_viz_does_not_import_matplotlib():
    code = "import sys, conceptattention.viz; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
