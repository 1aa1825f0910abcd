"""Segmentation metrics (eval/metrics.py) against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import pytest
import torch

from conceptattention.eval.metrics import BinarySegmentation, MultiClassSegmentation, average_precision, mean_threshold


def test_dataset_sums_hand_computed():
    seg = BinarySegmentation()
    # image 1: 2x2, prediction [[1,1],[0,0]] vs target [[1,0],[0,0]]
    seg.add(torch.tensor([[1, 1], [0, 0]]), torch.tensor([[1, 0], [0, 0]]))
    # image 2: 1x4, prediction all 0 vs target [1,1,0,0]
    seg.add(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 0, 0]))
    r = seg.result()
    # correct: 3 + 2 = 5 of 8
    assert r["pixel_accuracy"] == pytest.approx(5 / 8)
    # foreground: I = 1 + 0, U = 2 + 2 ; background: I = 2 + 2, U = 3 + 4
    assert r["iou_foreground"] == pytest.approx(1 / 4)
    assert r["iou_background"] == pytest.approx(4 / 7)
    assert r["miou"] == pytest.approx((1 / 4 + 4 / 7) / 2)
    assert r["paper_compatible_miou"] == pytest.approx((5 / 8) / (2 - 5 / 8))


def test_void_pixels_are_not_scored():
    seg = BinarySegmentation()
    valid = torch.tensor([True, True, False, False])
    seg.add(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 0]), valid=valid)
    r = seg.result()
    assert r["pixel_accuracy"] == 1.0 and r["miou"] == 1.0


def test_multiclass_metrics_hand_computed():
    seg = MultiClassSegmentation(3)
    label = torch.tensor([[0, 0, 1], [1, 2, -1]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 2]])
    seg.add(pred, label)
    # labelled: 5 pixels (one void); correct: (0,0), (0,2), (1,0) -> 3
    # class 0: inter 1, union 2; class 1: inter 2, union 4; class 2: inter 0, union 1 (void pixel not counted)
    r = seg.result(["bg", "a", "b"])
    assert r["pixel_accuracy"] == pytest.approx(3 / 5)
    assert r["iou_per_class"] == pytest.approx({"bg": 1 / 2, "a": 2 / 4, "b": 0.0})
    assert r["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    merged = seg.merge(seg)
    assert merged.result()["pixel_accuracy"] == pytest.approx(3 / 5) and merged.inter == [2, 4, 0]


def test_average_precision_hand_computed_and_ties():
    # ranking: pos, neg, pos -> precision at positives 1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 0, 1])) == pytest.approx(5 / 6)
    # all scores tied: one threshold, precision = 2/4 at recall 1
    assert average_precision(torch.ones(4), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5)
    assert math.isnan(average_precision(torch.rand(5), torch.zeros(5)))


def test_average_precision_agrees_with_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        target = torch.rand(200, generator=g) < 0.3
        scores = (torch.rand(200, generator=g) * 10).round() / 10 + 0.3 * target  # many ties
        ours = average_precision(scores, target)
        theirs = sklearn.average_precision_score(target.numpy(), scores.numpy())
        assert ours == pytest.approx(theirs, abs=1e-12)


def test_mean_threshold():
    m = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
    # normalised: 0, .2, .4, 1 ; mean .4 -> strictly above: only 1.0
    assert torch.equal(mean_threshold(m), torch.tensor([[False, False], [False, True]]))
    assert not mean_threshold(torch.ones(3, 3)).any()
