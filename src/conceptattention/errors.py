"""Exceptions a user can cause. Each message says what went wrong and what to do instead."""

from __future__ import annotations


class ConceptAttentionError(ValueError):
    """Bad input to conceptattention (wrong shapes, unknown names, unsupported models, ...)."""


class UnsupportedModelError(ConceptAttentionError, TypeError):
    """The transformer is of a class that no adapter knows how to read."""


def short(text: str, limit: int = 60) -> str:
    """``repr(text)``, cut in the middle when longer than ``limit`` (so an error never echoes a whole prompt)."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    keep = max(4, limit // 2 - 3)
    return repr(text[:keep] + " ... " + text[-keep:]) + f" ({len(text)} characters)"
