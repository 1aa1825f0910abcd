"""Experiment: does the model bind each shape word to its own object? (``conceptattention_lab.binding``)

Prints, per noise level t, ``order`` (how much the clean-image prediction moves when the two objects'
shape words are swapped, relative to replacing one: 0 for a model that reads the caption as a bag of
words) and ``prefers`` (how often the true caption reconstructs better than the swapped one; chance
50%), over the validation images with two objects of different colours and shapes. About two minutes
per weights at four noise levels on 2 CPU cores; a cheap yardstick of binding between the slow sample
benchmarks.

    python lab/experiments/binding_gap.py [--weights DIR ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from conceptattention.shapes.world import VALIDATION_SEED
from conceptattention_lab.binding import binding, two_object_scenes
from conceptattention_lab.train import init_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="*", default=["shapes"], help="weights directories ('shapes': the shipped model)")
    p.add_argument("--images", type=int, default=800, help="validation scenes drawn (about 1 in 5 qualifies)")
    p.add_argument("--t", type=float, nargs="*", default=[0.5, 0.7, 0.9, 0.97])
    p.add_argument("--samples", type=int, default=2, help="noise draws per image")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(2)
    scenes = two_object_scenes(a.images, VALIDATION_SEED)
    report = {"images": len(scenes), "samples": a.samples, "weights": {}}
    for w in a.weights:
        result = binding(init_model(w).eval(), scenes, a.t, a.samples)
        report["weights"][w] = result
        print(
            w,
            "  ".join(f"t={t}: order {r['order']:.4f} prefers {r['prefers']:.1%}" for t, r in result.items()),
            flush=True,
        )
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
