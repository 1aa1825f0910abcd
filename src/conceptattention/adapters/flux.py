"""Flux.1 (dev, schnell and fine-tunes): diffusers ``FluxTransformer2DModel``.

Tokens are packed latents ``[B, N, C]``; the grid comes from ``img_ids`` (row, column per token).
RoPE acts on image keys; concept tokens sit at position 0, where RoPE is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import CallInputs, MMDiTAdapter


class FluxAdapter(MMDiTAdapter):
    name = "flux"
    transformer_classes = (("diffusers", "FluxTransformer2DModel"),)
    key_norm_layout = "BNHD"
    clip_fp16 = True

    def rope_module(self, transformer: nn.Module) -> nn.Module | None:
        rope: Any = transformer.pos_embed
        return rope

    def image_rope(self, rope_output: Any, num_image_tokens: int, dtype: torch.dtype) -> Any:
        # Tables are [S_text + N, Dh], text ids first, each angle stored for both channels of a pair.
        cos, sin = (t[-num_image_tokens:, None, :].to(dtype) for t in rope_output)  # [N, 1, Dh]
        return cos, sin[..., 0::2]

    def text_rope(self, rope_output: Any, num_text_tokens: int, dtype: torch.dtype) -> Any:
        cos, sin = (t[:num_text_tokens, None, :].to(dtype) for t in rope_output)  # text ids come first
        return cos, sin[..., 0::2]

    def apply_rope(self, key: torch.Tensor, rope: Any) -> torch.Tensor:
        # Channel pairs (a, b) rotate to (a cos - b sin, b cos + a sin), in the key's own dtype.
        cos, sin = rope
        out = key * cos
        out[..., 0::2].addcmul_(key[..., 1::2], sin, value=-1)
        out[..., 1::2].addcmul_(key[..., 0::2], sin)
        return out

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        hidden_states = arguments.get("hidden_states")
        img_ids = arguments.get("img_ids")
        num_image = hidden_states.shape[1] if isinstance(hidden_states, torch.Tensor) else None
        if not isinstance(img_ids, torch.Tensor):
            return CallInputs(grid=None, num_image_tokens=num_image)
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids

        def grid() -> tuple[int, int]:  # distinct positions, so ids at any spacing (a re-patched model's) count
            return int(ids[:, 1].unique().numel()), int(ids[:, 2].unique().numel())

        return CallInputs(grid=grid, num_image_tokens=num_image)
