"""Does a shapes model bind each shape word to its own object? A measure read from the denoiser alone.

Sampling and scoring (``conceptattention.eval.shapes_report.sample_quality``) says how often the shapes
come out right, but a caption with two objects of different shapes is drawn right half the time by a
model that reads the caption as a bag of words (``scorer.unbound_shapes_right``), and the sample score
needs hundreds of images to move a couple of points. This measure needs no sampling: for images with
two objects of different colours and different shapes, noised at t, the model's clean-image prediction
is compared under three captions that differ only in their shape words, with the same noise:

- the image's own caption ("a red circle and a blue square on grass");
- the shapes swapped ("a red square and a blue circle on grass": the same words, in the same order and
  phrasing, bound the other way);
- the first-named object's shape replaced by the third shape ("a red triangle and a blue square ...").

``order``: the mean squared change of the prediction under the swap, divided by that under the
replacement. It is exactly 0 for a model to which word order is invisible (without position ids or
position embeddings, the text encoder and the transformer are permutation invariant over prompt
tokens); a model that binds moves its prediction under a swap about as much as under a new word.

``prefers``: the share of (image, noise) pairs where the true caption reconstructs the pixels that
differ between the two bindings better than the swapped one (chance 50%).
"""

from __future__ import annotations

import dataclasses

import torch

from conceptattention.shapes import world
from conceptattention.shapes.model import ShapesModel, pack


def two_object_scenes(n: int, seed: int) -> world.Scenes:
    """Of the first n scenes of ``seed``, those with two objects of different colours and different shapes."""
    scenes = world.sample_scenes(n, seed)
    keep = [
        i
        for i in range(n)
        if len(objs := scenes.objects(i)) == 2 and objs[0][0] != objs[1][0] and objs[0][1] != objs[1][1]
    ]
    return scenes.select(torch.tensor(keep, dtype=torch.long))


def object_tokens(labels: torch.Tensor, patch: int, objects: int = 2) -> torch.Tensor:
    """``[B, objects, N]`` bool: which image tokens (``patch``-px patches, row-major) lie at least half on
    object slot s (label s + 1) of each label map ``[B, 64, 64]``."""
    share = torch.nn.functional.avg_pool2d(torch.stack([(labels == s + 1).float() for s in range(objects)], 1), patch)
    return (share >= 0.5).flatten(2)


def with_shapes(scenes: world.Scenes, shape: torch.Tensor) -> world.Scenes:
    """The same scenes with other shapes; their captions keep word order and phrasing (from ``caption_u``)."""
    return dataclasses.replace(scenes, shape=shape)


def swap_shapes(scenes: world.Scenes) -> world.Scenes:
    """The shapes of the first two objects exchanged."""
    return with_shapes(scenes, scenes.shape[:, [1, 0, 2]])


def third_shape(scenes: world.Scenes) -> world.Scenes:
    """The first object's shape replaced by the one neither of the first two objects has (three shapes)."""
    if len(world.SHAPES) != 3:
        raise ValueError("third_shape needs a world of exactly three shapes")
    shape = scenes.shape.clone()
    shape[:, 0] = 3 - shape[:, 0] - shape[:, 1]  # the indices 0 + 1 + 2 sum to 3
    return with_shapes(scenes, shape)


@torch.no_grad()
def binding(
    model: ShapesModel, scenes: world.Scenes, ts: list[float], samples: int = 2, seed: int = 0, batch: int = 64
) -> dict[str, dict[str, float]]:
    """Per noise level t (keyed by its text): ``order`` and ``prefers`` (see the module's description) over
    two-object ``scenes`` (:func:`two_object_scenes`; the first two objects are the ones swapped), ``samples``
    noise draws each."""
    captions = [world.captions(s) for s in (scenes, swap_shapes(scenes))]
    if any(a == b for a, b in zip(*captions)):
        raise ValueError("every scene needs two objects of different shapes (see two_object_scenes)")
    captions.append(world.captions(third_shape(scenes)))
    images, _ = world.render(scenes)
    swapped_images, _ = world.render(swap_shapes(scenes))
    patch = model.config.patch
    x0 = pack(images * 2 - 1, patch)
    # pixels where the two bindings' images differ; elsewhere both captions' errors are alike in expectation
    differ = (images != swapped_images).any(1, keepdim=True).expand(-1, 3, -1, -1).float().contiguous()
    differ = pack(differ, patch)
    noise = torch.randn((samples, *x0.shape), generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    out = {}
    for t_value in ts:
        prefers, by_swap, by_word = [], [], []
        for s in range(samples):
            for start in range(0, len(scenes), batch):
                sl = slice(start, start + batch)
                clean, mask = x0[sl].to(device), differ[sl].to(device)
                t = torch.full((clean.shape[0],), t_value, device=device)
                x_t = t_value * noise[s, sl].to(device) + (1 - t_value) * clean
                true, swapped, other = (
                    x_t - t_value * model.velocity(x_t, t, *model.encode_text(caps[sl])).float() for caps in captions
                )
                errors = [((p - clean).pow(2) * mask).sum((1, 2)) for p in (true, swapped)]
                prefers.append(errors[0] < errors[1])
                by_swap.append((true - swapped).pow(2).sum())
                by_word.append((true - other).pow(2).sum())
        order = torch.stack(by_swap).sum() / torch.stack(by_word).sum()  # one host sync per noise level
        out[f"{t_value:g}"] = {"order": order.item(), "prefers": torch.cat(prefers).float().mean().item()}
    return out
