"""ConceptAttention: where each concept lives in an image, read from a diffusion transformer.

Public API (see README):

- :class:`ConceptAttention` -- attach a concept stream to a diffusers MM-DiT and read saliency maps.
- :data:`READOUTS`, :class:`Readout` -- the paper's method, its ablations and attention baselines.
- :data:`FOLLOWUPS` -- the follow-up methods: attention chains, anchor propagation, head and layer weighting.
- :data:`FAMILIES`, :class:`Family`, :func:`register_family` -- the supported model families, and how to add one.
- :class:`ConceptAttentionError` -- raised for every input error a user can cause.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import ConceptAttentionError, UnsupportedModelError

__version__ = "0.2.0"  # the package version (pyproject.toml reads it from here); see CHANGELOG.md

# Where each public name lives; imported on first use, so `conceptattention --help` needs no torch.
_LAZY = {
    "FAMILIES": "families",
    "Family": "families",
    "family_for_transformer": "families",
    "register_family": "families",
    "supported_transformers": "families",
    "PromptAttention": "prompt_attention",
    "ConceptAttention": "core",
    "default_layers": "core",
    "READOUTS": "readouts",
    "FOLLOWUPS": "readouts",
    "Readout": "readouts",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAMILIES",
    "FOLLOWUPS",
    "ConceptAttention",
    "ConceptAttentionError",
    "Family",
    "PromptAttention",
    "READOUTS",
    "Readout",
    "UnsupportedModelError",
    "default_layers",
    "family_for_transformer",
    "register_family",
    "supported_transformers",
]
