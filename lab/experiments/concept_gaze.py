"""Experiment: where do the shape concepts look? (the concept side of ConceptAttention's shape maps)

A shape word's map is ``o_x[i] · o_c`` per block: the image tokens' attention outputs against the
concept's. ``shape_binding.py`` shows that the image side names an object's shape (a linear probe on
single tokens' attention outputs). This script measures the concept side, on the validation images
with two objects of different colours and shapes, noised at t = 0.5 with their own caption, all 11
concepts encoded alone as ConceptAttention does. Per double-stream block:

- ``on own object`` / ``on other object``: the share of a shape concept's attention (its query over
  the concept and image keys, mean over heads) that lands on the tokens of the object of its shape /
  of the other object, averaged over the two shapes present;
- ``on concepts``: the share that stays on the concept tokens;
- ``pick right`` / ``pick wrong``: at the object tokens, how often that block's own ConceptAttention
  scores (softmax over concepts) put the object's shape word strictly above / below the other
  object's; the rest are ties, where a saturated softmax left both at exactly 0.

A concept that can find its object attends to it more than to the other one.

    python lab/experiments/concept_gaze.py [--weights DIR]   # 800 scenes -> 155 images, under a minute
"""

from __future__ import annotations

import argparse
import json

import torch

from conceptattention.core import ConceptAttention
from conceptattention.pipelines.shapes import ShapesPipeline
from conceptattention.shapes import world
from conceptattention_lab.binding import object_tokens, two_object_scenes


class GazeRecorder(ConceptAttention):
    """ConceptAttention that also keeps, per read block, the concepts' attention weights and both outputs."""

    def reset(self) -> None:
        super().reset()
        self.records: list[dict[str, torch.Tensor]] = []

    def _accumulate(self, image_out, concept_out, image_value, image_key, step) -> None:
        k = self.num_concepts  # the first stream is ConceptAttention's own (cross + self)
        query = step.query[:, :, :k]
        keys = torch.cat([step.key[:, :, :k], image_key.to(step.key.dtype)], dim=2)
        weights = (query @ keys.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1).mean(1)  # [B, K, K + N]
        self.records.append(
            {"weights": weights.float(), "image_out": image_out.float(), "concept_out": concept_out[:, :k].float()}
        )
        super()._accumulate(image_out, concept_out, image_value, image_key, step)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=800, help="validation scenes drawn (about 1 in 5 qualifies)")
    p.add_argument("--weights", default=None, help="a weights directory (default: the shipped model)")
    p.add_argument("--samples", type=int, default=2, help="noise draws per image")
    p.add_argument("--batch", type=int, default=25, help="images per pass")
    a = p.parse_args()
    torch.set_num_threads(2)
    pipe = ShapesPipeline.from_pretrained(a.weights) if a.weights else ShapesPipeline.from_pretrained()
    scenes = two_object_scenes(a.images, world.VALIDATION_SEED)
    images, labels = world.render(scenes)
    captions = world.captions(scenes)
    concepts = list(world.CONCEPTS)
    _, embeds = pipe._concepts(concepts)
    patch, k = pipe.model.config.patch, len(concepts)
    on_object = object_tokens(labels, patch)  # [B, 2, N]: the tokens at least half on object slot s
    blocks = pipe.model.config.num_layers
    keys = ("on own object", "on other object", "on concepts", "pick right", "pick wrong")
    sums = {b: dict.fromkeys(keys, 0.0) for b in range(blocks)}
    counts = {b: [0, 0] for b in range(blocks)}  # (concept-object pairs, object tokens x draws)
    for start in range(0, len(captions), a.batch):
        idx = list(range(start, min(len(captions), start + a.batch)))
        inputs, b = pipe._noisy_inputs(
            [images[i] for i in idx], [captions[i] for i in idx], 0.5, a.samples, [1000 * i for i in idx]
        )
        with GazeRecorder(pipe.model.transformer, embeds, layers=list(range(blocks))) as session:
            session.forward_until_last_layer(**inputs)
        for block, rec in enumerate(session.records):
            weights, scores = (
                rec["weights"].unflatten(0, (b, a.samples)),
                (rec["image_out"] @ rec["concept_out"].transpose(-1, -2)).softmax(-1).unflatten(0, (b, a.samples)),
            )
            total = sums[block]
            for j, i in enumerate(idx):
                objects = scenes.objects(i)
                for slot, (_, shape) in enumerate(objects):
                    own, other = on_object[i, slot], on_object[i, 1 - slot]
                    c = concepts.index(shape)
                    total["on own object"] += weights[j, :, c, k:][:, own].sum(-1).mean().item()
                    total["on other object"] += weights[j, :, c, k:][:, other].sum(-1).mean().item()
                    total["on concepts"] += weights[j, :, c, :k].sum(-1).mean().item()
                    counts[block][0] += 1
                    mine, theirs = scores[j][:, own, c], scores[j][:, own, concepts.index(objects[1 - slot][1])]
                    total["pick right"] += (mine > theirs).sum().item()
                    total["pick wrong"] += (mine < theirs).sum().item()
                    counts[block][1] += mine.numel()
    report = {
        block: {key: round(v / counts[block][0 if key.startswith("on") else 1], 4) for key, v in s.items()}
        for block, s in sums.items()
    }
    print(json.dumps({"weights": a.weights or "shapes", "images": len(captions), "by block": report}, indent=1))


if __name__ == "__main__":
    main()
