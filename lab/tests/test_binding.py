"""The binding measure (``conceptattention_lab.binding``): zero for a model blind to word order."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from lab_helpers import TINY

from conceptattention.shapes import world
from conceptattention.shapes.model import ShapesModel


@pytest.mark.slow  # run with: python -m pytest -m slow
def test_binding_measure_is_zero_for_a_bag_of_words_model_and_sees_word_order_otherwise():
    from conceptattention_lab.binding import (
        binding,
        swap_shapes,
        third_shape,
        two_object_scenes,
        with_shapes,
    )

    scenes = two_object_scenes(60, seed=3)
    assert len(scenes) >= 5 and all(len(scenes.objects(i)) == 2 for i in range(len(scenes)))
    true, swapped, other = (world.captions(s) for s in (scenes, swap_shapes(scenes), third_shape(scenes)))
    for i in range(len(scenes)):
        (c0, s0), (c1, s1) = scenes.objects(i)
        assert c0 != c1 and s0 != s1
        assert swapped[i] != true[i] and sorted(swapped[i].split()) == sorted(true[i].split())  # same words
        assert f"{c0} {s1}" in swapped[i] and f"{c1} {s0}" in swapped[i]  # bound the other way
        changed = [(a, b) for a, b in zip(true[i].split(), other[i].split()) if a != b]
        assert changed == [(s0, ({"circle", "square", "triangle"} - {s0, s1}).pop())]  # one word: the third shape

    # no mixing layers, no position embeddings, Flux's zero text ids: the transformer cannot see word order
    torch.manual_seed(0)
    model = ShapesModel(replace(TINY, text_layers=0)).eval()
    with torch.no_grad():
        model.text_encoder.position.zero_()
    blind = binding(model, scenes, [0.5, 0.9], samples=1)
    assert all(r["order"] < 1e-8 for r in blind.values()), blind
    # word order through position embeddings: a swap moves the prediction
    with torch.no_grad():
        model.text_encoder.position.normal_()
    seen = binding(model, scenes, [0.5, 0.9], samples=1)
    assert all(r["order"] > 1e-3 and 0 <= r["prefers"] <= 1 for r in seen.values()), seen
    # or through maps of the neighbouring words, with zero ids and no position embeddings
    blind_again = ShapesModel(replace(TINY, text_layers=0, text_neighbours=True)).eval()
    with torch.no_grad():
        blind_again.text_encoder.position.zero_()
        blind_again.text_encoder.before.weight.normal_(std=0.1)
    assert all(r["order"] > 1e-3 for r in binding(blind_again, scenes, [0.5, 0.9], samples=1).values())
    same = with_shapes(scenes, torch.zeros_like(scenes.shape))  # two circles: a swap changes nothing
    with pytest.raises(ValueError, match="two objects of different shapes"):
        binding(model, same, [0.5])
