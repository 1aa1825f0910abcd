"""Chroma (Chroma1-HD, Chroma1-Base and fine-tunes): ``ChromaTransformer2DModel`` in ``ChromaPipeline``.

A FLUX.1-schnell derivative with the modulation pruned: there is no pooled text vector, and one
``distilled_guidance_layer`` (the approximator) maps the timestep alone to every block's shift, scale
and gate vectors. Each double block is called with ``temb`` = [image modulation ``[B, 6, D]``; text
modulation ``[B, 6, D]``] along dim 1, and its text stream reads ``temb[:, 6:]``; the concept stream is
modulated with that text half, exactly like the prompt. It carries no text, so there is nothing to
zero (``pooled_text = False``: ``concept_pooled`` changes nothing).

Tokens, grid and RoPE are FLUX.1's: packed latents, the grid from ``img_ids``, rotary tables over
cat(txt_ids, img_ids). The pipeline sets every text id to 0, so the first token of a lone-word
prompt sits at position 0; concept tokens take that position, where RoPE is the identity.

Concepts are encoded by the pipeline's own T5 path (``_get_t5_prompt_embeds``: no template, the
word's tokens first, T5 run with the tokenizer's padding mask), each word as a prompt of its own.

Masks: the pipeline passes ``attention_mask`` over [text; image] tokens, keeping the prompt's tokens,
its first padding token and every image token; the blocks combine it as query x key. diffusers
builds it of 0/1 floats, which the attention adds to the logits (a kept key gains 1, a dropped one
0, so padding keeps e^-1 of its weight); a boolean mask drops. :meth:`prompt_mask` reads either kind
as the keep mask the pipeline means, so the image-to-prompt baseline gives dropped padding no weight.
The concept stream attends to concept and image keys only, never to prompt tokens: it needs no mask.

Guidance is true CFG in separate calls, the prompt's first, then the negative prompt's, in every step
where ``guidance_scale`` > 1 (the pipeline's default is 5.0); only the prompt's calls count. A call's
batch holds the prompt's images only; its first item is the image ``generate`` returns. Real-image
passes (``encode``) run the prompt's call alone; Chroma has no guidance input, so ``guidance`` is unused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import register_family
from .base import call_default
from .flux import FluxLayout


@register_family
class Chroma(FluxLayout):
    name = "chroma"
    title = "Chroma"
    transformer_classes = ("ChromaTransformer2DModel",)
    pipeline_classes = ("ChromaPipeline",)
    clip_fp16 = True
    pooled_text = False
    prompt_batch_index = 0

    # ----- transformer side -------------------------------------------------------------------------
    def text_modulation(self, block: nn.Module, arguments: dict[str, Any], temb: torch.Tensor | None) -> Any:
        """The text stream's six modulation vectors, ``temb[:, 6:]`` of the block's own ``temb``."""
        return arguments["temb"][:, 6:]

    def prompt_mask(self, call: dict[str, Any], num_text_tokens: int) -> torch.Tensor | None:
        """The prompt part of the call's ``attention_mask``, nonzero (float) or True (bool) = kept."""
        mask = call.get("attention_mask")
        if not isinstance(mask, torch.Tensor):
            return None
        return mask[:, :num_text_tokens] != 0

    # ----- pipeline side ----------------------------------------------------------------------------
    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        return pipe.tokenizer, 0

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        embeds, _ = pipe._get_t5_prompt_embeds(
            prompt=words, max_sequence_length=max_length, device=pipe._execution_device
        )
        return embeds

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        # a truncated prompt keeps T5's end token in its last slot
        return pipe.tokenizer, 0, max_length - 1

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        """The prompt's call as the pipeline makes it: T5 states, zero text ids, the pipeline's mask."""
        device, dtype, s = pipe._execution_device, pipe.transformer.dtype, noisy.shape[0]
        embeds, text_ids, mask, *_ = pipe.encode_prompt(
            caption,
            device=device,
            num_images_per_prompt=s,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
        _, c, h, w = noisy.shape
        latents = pipe._pack_latents(noisy, s, c, h, w).to(dtype)
        return dict(
            hidden_states=latents,
            timestep=torch.full((s,), t, device=device, dtype=dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=text_ids,
            img_ids=pipe._prepare_latent_image_ids(s, h // 2, w // 2, device, dtype),
            attention_mask=pipe._prepare_attention_mask(s, latents.shape[1], dtype, mask),
            return_dict=False,
        )

    def calls_per_step(self, pipe: Any, call_kwargs: dict[str, Any]) -> int:
        """2 when the call runs CFG (``guidance_scale`` > 1, the pipeline's default if not given)."""
        scale = call_kwargs.get("guidance_scale")
        if scale is None:
            scale = call_default(pipe, "guidance_scale")
        return 2 if scale > 1 else 1
