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

Maps are the mean over the chosen layers and transformer calls of those per-layer scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import ConceptAttentionError

Stream = Literal["cross+self", "cross", "self", "none"]
Space = Literal["output", "value", "cross_attention"]

STREAMS: tuple[str, ...] = ("cross+self", "cross", "self", "none")
SPACES: tuple[str, ...] = ("output", "value", "cross_attention")


@dataclass(frozen=True)
class Readout:
    """One way of turning the concept stream into saliency scores (see module docstring)."""

    space: Space = "output"
    softmax: bool = True
    stream: Stream = "cross+self"
    concept_norm: str = "none"

    def __post_init__(self) -> None:
        if self.concept_norm not in ("none", "linear"):
            raise ConceptAttentionError(f"concept_norm is 'none' or 'linear', not {self.concept_norm!r}")
        if self.concept_norm != "none" and self.space == "cross_attention":
            raise ConceptAttentionError("concept_norm applies to the output and value spaces, not cross_attention")
        if self.space not in SPACES:
            raise ConceptAttentionError(f"unknown space {self.space!r}; choose one of {', '.join(SPACES)}")
        if self.stream not in STREAMS:
            raise ConceptAttentionError(f"unknown stream {self.stream!r}; choose one of {', '.join(STREAMS)}")


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


def resolve_readouts(readouts: Iterable[str | Readout] | str | Readout) -> dict[str, Readout]:
    """Names or specs -> ``{name: Readout}``; unnamed specs are named after their fields."""
    if isinstance(readouts, (str, Readout)):
        readouts = [readouts]
    resolved: dict[str, Readout] = {}
    for item in readouts:
        if isinstance(item, Readout):
            name = f"{item.stream}/{item.space}/{'softmax' if item.softmax else 'raw'}"
            if item.concept_norm != "none":
                name = f"{item.stream}/{item.space}/{item.concept_norm}/{'softmax' if item.softmax else 'raw'}"
            resolved[name] = item
        elif isinstance(item, str):
            if item not in READOUTS:
                raise ConceptAttentionError(
                    f"unknown readout {item!r}; choose from {', '.join(READOUTS)} or pass a Readout(...)"
                )
            resolved[item] = READOUTS[item]
        else:
            raise ConceptAttentionError(f"a readout is a name or a Readout, not {type(item).__name__}")
    if not resolved:
        raise ConceptAttentionError(f"no readout was asked for; pass at least one of {', '.join(READOUTS)}")
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
) -> torch.Tensor:
    """Raw per-layer scores ``[B, K, N]`` in float32 for one space.

    image_out ``[B, N, D]``, concept_out ``[B, K, D]``; image_value / image_key ``[B, H, N, Dh]``,
    concept_value / concept_query ``[B, H, K, Dh]``.
    """
    if space == "output":
        return torch.einsum("bkd,bnd->bkn", linear_norm(concept_out, -2, concept_norm), image_out).float()
    if space == "value":
        return torch.einsum("bhkd,bhnd->bkn", linear_norm(concept_value, -2, concept_norm), image_value).float()
    if space == "cross_attention":
        scale = concept_query.shape[-1] ** -0.5
        logits = torch.einsum("bhkd,bhnd->bhkn", concept_query.float(), image_key.float()) * scale
        return logits.softmax(dim=-1).mean(dim=1)
    raise ConceptAttentionError(f"unknown space {space!r}")


def linear_norm(x: torch.Tensor, dim: int, mode: str = "linear") -> torch.Tensor:
    """Per channel across ``dim``: subtract the minimum, divide by the sum (identity for mode "none")."""
    if mode == "none":
        return x
    shifted = x - x.amin(dim=dim, keepdim=True)
    return shifted / shifted.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
