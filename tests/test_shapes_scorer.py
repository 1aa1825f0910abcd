"""The analytic scorer (shapes/scorer.py) on rendered images: right even with pixel noise, ragged outlines and
specks; catches wrong shapes and colours and says why each wrong shape failed; calls regions of no shape blobs; the
no-binding baseline."""

from __future__ import annotations

import pytest
import torch

from conceptattention.shapes import scorer, world


@pytest.mark.slow  # run with: python -m pytest -m slow
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


@pytest.mark.slow  # run with: python -m pytest -m slow
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


@pytest.mark.slow  # run with: python -m pytest -m slow
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
