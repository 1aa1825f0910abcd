"""Pictures: heat-map overlays with a colour bar, a labelled grid, and an argmax segmentation with a legend."""

from __future__ import annotations

import colorsys
import functools
import math
import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import ConceptAttentionError

# A perceptually ordered dark-blue -> yellow ramp (viridis-like anchor points): the colour map when matplotlib
# is not installed.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)

#: The colour map of every heat map unless one is named.
DEFAULT_CMAP = "viridis"


@functools.lru_cache(maxsize=32)
def _colormap(name: str):
    """matplotlib's colour map called ``name``, or None without matplotlib (imported here, on first use, so
    importing this module stays cheap; the lookup is cached: matplotlib hands out a fresh copy each time)."""
    try:
        import matplotlib
    except ImportError:
        return None
    try:
        cmap = matplotlib.colormaps[name]
    except (KeyError, ValueError):
        raise ConceptAttentionError(
            f"unknown colour map {name!r}; give one of matplotlib's, such as viridis, magma, inferno, plasma, "
            "cividis, turbo or gray (list(matplotlib.colormaps) has them all)"
        ) from None
    cmap(np.zeros(1))  # build its lookup table now, not lazily in a later (maybe concurrent) call
    return cmap


def _ramp(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_RAMP) - 2)
    frac = (v - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def colorize(values: np.ndarray, cmap: str | None = None) -> np.ndarray:
    """Values in [0, 1] ``[H, W]`` -> RGB uint8 ``[H, W, 3]``.

    ``cmap`` names a matplotlib colour map (default viridis). Without matplotlib installed, the default is
    drawn with a built-in five-point viridis-like ramp, and naming another colour map is an error.
    """
    name = DEFAULT_CMAP if cmap is None else cmap
    if not isinstance(name, str):  # a matplotlib Colormap object itself
        colormap = name
    else:
        colormap = _colormap(name)
        if colormap is None:
            if name != DEFAULT_CMAP:
                raise ConceptAttentionError(
                    f'the colour map {name!r} needs matplotlib: pip install "conceptattention[plot]" '
                    f"(without it only the default, {DEFAULT_CMAP}, is available)"
                )
            return _ramp(values)
    v = np.asarray(values)
    v = np.clip(v if v.dtype.kind == "f" else v.astype(np.float32), 0.0, 1.0)  # integers are values, not indices
    return np.ascontiguousarray(colormap(v, bytes=True)[..., :3])


def normalise(m: torch.Tensor | np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (a constant map becomes zeros)."""
    a = m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, np.float32)
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def overlay(
    image: Image.Image, saliency: torch.Tensor | np.ndarray, alpha: float = 0.55, cmap: str | None = None
) -> Image.Image:
    """The image blended with its saliency heat map (map resized to the image if needed)."""
    heat = colorize(normalise(saliency), cmap)
    heat_img = Image.fromarray(heat).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat_img, alpha)


def safe_name(text: str) -> str:
    """A file-name stem for any concept: letters (any script), digits, '-' and '_' kept."""
    return re.sub(r"[^\w-]+", "_", text).strip("_.") or "concept"


def _display_size(image: Image.Image, longer: int) -> tuple[int, int]:
    """The image's size scaled so its longer side is ``longer`` (aspect ratio kept)."""
    w, h = image.size
    scale = longer / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def overlay_with_colorbar(
    image: Image.Image, saliency: torch.Tensor | np.ndarray, label: str, longer: int = 384, cmap: str | None = None
) -> Image.Image:
    """A titled overlay of one concept's map with a colour bar giving the map's value range (both in the
    colour map ``cmap``, see :func:`colorize`)."""
    a = saliency.detach().float().cpu().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency)
    lo, hi = float(a.min()), float(a.max())
    size = _display_size(image, longer)
    heat = overlay(image.convert("RGB").resize(size, Image.NEAREST), a, cmap=cmap)
    title_h, bar_w, pad, text_w = 26, 16, 8, 64
    canvas = Image.new("RGB", (size[0] + pad + bar_w + text_w, size[1] + title_h), "white")
    canvas.paste(heat, (0, title_h))
    ramp = colorize(np.linspace(1.0, 0.0, size[1])[:, None].repeat(bar_w, 1), cmap)
    canvas.paste(Image.fromarray(ramp), (size[0] + pad, title_h))
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((4, 5), label, fill="black", font=font)
    x = size[0] + pad + bar_w + 4
    draw.text((x, title_h), f"{hi:.3g}", fill="black", font=font)
    draw.text((x, title_h + size[1] - 16), f"{lo:.3g}", fill="black", font=font)
    return canvas


# Distinct, colour-blind-friendly colours for segmentation labels (Okabe-Ito, then Tableau).
_PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (0, 0, 0),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
# Beyond the palette: hues spaced by the golden ratio, cycling through these (saturation, value) bands so that
# neighbouring hues also differ in brightness.
_BANDS = [(0.85, 0.95), (0.65, 0.6), (0.45, 0.85), (0.95, 0.45)]


def _generated(i: int) -> tuple[int, int, int]:
    s, v = _BANDS[i % len(_BANDS)]
    r, g, b = colorsys.hsv_to_rgb((0.11 + i * 0.6180339887498949) % 1.0, s, v)
    return round(255 * r), round(255 * g), round(255 * b)


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def label_colors(k: int) -> list[tuple[int, int, int]]:
    """``k`` distinct label colours, never white (the background): the 18-colour palette, then generated hues
    kept as far from every colour already chosen as can be (the required gap shrinks only as they run out)."""
    colors = list(_PALETTE[:k])
    taken = set(colors) | {(255, 255, 255)}
    gap, i, misses = 48.0, 0, 0
    while len(colors) < k:
        if gap >= 1.0:
            candidate = _generated(i)
            i += 1
            far = min(_distance(candidate, c) for c in [*colors, (255, 255, 255)]) >= gap
            if candidate in taken or not far:
                misses += 1
                if misses >= 4 * len(_BANDS) * 16:  # none left this far apart: accept closer ones
                    gap, misses = gap / 2, 0
                continue
        else:  # the generated hues are used up: walk the whole colour cube (an odd stride visits every code once)
            code = (i * 2654435761) % (1 << 24)
            i += 1
            candidate = (code >> 16, (code >> 8) & 255, code & 255)
            if candidate in taken:
                continue
        misses = 0
        colors.append(candidate)
        taken.add(candidate)
    return colors


def _legend_width(draw: ImageDraw.ImageDraw, lines: list[str], font) -> int:
    return 40 + max(int(math.ceil(draw.textlength(line, font=font))) for line in lines)


def segmentation(image: Image.Image, maps: torch.Tensor, concepts: list[str], longer: int = 384) -> Image.Image:
    """The image, beside it the argmax over concepts per pixel in solid label colours (each pixel exactly its
    concept's legend colour), then a legend of solid swatches with each concept's share of the pixels.

    Layout: image at x = 0, the segmentation at x = image width + 8, the legend after it (a swatch per
    row of 20 px from y = 6); the canvas grows with the number of concepts."""
    labels = maps.float().argmax(0).cpu().numpy()
    colors = np.array(label_colors(len(concepts)), dtype=np.uint8)
    size = _display_size(image, longer)
    seg = Image.fromarray(colors[labels]).resize(size, Image.NEAREST)
    font, row, gap = _font(), 20, 8
    share = np.bincount(labels.ravel(), minlength=len(concepts)) / labels.size
    lines = [f"{concept}  {100 * share[k]:.0f}%" for k, concept in enumerate(concepts)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 2 * size[0] + gap  # where the legend starts
    canvas = Image.new(
        "RGB", (left + _legend_width(measure, lines, font), max(size[1], row * len(concepts) + 8)), "white"
    )
    canvas.paste(image.convert("RGB").resize(size, Image.NEAREST), (0, 0))
    canvas.paste(seg, (size[0] + gap, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (line, color) in enumerate(zip(lines, colors.tolist())):
        y = 6 + k * row
        draw.rectangle([left + 5, y - 1, left + 21, y + 15], fill=(0, 0, 0))  # a 1-px frame, then the solid swatch
        draw.rectangle([left + 6, y, left + 20, y + 14], fill=tuple(color))
        draw.text((left + 28, y), line, fill="black", font=font)
    return canvas


def _clipped(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, shortened in the middle with an ellipsis to fit ``width`` pixels (both ends stay readable:
    "a very long concept 12" -> "a very…ept 12")."""
    if draw.textlength(text, font=font) <= width:
        return text
    head, tail = text[: (len(text) + 1) // 2], text[(len(text) + 1) // 2 :]
    while head or tail:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
        if draw.textlength(head + "…" + tail, font=font) <= width:
            break
    return head + "…" + tail


def concept_grid(
    image: Image.Image,
    maps: torch.Tensor,
    concepts: list[str],
    cell: int = 192,
    columns: int = 8,
    cmap: str | None = None,
) -> Image.Image:
    """The image, then one labelled overlay per concept (aspect ratio kept), in rows of at most ``columns``
    tiles: a few concepts make one row, many wrap into more rows instead of an ever wider picture.
    ``cmap``: the heat maps' colour map (see :func:`colorize`)."""
    if columns < 1:
        raise ValueError("columns must be at least 1")
    label_h = 22
    size = _display_size(image, cell)
    tiles = [image.convert("RGB").resize(size, Image.NEAREST)]
    tiles += [overlay(image, maps[k], cmap=cmap).resize(size, Image.NEAREST) for k in range(len(concepts))]
    across = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / across)
    step_x, step_y = size[0] + 4, size[1] + label_h
    grid = Image.new("RGB", (step_x * across, step_y * rows), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    for i, (tile, label) in enumerate(zip(tiles, ["image", *concepts])):
        x, y = (i % across) * step_x, (i // across) * step_y
        grid.paste(tile, (x, y + label_h))
        draw.text((x + 4, y + 4), _clipped(draw, label, font, size[0] - 4), fill="black", font=font)
    return grid
