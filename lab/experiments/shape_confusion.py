"""Experiment: at an object's pixels, which shape word's map wins, and does it depend on the true shape?

For the validation images with two objects of different colours and shapes, reads the maps of all 11
concepts of the shapes world (all blocks by default, t = 0.5, four noise draws per image, as the
benchmark) and counts, over each object's pixels, which of the three shape words has the highest map.
Rows of the printed matrix are the true shape, columns the winning word; identical rows mean the maps
carry nothing of the shape under them, a strong diagonal that loses to one column would mean a signal
hidden by a bias. The "pair pick" is the benchmark's shape pick (the object's own word against the
other object's). About a minute per weights on 2 CPU cores.

``--in-caption`` (ConceptAttention only, one image per pass, a few minutes) is not the paper's method but
a probe of where the gap lies: the two shape concepts of each image are its caption's own tokens of those
words (with their position and neighbour maps) instead of the words encoded alone. If the picks then
follow the truth, a lone shape word is what the image tokens fail to match; if not, the caption's shape
tokens carry nothing the pixels' attention outputs share either. With neighbour maps a caption's shape
token also carries its colour, so ``--swapped`` takes the shape tokens from the caption with the two
shape words swapped ("a red square and a blue circle"), where each carries the *other* object's colour:
picks that follow the colour then fall below 50%.

    python lab/experiments/shape_confusion.py [--weights DIR] [--readouts concept_attention cross_only]
"""

from __future__ import annotations

import argparse

import torch

from conceptattention.pipelines.shapes import ShapesPipeline
from conceptattention.shapes import world
from conceptattention_lab.binding import swap_shapes, two_object_scenes


def in_caption_maps(
    pipe, image, caption: str, concept_caption: str, concepts: list[str], samples: int, seed: int, layers
) -> dict:
    """ConceptAttention maps of one image (noised with its ``caption``) whose concepts are the words alone,
    except the shape words of ``concept_caption``, which are that caption's own tokens of them."""
    embeds = pipe.model.encode_concepts(concepts)
    tokens, _ = pipe.model.encode_text([concept_caption])
    words = concept_caption.split()
    for shape in world.SHAPES:
        if shape in words:
            embeds[concepts.index(shape)] = tokens[0, words.index(shape)]
    inputs, _ = pipe._noisy_inputs([image], [caption], 0.5, samples, [seed])
    with pipe._session(embeds, layers, ["concept_attention"]) as session:
        session.forward_until_last_layer(**inputs)
    return {"concept_attention": session.maps().mean(0, keepdim=True).float().cpu()}


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="a weights directory (default: the shipped model)")
    p.add_argument("--readouts", nargs="+", default=["concept_attention", "cross_only"])
    p.add_argument("--layers", type=int, nargs="*", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--images", type=int, default=800, help="validation scenes drawn (about 1 in 5 qualifies)")
    p.add_argument("--samples", type=int, default=4, help="noise draws per image")
    p.add_argument(
        "--in-caption",
        action="store_true",
        help="the two shape concepts are the caption's own tokens of those words (concept_attention only)",
    )
    p.add_argument(
        "--swapped",
        action="store_true",
        help="with --in-caption: take the shape tokens from the caption with the shape words swapped",
    )
    a = p.parse_args()
    if a.swapped and not a.in_caption:
        p.error("--swapped needs --in-caption")
    if a.in_caption:
        a.readouts = ["concept_attention"]
    torch.set_num_threads(2)
    pipe = ShapesPipeline.from_pretrained(a.weights)
    scenes = two_object_scenes(a.images, world.VALIDATION_SEED)
    images, labels = world.render(scenes)
    captions = world.captions(scenes)
    concept_captions = world.captions(swap_shapes(scenes)) if a.swapped else captions
    concepts = list(world.CONCEPTS)
    shape_rows = [concepts.index(s) for s in world.SHAPES]
    counts = {r: torch.zeros(len(world.SHAPES), len(world.SHAPES)) for r in a.readouts}
    pair = {r: [0, 0] for r in a.readouts}
    step = 1 if a.in_caption else 25
    for start in range(0, len(captions), step):
        idx = list(range(start, min(len(captions), start + step)))
        if a.in_caption:
            maps = in_caption_maps(
                pipe,
                images[idx[0]],
                captions[idx[0]],
                concept_captions[idx[0]],
                concepts,
                a.samples,
                1000 * idx[0],
                a.layers,
            )
        else:
            maps = pipe.token_maps(
                [images[i] for i in idx],
                concepts,
                [captions[i] for i in idx],
                readouts=a.readouts,
                samples=a.samples,
                seeds=[1000 * i for i in idx],
                layers=a.layers,
            )
        for name, m in maps.items():
            up = torch.nn.functional.interpolate(m, size=labels.shape[-2:], mode="nearest")
            for j, i in enumerate(idx):
                objects = scenes.objects(i)
                own = [concepts.index(shape) for _, shape in objects]
                for slot, (_, shape) in enumerate(objects):
                    pixels = labels[i] == slot + 1
                    winner = up[j][shape_rows][:, pixels].argmax(0)
                    counts[name][world.SHAPES.index(shape)] += torch.bincount(
                        winner, minlength=len(world.SHAPES)
                    ).float()
                    right = up[j][own[slot]][pixels] > up[j][own[1 - slot]][pixels]
                    pair[name] = [pair[name][0] + int(right.sum()), pair[name][1] + int(pixels.sum())]
    print(f"{len(captions)} images; rows: true shape, columns: winning word ({', '.join(world.SHAPES)})")
    for name, c in counts.items():
        share = c / c.sum(1, keepdim=True)
        print(f"{name}: pair pick {pair[name][0] / pair[name][1]:.1%}")
        for shape, row in zip(world.SHAPES, share.tolist()):
            print(f"  {shape:9s}" + "".join(f"{x:8.1%}" for x in row))


if __name__ == "__main__":
    main()
