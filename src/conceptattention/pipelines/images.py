"""Reading user images: paths, PIL images or tensors, any mode, checked and resized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConceptAttentionError


def open_image(source: Any) -> Image.Image:
    """A path, PIL image or tensor/array (``[3, H, W]`` or ``[H, W, 3]``, floats in [0, 1] or uint8) -> RGB PIL."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConceptAttentionError(f"image file not found: {path}")
        if path.stat().st_size == 0:
            raise ConceptAttentionError(f"image file is empty: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
        except (UnidentifiedImageError, OSError) as err:
            raise ConceptAttentionError(f"cannot read {path} as an image ({err}); give a PNG, JPEG or WebP file") from None
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, (torch.Tensor, np.ndarray)):
        array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ConceptAttentionError(f"an image array must be [H, W], [H, W, C] or [C, H, W]; got {source.shape}")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
        return _to_rgb(Image.fromarray(array[..., 0] if mode == "L" else array, mode))
    raise ConceptAttentionError(f"cannot use a {type(source).__name__} as an image; give a path, PIL image or tensor")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.width < 2 or img.height < 2:
        raise ConceptAttentionError(f"the image is {img.width}x{img.height} pixels; give one at least 2x2 (ideally the model's size)")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGB", img.size, "white")  # composite transparency on white
        rgba = img.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def load_image(source: Any, size: tuple[int, int]) -> torch.Tensor:
    """Any image -> ``[3, H, W]`` float in [0, 1], resized (bicubic) to ``size = (W, H)``."""
    img = open_image(source)
    if img.size != tuple(size):
        img = img.resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def noise_samples(shape: tuple[int, ...], samples: int, seed: int) -> torch.Tensor:
    """``[samples, *shape]`` standard normal noise; draw i comes from seed + i alone (CPU generator),
    so S batched draws are exactly the draws of S single runs with seeds seed .. seed + S - 1."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed + i))
                        for i in range(samples)])


def batch_seeds(images: Any, captions: Any, seeds: Any) -> list[int]:
    """Check there is one caption per image (at least one image); the noise seed of each image
    (default: its position in the batch)."""
    if len(images) != len(captions) or not len(images):
        raise ConceptAttentionError(f"give one caption per image ({len(images)} images, {len(captions)} captions)")
    return list(range(len(images))) if seeds is None else [int(s) for s in seeds]


def sum_word_tokens(per_token: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Per-prompt-token maps ``[S, h, w]`` -> one map per concept ``[K, h, w]``: the sum over the
    concept's token positions (all zero for a concept with none)."""
    out = torch.zeros(len(positions), *per_token.shape[-2:])
    for k, where in enumerate(positions):
        if where:
            out[k] = per_token[where].sum(0)
    return out
