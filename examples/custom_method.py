"""Add a saliency method in a few lines and benchmark it against ConceptAttention on the shapes set.

A method is a function (pipe, images, concepts, captions, settings) -> maps [B, K, h, w]. Here: the
ConceptAttention maps sharpened by a temperature, a one-line variation of the paper's method.

    python examples/custom_method.py [--images 100]
"""

from __future__ import annotations

import argparse

from conceptattention.eval.datasets import load_dataset
from conceptattention.eval.methods import register_method
from conceptattention.eval.runner import evaluate, markdown_table
from conceptattention.pipelines import load_pipeline


@register_method("sharpened_concept_attention", "ConceptAttention raw scores, softmax at temperature 0.5")
def sharpened(pipe, images, concepts, captions, settings):
    raw = pipe.token_maps(images, concepts, captions, readouts=["output_no_softmax"], **settings)
    return (raw["output_no_softmax"] / 0.5).softmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    results = evaluate(
        load_pipeline("shapes"),
        load_dataset("shapes", images=args.images),
        ["concept_attention", "sharpened_concept_attention"],
        out=None,
    )
    print(markdown_table(results))


if __name__ == "__main__":
    main()
