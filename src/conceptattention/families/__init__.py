"""Model families: one file each (see :mod:`.base`); this registry is their table of contents.

Every module in this package is imported with it, and each registers its family with
:func:`register_family`, so supporting a new model is one new file. A family is found
by the class of a transformer or of a diffusers pipeline.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, TypeVar

from ..errors import UnsupportedModelError
from .base import CallInputs, Family, TextStep

__all__ = [
    "FAMILIES",
    "CallInputs",
    "Family",
    "TextStep",
    "family_for_pipeline",
    "family_for_transformer",
    "register_family",
    "supported_transformers",
]

#: Registered families, in registration order (a family registered later is tried first).
FAMILIES: list[Family] = []

F = TypeVar("F", bound=type[Family])


def register_family(cls: F) -> F:
    """Class decorator: register an instance of a :class:`Family` subclass."""
    FAMILIES[:] = [f for f in FAMILIES if type(f).__name__ != cls.__name__]
    FAMILIES.append(cls())
    return cls


def supported_transformers() -> list[str]:
    """Class names of every supported transformer, family by family."""
    return [name for family in FAMILIES for name in family.transformer_classes]


def family_for_transformer(transformer: Any) -> Family:
    """The family of ``transformer``; UnsupportedModelError naming the supported classes otherwise."""
    for family in reversed(FAMILIES):
        if family.matches(transformer, family.transformer_classes):
            return family
    families = "; ".join(f"{f.title} ({', '.join(f.transformer_classes)})" for f in FAMILIES)
    raise UnsupportedModelError(
        f"no ConceptAttention family for {type(transformer).__name__}; supported families: {families} "
        "(pass the pipeline's .transformer, or add a family: see conceptattention.families)"
    )


def family_for_pipeline(pipe: Any) -> Family:
    """The family of a diffusers pipeline; UnsupportedModelError naming the supported ones otherwise."""
    for family in reversed(FAMILIES):
        if family.matches(pipe, family.pipeline_classes):
            return family
    names = ", ".join(f"{f.title} ({', '.join(f.pipeline_classes)})" for f in FAMILIES)
    raise UnsupportedModelError(f"{type(pipe).__name__} is not supported; supported pipelines: {names}")


for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
