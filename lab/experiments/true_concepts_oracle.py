"""Experiment: how much of the maps' mIoU do absent words cost? (an oracle on the concept set)

ConceptAttention's softmax runs over every concept given, and the shapes benchmark gives all eleven
words to every image. This script scores the same maps twice on validation images: with the softmax
over all eleven words, as the benchmark does, and over only the words true of each image (the oracle
knows which words are in the picture, never where). The gap is what absent words take from the true
ones. Maps as the benchmark makes them: blocks 3-5 (or --layers), t = 0.5, 4 noise draws, bilinear
upsampling, each map min-max normalised and thresholded at its mean, fg/bg mIoU from sums over the set.

    python lab/experiments/true_concepts_oracle.py [--weights DIR] [--images 100]   # about a minute
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from conceptattention.eval import shapes_report
from conceptattention.pipelines.shapes import ShapesPipeline
from conceptattention.shapes import world
from conceptattention_lab.train import concept_scores


def kind_of(word: str) -> str:
    return next(kind for kind, words in shapes_report.WORD_KINDS.items() if word in words)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="a weights directory (default: the shipped model)")
    p.add_argument("--images", type=int, default=100, help="validation images")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="blocks read (default: the model's)")
    p.add_argument("--batch", type=int, default=25, help="images per pass")
    a = p.parse_args()
    torch.set_num_threads(2)
    pipe = ShapesPipeline.from_pretrained(a.weights) if a.weights else ShapesPipeline.from_pretrained()
    layers = list(a.layers or pipe.default_layers)
    scenes = world.sample_scenes(a.images, world.VALIDATION_SEED)
    images, labels = world.render(scenes)
    captions = world.captions(scenes)
    true = world.true_concepts(scenes)
    concepts, samples = list(world.CONCEPTS), 4
    sums: dict[tuple[str, str], torch.Tensor] = {}  # (softmax over, kind) -> [inter fg, union fg, inter bg, union bg]
    for start in range(0, a.images, a.batch):
        idx = list(range(start, min(a.images, start + a.batch)))
        inputs, b = pipe._noisy_inputs(
            [images[i] for i in idx], [captions[i] for i in idx], 0.5, samples, [1000 * i for i in idx]
        )
        with concept_scores(pipe.model, layers) as scores:
            pipe.model.transformer(**inputs)
        raw = torch.stack(scores).float().unflatten(1, (b, samples))  # [L, B, S, K, N]
        for j, i in enumerate(idx):
            one = scenes.select(torch.tensor([i]))
            for over, allowed in (("all words", torch.ones(len(concepts), dtype=torch.bool)), ("true words", true[i])):
                kept = allowed.nonzero()[:, 0]
                maps = raw[:, j][:, :, kept].softmax(2).mean((0, 1))  # [k, N]
                side = int(maps.shape[-1] ** 0.5)
                maps = F.interpolate(maps.view(len(kept), 1, side, side), size=labels.shape[-2:], mode="bilinear")[:, 0]
                for m, c in zip(maps, kept.tolist()):
                    if not true[i, c]:
                        continue
                    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
                    pred, mask = m > m.mean(), world.concept_mask(one, labels[i : i + 1], concepts[c])[0]
                    counts = torch.tensor(
                        [(pred & mask).sum(), (pred | mask).sum(), (~pred & ~mask).sum(), (~pred | ~mask).sum()],
                        dtype=torch.float64,
                    )
                    for kind in (kind_of(concepts[c]), "all"):
                        sums[(over, kind)] = sums.get((over, kind), torch.zeros(4, dtype=torch.float64)) + counts
    report = {
        over: {kind: round(100 * float(s[0] / s[1] + s[2] / s[3]) / 2, 1) for (o, kind), s in sums.items() if o == over}
        for over in ("all words", "true words")
    }
    print(
        json.dumps({"weights": a.weights or "shapes", "images": a.images, "layers": layers, "miou": report}, indent=1)
    )


if __name__ == "__main__":
    main()
