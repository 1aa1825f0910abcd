"""An analytic judge of shapes-world images: which coloured shapes does a picture show?

Pixels close to one of the four object colours form colour regions; each 4-connected region bigger
than a minimum area is an object. Its small holes (enclosed specks of other colours) are filled, and it is
compared with the three ideal shapes of the world, each drawn with the world's own geometry at the
region's centroid and with the region's area (circle: area pi r^2; square: (1.7 r)^2; upright triangle:
1.8 r^2, centroid 0.3 r below the box centre). The shape is the template that overlaps the region best
(IoU), provided that overlap is at least ``MIN_FIT``; a region that fits no template is ``"blob"`` and
never counts as a right shape.

Used to score generated samples against their captions; checked in the tests on rendered images,
on rendered images with pixel noise and with ragged, pitted outlines, and on shapes of no kind.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import world
from .world import COLOR_NAMES, COLORS

MIN_AREA = 40  # pixels; smaller specks are noise
COLOR_TOLERANCE = 0.22  # max RGB distance (0-1 scale) to a palette colour
MAX_HOLE, MAX_HOLE_SHARE = 6, 0.02  # enclosed pockets up to this size are specks, filled before fitting
MIN_FIT = 0.7  # least IoU with the best template for a region to count as that shape


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
        neighbours = torch.stack(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        ).amin(0)
        updated = torch.where(mask, neighbours, labels)
        if torch.equal(updated, labels):
            return torch.where(mask, labels, torch.zeros_like(labels))
        labels = updated


def fill_holes(region: torch.Tensor) -> torch.Tensor:
    """``region`` plus its small holes: pockets of outside pixels (4-connected) that the image border
    cannot reach and that are at most ``max(MAX_HOLE, MAX_HOLE_SHARE * area)`` pixels (specks, not a ring's
    middle)."""
    outside = components(~region)
    border = torch.cat([outside[0], outside[-1], outside[:, 0], outside[:, -1]]).unique()
    ids, counts = outside[outside > 0].unique(return_counts=True)
    limit = max(MAX_HOLE, MAX_HOLE_SHARE * region.sum().item())
    small = ids[(counts <= limit) & ~torch.isin(ids, border)]
    return region | torch.isin(outside, small)


def templates(region: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three ideal shapes with ``region``'s centroid and area, drawn with the world's geometry."""
    h, w = region.shape
    ys, xs = region.nonzero(as_tuple=True)
    area, cx, cy = float(len(ys)), xs.float().mean(), ys.float().mean()
    gy = torch.arange(h, dtype=torch.float32)[:, None]
    gx = torch.arange(w, dtype=torch.float32)[None, :]
    # r from the area (circle pi r^2, square (1.7 r)^2, triangle 1.8 r^2); a triangle's centroid lies
    # 0.3 r below its centre, a circle's and a square's on it
    out = {}
    for name, area_per_r2, centroid_drop in (("circle", math.pi, 0.0), ("square", 2.89, 0.0), ("triangle", 1.8, 0.3)):
        r = math.sqrt(area / area_per_r2)
        out[name] = world.inside(name, gx - cx, gy - (cy - centroid_drop * r), r)
    return out


def fits(region: torch.Tensor) -> dict[str, float]:
    """IoU of the (hole-filled) region with each shape's template."""
    region = fill_holes(region)
    return {name: ((region & t).sum() / (region | t).sum()).item() for name, t in templates(region).items()}


def classify(region: torch.Tensor) -> str:
    """Shape of one boolean region ``[H, W]``: the best-fitting template, or ``"blob"``."""
    scores = fits(region)
    best = max(scores, key=scores.get)
    return best if scores[best] >= MIN_FIT else "blob"


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


# why an asked-for object's shape is not right (see ``shape_errors``)
ERROR_KINDS = ("borrowed", "other_shape", "blob", "missing")


@dataclass
class Score:
    objects: int  # objects the caption asks for
    colors_right: int  # of them, how many have a region of their colour
    shapes_right: int  # of them, how many have a region of their colour and shape
    exact: bool  # the image shows exactly the captioned objects
    errors: tuple[str, ...] = ()  # one ERROR_KINDS entry per object whose shape is not right


def shape_errors(found: list[Detected], wanted: list[tuple[str, str]]) -> list[str]:
    """Why each asked-for object without a right region failed, one kind per such object.

    Regions of its colour left over after the right ones are taken (largest first) are the object's
    drawing: none left is ``"missing"``; a region fitting no shape is ``"blob"``; a shape the caption
    gives to another object is ``"borrowed"`` (a shape word bound to the wrong object);
    any other shape is ``"other_shape"``.
    """
    kinds, asked = [], {sh for _, sh in wanted}  # a wrong drawn shape that was asked for is another object's
    for color in dict.fromkeys(c for c, _ in wanted):
        leftovers = [d.shape for d in found if d.color == color]  # largest first
        unmatched = 0
        for _, sh in (p for p in wanted if p[0] == color):
            if sh in leftovers:
                leftovers.remove(sh)  # a right region: this object is drawn
            else:
                unmatched += 1
        for k in range(unmatched):
            drawn = leftovers[k] if k < len(leftovers) else None
            kinds.append(
                "missing"
                if drawn is None
                else "blob"
                if drawn == "blob"
                else "borrowed"
                if drawn in asked
                else "other_shape"
            )
    return kinds


def unbound_shapes_right(wanted: list[tuple[str, str]]) -> float:
    """Shapes a model that does not bind words would get right, in expectation: one that draws the objects
    in their colours and the caption's shapes on them in a random order (a bag of words). An object whose
    shape k is asked for c_k times among n objects gets it with probability c_k / n, so the sum over
    objects is sum_k c_k^2 / n: every one for one object or equal shapes, half of two different ones."""
    if not wanted:
        return 0.0
    counts = Counter(shape for _, shape in wanted)
    return sum(c * c for c in counts.values()) / len(wanted)


def score(image: torch.Tensor, wanted: list[tuple[str, str]]) -> Score:
    """Compare one image with its caption's (colour, shape) list."""
    found = detect(image)
    have_colors = Counter(d.color for d in found)
    have_pairs = Counter((d.color, d.shape) for d in found)
    want_colors = Counter(c for c, _ in wanted)
    want_pairs = Counter(wanted)
    colors_right = sum(min(n, have_colors[c]) for c, n in want_colors.items())
    shapes_right = sum(min(n, have_pairs[p]) for p, n in want_pairs.items())
    return Score(len(wanted), colors_right, shapes_right, have_pairs == want_pairs, tuple(shape_errors(found, wanted)))
