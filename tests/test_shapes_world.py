"""The shapes world: geometry, colours, masks vs captions, determinism; the analytic scorer."""

from __future__ import annotations

import math

import pytest
import torch

from conceptattention.shapes import scorer, world


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


def test_scorer_is_right_on_rendered_images_even_with_noise():
    s = world.sample_scenes(120, seed=2024)
    images, _ = world.render(s)
    noisy = (images + 0.04 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for batch in (images, noisy):
        exact = sum(scorer.score(batch[i], s.objects(i)).exact for i in range(len(s)))
        assert exact / len(s) >= 0.95


def test_scorer_catches_wrong_shapes_and_colours():
    s = world.sample_scenes(30, seed=11, max_objects=1)
    images, _ = world.render(s)
    for i in range(len(s)):
        color, shape = s.objects(i)[0]
        other_shape = next(x for x in world.SHAPES if x != shape)
        other_color = next(x for x in world.COLORS if x != color)
        assert scorer.score(images[i], [(color, shape)]).shapes_right == 1
        wrong = scorer.score(images[i], [(color, other_shape)])
        assert wrong.colors_right == 1 and wrong.shapes_right == 0 and not wrong.exact
        assert scorer.score(images[i], [(other_color, shape)]).colors_right == 0


def test_scorer_says_why_each_wrong_shape_failed():
    D = scorer.Detected
    red_circle, blue_square = ("red", "circle"), ("blue", "square")
    # the two shape words bound to the wrong colours: each object borrowed the other's shape
    found = [D("red", "square", 300), D("blue", "circle", 200)]
    assert scorer.shape_errors(found, [red_circle, blue_square]) == ["borrowed", "borrowed"]
    # one object right, the other drawn as a shape nobody asked for, a blob, or not at all
    assert scorer.shape_errors([D("red", "circle", 300), D("blue", "triangle", 200)], [red_circle, blue_square]) == [
        "other_shape"
    ]
    assert scorer.shape_errors([D("red", "circle", 300), D("blue", "blob", 200)], [red_circle, blue_square]) == ["blob"]
    assert scorer.shape_errors([D("red", "circle", 300)], [red_circle, blue_square]) == ["missing"]
    # two red objects asked for: the right one is taken first, the spare region explains the other
    assert scorer.shape_errors(
        [D("red", "circle", 300), D("red", "circle", 250), D("blue", "square", 200)],
        [red_circle, ("red", "square"), blue_square],
    ) == ["borrowed"]
    assert scorer.shape_errors(found[::-1], [("red", "square"), ("blue", "circle")]) == []


def test_unbound_baseline_is_the_mean_over_every_order_of_the_shapes():
    import itertools

    def by_enumeration(wanted):  # draw the caption's shapes on its objects in each order; mean right
        shapes = [sh for _, sh in wanted]
        orders = list(itertools.permutations(shapes))
        return sum(sum(a == b for a, b in zip(order, shapes)) for order in orders) / len(orders)

    cases = [
        [("red", "circle")],
        [("red", "circle"), ("blue", "square")],
        [("red", "circle"), ("blue", "circle")],
        [("red", "circle"), ("blue", "square"), ("green", "circle")],
        [("red", "circle"), ("blue", "square"), ("green", "triangle")],
    ]
    for wanted in cases:
        assert scorer.unbound_shapes_right(wanted) == pytest.approx(by_enumeration(wanted))
    assert scorer.unbound_shapes_right(cases[1]) == 1.0  # two different shapes: one of two right
    assert scorer.unbound_shapes_right([]) == 0.0


def test_scores_of_rendered_two_object_images_count_borrowed_shapes():
    s = world.sample_scenes(200, seed=5, max_objects=2)
    images, _ = world.render(s)
    checked = 0
    for i in range(len(s)):
        objs = s.objects(i)
        if len(objs) != 2 or objs[0][0] == objs[1][0] or objs[0][1] == objs[1][1]:
            continue
        (c1, s1), (c2, s2) = objs
        right = scorer.score(images[i], objs)
        assert right.shapes_right == 2 and right.errors == ()
        crossed = scorer.score(images[i], [(c1, s2), (c2, s1)])  # the caption with the shapes exchanged
        assert crossed.colors_right == 2 and crossed.shapes_right == 0 and crossed.errors == ("borrowed", "borrowed")
        checked += 1
    assert checked >= 10


def _ragged(mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A hand-drawn-looking copy of ``mask``: outline pixels (1 px either side) flipped at random, and
    a few one-pixel specks punched inside."""
    m = mask.float()[None, None]
    grown = torch.nn.functional.max_pool2d(m, 3, 1, 1)[0, 0] > 0
    shrunk = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)[0, 0] > 0
    band = grown & ~shrunk
    flip = band & (torch.rand(mask.shape, generator=g) < 0.35)
    specks = shrunk & (torch.rand(mask.shape, generator=g) < 0.03)
    return (mask ^ flip) & ~specks


def test_scorer_reads_shapes_through_ragged_outlines_and_specks():
    s = world.sample_scenes(200, seed=5, max_objects=1)
    masks = world.object_masks(s)[:, 0]
    g = torch.Generator().manual_seed(0)
    right = sum(scorer.classify(_ragged(masks[i], g)) == world.SHAPES[int(s.shape[i, 0])] for i in range(len(s)))
    assert right / len(s) >= 0.95


def test_scorer_calls_regions_of_no_shape_blobs():
    def region(fn):
        ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        return fn(xs, ys)

    not_shapes = {
        "bar": region(lambda x, y: (x >= 10) & (x < 54) & (y >= 30) & (y < 36)),
        "ring": region(lambda x, y: ((x - 32) ** 2 + (y - 32) ** 2 <= 15**2) & ((x - 32) ** 2 + (y - 32) ** 2 > 9**2)),
        "L": region(
            lambda x, y: ((x >= 10) & (x < 18) & (y >= 10) & (y < 50)) | ((x >= 10) & (x < 50) & (y >= 42) & (y < 50))
        ),
        "down triangle": region(lambda x, y: (y >= 14) & (y <= 50) & ((x - 32).abs() <= (50 - y) / 1.8)),
    }
    for name, mask in not_shapes.items():
        assert scorer.classify(mask) == "blob", name
    # and each true shape still fits its own template almost exactly
    s = world.sample_scenes(60, seed=9, max_objects=1)
    for i, mask in enumerate(world.object_masks(s)[:, 0]):
        fits = scorer.fits(mask)
        assert fits[world.SHAPES[int(s.shape[i, 0])]] > 0.95


def test_the_data_split_seeds_are_the_worlds():
    """The held-out and validation seeds belong to the world (the eval and the lab import them from here)."""
    assert (world.HELDOUT_SEED, world.VALIDATION_SEED) == (20_250_204, 31_337)
    from conceptattention.eval.datasets import ShapesDataset

    ds = ShapesDataset(2)
    assert ds.seed == world.HELDOUT_SEED and ds.concepts == list(world.CONCEPTS)
