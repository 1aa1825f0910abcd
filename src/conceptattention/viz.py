"""Pictures: heat-map overlays with a colour bar, a labelled grid, and an argmax segmentation with a legend."""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# A perceptually ordered dark-blue -> yellow ramp (viridis-like anchor points).
_RAMP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] ``[H, W]`` -> RGB uint8 ``[H, W, 3]``."""
    v = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_RAMP) - 2)
    frac = (v - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def normalise(m: torch.Tensor | np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (a constant map becomes zeros)."""
    a = m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, np.float32)
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def overlay(image: Image.Image, saliency: torch.Tensor | np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The image blended with its saliency heat map (map resized to the image if needed)."""
    heat = colorize(normalise(saliency))
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


def overlay_with_colorbar(image: Image.Image, saliency: torch.Tensor | np.ndarray, label: str,
                          longer: int = 384) -> Image.Image:
    """A titled overlay of one concept's map with a colour bar giving the map's value range."""
    a = saliency.detach().float().cpu().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency)
    lo, hi = float(a.min()), float(a.max())
    size = _display_size(image, longer)
    heat = overlay(image.convert("RGB").resize(size, Image.NEAREST), a)
    title_h, bar_w, pad, text_w = 26, 16, 8, 64
    canvas = Image.new("RGB", (size[0] + pad + bar_w + text_w, size[1] + title_h), "white")
    canvas.paste(heat, (0, title_h))
    ramp = colorize(np.linspace(1.0, 0.0, size[1])[:, None].repeat(bar_w, 1))
    canvas.paste(Image.fromarray(ramp), (size[0] + pad, title_h))
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((4, 5), label, fill="black", font=font)
    x = size[0] + pad + bar_w + 4
    draw.text((x, title_h), f"{hi:.3g}", fill="black", font=font)
    draw.text((x, title_h + size[1] - 16), f"{lo:.3g}", fill="black", font=font)
    return canvas


# Distinct, colour-blind-friendly colours for segmentation labels (Okabe-Ito, then Tableau).
_PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
            (204, 121, 167), (0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
            (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def label_colors(k: int) -> list[tuple[int, int, int]]:
    return [_PALETTE[i % len(_PALETTE)] for i in range(k)]


def segmentation(image: Image.Image, maps: torch.Tensor, concepts: list[str], longer: int = 384,
                 alpha: float = 0.6) -> Image.Image:
    """Argmax over concepts per pixel, coloured and blended over the image, with a legend."""
    labels = maps.float().argmax(0).cpu().numpy()
    colors = np.array(label_colors(len(concepts)), dtype=np.uint8)
    size = _display_size(image, longer)
    seg = Image.fromarray(colors[labels]).resize(size, Image.NEAREST)
    blended = Image.blend(image.convert("RGB").resize(size, Image.BILINEAR), seg, alpha)
    font, row = _font(), 20
    share = np.bincount(labels.ravel(), minlength=len(concepts)) / labels.size
    legend_w = 24 + max(len(f"{c}  100%") for c in concepts) * 8
    canvas = Image.new("RGB", (size[0] + legend_w, max(size[1], row * len(concepts) + 8)), "white")
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (concept, color) in enumerate(zip(concepts, colors.tolist())):
        y = 6 + k * row
        draw.rectangle([size[0] + 6, y, size[0] + 20, y + 14], fill=tuple(color), outline="black")
        draw.text((size[0] + 26, y), f"{concept}  {100 * share[k]:.0f}%", fill="black", font=font)
    return canvas


def concept_grid(image: Image.Image, maps: torch.Tensor, concepts: list[str], cell: int = 192) -> Image.Image:
    """One row: the image, then one labelled overlay per concept (aspect ratio kept)."""
    label_h = 22
    size = _display_size(image, cell)
    tiles = [image.convert("RGB").resize(size, Image.NEAREST)]
    tiles += [overlay(image, maps[k]).resize(size, Image.NEAREST) for k in range(len(concepts))]
    grid = Image.new("RGB", ((size[0] + 4) * len(tiles), size[1] + label_h), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    for i, (tile, label) in enumerate(zip(tiles, ["image", *concepts])):
        grid.paste(tile, (i * (size[0] + 4), label_h))
        draw.text((i * (size[0] + 4) + 4, 4), label, fill="black", font=font)
    return grid
