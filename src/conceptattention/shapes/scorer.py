"""An analytic judge of shapes-world images: which coloured shapes does a picture show?

Pixels close to one of the four object colours form colour regions; each connected region bigger
than a minimum area is an object, classified by its geometry:

- fill ratio = area / bounding-box area: square ~1.0, circle ~pi/4 = 0.785, triangle ~0.5;
- a triangle (apex up) is also much narrower in its top third than in its bottom third.

Used to score generated samples against their captions; checked on rendered images in the tests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .world import COLOR_NAMES, COLORS

MIN_AREA = 40  # pixels; smaller specks are noise
COLOR_TOLERANCE = 0.22  # max RGB distance (0-1 scale) to a palette colour


@dataclass(frozen=True)
class Detected:
    color: str
    shape: str
    area: int


def components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected component labels ``[H, W]`` (0 = off, else the component's smallest pixel index + 1)."""
    h, w = mask.shape
    big = h * w + 1
    labels = torch.where(mask, torch.arange(1, h * w + 1, dtype=torch.long).view(h, w), torch.full((h, w), big))
    while True:
        padded = F.pad(labels[None, None].float(), (1, 1, 1, 1), value=float(big))[0, 0].long()
        neighbours = torch.stack([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                  padded[1:-1, :-2], padded[1:-1, 2:]]).amin(0)
        updated = torch.where(mask, neighbours, labels)
        if torch.equal(updated, labels):
            return torch.where(mask, labels, torch.zeros_like(labels))
        labels = updated


def classify(region: torch.Tensor) -> str:
    """Shape of one boolean region ``[H, W]``."""
    ys, xs = region.nonzero(as_tuple=True)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    height, width = int(bottom - top) + 1, int(right - left) + 1
    fill = region.sum().item() / (height * width)
    third = max(1, height // 3)
    top_width = region[top : top + third].sum(1).float().mean().item()
    bottom_width = region[bottom - third + 1 : bottom + 1].sum(1).float().mean().item()
    if fill < 0.66 or top_width < 0.6 * bottom_width:
        return "triangle"
    if fill > 0.9:
        return "square"
    return "circle"


def detect(image: torch.Tensor) -> list[Detected]:
    """Objects in one image ``[3, H, W]`` in [0, 1], largest first."""
    palette = torch.tensor([COLORS[c] for c in COLOR_NAMES], dtype=torch.float32) / 255.0  # [C, 3]
    pixels = image.float().cpu().permute(1, 2, 0)  # [H, W, 3]
    dist = (pixels[:, :, None, :] - palette[None, None]).norm(dim=-1)  # [H, W, C]
    best, index = dist.min(-1)
    found = []
    for c, name in enumerate(COLOR_NAMES):
        mask = (index == c) & (best < COLOR_TOLERANCE)
        if mask.sum() < MIN_AREA:
            continue
        labels = components(mask)
        ids, counts = labels[labels > 0].unique(return_counts=True)
        for lab, count in zip(ids.tolist(), counts.tolist()):
            if count >= MIN_AREA:
                found.append(Detected(name, classify(labels == lab), count))
    return sorted(found, key=lambda d: -d.area)


@dataclass
class Score:
    objects: int  # objects the caption asks for
    colors_right: int  # of them, how many have a region of their colour
    shapes_right: int  # of them, how many have a region of their colour and shape
    exact: bool  # the image shows exactly the captioned objects


def score(image: torch.Tensor, wanted: list[tuple[str, str]]) -> Score:
    """Compare one image with its caption's (colour, shape) list."""
    found = detect(image)
    have_colors = Counter(d.color for d in found)
    have_pairs = Counter((d.color, d.shape) for d in found)
    want_colors = Counter(c for c, _ in wanted)
    want_pairs = Counter(wanted)
    colors_right = sum(min(n, have_colors[c]) for c, n in want_colors.items())
    shapes_right = sum(min(n, have_pairs[p]) for p, n in want_pairs.items())
    return Score(len(wanted), colors_right, shapes_right, have_pairs == want_pairs)

