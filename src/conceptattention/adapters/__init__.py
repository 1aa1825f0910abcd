"""Adapters: one small file per MM-DiT family (see :mod:`.base`)."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import CallInputs, MMDiTAdapter, TextStep
from .flux import FluxAdapter
from .sd3 import SD3Adapter

#: Adapters tried in order by :func:`get_adapter`. Append your own to support another family.
ADAPTERS: list[MMDiTAdapter] = [FluxAdapter(), SD3Adapter()]


def get_adapter(transformer: nn.Module) -> MMDiTAdapter:
    """The adapter for ``transformer``; raises UnsupportedModelError naming the supported classes."""
    for adapter in ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    supported = ", ".join(cls for adapter in ADAPTERS for _, cls in adapter.transformer_classes)
    raise UnsupportedModelError(
        f"no ConceptAttention adapter for {type(transformer).__name__}; supported transformers: {supported} "
        "(pass the pipeline's .transformer, or register an adapter in conceptattention.adapters.ADAPTERS)"
    )


__all__ = ["ADAPTERS", "CallInputs", "FluxAdapter", "MMDiTAdapter", "SD3Adapter", "TextStep", "get_adapter"]
