"""Pipelines: text -> image + maps (``generate``) and image -> maps (``encode``), one interface per model.

Importing this package is cheap (no torch); the pipelines load their libraries when first used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ConceptResult", "is_shapes_model", "load_image", "open_image", "load_pipeline"]


def __getattr__(name: str) -> Any:
    if name in ("load_image", "open_image"):
        from . import images

        return getattr(images, name)
    if name == "ConceptResult":
        from .result import ConceptResult

        return ConceptResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _shapes_weights(model: str | None) -> tuple[bool, Path | None]:
    """(whether ``model`` names a shapes model, its weights directory: None for the built-in one)."""
    if model in ("shapes", "", None):
        return True, None
    local = Path(model).expanduser()
    if not (local / "model.safetensors").is_file() and (local / "weights" / "model.safetensors").is_file():
        local = local / "weights"
    if (local / "model.safetensors").is_file() and (local / "config.json").is_file():
        return True, local
    return False, None


def is_shapes_model(model: str | None) -> bool:
    """Whether :func:`load_pipeline` would load ``model`` as a shapes model."""
    return _shapes_weights(model)[0]


def load_pipeline(model: str = "shapes", device: str | None = None, torch_dtype=None, offload: str | None = None):
    """The pipeline for ``model``.

    "shapes" is the built-in model; a directory holding ``model.safetensors`` + ``config.json`` is a
    shapes model written by ``train-shapes`` (its run directory, holding them in ``weights/``, too);
    anything else is a diffusers model of a supported family (hub id or local directory). A device that
    torch cannot use here fails before anything is loaded.
    """
    from .options import check_device

    check_device(device)
    shapes, weights = _shapes_weights(model)
    if shapes:
        from .shapes import ShapesPipeline

        return ShapesPipeline.from_pretrained(weights, device=device or "cpu")
    from .mmdit import MMDiTPipeline

    return MMDiTPipeline.from_pretrained(model, torch_dtype=torch_dtype, device=device, offload=offload)
