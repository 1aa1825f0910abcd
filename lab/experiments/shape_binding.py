"""Experiment: where does a caption's shape word reach its object? (why the shape maps stay at chance)

For validation images with two objects of different colours and different shapes, at each block of
the shapes model, on the image noised at t = 0.5 with its own caption:

1. attention: the mean share of an object's image tokens' attention (DAAM-style, image queries over
   the caption's keys) that goes to its own colour word, its own shape word, the other object's colour
   and shape words, the word after each shape word ("and", "on": with neighbour maps they carry the shape
   before them), and everything else ("a", the scene word, padding);
2. probes: how well a linear probe (ridge regression, fit on half the objects, scored on the other half)
   names an object's shape from (a) the text stream's state of the object's *colour* word, (b) that of
   its *shape* word, (c) the mean image-stream state over the object's tokens, (d) the mean of their
   attention outputs (before the output projection: the vectors ConceptAttention compares with the
   concepts'), and (e) single object tokens' attention outputs (probe fit on the tokens of the first
   half of the images). Chance is about 1/3.

If the object's pixels attend to their colour word and that word's text-stream state names the
shape, the caption's binding of shape to colour is done in the text stream and the pixels read shape
through the colour word: a lone shape concept (as ConceptAttention encodes it) then has nothing of its
own to match.

    python lab/experiments/shape_binding.py [--weights DIR]   # 800 scenes -> 155 images, about a minute
"""

from __future__ import annotations

import argparse
import json

import torch

from conceptattention.pipelines.shapes import ShapesPipeline
from conceptattention.prompt_attention import PromptAttention
from conceptattention.shapes import world
from conceptattention_lab.binding import object_tokens, two_object_scenes


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, ridge: float = 10.0, half: int | None = None) -> float:
    """A linear probe: ridge regression onto one-hot shapes, fit on the first ``half`` rows (default: half
    of them; features standardised there), scored as the arg-max on the rest."""
    half = len(labels) // 2 if half is None else half
    x = features.double()
    mean, std = x[:half].mean(0), x[:half].std(0) + 1e-6
    x = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = torch.nn.functional.one_hot(labels, len(world.SHAPES)).double()
    a = x[:half]
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=x.dtype), a.T @ y[:half])
    return ((x[half:] @ w).argmax(-1) == labels[half:]).float().mean().item()


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=800, help="validation scenes drawn (about 1 in 5 qualifies)")
    p.add_argument("--weights", default=None, help="a weights directory (default: the shipped model)")
    p.add_argument("--samples", type=int, default=2, help="noise draws per image")
    a = p.parse_args()
    torch.set_num_threads(2)
    pipe = ShapesPipeline.from_pretrained(a.weights) if a.weights else ShapesPipeline.from_pretrained()
    scenes = two_object_scenes(a.images, world.VALIDATION_SEED)
    images, labels = world.render(scenes)
    captions = world.captions(scenes)
    patch = pipe.model.config.patch
    on_object = object_tokens(labels, patch)  # [B, 2, N]: the tokens at least half on object slot s
    roles = ("own colour", "own shape", "other colour", "other shape", "after own shape", "after other shape", "rest")
    attention = {}
    states: dict[int, dict[str, list]] = {}
    blocks = list(pipe.model.transformer.transformer_blocks)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        b.register_forward_hook(lambda m, args, out, k=k: captured.__setitem__(k, out)) for k, b in enumerate(blocks)
    ]
    outputs: dict[int, torch.Tensor] = {}  # image tokens' attention outputs, heads concatenated
    hooks += [
        b.attn.to_out[0].register_forward_pre_hook(lambda m, args, k=k: outputs.__setitem__(k, args[0]))
        for k, b in enumerate(blocks)
    ]
    try:
        inputs, b = pipe._noisy_inputs(list(images), captions, 0.5, a.samples, None)
        for k in range(len(blocks)):
            with PromptAttention(pipe.model.transformer, layers=[k]) as session:
                session.forward_until_last_layer(**inputs)
            probs = session.maps().flatten(2).unflatten(0, (b, a.samples)).mean(1)  # [B, S, N]
            states[k] = {
                "text": captured[k][0].unflatten(0, (b, a.samples)).mean(1).float(),
                "image": captured[k][1].unflatten(0, (b, a.samples)).mean(1).float(),
                "output": outputs[k].unflatten(0, (b, a.samples)).mean(1).float(),
            }
            totals = dict.fromkeys(roles, 0.0)
            for i, caption in enumerate(captions):
                words = caption.split()
                objs = scenes.objects(i)
                for s in range(2):
                    (colour, shape), (other_colour, other_shape) = objs[s], objs[1 - s]
                    mass = probs[i][:, on_object[i, s]].mean(-1)  # [S]: attention per caption token
                    picked = {
                        r: mass[words.index(w)].item()
                        for r, w in zip(roles, (colour, shape, other_colour, other_shape))
                    }
                    for r, w in (("after own shape", shape), ("after other shape", other_shape)):  # "and", "on"
                        after = words.index(w) + 1
                        picked[r] = mass[after].item() if after < len(words) else 0.0
                    picked["rest"] = mass.sum().item() - sum(picked.values())
                    for r in roles:
                        totals[r] += picked[r] / (2 * len(captions))
            attention[k] = {r: round(v, 3) for r, v in totals.items()}
    finally:
        for h in hooks:
            h.remove()
    shape_index = {s: j for j, s in enumerate(world.SHAPES)}
    target = torch.tensor([shape_index[scenes.objects(i)[s][1]] for i in range(len(captions)) for s in range(2)])
    # before block 0: the prompt tokens as the text encoder gives them (no image stream yet)
    prompt = inputs["encoder_hidden_states"].unflatten(0, (b, a.samples)).mean(1).float()
    states[-1] = {"text": prompt, "image": None, "output": None}
    probes = {}
    for k in sorted(states):
        text, image, output = states[k]["text"], states[k]["image"], states[k]["output"]
        colour_word, shape_word, pixels, outs, tokens, token_shapes, first_half = [], [], [], [], [], [], 0
        for i, caption in enumerate(captions):
            words = caption.split()
            for s, (colour, shape) in enumerate(scenes.objects(i)):
                colour_word.append(text[i, words.index(colour)])
                shape_word.append(text[i, words.index(shape)])
                if image is not None:
                    pixels.append(image[i][on_object[i, s]].mean(0))
                    outs.append(output[i][on_object[i, s]].mean(0))
                    tokens.append(output[i][on_object[i, s]])
                    token_shapes += [shape_index[shape]] * int(on_object[i, s].sum())
            if i + 1 == len(captions) // 2:
                first_half = len(token_shapes)
        probes["prompt" if k < 0 else k] = {
            name: round(probe_accuracy(torch.stack(f), target), 3)
            for name, f in (
                ("colour word", colour_word),
                ("shape word", shape_word),
                ("object pixels", pixels),
                ("object outputs", outs),
            )
            if f
        }
        if tokens:
            probes[k]["token outputs"] = round(
                probe_accuracy(torch.cat(tokens), torch.tensor(token_shapes), half=first_half), 3
            )
    print(
        json.dumps({"objects": len(target), "attention by block": attention, "shape probe by block": probes}, indent=1)
    )


if __name__ == "__main__":
    main()
