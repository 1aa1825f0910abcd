"""Pipelines: text -> image + maps (``generate``) and image -> maps (``encode``), one interface per model."""

from pathlib import Path

from .images import load_image, open_image
from .result import ConceptResult

__all__ = ["ConceptResult", "is_shapes_model", "load_image", "open_image", "load_pipeline"]


def _shapes_weights(model: str | None) -> tuple[bool, Path | None]:
    """(whether ``model`` names a shapes model, its weights directory: None for the built-in one)."""
    if model in ("shapes", "", None):
        return True, None
    local = Path(model)
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
    shapes model written by ``train-shapes`` (its run directory, holding them in ``weights/``, too); anything else is a diffusers FLUX.1 or SD3/SD3.5 model
    (hub id or local directory).
    """
    shapes, weights = _shapes_weights(model)
    if shapes:
        from .shapes import ShapesPipeline

        return ShapesPipeline.from_pretrained(weights, device=device or "cpu")
    from .mmdit import MMDiTPipeline

    return MMDiTPipeline.from_pretrained(model, torch_dtype=torch_dtype, device=device, offload=offload)
