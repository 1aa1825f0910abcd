"""Pictures: heat-map overlays and a labelled grid of image + one overlay per concept."""

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
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "concept"


def concept_grid(image: Image.Image, maps: torch.Tensor, concepts: list[str], cell: int = 192) -> Image.Image:
    """One row: the image, then one labelled overlay per concept."""
    label_h = 22
    tiles = [image.convert("RGB").resize((cell, cell), Image.NEAREST)]
    tiles += [overlay(image, maps[k]).resize((cell, cell), Image.NEAREST) for k in range(len(concepts))]
    grid = Image.new("RGB", (cell * len(tiles), cell + label_h), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (tile, label) in enumerate(zip(tiles, ["image", *concepts])):
        grid.paste(tile, (i * cell, label_h))
        draw.text((i * cell + 4, 4), label, fill="black", font=font)
    return grid
