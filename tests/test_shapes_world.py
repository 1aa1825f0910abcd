"""The shapes world (shapes/world.py): geometry, colours, masks vs captions, determinism, the words true of an
image and the pairs of words whose masks are the same; the data-split seeds."""

from __future__ import annotations

import math

import pytest
import torch

from conceptattention.shapes import world


@pytest.fixture(scope="module")
def scenes():
    s = world.sample_scenes(300, seed=123)
    images, labels = world.render(s)
    return s, images, labels


def test_counts_sizes_and_placement(scenes):
    s, _, labels = scenes
    counts = s.present.sum(1)
    assert counts.min() >= 1 and counts.max() <= 3
    assert set(counts.tolist()) == {1, 2, 3}
    r = s.radius[s.present]
    assert r.min() >= 0.17 * 64 - 1e-4 and r.max() <= 0.28 * 64 + 1e-4
    masks = world.object_masks(s)
    assert (masks.sum(1) <= 1).all(), "objects overlap"
    # every present object is visible and nothing is cut at the border (its mask has its full area)
    for i in range(len(s)):
        for slot in range(3):
            if not s.present[i, slot]:
                assert not masks[i, slot].any()
                continue
            rad, kind = float(s.radius[i, slot]), world.SHAPES[int(s.shape[i, slot])]
            expected = {"circle": math.pi * rad**2, "square": (1.7 * rad) ** 2, "triangle": 0.5 * 2 * rad * 1.8 * rad}[
                kind
            ]
            area = masks[i, slot].sum().item()
            assert abs(area - expected) <= 0.08 * expected + 8, (kind, area, expected)


def test_triangle_points_up_and_square_is_square():
    s = world.sample_scenes(200, seed=5, max_objects=1)
    masks = world.object_masks(s)[:, 0]
    for i in range(len(s)):
        m = masks[i]
        rows = m.sum(1)
        ys = rows.nonzero().flatten()
        top, bottom = rows[ys[0]].item(), rows[ys[-1]].item()
        kind = world.SHAPES[int(s.shape[i, 0])]
        if kind == "triangle":
            assert top < bottom / 3
            assert abs((ys[-1] - ys[0] + 1).item() - 1.8 * s.radius[i, 0].item()) <= 2
        if kind == "square":
            cols = m.sum(0).nonzero().flatten()
            assert abs(len(ys) - len(cols)) <= 1 and top == bottom


def test_exact_colours_and_gray_level(scenes):
    s, images, labels = scenes
    for i in range(40):
        for slot in range(3):
            if s.present[i, slot]:
                rgb = torch.tensor(world.COLORS[world.COLOR_NAMES[int(s.color[i, slot])]]) / 255.0
                pix = images[i][:, labels[i] == slot + 1]
                assert torch.allclose(pix, rgb[:, None].expand_as(pix))
        if s.background[i] == 0:
            bg = images[i][:, labels[i] == 0]
            assert torch.allclose(bg, torch.full_like(bg, float(s.gray_level[i])))
            assert 0.25 <= float(s.gray_level[i]) <= 0.6


def test_masks_match_captions(scenes):
    s, _, labels = scenes
    caps = world.captions(s)
    vocab = list(world.SHAPES) + list(world.COLORS) + list(world.BACKGROUNDS) + ["background"]
    masks = {w: world.concept_mask(s, labels, w) for w in vocab}
    for i, cap in enumerate(caps):
        words = set(cap.split())
        for w in vocab:
            present = masks[w][i].any().item()
            if w == "background":
                assert present  # there is always some background
            else:
                assert present == (w in words), (cap, w)
        # the union of the caption's shape masks is exactly the non-background pixels
        shapes = torch.zeros_like(labels[i], dtype=torch.bool)
        for w in world.SHAPES:
            shapes |= masks[w][i]
        assert torch.equal(shapes, labels[i] > 0)
        if int(s.background[i]) == 0:
            assert cap.endswith("on a gray background")


def test_single_word_captions_are_true_of_the_image():
    s = world.sample_scenes(200, seed=9)
    caps = world.captions(s, single_word_rate=1.0)
    for i, cap in enumerate(caps):
        assert len(cap.split()) == 1
        truth = {w for pair in s.objects(i) for w in pair} | {world.BACKGROUNDS[int(s.background[i])]}
        assert cap in truth


def test_colorless_captions_name_the_same_shapes_without_colours():
    s = world.sample_scenes(200, seed=9)
    full, none, some = world.captions(s), world.captions(s, colorless_rate=1.0), world.captions(s, colorless_rate=0.3)
    assert world.captions(s, colorless_rate=0.0) == full  # the default leaves every caption as it was
    for i, cap in enumerate(none):
        assert not set(cap.split()) & set(world.COLOR_NAMES)
        assert sorted(w for w in cap.split() if w in world.SHAPES) == sorted(shape for _, shape in s.objects(i))
        # the same caption with the colour words removed (objects in the same order, same background phrase)
        assert cap == " ".join(w for w in full[i].split() if w not in world.COLOR_NAMES)
    dropped = sum(a != b for a, b in zip(some, full))
    assert 0.2 * 200 < dropped < 0.4 * 200 and all(c in (f, n) for c, f, n in zip(some, full, none))


def test_deterministic_and_prefix_stable():
    a_img, a_lab = world.render(world.sample_scenes(50, seed=77))
    b_img, b_lab = world.render(world.sample_scenes(20, seed=77))
    assert torch.equal(a_img[:20], b_img) and torch.equal(a_lab[:20], b_lab)
    c_img, _ = world.render(world.sample_scenes(20, seed=78))
    assert not torch.equal(b_img, c_img)


def test_true_concepts_are_the_words_whose_masks_are_not_empty():
    scenes = world.sample_scenes(64, seed=5)
    _, labels = world.render(scenes)
    expected = torch.stack([world.concept_mask(scenes, labels, word).flatten(1).any(1) for word in world.CONCEPTS], 1)
    assert torch.equal(world.true_concepts(scenes), expected)
    assert 0 < expected[:, :3].sum(1).float().mean() < 3  # some images hold one shape, some several


def test_coreferent_concepts_are_the_pairs_whose_masks_are_the_same():
    scenes = world.sample_scenes(96, seed=6)
    _, labels = world.render(scenes)
    masks = torch.stack([world.concept_mask(scenes, labels, word).flatten(1) for word in world.CONCEPTS], 1)
    same_mask = (masks[:, :, None] == masks[:, None]).all(-1) & masks.any(-1)[:, :, None]
    expected = same_mask & ~torch.eye(len(world.CONCEPTS), dtype=torch.bool)
    pairs = world.coreferent_concepts(scenes)
    assert torch.equal(pairs, expected)
    shape_colour = pairs[:, :3, 3:7].sum((1, 2))
    assert (shape_colour == 0).any() and (shape_colour >= 2).any()  # some images share a colour, some bind two


def test_the_data_split_seeds_are_the_worlds():
    """The held-out and validation seeds belong to the world (the eval and the lab import them from here)."""
    assert (world.HELDOUT_SEED, world.VALIDATION_SEED) == (20_250_204, 31_337)
    from conceptattention.eval.datasets import ShapesDataset

    ds = ShapesDataset(2)
    assert ds.seed == world.HELDOUT_SEED and ds.concepts == list(world.CONCEPTS)
