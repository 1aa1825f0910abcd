"""Exceptions a user can cause. Each message says what went wrong and what to do instead."""

from __future__ import annotations


class ConceptAttentionError(ValueError):
    """Bad input to conceptattention (wrong shapes, unknown names, unsupported models, ...)."""


class UnsupportedModelError(ConceptAttentionError, TypeError):
    """The transformer is of a class that no adapter knows how to read."""
