"""The shapes world: 64x64 images of 1-3 coloured shapes on a named background, with exact masks.

Everything about an image follows from ``(seed, index)``: each image draws a fixed number of
uniforms from one CPU generator (``rand(n, UNIFORMS)``), so image i of a set does not depend on how
many images are drawn with it, and the held-out benchmark is the same on every machine. Rendering
is vectorised in torch on any device.

Geometry (pixels, image 64x64, centre (cx, cy), size r drawn from [0.17, 0.28] * 64):
- ``circle``: radius r;
- ``square``: axis-aligned, side 1.7 r;
- ``triangle``: upright, apex up, height 1.8 r, base 2 r (apex at cy - 0.9 r, base at cy + 0.9 r).
Objects never overlap (their bounding circles keep 1 px apart) and lie fully inside the image.

Colours (exact RGB): red (220,40,40), green (40,180,60), blue (40,80,220), yellow (230,210,40).
Backgrounds: ``gray`` (uniform level in [0.25, 0.6]), ``grass`` (dark green blades), ``sky``
(light blue gradient with clouds).

Label map per pixel: 0 background, 1..3 the object slot. Every concept word's mask follows:
shape words, colour words, the background's name, and ``background`` (every non-object pixel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUNDS = ("gray", "grass", "sky")
#: Every concept word with a mask: the shapes, the colours, the background names and the word "background".
CONCEPTS: tuple[str, ...] = (*SHAPES, *COLOR_NAMES, *BACKGROUNDS, "background")
#: The data split, by seed: the held-out benchmark's scenes come from ``HELDOUT_SEED`` (training seeds are
#: derived so that they never equal it) and settings such as a model's default layers and sampler are chosen
#: on ``VALIDATION_SEED``, never on the held-out set.
HELDOUT_SEED = 20_250_204
VALIDATION_SEED = 31_337
MAX_OBJECTS = 3
R_RANGE = (0.17 * SIZE, 0.28 * SIZE)
CANDIDATES = 32  # placement tries per image

# Uniforms per image: count, per-slot (shape, colour, size) + placement tries (x, y per slot),
# background (kind, level, 6 texture numbers), caption (order x3, phrasing x2, single-word x2).
_U_SLOT = 3 * MAX_OBJECTS
_U_PLACE = CANDIDATES * MAX_OBJECTS * 2
_U_BG = 8
_U_CAPTION = 7
UNIFORMS = 1 + _U_SLOT + _U_PLACE + _U_BG + _U_CAPTION


@dataclass
class Scenes:
    """Parameters of n scenes (CPU tensors). Absent slots have ``present`` False."""

    present: torch.Tensor  # [n, 3] bool
    shape: torch.Tensor  # [n, 3] long, index into SHAPES
    color: torch.Tensor  # [n, 3] long, index into COLOR_NAMES
    center: torch.Tensor  # [n, 3, 2] float (x, y) pixels
    radius: torch.Tensor  # [n, 3] float
    background: torch.Tensor  # [n] long, index into BACKGROUNDS
    gray_level: torch.Tensor  # [n] float in [0.25, 0.6]
    texture: torch.Tensor  # [n, 6] float uniforms for the textures
    caption_u: torch.Tensor  # [n, 7] float uniforms for the caption

    def __len__(self) -> int:
        return self.present.shape[0]

    def select(self, index: torch.Tensor) -> Scenes:
        """The scenes at ``index`` (a 1-D tensor of positions), in that order."""
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in fields(Scenes)})

    @staticmethod
    def cat(parts: Sequence[Scenes]) -> Scenes:
        """The scenes of ``parts`` one after the other."""
        return Scenes(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Scenes)})

    def objects(self, i: int) -> list[tuple[str, str]]:
        """(colour, shape) of image i's objects, in slot order."""
        return [
            (COLOR_NAMES[int(self.color[i, s])], SHAPES[int(self.shape[i, s])])
            for s in range(MAX_OBJECTS)
            if bool(self.present[i, s])
        ]


def _half_extent(shape: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half width and half height of each shape's bounding box."""
    hx = torch.where(shape == 1, 0.85 * r, r)  # square 0.85 r, circle and triangle r
    hy = torch.where(shape == 1, 0.85 * r, torch.where(shape == 2, 0.9 * r, r))
    return hx, hy


def _bounding_radius(shape: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Radius of a circle around the shape's centre that holds the whole shape."""
    square = 0.85 * math.sqrt(2.0) * r
    triangle = math.sqrt(1.0 + 0.81) * r  # base corners at (±r, 0.9 r)
    return torch.where(shape == 0, r, torch.where(shape == 1, square, triangle))


def sample_scenes(n: int, seed: int, max_objects: int = MAX_OBJECTS) -> Scenes:
    """Draw n scenes; image i depends only on (seed, i). ``max_objects`` caps the count (1..3)."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be 1..{MAX_OBJECTS}")
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(n, UNIFORMS, generator=g, dtype=torch.float64)
    cursor = 0

    def take(k: int) -> torch.Tensor:
        nonlocal cursor
        out = u[:, cursor : cursor + k]
        cursor += k
        return out

    count = 1 + (take(1)[:, 0] * max_objects).long().clamp(max=max_objects - 1)  # [n]
    slot = take(_U_SLOT).view(n, MAX_OBJECTS, 3)
    shape = (slot[..., 0] * len(SHAPES)).long().clamp(max=len(SHAPES) - 1)
    color = (slot[..., 1] * len(COLORS)).long().clamp(max=len(COLORS) - 1)
    radius = R_RANGE[0] + slot[..., 2] * (R_RANGE[1] - R_RANGE[0])
    place = take(_U_PLACE).view(n, CANDIDATES, MAX_OBJECTS, 2)
    bg = take(_U_BG)
    cap = take(_U_CAPTION)

    hx, hy = _half_extent(shape, radius)  # [n, 3]
    lo = torch.stack([hx, hy], -1)  # keep inside [h, SIZE - 1 - h]
    hi = SIZE - 1 - lo
    centers = lo[:, None] + place * (hi - lo)[:, None]  # [n, T, 3, 2]
    bound = _bounding_radius(shape, radius)  # [n, 3]
    dist = (centers[:, :, :, None, :] - centers[:, :, None, :, :]).norm(dim=-1)  # [n, T, 3, 3]
    need = bound[:, None, :, None] + bound[:, None, None, :] + 1.0
    slot_ids = torch.arange(MAX_OBJECTS)
    active = slot_ids[None, :] < count[:, None]  # [n, 3]
    pair_active = active[:, None, :, None] & active[:, None, None, :] & (slot_ids[:, None] < slot_ids[None, :])
    ok = ((dist >= need) | ~pair_active).flatten(2).all(-1)  # [n, T]
    # Where no try fits all objects, drop the last one and try again (rare with 3 large shapes).
    while True:
        failed = ~ok.any(-1)
        if not failed.any():
            break
        count = torch.where(failed, count - 1, count)
        active = slot_ids[None, :] < count[:, None]
        pair_active = active[:, None, :, None] & active[:, None, None, :] & (slot_ids[:, None] < slot_ids[None, :])
        ok = ((dist >= need) | ~pair_active).flatten(2).all(-1)
    first = ok.float().argmax(-1)  # first try that fits
    center = centers[torch.arange(n), first]  # [n, 3, 2]

    return Scenes(
        present=active,
        shape=shape,
        color=color,
        center=center.float(),
        radius=radius.float(),
        background=(bg[:, 0] * len(BACKGROUNDS)).long().clamp(max=len(BACKGROUNDS) - 1),
        gray_level=(0.25 + bg[:, 1] * 0.35).float(),
        texture=bg[:, 2:].float(),
        caption_u=cap.float(),
    )


def _hash(x: torch.Tensor, y: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """Deterministic pseudo-random values in [0, 1) from integer lattice coordinates."""
    v = torch.sin(x * 12.9898 + y * 78.233 + salt * 37.719) * 43758.5453
    return v - torch.floor(v)


def _value_noise(xs: torch.Tensor, ys: torch.Tensor, cell: float, salt: torch.Tensor) -> torch.Tensor:
    """Smooth noise in [0, 1): bilinear interpolation of hashed lattice values."""
    gx, gy = xs / cell, ys / cell
    x0, y0 = torch.floor(gx), torch.floor(gy)
    fx, fy = gx - x0, gy - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a, b = _hash(x0, y0, salt), _hash(x0 + 1, y0, salt)
    c, d = _hash(x0, y0 + 1, salt), _hash(x0 + 1, y0 + 1, salt)
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _backgrounds(scenes: Scenes, device: torch.device) -> torch.Tensor:
    """Background images ``[n, 3, 64, 64]`` in [0, 1]."""
    n = len(scenes)
    ys, xs = torch.meshgrid(
        torch.arange(SIZE, device=device, dtype=torch.float32),
        torch.arange(SIZE, device=device, dtype=torch.float32),
        indexing="ij",
    )
    xs, ys = xs[None], ys[None]  # [1, 64, 64]
    tex = scenes.texture.to(device)
    salt = (tex[:, 0] * 1000.0)[:, None, None]

    gray = scenes.gray_level.to(device)[:, None, None, None].expand(n, 3, SIZE, SIZE)

    # grass: dark green, vertical blades (per-column streaks) over soft patches
    blades = _value_noise(xs * 0.5, ys * 0.08, 1.0, salt)  # 2 px wide, stretched vertically
    patches = _value_noise(xs, ys, 12.0, salt + 1.0)
    light = 0.55 + 0.3 * blades + 0.25 * patches
    grass_rgb = torch.tensor([0.16, 0.42, 0.14], device=device)[None, :, None, None]
    grass = (grass_rgb * light[:, None]).clamp(0, 1)

    # sky: light blue gradient, brighter near the horizon, with soft white clouds
    top = torch.tensor([0.45, 0.65, 0.92], device=device)[None, :, None, None]
    bottom = torch.tensor([0.72, 0.85, 0.97], device=device)[None, :, None, None]
    grad = (ys / (SIZE - 1))[:, None]
    base = top * (1 - grad) + bottom * grad
    clouds = _value_noise(xs + tex[:, 1, None, None] * 64, ys * 1.6 + tex[:, 2, None, None] * 64, 14.0, salt + 2.0)
    cover = ((clouds - 0.55) / 0.25).clamp(0, 1)[:, None]
    sky = base * (1 - 0.8 * cover) + 0.97 * 0.8 * cover

    kind = scenes.background.to(device)[:, None, None, None]
    return torch.where(kind == 0, gray, torch.where(kind == 1, grass, sky))


def object_masks(scenes: Scenes, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean masks ``[n, 3, 64, 64]`` of each slot's object (False for absent slots)."""
    device = torch.device(device)
    coords = torch.arange(SIZE, device=device, dtype=torch.float32)
    ys, xs = coords[:, None], coords[None, :]
    cx = scenes.center[..., 0].to(device)[..., None, None]
    cy = scenes.center[..., 1].to(device)[..., None, None]
    r = scenes.radius.to(device)[..., None, None]
    dx, dy = xs - cx, ys - cy
    shape = scenes.shape.to(device)[..., None, None]
    masks = torch.where(
        shape == 0,
        inside("circle", dx, dy, r),
        torch.where(shape == 1, inside("square", dx, dy, r), inside("triangle", dx, dy, r)),
    )
    return masks & scenes.present.to(device)[..., None, None]


def inside(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor | float) -> torch.Tensor:
    """Whether offsets ``(dx, dy)`` from a shape's centre fall inside it (the geometry above; broadcasts)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    depth = dy + 0.9 * r  # triangle: 0 at the apex, 1.8 r at the base
    return (depth >= 0) & (depth <= 1.8 * r) & (dx.abs() <= depth / 1.8)


def render(scenes: Scenes, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[n, 3, 64, 64]`` float in [0, 1] and label maps ``[n, 64, 64]`` long (0 = background)."""
    device = torch.device(device)
    image = _backgrounds(scenes, device)
    masks = object_masks(scenes, device)
    palette = torch.tensor([COLORS[c] for c in COLOR_NAMES], device=device, dtype=torch.float32) / 255.0
    labels = torch.zeros(len(scenes), SIZE, SIZE, dtype=torch.long, device=device)
    for s in range(MAX_OBJECTS):
        rgb = palette[scenes.color[:, s].to(device)][:, :, None, None]  # [n, 3, 1, 1]
        m = masks[:, s, None]
        image = torch.where(m, rgb, image)
        labels = torch.where(masks[:, s], s + 1, labels)
    return image, labels


def true_concepts(scenes: Scenes) -> torch.Tensor:
    """Which of :data:`CONCEPTS` are true of each image, ``[n, len(CONCEPTS)]`` bool: the image-level labels
    (a word is true where its mask is not empty), from the scene parameters alone. Objects never fill the
    image, so "background" is always true."""
    n = len(scenes)
    present = scenes.present
    shapes = torch.stack([((scenes.shape == i) & present).any(1) for i in range(len(SHAPES))], 1)
    colours = torch.stack([((scenes.color == i) & present).any(1) for i in range(len(COLOR_NAMES))], 1)
    backgrounds = torch.nn.functional.one_hot(scenes.background, len(BACKGROUNDS)).bool()
    return torch.cat([shapes, colours, backgrounds, torch.ones(n, 1, dtype=torch.bool)], 1)


def coreferent_concepts(scenes: Scenes) -> torch.Tensor:
    """Which pairs of :data:`CONCEPTS` name the same pixels in each image, ``[n, K, K]`` bool (symmetric, no
    diagonal), from what the caption says of its objects, no mask: the background's name and "background"
    always; an object's colour and shape words when no other object has the one without the other (in "a red
    circle and a red square" neither pair names the same pixels, "red" names both objects)."""
    k = len(CONCEPTS)
    same = torch.zeros(len(scenes), k, k, dtype=torch.bool)
    scene = len(SHAPES) + len(COLOR_NAMES) + scenes.background
    rows = torch.arange(len(scenes))
    same[rows, scene, k - 1] = same[rows, k - 1, scene] = True
    present = scenes.present
    for slot in range(present.shape[1]):
        shape, colour = scenes.shape[:, slot], scenes.color[:, slot]
        with_shape = (scenes.shape == shape[:, None]) & present
        with_colour = (scenes.color == colour[:, None]) & present
        alike = present[:, slot] & (with_shape == with_colour).all(1)
        c = len(SHAPES) + colour
        same[rows[alike], shape[alike], c[alike]] = same[rows[alike], c[alike], shape[alike]] = True
    return same


def concept_mask(scenes: Scenes, labels: torch.Tensor, word: str) -> torch.Tensor:
    """Exact mask ``[n, 64, 64]`` of a concept word (empty where the word is absent)."""
    device = labels.device
    n = len(scenes)
    if word == "background":
        return labels == 0
    if word in BACKGROUNDS:
        is_scene = scenes.background.to(device) == BACKGROUNDS.index(word)
        return (labels == 0) & is_scene[:, None, None]
    if word in SHAPES:
        hit = (scenes.shape == SHAPES.index(word)) & scenes.present
    elif word in COLORS:
        hit = (scenes.color == COLOR_NAMES.index(word)) & scenes.present
    else:
        raise ValueError(f"{word!r} has no mask in the shapes world")
    slot_hit = torch.cat([torch.zeros(n, 1, dtype=torch.bool), hit], dim=1).to(device)  # label 0 never hits
    return torch.gather(slot_hit, 1, labels.flatten(1)).view_as(labels)


def captions(scenes: Scenes, single_word_rate: float = 0.0, colorless_rate: float = 0.0) -> list[str]:
    """One caption per scene, e.g. "a red circle and a blue square on grass".

    Objects are named in a random order; the background phrase is "on a gray background", "on grass"
    or "on a grass background", "in the sky" or "on a sky background". With ``single_word_rate`` > 0
    some captions are a single word that is true of the image (a shape, colour or background name),
    so that concepts encoded alone are in the text encoder's training distribution. With
    ``colorless_rate`` > 0 some captions name the shapes without their colours ("a circle and a square
    on grass"): there only the shape words say which shapes to draw, so the model must read them.
    """
    out = []
    # plain lists first: indexing tensors element by element costs more than the rest of a training step
    present, shape, color = scenes.present.tolist(), scenes.shape.tolist(), scenes.color.tolist()
    caption_u, background = scenes.caption_u.tolist(), scenes.background.tolist()
    for i in range(len(scenes)):
        objs = [(COLOR_NAMES[c], SHAPES[k]) for here, k, c in zip(present[i], shape[i], color[i]) if here]
        u = caption_u[i]
        order = sorted(range(len(objs)), key=lambda j: u[j])
        bg = BACKGROUNDS[background[i]]
        if u[5] < single_word_rate:
            words = sorted({w for pair in objs for w in pair}) + [bg]
            out.append(words[min(int(u[6] * len(words)), len(words) - 1)])
            continue
        if u[4] < colorless_rate:  # u[4] is drawn for every scene and read nowhere else
            parts = [f"a {objs[j][1]}" for j in order]
        else:
            parts = [f"a {objs[j][0]} {objs[j][1]}" for j in order]
        if bg == "gray":
            place = "on a gray background"
        elif bg == "grass":
            place = "on grass" if u[3] < 0.6 else "on a grass background"
        else:
            place = "in the sky" if u[3] < 0.6 else "on a sky background"
        out.append(" and ".join(parts) + " " + place)
    return out
