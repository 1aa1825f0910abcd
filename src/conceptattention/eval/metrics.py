"""Segmentation metrics in the Chefer et al. convention, accumulated over a dataset.

- pixel accuracy = sum of correct pixels / sum of labelled pixels;
- mIoU = mean over {background, foreground} of (sum of intersections / sum of unions), sums over
  the whole dataset, for binary predictions;
- "paper-compatible mIoU" = acc / (2 - acc): what the authors' ImageNet script reports, because its
  IoU helper skipped the argmax over the [1 - m, m] channels (see PAPER.md);
- mAP = per-image average precision of the continuous map against the binary mask, averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Average precision of ``scores`` ranking the True pixels of ``target`` (sklearn's definition:
    sum over thresholds of (recall step) x precision; tied scores form one threshold)."""
    scores, target = scores.flatten().double(), target.flatten().bool()
    positives = int(target.sum())
    if positives == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True)
    s, t = scores[order], target[order].double()
    tp = torch.cumsum(t, 0)
    seen = torch.arange(1, len(s) + 1, dtype=torch.float64)
    last_of_tie = torch.ones(len(s), dtype=torch.bool)
    last_of_tie[:-1] = s[1:] != s[:-1]
    tp, seen = tp[last_of_tie], seen[last_of_tie]
    precision = tp / seen
    recall = tp / positives
    steps = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((steps * precision).sum())


def mean_threshold(saliency: torch.Tensor) -> torch.Tensor:
    """Min-max normalise one map and keep pixels above its mean (the paper's protocol)."""
    m = saliency.float()
    span = m.max() - m.min()
    m = (m - m.min()) / span if span > 0 else torch.zeros_like(m)
    return m > m.mean()


@dataclass
class BinarySegmentation:
    """Accumulates foreground/background scores over a dataset."""

    correct: float = 0.0
    labelled: float = 0.0
    inter: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [background, foreground]
    union: list[float] = field(default_factory=lambda: [0.0, 0.0])
    ap: list[float] = field(default_factory=list)

    def add(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        scores: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        """One image: binary prediction and target (same shape); ``valid`` masks out void pixels."""
        p, t = prediction.bool(), target.bool()
        if valid is None:
            valid = torch.ones_like(t)
        v = valid.bool()
        self.correct += float(((p == t) & v).sum())
        self.labelled += float(v.sum())
        for c, (pc, tc) in enumerate(((~p, ~t), (p, t))):
            self.inter[c] += float((pc & tc & v).sum())
            self.union[c] += float(((pc | tc) & v).sum())
        if scores is not None:
            ap = average_precision(scores[v], t[v])
            if ap == ap:  # not NaN
                self.ap.append(ap)

    def merge(self, other: BinarySegmentation) -> BinarySegmentation:
        out = BinarySegmentation(
            self.correct + other.correct,
            self.labelled + other.labelled,
            [a + b for a, b in zip(self.inter, other.inter)],
            [a + b for a, b in zip(self.union, other.union)],
            self.ap + other.ap,
        )
        return out

    def result(self) -> dict[str, float]:
        acc = self.correct / self.labelled if self.labelled else float("nan")
        ious = [i / u if u else float("nan") for i, u in zip(self.inter, self.union)]
        return {
            "pixel_accuracy": acc,
            "miou": sum(ious) / 2,
            "iou_background": ious[0],
            "iou_foreground": ious[1],
            "paper_compatible_miou": acc / (2 - acc) if acc == acc else float("nan"),
            "map": sum(self.ap) / len(self.ap) if self.ap else float("nan"),
            "images": len(self.ap),
        }


@dataclass
class MultiClassSegmentation:
    """Accumulates multi-class scores over a dataset: pixel accuracy and mIoU (per-class sums of
    intersection and union over the dataset, mean over the classes that occur in labels or predictions)."""

    num_classes: int
    correct: int = 0
    labelled: int = 0
    inter: list[int] = field(default_factory=list)
    union: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inter = self.inter or [0] * self.num_classes
        self.union = self.union or [0] * self.num_classes

    def add(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """One image: predicted and true class ids ``[H, W]``; label -1 (void) is not scored."""
        valid = label >= 0
        p, t = prediction[valid].long(), label[valid].long()
        self.correct += int((p == t).sum())
        self.labelled += int(valid.sum())
        n = self.num_classes
        inter = torch.bincount(t[p == t], minlength=n)[:n]
        area_p, area_t = torch.bincount(p, minlength=n)[:n], torch.bincount(t, minlength=n)[:n]
        for c in range(n):
            self.inter[c] += int(inter[c])
            self.union[c] += int(area_p[c] + area_t[c] - inter[c])

    def merge(self, other: MultiClassSegmentation) -> MultiClassSegmentation:
        return MultiClassSegmentation(
            self.num_classes,
            self.correct + other.correct,
            self.labelled + other.labelled,
            [a + b for a, b in zip(self.inter, other.inter)],
            [a + b for a, b in zip(self.union, other.union)],
        )

    def result(self, class_names: list[str] | None = None) -> dict:
        ious = {c: i / u for c, (i, u) in enumerate(zip(self.inter, self.union)) if u}
        names = class_names or [str(c) for c in range(self.num_classes)]
        return {
            "pixel_accuracy": self.correct / self.labelled if self.labelled else float("nan"),
            "miou": sum(ious.values()) / len(ious) if ious else float("nan"),
            "iou_per_class": {names[c]: v for c, v in ious.items()},
        }
