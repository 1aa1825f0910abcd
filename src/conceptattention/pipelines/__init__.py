"""Pipelines: text -> image + maps (``generate``) and image -> maps (``encode``), one interface per model."""

from .images import load_image, open_image
from .result import ConceptResult

__all__ = ["ConceptResult", "load_image", "open_image", "load_pipeline"]


def load_pipeline(model: str = "shapes", device: str | None = None, torch_dtype=None, offload: str | None = None):
    """The pipeline for ``model``.

    "shapes" is the built-in model; a directory holding ``model.safetensors`` + ``config.json`` is a
    shapes model written by ``train-shapes`` (its run directory, holding them in ``weights/``, too); anything else is a diffusers FLUX.1 or SD3/SD3.5 model
    (hub id or local directory).
    """
    from pathlib import Path

    from .shapes import ShapesPipeline

    if model in ("shapes", "", None):
        return ShapesPipeline.from_pretrained(device=device or "cpu")
    local = Path(model)
    if not (local / "model.safetensors").is_file() and (local / "weights" / "model.safetensors").is_file():
        local = local / "weights"
    if (local / "model.safetensors").is_file() and (local / "config.json").is_file():
        return ShapesPipeline.from_pretrained(local, device=device or "cpu")
    from .mmdit import MMDiTPipeline

    return MMDiTPipeline.from_pretrained(model, torch_dtype=torch_dtype, device=device, offload=offload)
