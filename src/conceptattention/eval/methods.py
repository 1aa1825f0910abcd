"""Methods a benchmark compares: each turns images + concepts + captions into one map per concept.

ConceptAttention and its ablations are *readouts* of the concept stream; all readouts asked for are
recorded in one shared transformer pass per batch. Any other method is a function

    maps(pipe, images, concepts, captions, settings) -> Tensor [B, K, h, w]

registered with :func:`register_method`::

    @register_method("center_prior", "a Gaussian bump in the middle, whatever the image")
    def center_prior(pipe, images, concepts, captions, settings):
        ...

Maps are on any grid; the runner blurs (optionally), upsamples to the labels and scores them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConceptAttentionError
from ..readouts import READOUTS


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    readout: str | None = None  # a ConceptAttention readout, recorded in the shared pass
    maps: Callable[..., torch.Tensor] | None = None  # any other method


METHODS: dict[str, Method] = {}

_READOUT_DESCRIPTIONS = {
    "concept_attention": "ConceptAttention (paper default): output space, softmax over concepts, cross + self attention",
    "output_no_softmax": "ConceptAttention without the softmax over concepts",
    "cross_only": "concept tokens attend to image tokens only (no self attention among concepts)",
    "self_only": "concept tokens attend to each other only",
    "no_concept_attention": "concept tokens attend to neither (each only to itself)",
    "cross_attention": "raw cross attention: softmax of concept query x image key over image tokens",
    "cross_attention_softmax": "cross attention, then a softmax over concepts",
    "value": "value space: image value x concept value, softmax over concepts",
    "value_no_softmax": "value space without the softmax over concepts",
    "concept_attention_linear_norm": "ConceptAttention with the authors' linear normalisation of concept "
    "vectors (their benchmark scripts)",
}

for _name in READOUTS:
    METHODS[_name] = Method(_name, _READOUT_DESCRIPTIONS.get(_name, _name), readout=_name)


def register_method(name: str, description: str = "") -> Callable:
    """Decorator: add ``fn(pipe, images, concepts, captions, settings) -> [B, K, h, w]`` as a method."""

    def add(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in METHODS:
            raise ConceptAttentionError(f"a method named {name!r} is already registered")
        METHODS[name] = Method(name, description or (fn.__doc__ or name).strip().splitlines()[0], maps=fn)
        return fn

    return add


@register_method(
    "daam",
    "DAAM-style: attention of image queries to the caption's own tokens, "
    "softmax over caption tokens, summed over each concept word's tokens",
)
def daam(pipe: Any, images: list, concepts: list[str], captions: list[str], settings: dict) -> torch.Tensor:
    """Concepts absent from the caption get an all-zero map (DAAM sees only the prompt's words)."""
    return pipe.prompt_maps(images, concepts, captions, **settings)


def resolve_methods(names: str | list[str]) -> list[Method]:
    """``"all"``, one name, a comma-separated string or a list -> registered methods, in order."""
    if isinstance(names, str):
        names = [names]
    expanded: list[str] = []
    for n in (part.strip() for item in names for part in item.split(",") if part.strip()):
        for item in list(METHODS) if n == "all" else [n]:
            if item not in expanded:
                expanded.append(item)
    unknown = [n for n in expanded if n not in METHODS]
    if unknown or not expanded:
        raise ConceptAttentionError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from all, {', '.join(METHODS)}"
        )
    return [METHODS[n] for n in expanded]


def run_methods(
    pipe: Any, methods: list[Method], images: list, concepts: list[str], captions: list[str], settings: dict
) -> dict[str, torch.Tensor]:
    """Maps of every method for a batch sharing one concept list: ``{method: [B, K, h, w]}``."""
    out: dict[str, torch.Tensor] = {}
    readouts = [m.readout for m in methods if m.readout is not None]
    if readouts:
        out.update(pipe.token_maps(images, concepts, captions, readouts=readouts, **settings))
    for m in methods:
        if m.readout is None:
            out[m.name] = m.maps(pipe, images, concepts, captions, dict(settings)).float().cpu()
    return {m.name: out[m.readout or m.name] for m in methods}
