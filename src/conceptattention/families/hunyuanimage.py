"""HunyuanImage 2.1: ``HunyuanImageTransformer2DModel`` in ``HunyuanImagePipeline``.

Latents ``[B, C, H, W]`` are patchified in the model (grid ``H / p_h, W / p_w``). Joint attention orders tokens
[image, text]; RoPE (the model's real ``rope`` tables) rotates image tokens only, so concept tokens, like prompt
tokens, get none. The modulation ``time_guidance_embed(timestep, guidance, timestep_r)`` has no pooled text vector:
the concept stream is modulated exactly like the prompt.

Concepts: the pipeline wraps a prompt in a system/user template and drops its first ``prompt_template_encode_start_idx``
Qwen2.5-VL tokens; a concept is its word's first-token state in the prompt made of that word alone, at index
``len(template prefix tokens) - start_idx`` (0 with the real tokenizer, whose prefix is the 34 dropped tokens).
The ``context_embedder`` is a token refiner (self-attention among a prompt's tokens, conditioned on the timestep and
their masked mean): each concept goes through it alone, as a one-token prompt (one-token mask) at the call's timestep.
A lone concept quotes nothing, so it has no ByT5 glyph tokens.

Prompt tokens: with glyph states (the pipeline always passes them, all masked when nothing is quoted) the model
orders text as [valid ByT5, valid Qwen, padding], and ``prompt_mask`` follows. Word positions are a caption's Qwen
tokens, after the valid ByT5 tokens of its quoted text; byte-level BPE tokenizes a word after a space with it.

Real images: latents ``mean(VAE) * scaling_factor`` (no shift: the base's ``latents``), timestep ``1000 t``, guidance
``1000 g`` (``distilled_guidance_scale``) for guidance-distilled models, and ``timestep_r = timestep`` for MeanFlow
ones (the instantaneous velocity at t). A guider calls the transformer for the prompt, then the negative prompt.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..errors import ConceptAttentionError
from . import register_family
from .base import CallInputs, Family, call_default, pair_tables, rotate_pairs


@register_family
class HunyuanImage(Family):
    name = "hunyuanimage"
    title = "HunyuanImage 2.1"
    transformer_classes = ("HunyuanImageTransformer2DModel",)
    pipeline_classes = ("HunyuanImagePipeline",)
    guidance_argument = "distilled_guidance_scale"
    spaced_words = True

    # ----- transformer side -------------------------------------------------------------------------
    def text_dim(self, transformer: nn.Module) -> int:
        embedder: Any = transformer.context_embedder
        return embedder.proj_in.in_features

    def embed_concepts(self, transformer: nn.Module, embeds: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        """Each concept through the token refiner as a one-token prompt, at each batch item's timestep."""
        timestep = call["timestep"].reshape(-1)
        batch, k = max(embeds.shape[0], timestep.shape[0]), embeds.shape[1]
        tokens = embeds.expand(batch, -1, -1).reshape(batch * k, 1, -1)
        mask = torch.ones(batch * k, 1, dtype=torch.bool, device=embeds.device)
        embedder: Any = transformer.context_embedder
        return embedder(tokens, timestep.expand(batch).repeat_interleave(k), mask).reshape(batch, k, -1)

    def image_rope(self, rope: Any, num_image_tokens: int, dtype: torch.dtype) -> Any:
        return pair_tables(rope[0], rope[1], dtype)  # image tokens only: the tables cover them all

    def apply_rope(self, x: torch.Tensor, table: Any) -> torch.Tensor:
        return rotate_pairs(x, table)

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        hidden_states = arguments.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 4:
            return CallInputs(grid=None)
        config: Any = transformer.config  # diffusers' FrozenDict
        ph, pw = config.patch_size
        h, w = hidden_states.shape[-2] // ph, hidden_states.shape[-1] // pw
        return CallInputs(grid=lambda: (h, w), num_image_tokens=h * w)

    def prompt_mask(self, call: dict[str, Any], num_text_tokens: int) -> torch.Tensor | None:
        """In the model's text order: with glyph states joined, valid ByT5 and Qwen tokens first, then padding."""
        mask = call["encoder_attention_mask"].bool()
        if num_text_tokens == mask.shape[1]:  # no glyph states joined
            return mask
        valid = mask.sum(1) + call["encoder_attention_mask_2"].bool().sum(1)
        return torch.arange(num_text_tokens, device=mask.device) < valid[:, None]

    # ----- pipeline side ----------------------------------------------------------------------------
    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        prefix = pipe.prompt_template_encode.split("{}")[0]
        first = len(pipe.tokenizer(prefix).input_ids) - pipe.prompt_template_encode_start_idx
        if first < 0:
            raise ConceptAttentionError("the pipeline drops more tokens than its template prefix has: prompts are cut")
        return pipe.tokenizer, first

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        embeds, _ = pipe._get_qwen_prompt_embeds(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            prompt=words,
            device=pipe._execution_device,
            tokenizer_max_length=pipe.tokenizer_max_length,
            template=pipe.prompt_template_encode,
            drop_idx=pipe.prompt_template_encode_start_idx,
        )
        return embeds

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        """Qwen tokens follow the caption's valid ByT5 tokens (its quoted text) in the model's text order."""
        from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text

        tokenizer, first = self.concept_tokenizer(pipe)
        glyph, quoted = 0, extract_glyph_text(caption)
        if quoted is not None and getattr(pipe, "tokenizer_2", None) is not None:
            glyph = len(pipe.tokenizer_2(quoted, max_length=pipe.tokenizer_2_max_length, truncation=True).input_ids)
        return tokenizer, glyph + first, glyph + pipe.tokenizer_max_length  # it keeps tokenizer_max_length tokens

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        device, dtype, s = pipe._execution_device, pipe.transformer.dtype, noisy.shape[0]
        embeds, mask, glyph, glyph_mask = pipe.encode_prompt(prompt=caption, device=device, num_images_per_prompt=s)
        timestep, config = torch.full((s,), t * 1000.0, device=device, dtype=dtype), pipe.transformer.config
        inputs = dict(
            hidden_states=noisy.to(dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.to(dtype),
            encoder_attention_mask=mask,
            encoder_hidden_states_2=glyph.to(dtype),
            encoder_attention_mask_2=glyph_mask,
            return_dict=False,
        )
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((s,), guidance, device=device, dtype=dtype) * 1000.0
        if config.use_meanflow:
            inputs["timestep_r"] = timestep
        return inputs

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * math.lcm(*pipe.transformer.config.patch_size)

    def calls_per_step(self, pipe: Any, call_kwargs: dict[str, Any]) -> int:
        """The guider's conditions per step (the pipeline falls back to ``guider`` without an ``ocr_guider``)."""
        steps = call_kwargs.get("num_inference_steps") or call_default(pipe, "num_inference_steps")
        counts = conditions(pipe.guider, steps) | conditions(pipe.ocr_guider or pipe.guider, steps)
        if len(counts) > 1:
            raise ConceptAttentionError(
                "this pipeline's guiders call the transformer a different number of times at different steps "
                "(guidance on part of the schedule, or guider and ocr_guider differ); maps cannot follow the steps"
            )
        return counts.pop()


def conditions(guider: Any, steps: int) -> set[int]:
    """The numbers of transformer calls ``guider`` makes at the steps of a ``steps``-step run (1 without one)."""
    if guider is None:
        return {1}
    probe = copy.copy(guider)  # the pipeline's own guider keeps its state
    counts = set()
    for step in range(steps):
        probe.set_state(step=step, num_inference_steps=steps, timestep=None)
        counts.add(probe.num_conditions)
    return counts
