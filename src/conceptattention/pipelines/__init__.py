"""Pipelines: text -> image + maps (``generate``) and image -> maps (``encode``), one interface per model."""

from .images import load_image, open_image
from .result import ConceptResult

__all__ = ["ConceptResult", "load_image", "open_image", "load_pipeline"]


def load_pipeline(model: str = "shapes", device: str = "cpu"):
    """The pipeline for ``model``: "shapes" (built in) or a directory of shapes weights."""
    from .shapes import ShapesPipeline

    if model in ("shapes", "", None):
        return ShapesPipeline.from_pretrained(device=device)
    return ShapesPipeline.from_pretrained(model, device=device)
