"""Time the shapes benchmark: every method on N held-out images, and ConceptAttention alone, in one run.

    python benchmarks/eval_shapes.py [--images 500] [--threads 2]

Prints JSON: seconds for all methods (the `conceptattention eval --dataset shapes --method all` work,
without process start-up), seconds for concept_attention alone, their ratio, and images per second.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from conceptattention.eval.datasets import load_dataset
from conceptattention.eval.methods import METHODS
from conceptattention.eval.runner import evaluate
from conceptattention.pipelines import load_pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load_pipeline("shapes")
    began = time.perf_counter()
    dataset = load_dataset("shapes", images=a.images)
    data_seconds = time.perf_counter() - began
    timings = {}
    for label, methods in (("concept_attention", ["concept_attention"]), ("all", "all")):
        began = time.perf_counter()
        evaluate(pipe, dataset, methods, None, progress=False)
        timings[label] = time.perf_counter() - began
    print(
        json.dumps(
            {
                "images": a.images,
                "methods": len(METHODS),
                "threads": torch.get_num_threads(),
                "dataset_seconds": round(data_seconds, 2),
                "all_methods_seconds": round(timings["all"], 2),
                "concept_attention_seconds": round(timings["concept_attention"], 2),
                "ratio_all_to_concept_attention": round(timings["all"] / timings["concept_attention"], 3),
                "all_methods_images_per_second": round(a.images / timings["all"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
