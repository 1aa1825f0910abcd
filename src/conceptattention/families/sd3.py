"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` in ``StableDiffusion3Pipeline``.

Latents arrive as ``[B, C, H, W]`` and are patchified inside the model, so the grid is
``(H / patch, W / patch)``. Positions are learned embeddings added to the image tokens (no RoPE).
SD3.5's dual-attention blocks add an image-only attention (``attn2``) that the concept stream does
not touch; the last block has ``context_pre_only`` (no text-stream update after its attention).
The modulation takes the two CLIP encoders' pooled vector, zeroed for the concept stream.

Concepts are encoded by T5, as the pipeline encodes a prompt; a model loaded without T5 encodes
them with its two CLIP encoders (start token first, states zero-padded to the joint width), and
its prompt tokens sit after CLIP's start token. With T5, prompt tokens start after the 77 CLIP ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register_family
from .base import CallInputs, Family


@register_family
class SD3(Family):
    name = "sd3"
    title = "SD3 / SD3.5"
    transformer_classes = ("SD3Transformer2DModel",)
    pipeline_classes = ("StableDiffusion3Pipeline",)
    examples = ("stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large")
    key_norm_layout = "BHND"
    pooled_text = True

    # ----- transformer side -------------------------------------------------------------------------
    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        hidden_states = arguments.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 4:
            return CallInputs(grid=None)
        config: Any = transformer.config  # diffusers' FrozenDict
        h, w = hidden_states.shape[-2] // config.patch_size, hidden_states.shape[-1] // config.patch_size
        return CallInputs(grid=lambda: (h, w), num_image_tokens=h * w)

    # ----- pipeline side ----------------------------------------------------------------------------
    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        if getattr(pipe, "text_encoder_3", None) is None:
            return pipe.tokenizer, 1  # CLIP: position 0 is the start token
        return pipe.tokenizer_3, 0

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        device = pipe._execution_device
        if getattr(pipe, "text_encoder_3", None) is not None:
            return pipe._get_t5_prompt_embeds(prompt=words, max_sequence_length=max_length, device=device)
        clip_l, _ = pipe._get_clip_prompt_embeds(prompt=words, device=device, clip_model_index=0)
        clip_g, _ = pipe._get_clip_prompt_embeds(prompt=words, device=device, clip_model_index=1)
        clip = torch.cat([clip_l, clip_g], dim=-1)
        return F.pad(clip, (0, pipe.transformer.config.joint_attention_dim - clip.shape[-1]))

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        if getattr(pipe, "text_encoder_3", None) is None:
            return pipe.tokenizer, 1, pipe.tokenizer_max_length - 1  # CLIP's end token takes the last slot
        start = pipe.tokenizer_max_length
        return pipe.tokenizer_3, start, start + max_length - 1  # T5's end token takes its last slot

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        device, dtype, s = pipe._execution_device, pipe.transformer.dtype, noisy.shape[0]
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=caption,
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=s,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
        return dict(
            hidden_states=noisy.to(dtype),
            timestep=torch.full((s,), t * 1000.0, device=device, dtype=dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            return_dict=False,
        )
