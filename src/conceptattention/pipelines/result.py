"""The result every pipeline returns, and how it is written to disk."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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


def upsample(token_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[K, h, w]`` -> ``[K, H, W]`` bilinear (per-pixel sums over concepts are kept)."""
    return F.interpolate(token_maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def result_from_session(image: Image.Image, session: Any, concepts: list[str], settings: dict[str, Any],
                        batch_index: int | None) -> ConceptResult:
    """Maps of one image from a finished ConceptAttention session.

    ``batch_index`` picks the batch item (e.g. -1: the conditional half of a guidance batch); None
    averages over the batch (noise samples of one image).
    """
    def pick(maps: torch.Tensor) -> torch.Tensor:  # [B, K, h, w] -> [K, h, w]
        return maps.mean(0) if batch_index is None else maps[batch_index]

    return result_from_maps(image, {name: pick(m) for name, m in session.all_maps().items()}, concepts, settings)


def result_from_maps(image: Image.Image, token_maps: dict[str, torch.Tensor], concepts: list[str],
                     settings: dict[str, Any]) -> ConceptResult:
    """A result from ``{readout: [K, h, w]}`` token maps; the first readout is the main one."""
    size = (image.size[1], image.size[0])
    all_maps = {name: m.float().cpu() for name, m in token_maps.items()}
    first = next(iter(all_maps))
    main = all_maps.pop(first)
    return ConceptResult(image=image, maps=upsample(main, size), token_maps=main, concepts=concepts,
                         settings=settings, extra_maps={k: upsample(v, size) for k, v in all_maps.items()})
