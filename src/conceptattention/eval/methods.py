"""Methods a benchmark compares: each turns images + concepts + captions into one map per concept.

ConceptAttention, its ablations and the follow-up methods (attention chains, anchor propagation,
head and layer weighting) are *readouts* of the concept stream; all readouts asked for are recorded
in one shared transformer pass per batch. A readout method takes settings after its name,
``NAME:key=value[:key=value...]`` (the fields of :class:`~conceptattention.readouts.Readout`), e.g.
``concept_attention:bounces=inf`` or ``bounce_2:heads=lambda2``. Any other method is a function

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
from ..readouts import ALL_READOUTS, parse_readout


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    readout: str | None = None  # a ConceptAttention readout (a name or NAME:key=value spec), in the shared pass
    maps: Callable[..., torch.Tensor] | None = None  # any other method

    def settings(self) -> dict[str, Any]:
        """The method's own settings, for results.json: every field of its readout ({} for other methods)."""
        return parse_readout(self.readout).settings() if self.readout is not None else {}


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
    "bounce_1": "ConceptAttention propagated once through each head's image self-attention (attention chains)",
    "bounce_2": "ConceptAttention propagated twice through each head's image self-attention",
    "bounce_4": "ConceptAttention propagated four times through each head's image self-attention",
    "bounce_8": "ConceptAttention propagated eight times through each head's image self-attention",
    "bounce_2_lambda2": "two bounces, heads weighted by the second eigenvalue of their chain (attention chains)",
    "anchor_propagation": "each concept's 4 most confident tokens spread 3 steps over image self-attention, gated "
    "by output-space similarity (AnchorDiff-style)",
    "heads_entropy": "ConceptAttention with heads weighted by how far their maps are from uniform",
    "heads_lambda2": "ConceptAttention with heads weighted by the second eigenvalue of their self-attention chain",
    "layers_confidence": "ConceptAttention over every double-stream block, each layer weighted per image by how "
    "decided its maps are",
    "heads_layers_auto": "entropy-weighted heads and confidence-weighted layers over every double-stream block",
}

for _name in ALL_READOUTS:
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
    unknown = [n for n in expanded if n.split(":")[0] not in METHODS]
    if unknown or not expanded:
        raise ConceptAttentionError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from all, {', '.join(METHODS)}"
        )
    return [METHODS[n] if n in METHODS else with_settings(n) for n in expanded]


def with_settings(spec: str) -> Method:
    """``NAME:key=value[:...]``: a readout method with some of its readout's fields changed."""
    base = METHODS[spec.split(":")[0]]
    if base.readout is None:
        raise ConceptAttentionError(
            f"{base.name} takes no settings; KEY=VALUE settings apply to the concept-stream methods, "
            "e.g. concept_attention:bounces=3"
        )
    changes = spec.split(":", 1)[1]
    parse_readout(base.readout + ":" + changes)  # one clear error for a bad setting, before any work
    return Method(spec, f"{base.description}; with {changes.replace(':', ', ')}", readout=base.readout + ":" + changes)


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
