"""Qwen-Image: ``QwenImageTransformer2DModel`` in ``QwenImagePipeline`` (text-to-image).

Tokens are packed latents ``[B, N, C]``; the grid is the ``(frames, h, w)`` of the call's ``img_shapes``.
Prompt tokens enter through ``txt_in(txt_norm(x))``; each block modulates its text stream with
``txt_mod(temb)`` (shift, scale, gate for ``txt_norm1``, then for ``txt_norm2``). There is no pooled text
vector: the concept stream is modulated exactly like the prompt (timestep only), and clipped in fp16 like it.

Open choices, made so that a lone concept is encoded and placed as the pipeline does a prompt of that word alone:

- **Chat template.** The pipeline wraps a prompt in Qwen's chat template and drops its first
  ``prompt_template_encode_start_idx`` tokens (the system message): a prompt's states start with its first
  word. Each concept is encoded by the pipeline's ``encode_prompt``, one word per call (no padding), and keeps
  its first token's state (index 0). The word follows a newline, so it is tokenized without a leading space.
- **RoPE.** Text positions continue after the image's largest index (``txt_freqs`` of ``pos_embed``); a
  lone-word prompt's first token takes the first one, so concept queries and keys are rotated by
  ``txt_freqs[0]`` (complex tables, as ``apply_rotary_emb_qwen(use_real=False)``).
- **Masks.** ``encoder_hidden_states_mask`` masks padding prompt tokens: the image-to-prompt baseline masks
  them; the concept stream never attends to prompt tokens, so it needs no mask.
- **Word positions.** Byte-level BPE tokenizes a word after a space with its space: caption words after the
  first are counted with one; the caption's first token is the first text token.
- **Guidance.** True CFG (``true_cfg_scale`` > 1 and a negative prompt) calls the transformer for the prompt,
  then for the negative prompt; only the prompt's calls count. ``guidance`` sets ``true_cfg_scale``;
  real-image passes take none (no released Qwen-Image embeds guidance).
- **Variants.** ``zero_cond_t`` (doubled ``temb``; the text stream takes its first half) and
  ``use_additional_t_cond`` models are handled; calls with several images or frames in ``img_shapes`` (edit
  and layered pipelines, condition images in the image stream) raise ConceptAttentionError.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConceptAttentionError
from . import register_family
from .base import CallInputs, Family, TextStep, call_default


@register_family
class QwenImage(Family):
    name = "qwenimage"
    title = "Qwen-Image"
    transformer_classes = ("QwenImageTransformer2DModel",)
    pipeline_classes = ("QwenImagePipeline",)
    clip_fp16 = True
    guidance_argument = "true_cfg_scale"
    spaced_words = True
    prompt_batch_index = 0  # true CFG runs separate calls: the batch holds the prompt's images, the first returned

    # ----- transformer side -------------------------------------------------------------------------
    def text_dim(self, transformer: nn.Module) -> int:
        embedder: Any = transformer.txt_in
        return embedder.in_features

    def embed_concepts(self, transformer: nn.Module, embeds: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        model: Any = transformer
        return model.txt_in(model.txt_norm(embeds))

    def text_modulation(self, block: nn.Module, arguments: dict[str, Any], temb: torch.Tensor | None) -> Any:
        temb = arguments["temb"]  # zero_cond_t doubles the batch; the text stream takes the first half
        return temb.chunk(2, dim=0)[0] if getattr(block, "zero_cond_t", False) else temb

    def image_rope(self, rope: Any, num_image_tokens: int, dtype: torch.dtype) -> Any:
        return rope[0][:num_image_tokens]

    def text_rope(self, rope: Any, num_text_tokens: int, dtype: torch.dtype) -> Any:
        return rope[1][:num_text_tokens]

    def concept_rope(self, transformer: nn.Module, rope: Any, dtype: torch.dtype, position: int | None) -> Any:
        return rope[1][:1]  # the first text position: a lone-word prompt's first token (the template is dropped)

    def apply_rope(self, x: torch.Tensor, table: Any) -> torch.Tensor:
        """Channel pairs of ``[B, N, H, Dh]`` as complex numbers times ``table`` ``[N | 1, Dh/2]``, in float32."""
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * table[:, None]).flatten(-2).type_as(x)

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        hidden_states, shapes = arguments.get("hidden_states"), arguments.get("img_shapes")
        num_image = hidden_states.shape[1] if isinstance(hidden_states, torch.Tensor) else None
        if shapes is None:
            return CallInputs(grid=None, num_image_tokens=num_image)
        shapes = shapes[0] if isinstance(shapes, list) else shapes  # the model reads the first sample's
        shapes = shapes if isinstance(shapes, list) else [shapes]
        if len(shapes) != 1 or int(shapes[0][0]) != 1:
            msg = "ConceptAttention reads text-to-image calls of one image; edit and layered inputs are not supported"
            raise ConceptAttentionError(f"this Qwen-Image call has img_shapes {shapes}: {msg}")
        h, w = int(shapes[0][1]), int(shapes[0][2])
        return CallInputs(grid=lambda: (h, w), num_image_tokens=num_image)

    def prompt_mask(self, call: dict[str, Any], num_text_tokens: int) -> torch.Tensor | None:
        mask = call.get("encoder_hidden_states_mask")
        return None if mask is None else mask[:, :num_text_tokens].bool()

    def text_step(self, block: Any, hidden: torch.Tensor, modulation: Any) -> TextStep:
        mod1, mod2 = block.txt_mod(modulation).chunk(2, dim=-1)
        (shift1, scale1, gate1), (shift2, scale2, gate2) = mod1.chunk(3, dim=-1), mod2.chunk(3, dim=-1)
        attn = block.attn
        q, k, v = self.text_qkv(attn, block.txt_norm1(hidden) * (1 + scale1[:, None]) + shift1[:, None])

        def finish(attention_output: torch.Tensor) -> torch.Tensor:
            out = hidden + gate1[:, None] * attn.to_add_out(attention_output)
            mlp_in = block.txt_norm2(out) * (1 + scale2[:, None]) + shift2[:, None]
            return self.clip(out + gate2[:, None] * block.txt_mlp(mlp_in))

        return TextStep(q, k, v, finish)

    # ----- pipeline side ----------------------------------------------------------------------------
    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        return pipe.tokenizer, 0

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        device = pipe._execution_device
        states = [pipe.encode_prompt(w, device=device, max_sequence_length=max_length)[0][0] for w in words]
        longest = max(s.shape[0] for s in states)
        return torch.stack([F.pad(s, (0, 0, 0, longest - s.shape[0])) for s in states])

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        return pipe.tokenizer, 0, min(max_length, pipe.tokenizer_max_length)

    def latents(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = (pixels[None, :, None] * 2 - 1).to(pipe._execution_device, vae.dtype)  # [1, 3, 1 frame, H, W]
        z = vae.encode(x).latent_dist.mean
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
        return ((z - mean) / std)[:, :, 0]  # [1, C, h, w]

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        device, dtype, s = pipe._execution_device, pipe.transformer.dtype, noisy.shape[0]
        embeds, mask = pipe.encode_prompt(
            caption, device=device, num_images_per_prompt=s, max_sequence_length=max_length
        )
        _, c, h, w = noisy.shape
        return dict(
            hidden_states=pipe._pack_latents(noisy, s, c, h, w).to(dtype),
            timestep=torch.full((s,), t, device=device, dtype=dtype),
            encoder_hidden_states=embeds.to(dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // 2, w // 2)]] * s,
            return_dict=False,
        )

    def calls_per_step(self, pipe: Any, call_kwargs: dict[str, Any]) -> int:
        scale = call_kwargs.get("true_cfg_scale", call_default(pipe, "true_cfg_scale"))
        negative = any(call_kwargs.get(k) is not None for k in ("negative_prompt", "negative_prompt_embeds"))
        return 2 if scale > 1 and negative else 1
