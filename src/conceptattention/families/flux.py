"""FLUX.1 (dev, schnell and fine-tunes): ``FluxTransformer2DModel`` in ``FluxPipeline``.

Tokens are packed latents ``[B, N, C]``; the grid comes from ``img_ids`` (row, column per token).
The modulation takes CLIP's pooled vector, zeroed for the concept stream (the paper's choice).
RoPE tables hold the text ids first, then the image's; every text id is 0, so concept tokens sit at
position 0, where RoPE is the identity. Concepts are encoded by T5, as the pipeline encodes a
prompt (no template, the word's tokens first).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import register_family
from .base import CallInputs, Family, pair_tables, rotate_pairs

#: The paper's FLUX.1-schnell layers: double blocks 14-17 of 19.
PAPER_LAYERS = (14, 15, 16, 17)


class FluxLayout(Family):
    """Flux's token layout, shared by its derivatives: packed latents, the grid from ``img_ids``, real RoPE
    tables over [text ids; image ids] (each angle stored for both channels of a pair)."""

    def image_rope(self, rope: Any, num_image_tokens: int, dtype: torch.dtype) -> Any:
        cos, sin = rope
        return pair_tables(cos[-num_image_tokens:], sin[-num_image_tokens:], dtype)

    def text_rope(self, rope: Any, num_text_tokens: int, dtype: torch.dtype) -> Any:
        cos, sin = rope
        return pair_tables(cos[:num_text_tokens], sin[:num_text_tokens], dtype)

    def apply_rope(self, x: torch.Tensor, table: Any) -> torch.Tensor:
        return rotate_pairs(x, table)

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        return grid_from_ids(arguments)


@register_family
class Flux(FluxLayout):
    name = "flux"
    title = "FLUX.1"
    transformer_classes = ("FluxTransformer2DModel",)
    pipeline_classes = ("FluxPipeline",)
    examples = ("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev")
    clip_fp16 = True
    pooled_text = True

    # ----- transformer side -------------------------------------------------------------------------
    def default_layers(self, transformer: nn.Module) -> tuple[int, ...] | None:
        return PAPER_LAYERS if len(self.double_blocks(transformer)) == 19 else None

    # ----- pipeline side ----------------------------------------------------------------------------
    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        return pipe.tokenizer_2, 0

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        return pipe._get_t5_prompt_embeds(prompt=words, max_sequence_length=max_length, device=pipe._execution_device)

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        return pipe.tokenizer_2, 0, max_length - 1  # a truncated prompt keeps T5's end token in its last slot

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        device, dtype, s = pipe._execution_device, pipe.transformer.dtype, noisy.shape[0]
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            caption, prompt_2=None, device=device, num_images_per_prompt=s, max_sequence_length=max_length
        )
        _, c, h, w = noisy.shape
        inputs = dict(
            hidden_states=pipe._pack_latents(noisy, s, c, h, w).to(dtype),
            timestep=torch.full((s,), t, device=device, dtype=dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            txt_ids=text_ids,
            img_ids=pipe._prepare_latent_image_ids(s, h // 2, w // 2, device, dtype),
            return_dict=False,
        )
        if pipe.transformer.config.guidance_embeds:
            inputs["guidance"] = torch.full((s,), guidance, device=device, dtype=torch.float32)
        return inputs

    def calls_per_step(self, pipe: Any, call_kwargs: dict[str, Any]) -> int:
        # true CFG: the pipeline calls the transformer for the prompt, then for the negative prompt
        true_cfg = call_kwargs.get("true_cfg_scale", 1.0) > 1 and call_kwargs.get("negative_prompt")
        return 2 if true_cfg else 1


def grid_from_ids(arguments: dict[str, Any], row: int = 1, col: int = 2) -> CallInputs:
    """The grid of a Flux-layout call: the distinct values of ``img_ids``' row and column axes (so ids
    at any spacing count)."""
    hidden_states, img_ids = arguments.get("hidden_states"), arguments.get("img_ids")
    num_image = hidden_states.shape[1] if isinstance(hidden_states, torch.Tensor) else None
    if not isinstance(img_ids, torch.Tensor):
        return CallInputs(grid=None, num_image_tokens=num_image)
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids

    def grid() -> tuple[int, int]:
        return int(ids[:, row].unique().numel()), int(ids[:, col].unique().numel())

    return CallInputs(grid=grid, num_image_tokens=num_image)
