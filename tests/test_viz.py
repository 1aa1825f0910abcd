"""Pictures (viz.py): the segmentation panel and its legend colours, the concept grid, the heat-map colours and
the colour bar, with and without matplotlib."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conceptattention import viz
from conceptattention.errors import ConceptAttentionError
from conceptattention.viz import colorize, concept_grid, label_colors, overlay_with_colorbar, segmentation


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


# ----- heat-map colours and the colour bar -----------------------------------------------------------------------
def _values() -> np.ndarray:
    v = np.random.default_rng(3).random((17, 23)).astype(np.float32)
    v[0, :5] = [0.0, 1.0, 0.125, 0.5, 0.999]
    return v


def _old_ramp(v: np.ndarray) -> np.ndarray:
    """The five-point ramp, written out independently: piecewise linear between anchors at 0, 1/4, ... 1."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    x = np.clip(v.astype(np.float64), 0, 1)
    return np.stack([np.interp(x, np.linspace(0, 1, 5), anchors[:, c]) for c in range(3)], -1)


def test_colorize_uses_matplotlibs_colour_map():
    matplotlib = pytest.importorskip("matplotlib")
    v = _values()
    for name in (None, "viridis", "magma", "gray"):
        got = colorize(v) if name is None else colorize(v, cmap=name)
        assert got.dtype == np.uint8 and got.shape == (17, 23, 3)
        want = matplotlib.colormaps[name or "viridis"](v.astype(np.float64))[..., :3] * 255.0
        assert np.abs(got.astype(np.float64) - want).max() <= 1.0, name
    # the real viridis, not the five-point ramp (they differ between the ramp's anchors)
    assert np.abs(colorize(v).astype(int) - _old_ramp(v).astype(int)).max() > 3
    out_of_range = colorize(np.array([[-3.0, 7.0]]))
    assert (out_of_range[0, 0] == colorize(np.array([[0.0]]))[0, 0]).all()
    assert (out_of_range[0, 1] == colorize(np.array([[1.0]]))[0, 0]).all()
    viz._colormap.cache_clear()
    colorize(v, "magma")
    colorize(v, "magma")
    assert viz._colormap.cache_info().hits >= 1 and viz._colormap.cache_info().misses == 1  # looked up once
    with pytest.raises(ConceptAttentionError, match="unknown colour map 'no-such-map'"):
        colorize(v, "no-such-map")


def test_colorize_without_matplotlib_is_the_five_point_ramp(no_matplotlib):
    v = _values()
    got = colorize(v)
    assert got.dtype == np.uint8 and got.shape == (17, 23, 3)
    assert np.abs(got.astype(np.float64) - _old_ramp(v)).max() <= 1.0
    assert got[0, 0].tolist() == [68, 1, 84] and got[0, 1].tolist() == [253, 231, 37]
    assert got[0, 3].tolist() == [33, 145, 140]  # the middle anchor, exactly
    assert np.array_equal(colorize(v, cmap="viridis"), got)  # the default, by name
    with pytest.raises(ConceptAttentionError, match=r'needs matplotlib: pip install "conceptattention\[plot\]"'):
        colorize(v, cmap="magma")


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


def test_colour_bar_without_matplotlib_is_the_five_point_ramp(no_matplotlib):
    bar = _check_bar_and_overlay(None, _old_ramp)
    assert bar[0, 0].tolist() == [253, 231, 37] and bar[-1, 0].tolist() == [68, 1, 84]


def test_importing_viz_does_not_import_matplotlib():
    code = "import sys, conceptattention.viz; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
