"""What a saliency map is read from: the paper's method, its ablations and the attention baselines.

A *readout* names three choices:

- ``stream``: how concept tokens attend inside each double-stream block. ``"cross+self"`` is
  ConceptAttention (concept queries see concept keys and image keys); ``"cross"`` sees image keys
  only; ``"self"`` concept keys only; ``"none"`` each concept token sees only itself. The choice
  changes how the concept tokens evolve from layer to layer, so each stream is its own set of
  concept tokens (they are batched together in one attention call).
- ``space``: which vectors are compared per layer. ``"output"`` is the attention output (before the
  output projection, heads concatenated): ``o_x[i] · o_c[c]``; ``"value"`` the value vectors
  ``v_x[i] · v_c[c]``; ``"cross_attention"`` the attention probability of concept query c on image
  key i, softmax over image tokens, mean over heads.
- ``softmax``: whether each layer's scores get a softmax over concepts before being averaged.
- ``concept_norm``: ``"linear"`` rescales the concept vectors of the compared space across concepts
  before the dot product (per channel: subtract the minimum over concepts, divide by the sum over
  concepts), as the authors' benchmark scripts do; ``"none"`` (default) compares them as they are.

The follow-up methods add choices applied per layer (see :mod:`conceptattention.propagation`); their
defaults leave a readout exactly as above:

- ``heads``: how heads are combined: ``"uniform"`` (all channels together, the paper), ``"entropy"``
  (heads whose maps are far from uniform count more) or ``"lambda2"`` (heads whose image
  self-attention chain has a larger second eigenvalue count more).
- ``bounces``: the layer's map is propagated n times through each head's image self-attention
  (an int >= 0, or ``math.inf`` for the stationary limit).
- ``anchors``: (> 0) anchor propagation: each concept's ``anchors`` most confident tokens, spread
  ``spread`` steps over the image self-attention, gated by output-space similarity.
- ``layers``: ``"session"`` reads the session's layers; ``"all"`` every double-stream block.
- ``layer_weight``: ``"uniform"`` or ``"confidence"`` (layers whose maps decide more between
  concepts count more, per image).

Maps are the mean over the chosen layers and transformer calls of those per-layer scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch

from .errors import ConceptAttentionError

Stream = Literal["cross+self", "cross", "self", "none"]
Space = Literal["output", "value", "cross_attention"]

STREAMS: tuple[str, ...] = ("cross+self", "cross", "self", "none")
SPACES: tuple[str, ...] = ("output", "value", "cross_attention")
HEADS: tuple[str, ...] = ("uniform", "entropy", "lambda2")
LAYER_SETS: tuple[str, ...] = ("session", "all")
LAYER_WEIGHTS: tuple[str, ...] = ("uniform", "confidence")


@dataclass(frozen=True)
class Readout:
    """One way of turning the concept stream into saliency scores (see module docstring)."""

    space: Space = "output"
    softmax: bool = True
    stream: Stream = "cross+self"
    concept_norm: str = "none"
    heads: str = "uniform"
    bounces: float = 0
    anchors: int = 0
    spread: int = 1
    layers: str = "session"
    layer_weight: str = "uniform"

    def __post_init__(self) -> None:
        self._check_followups()
        if self.concept_norm not in ("none", "linear"):
            raise ConceptAttentionError(f"concept_norm is 'none' or 'linear', not {self.concept_norm!r}")
        if self.concept_norm != "none" and self.space == "cross_attention":
            raise ConceptAttentionError("concept_norm applies to the output and value spaces, not cross_attention")
        if self.space not in SPACES:
            raise ConceptAttentionError(f"unknown space {self.space!r}; choose one of {', '.join(SPACES)}")
        if self.stream not in STREAMS:
            raise ConceptAttentionError(f"unknown stream {self.stream!r}; choose one of {', '.join(STREAMS)}")

    def _check_followups(self) -> None:
        for field, value, choices in (
            ("heads", self.heads, HEADS),
            ("layers", self.layers, LAYER_SETS),
            ("layer_weight", self.layer_weight, LAYER_WEIGHTS),
        ):
            if value not in choices:
                raise ConceptAttentionError(f"{field} is one of {', '.join(choices)}, not {value!r}")
        b = self.bounces
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b < 0 or not (math.isinf(b) or b == int(b)):
            raise ConceptAttentionError(f"bounces is a whole number >= 0 or math.inf, not {b!r}")
        for name, count, low in (("anchors", self.anchors, 0), ("spread", self.spread, 1)):
            if isinstance(count, bool) or not isinstance(count, int) or count < low:
                raise ConceptAttentionError(f"{name} is an int >= {low}, not {count!r}")
        if self.anchors and self.bounces:
            raise ConceptAttentionError("bounces and anchors are two methods; give one of them, not both")

    @property
    def needs_queries(self) -> bool:
        """Whether the image tokens' queries must be read (the self-attention chain is used)."""
        return bool(self.bounces or self.anchors or self.heads == "lambda2")

    def settings(self) -> dict[str, Any]:
        """Every field as JSON-ready values (``bounces`` inf as the string "inf")."""
        out = asdict(self)
        out["bounces"] = "inf" if math.isinf(self.bounces) else int(self.bounces)
        return out

    def label(self) -> str:
        """A name from the fields: ``stream/space[follow-ups]/[norm/]softmax|raw``, the follow-up fields listed
        only where they differ from their defaults."""
        defaults, settings = Readout(), self.settings()
        extra = [f"{f}={settings[f]}" for f in FOLLOWUP_FIELDS if getattr(self, f) != getattr(defaults, f)]
        parts = [self.stream, self.space + (f"[{','.join(extra)}]" if extra else "")]
        parts += [self.concept_norm] if self.concept_norm != "none" else []
        return "/".join([*parts, "softmax" if self.softmax else "raw"])


FOLLOWUP_FIELDS = ("heads", "bounces", "anchors", "spread", "layers", "layer_weight")


#: Named readouts: the paper's method, the ablations of its Tables 3 and 4, and raw cross attention.
READOUTS: dict[str, Readout] = {
    "concept_attention": Readout("output", True, "cross+self"),
    "output_no_softmax": Readout("output", False, "cross+self"),
    "cross_only": Readout("output", True, "cross"),
    "self_only": Readout("output", True, "self"),
    "no_concept_attention": Readout("output", True, "none"),
    "cross_attention": Readout("cross_attention", False, "cross+self"),
    "cross_attention_softmax": Readout("cross_attention", True, "cross+self"),
    "value": Readout("value", True, "cross+self"),
    "value_no_softmax": Readout("value", False, "cross+self"),
    "concept_attention_linear_norm": Readout("output", True, "cross+self", "linear"),
}

#: The follow-up methods (after the paper), each applied to ConceptAttention's own per-layer maps.
FOLLOWUPS: dict[str, Readout] = {
    "bounce_1": Readout(bounces=1),
    "bounce_2": Readout(bounces=2),
    "bounce_4": Readout(bounces=4),
    "bounce_8": Readout(bounces=8),
    "bounce_2_lambda2": Readout(bounces=2, heads="lambda2"),
    "anchor_propagation": Readout(anchors=4, spread=3),  # chosen on the validation seed (docs/benchmarks.md)
    "heads_entropy": Readout(heads="entropy"),
    "heads_lambda2": Readout(heads="lambda2"),
    "layers_confidence": Readout(layers="all", layer_weight="confidence"),
    "heads_layers_auto": Readout(heads="entropy", layers="all", layer_weight="confidence"),
}

#: Every named readout: the paper's, then the follow-ups.
ALL_READOUTS: dict[str, Readout] = {**READOUTS, **FOLLOWUPS}


def _setting(readout: Readout, key: str, value: str) -> Any:
    """One ``key=value`` of a readout spec, converted to the field's type."""
    current = getattr(readout, key)
    if isinstance(current, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConceptAttentionError(f"readout setting {key} is true or false, not {value!r}")
        return value.lower() in ("true", "1")
    if key == "bounces" and value.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(current, (int, float)):
        try:
            return int(value)
        except ValueError:
            raise ConceptAttentionError(f"readout setting {key} is a whole number, not {value!r}") from None
    return value


def parse_readout(spec: str) -> Readout:
    """``NAME`` or ``NAME:key=value[:key=value...]``: a named readout with some fields changed, e.g.
    ``concept_attention:bounces=3:heads=lambda2`` (``bounces=inf`` for the stationary limit)."""
    base, *changes = spec.split(":")
    if base not in ALL_READOUTS:
        raise ConceptAttentionError(
            f"unknown readout {base!r}; choose from {', '.join(ALL_READOUTS)} or pass a Readout(...)"
        )
    readout = ALL_READOUTS[base]
    names = [f.name for f in fields(Readout)]
    updates: dict[str, Any] = {}
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or key not in names:
            raise ConceptAttentionError(
                f"readout setting {change!r} is not KEY=VALUE with KEY one of {', '.join(names)}"
            )
        updates[key] = _setting(readout, key, value)
    return replace(readout, **updates) if updates else readout


def resolve_readouts(readouts: Iterable[str | Readout] | str | Readout) -> dict[str, Readout]:
    """Names or specs -> ``{name: Readout}``; unnamed specs are named after their fields."""
    if isinstance(readouts, (str, Readout)):
        readouts = [readouts]
    resolved: dict[str, Readout] = {}
    for item in readouts:
        if isinstance(item, Readout):
            resolved[item.label()] = item
        elif isinstance(item, str):
            resolved[item] = parse_readout(item)
        else:
            raise ConceptAttentionError(f"a readout is a name or a Readout, not {type(item).__name__}")
    if not resolved:
        raise ConceptAttentionError(f"no readout was asked for; pass at least one of {', '.join(ALL_READOUTS)}")
    return resolved


def stream_mask(streams: Sequence[str], num_concepts: int, num_image: int, device: torch.device) -> torch.Tensor | None:
    """Boolean attention mask ``[S*K, S*K + N]`` (True = may attend) for the stacked concept streams.

    Keys are ordered ``[concepts of stream 0, ..., concepts of stream S-1, image tokens]``.
    Returns None when a single ConceptAttention stream needs no mask.
    """
    if list(streams) == ["cross+self"]:  # any sequence, not only a list
        return None
    k = num_concepts
    total = len(streams) * k
    mask = torch.zeros(total, total + num_image, dtype=torch.bool, device=device)
    eye = torch.eye(k, dtype=torch.bool, device=device)
    for s, mode in enumerate(streams):
        rows = slice(s * k, (s + 1) * k)
        if mode in ("cross+self", "self"):
            mask[rows, rows] = True
        if mode == "none":
            mask[rows, rows] = eye
        if mode in ("cross+self", "cross"):
            mask[rows, total:] = True
    return mask


def layer_scores(
    space: str,
    *,
    image_out: torch.Tensor,
    concept_out: torch.Tensor,
    image_value: torch.Tensor,
    concept_value: torch.Tensor,
    image_key: torch.Tensor,
    concept_query: torch.Tensor,
    concept_norm: str = "none",
    head_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw per-layer scores ``[B, K, N]`` in float32 for one space.

    image_out ``[B, N, D]``, concept_out ``[B, K, D]``; image_value / image_key ``[B, H, N, Dh]``,
    concept_value / concept_query ``[B, H, K, Dh]``. ``head_weights`` ``[B, H]`` (rows summing to 1)
    reweights the heads' shares; None (or uniform weights) gives the plain scores.
    """
    if head_weights is not None:
        per_head = head_scores(
            space,
            image_out=image_out,
            concept_out=concept_out,
            image_value=image_value,
            concept_value=concept_value,
            image_key=image_key,
            concept_query=concept_query,
            concept_norm=concept_norm,
        )
        combined = torch.einsum("bh,bhkn->bkn", head_weights.float(), per_head)
        # the dot-product spaces sum over heads and cross attention averages them: uniform weights give either
        return combined * per_head.shape[1] if space != "cross_attention" else combined
    if space == "output":
        return torch.einsum("bkd,bnd->bkn", linear_norm(concept_out, -2, concept_norm), image_out).float()
    if space == "value":
        return torch.einsum("bhkd,bhnd->bkn", linear_norm(concept_value, -2, concept_norm), image_value).float()
    if space == "cross_attention":
        scale = concept_query.shape[-1] ** -0.5
        logits = torch.einsum("bhkd,bhnd->bhkn", concept_query.float(), image_key.float()) * scale
        return logits.softmax(dim=-1).mean(dim=1)
    raise ConceptAttentionError(f"unknown space {space!r}")


def head_scores(
    space: str,
    *,
    image_out: torch.Tensor,
    concept_out: torch.Tensor,
    image_value: torch.Tensor,
    concept_value: torch.Tensor,
    image_key: torch.Tensor,
    concept_query: torch.Tensor,
    concept_norm: str = "none",
) -> torch.Tensor:
    """Each head's share of :func:`layer_scores`, ``[B, H, K, N]`` float32 (the sum over heads for the
    output and value spaces, the mean for cross attention, is ``layer_scores``)."""
    heads = image_value.shape[1]
    if space == "output":
        concept = linear_norm(concept_out, -2, concept_norm).unflatten(-1, (heads, -1))
        return torch.einsum("bkhd,bnhd->bhkn", concept, image_out.unflatten(-1, (heads, -1))).float()
    if space == "value":
        return torch.einsum("bhkd,bhnd->bhkn", linear_norm(concept_value, -2, concept_norm), image_value).float()
    if space == "cross_attention":
        scale = concept_query.shape[-1] ** -0.5
        return (torch.einsum("bhkd,bhnd->bhkn", concept_query.float(), image_key.float()) * scale).softmax(dim=-1)
    raise ConceptAttentionError(f"unknown space {space!r}")


def linear_norm(x: torch.Tensor, dim: int, mode: str = "linear") -> torch.Tensor:
    """Per channel across ``dim``: subtract the minimum, divide by the sum (identity for mode "none")."""
    if mode == "none":
        return x
    shifted = x - x.amin(dim=dim, keepdim=True)
    return shifted / shifted.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
