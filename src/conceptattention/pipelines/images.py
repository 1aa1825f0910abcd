"""Reading user images: paths, PIL images or tensors, any mode, checked and resized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConceptAttentionError


def open_image(source: Any) -> Image.Image:
    """A path, PIL image or tensor/array (``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` with C = 1, 3 or 4) -> RGB PIL.

    Transparency is composited on white. Values are scaled to 8 bits by :func:`to_uint8`: 16-bit images
    (PIL modes ``I;16*``, uint16 arrays) by their 0..65535 range, floats in [0, 1] by 255, other ranges as
    that function says, so no image turns all white or black by clipping.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise ConceptAttentionError(f"is a directory, not an image file: {path}; give the path of an image file")
        if not path.is_file():
            raise ConceptAttentionError(f"image file not found: {path}")
        if path.stat().st_size == 0:
            raise ConceptAttentionError(f"image file is empty: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))  # a phone photo's rotation tag is applied
        except (UnidentifiedImageError, OSError) as err:
            raise ConceptAttentionError(
                f"cannot read {path} as an image ({err}); give a PNG, JPEG or WebP file"
            ) from None
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, (torch.Tensor, np.ndarray)):
        array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ConceptAttentionError(
                f"an image array must be [H, W], [H, W, C] or [C, H, W]; got {tuple(source.shape)}"
            )
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
            raise ConceptAttentionError(
                f"an image array holds numbers, not {array.dtype}; give floats in [0, 1] or uint8"
            )
        array = to_uint8(array)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
        return _to_rgb(Image.fromarray(np.ascontiguousarray(array[..., 0] if mode == "L" else array), mode))
    raise ConceptAttentionError(f"cannot use a {type(source).__name__} as an image; give a path, PIL image or tensor")


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values of any numeric type -> uint8, scaled by the range the type (or the values) imply:

    - uint8: as is; bool: 0 / 255;
    - uint16 (16-bit images): the 0..65535 range, ``round(v / 257)``;
    - other integers (e.g. PIL's 32-bit mode ``I``): values all in 0..255 as 8-bit, all in 0..65535 by the
      16-bit range, otherwise min-max to 0..255;
    - floats (e.g. PIL's mode ``F``): values all in [0, 1] times 255, otherwise min-max to 0..255
      (non-finite values count as 0).

    Min-max maps the smallest value to 0 and the largest to 255 (each channel alike); a constant is 0.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype.itemsize == 2 and not np.issubdtype(array.dtype, np.signedinteger):
            return _scaled(array, 65535.0)
        lo, hi = int(array.min()), int(array.max())
        if lo >= 0 and hi <= 255:
            return array.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return _scaled(array, 65535.0)
        return _min_max(array.astype(np.float64))
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.min() >= 0.0 and values.max() <= 1.0:
        return _scaled(values, 1.0)
    return _min_max(values)


def _scaled(array: np.ndarray, full: float) -> np.ndarray:
    """0..``full`` -> 0..255, rounded."""
    return np.clip(np.rint(array.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return _scaled(values - lo, hi - lo)


def _has_transparency(img: Image.Image) -> bool:
    known = getattr(img, "has_transparency_data", None)  # Pillow >= 10.1
    if known is not None:
        return bool(known)
    return (
        img.mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or "transparency" in img.info
        or (img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA")
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: high bit-depth grey (``I;16*``, ``I``, ``F``) scaled by :func:`to_uint8`, not clipped;
    transparency (alpha, a palette's or a colour key's) composited on white; every other mode by PIL's
    conversion (CMYK, YCbCr, LAB, HSV, 1-bit, palettes...)."""
    if img.width < 2 or img.height < 2:
        raise ConceptAttentionError(
            f"the image is {img.width}x{img.height} pixels; give one at least 2x2 (ideally the model's size)"
        )
    if img.mode.startswith("I") or img.mode == "F":  # one channel of 16 or 32 bits: PIL's convert would clip
        return Image.fromarray(to_uint8(np.asarray(img)), "L").convert("RGB")
    if img.mode == "La":  # premultiplied alpha: PIL converts it to LA only
        img = img.convert("LA")
    if _has_transparency(img):
        background = Image.new("RGB", img.size, "white")  # composite transparency on white
        rgba = img.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def load_image(source: Any, size: tuple[int, int]) -> torch.Tensor:
    """Any image -> ``[3, H, W]`` float in [0, 1], resized (bicubic) to ``size = (W, H)``."""
    img = open_image(source)
    if img.size != tuple(size):
        img = img.resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def fit_square(source: Any, side: int) -> tuple[torch.Tensor, str]:
    """Any image -> ``[3, side, side]`` float in [0, 1] for a model of fixed square size, without squashing it:
    a non-square image is first center-cropped to a square of its shorter side, then resized (bicubic).
    Also returns what was done, e.g. ``"center-crop 300x200 to 200x200, resized to 64x64"``,
    ``"resized 128x128 to 64x64"`` or ``"unchanged (64x64)"``."""
    img = open_image(source)
    w, h = img.size
    done = []
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        done.append(f"center-crop {w}x{h} to {s}x{s}")
    if img.size != (side, side):
        done.append(f"resized to {side}x{side}" if done else f"resized {w}x{h} to {side}x{side}")
    return load_image(img, (side, side)), ", ".join(done) or f"unchanged ({w}x{h})"


def noise_samples(shape: tuple[int, ...], samples: int, seed: int) -> torch.Tensor:
    """``[samples, *shape]`` standard normal noise; draw i comes from seed + i alone (CPU generator),
    so S batched draws are exactly the draws of S single runs with seeds seed .. seed + S - 1."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed + i)) for i in range(samples)]
    )


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
