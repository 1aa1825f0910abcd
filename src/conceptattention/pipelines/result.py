"""The result every pipeline returns, and how it is written to disk."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..readouts import Readout, resolve_readouts


RESERVED = {"image", "maps", "maps_raw", "grid", "segmentation", "result"}


def overlay_names(concepts: list[str]) -> list[str]:
    """A distinct, safe file name per concept (``dog.png``; clashes get ``_2``, ``_3``...)."""
    from ..viz import safe_name

    used, names = set(RESERVED), []
    for concept in concepts:
        stem = safe_name(concept)
        candidate, n = stem, 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{stem}_{n}"
        used.add(candidate.lower())
        names.append(candidate + ".png")
    return names


def with_raw(readouts: Sequence[Any]) -> list[Any]:
    """``readouts`` plus the main readout without its softmax over concepts, for ``maps_raw.npy``
    (same stream and space: computed in the same pass at no extra cost; its name ends in "/raw")."""
    main = next(iter(resolve_readouts(list(readouts)).values()))
    return [*readouts, Readout(main.space, False, main.stream)]


@dataclass
class ConceptResult:
    """An image and one saliency map per concept.

    ``maps`` is ``[K, H, W]`` float32 at the image's resolution (ConceptAttention saliency: softmax
    over concepts, mean over layers and steps); ``token_maps`` the same on the token grid ``[K, h, w]``;
    ``raw_token_maps`` the scores before the softmax over concepts ``[K, h, w]`` (when recorded).
    ``extra_maps`` holds other recorded readouts (name -> ``[K, H, W]``).
    """

    image: Image.Image
    maps: torch.Tensor
    token_maps: torch.Tensor
    concepts: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    extra_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    raw_token_maps: torch.Tensor | None = None

    def save(self, out: Path) -> dict[str, Path]:
        """Write image.png, maps.npy, maps_raw.npy, one ``<concept>.png`` overlay per concept, grid.png,
        segmentation.png and result.json into ``out``."""
        from .. import __version__
        from ..viz import concept_grid, overlay_with_colorbar, segmentation

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = {"image": out / "image.png", "maps": out / "maps.npy"}
        self.image.save(written["image"])
        np.save(written["maps"], self.maps.detach().float().cpu().numpy().astype(np.float32))
        if self.raw_token_maps is not None:
            written["maps_raw"] = out / "maps_raw.npy"
            np.save(written["maps_raw"], self.raw_token_maps.detach().float().cpu().numpy().astype(np.float32))
        for k, (concept, name) in enumerate(zip(self.concepts, overlay_names(self.concepts))):
            written[f"overlay:{concept}"] = out / name
            overlay_with_colorbar(self.image, self.maps[k], concept).save(written[f"overlay:{concept}"])
        written["grid"] = out / "grid.png"
        concept_grid(self.image, self.maps, self.concepts).save(written["grid"])
        written["segmentation"] = out / "segmentation.png"
        segmentation(self.image, self.maps, self.concepts).save(written["segmentation"])
        written["result"] = out / "result.json"
        info = {
            "concepts": self.concepts,
            "maps_shape": list(self.maps.shape),
            "token_grid": list(self.token_maps.shape[1:]),
            "image_size": list(self.image.size),
            "files": {k: v.name for k, v in written.items()},
            **self.settings,
            "version": __version__,
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
    raw_names = [n for n in all_maps if n.endswith("/raw")]  # with_raw appends it last
    raw = all_maps.pop(raw_names[-1]) if raw_names else None
    first = next(iter(all_maps))
    main = all_maps.pop(first)
    return ConceptResult(image=image, maps=upsample(main, size), token_maps=main, concepts=concepts,
                         settings=settings, extra_maps={k: upsample(v, size) for k, v in all_maps.items()},
                         raw_token_maps=raw)
