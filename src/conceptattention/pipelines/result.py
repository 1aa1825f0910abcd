"""The result every pipeline returns, and how it is written to disk."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass
class ConceptResult:
    """An image and one saliency map per concept.

    ``maps`` is ``[K, H, W]`` float32 at the image's resolution (ConceptAttention saliency: softmax
    over concepts, mean over layers and steps); ``token_maps`` the same on the token grid ``[K, h, w]``.
    ``extra_maps`` holds other recorded readouts (name -> ``[K, H, W]``).
    """

    image: Image.Image
    maps: torch.Tensor
    token_maps: torch.Tensor
    concepts: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    extra_maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, out: Path) -> dict[str, Path]:
        """Write image.png, maps.npy, one overlay per concept, grid.png and result.json into ``out``."""
        from ..viz import concept_grid, overlay, safe_name

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = {"image": out / "image.png", "maps": out / "maps.npy", "grid": out / "grid.png",
                   "result": out / "result.json"}
        self.image.save(written["image"])
        np.save(written["maps"], self.maps.detach().float().cpu().numpy().astype(np.float32))
        for k, concept in enumerate(self.concepts):
            path = out / f"overlay_{k:02d}_{safe_name(concept)}.png"
            overlay(self.image, self.maps[k]).save(path)
            written[f"overlay:{concept}"] = path
        concept_grid(self.image, self.maps, self.concepts).save(written["grid"])
        info = {
            "concepts": self.concepts,
            "maps_shape": list(self.maps.shape),
            "token_grid": list(self.token_maps.shape[1:]),
            "image_size": list(self.image.size),
            "files": {k: v.name for k, v in written.items()},
            **self.settings,
        }
        written["result"].write_text(json.dumps(info, indent=2))
        return written
