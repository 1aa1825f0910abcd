"""Pipelines: text -> image + maps (``generate``) and image -> maps (``encode``), one interface per model."""

from pathlib import Path

from .images import load_image, open_image
from .result import ConceptResult

__all__ = ["ConceptResult", "is_shapes_model", "load_image", "open_image", "load_pipeline"]


def shapes_weights(model: str | None) -> Path | None:
    """Where ``model`` names a shapes model: its weights directory (None: the built-in one). Raises
    LookupError for a diffusers model name (hub id or directory)."""
    if model in ("shapes", "", None):
        return None
    local = Path(model)
    if not (local / "model.safetensors").is_file() and (local / "weights" / "model.safetensors").is_file():
        local = local / "weights"
    if (local / "model.safetensors").is_file() and (local / "config.json").is_file():
        return local
    raise LookupError(model)


def is_shapes_model(model: str | None) -> bool:
    """Whether :func:`load_pipeline` would load ``model`` as a shapes model."""
    try:
        shapes_weights(model)
    except LookupError:
        return False
    return True


def load_pipeline(model: str = "shapes", device: str | None = None, torch_dtype=None, offload: str | None = None):
    """The pipeline for ``model``.

    "shapes" is the built-in model; a directory holding ``model.safetensors`` + ``config.json`` is a
    shapes model written by ``train-shapes`` (its run directory, holding them in ``weights/``, too); anything else is a diffusers FLUX.1 or SD3/SD3.5 model
    (hub id or local directory).
    """
    if is_shapes_model(model):
        from .shapes import ShapesPipeline

        return ShapesPipeline.from_pretrained(shapes_weights(model), device=device or "cpu")
    from .mmdit import MMDiTPipeline

    return MMDiTPipeline.from_pretrained(model, torch_dtype=torch_dtype, device=device, offload=offload)
