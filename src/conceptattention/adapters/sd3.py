"""Stable Diffusion 3 / 3.5: diffusers ``SD3Transformer2DModel``.

Latents arrive as ``[B, C, H, W]`` and are patchified inside the model, so the grid is
``(H / patch, W / patch)``. Positions are learned embeddings added to the image tokens (no RoPE).
SD3.5's dual-attention blocks add an image-only attention (``attn2``) that the concept stream does
not touch; the last block has ``context_pre_only`` (no text-stream update after its attention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import CallInputs, MMDiTAdapter


class SD3Adapter(MMDiTAdapter):
    name = "sd3"
    transformer_classes = (("diffusers", "SD3Transformer2DModel"),)
    key_norm_layout = "BHND"

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        hidden_states = arguments.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 4:
            return CallInputs(grid=None)
        config: Any = transformer.config  # diffusers' FrozenDict
        patch = config.patch_size
        h, w = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
        return CallInputs(grid=lambda: (h, w), num_image_tokens=h * w)
