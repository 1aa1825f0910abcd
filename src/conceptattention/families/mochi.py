"""Mochi 1: ``MochiTransformer3DModel`` in ``MochiPipeline`` (text-to-video, T5-XXL).

Every block is double-stream, its attention ``attn1``. Latents ``[B, C, F, H, W]`` are patched frame by
frame (no temporal patching): the grid is ``(F, H / p, W / p)``, tokens frame-major. The text stream is
narrower than the video stream: ``time_embed.caption_proj`` maps T5 states to ``pooled_projection_dim``
and embeds concepts like prompt tokens. Its updates are sandwich-normed and tanh-gated (``text_step``);
the last block is ``context_pre_only`` (a continuous RMS ada-norm, no update after its attention).

Modulation: ``temb`` = timestep embedding + an attention pool of the caption's valid T5 states. That
pool is the paper's pooled text vector: ``concept_pooled="zero"`` modulates the concept stream with the
timestep embedding alone (read at ``time_embed.timestep_embedder``, which sees no text), ``"prompt"``
with the prompt's ``temb``. RoPE acts on video tokens only: learned per-head frequencies over (frame,
row, column), tables ``(cos, sin)`` of ``[N, H, Dh / 2]`` applied to channel pairs in float32 as the
processor does. Text tokens have no position, so concept tokens get none (no choice is left open).

Masks: per batch item the processor attends to the video tokens and the prompt tokens its
``encoder_attention_mask`` keeps (T5 padding dropped); the DAAM-style baseline drops the same tokens.
The concept stream attends to concept and video keys only and needs no mask.

Concepts are encoded by the pipeline's own T5 path (``_get_t5_prompt_embeds``: padded to the maximum
length, run with the tokenizer's mask), each word as a prompt of its own; T5 puts no token before a
text, so a word's first token is at index 0, as in a caption (a truncated one keeps its end token in the
last slot). CFG is batched as [unconditional, conditional], one call per step: the prompt's maps are the
last item. A real video is encoded as the pipeline decodes: the VAE mean, ``(z - latents_mean) *
scaling_factor / latents_std`` (``z * scaling_factor`` without stats); the timestep follows the
scheduler (Mochi's ``invert_sigmas``: ``(1 - t) * 1000`` at noise level t). Frames are ``6k + 1`` (the
pipeline's temporal factor), sides multiples of 8 x patch; videos are saved at Mochi's 30 fps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import register_family
from .base import CallInputs, Converter, Family, TextStep, split_heads


@register_family
class Mochi(Family):
    name = "mochi"
    title = "Mochi 1"
    transformer_classes = ("MochiTransformer3DModel",)
    pipeline_classes = ("MochiPipeline",)
    examples = ("genmo/mochi-1-preview",)
    pooled_text = True
    video = True
    fps = 30

    # ----- transformer side -------------------------------------------------------------------------
    def text_dim(self, transformer: Any) -> int:
        return transformer.time_embed.caption_proj.in_features

    def embed_concepts(self, transformer: Any, embeds: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        return transformer.time_embed.caption_proj(embeds)

    def time_embedder(self, transformer: Any) -> nn.Module:
        return transformer.time_embed.timestep_embedder  # its output is temb less the pooled caption term

    def without_pooled(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs  # the timestep embedder sees no text: nothing to zero in its arguments

    def image_rope(self, rope: Any, num_image_tokens: int, dtype: torch.dtype) -> Any:
        return rope  # (cos, sin) [N, H, Dh / 2], video tokens only

    def apply_rope(self, x: torch.Tensor, table: Any) -> torch.Tensor:
        """Pairs (a, b) of ``[B, N, H, Dh]`` -> (a cos - b sin, a sin + b cos), in float32, back in x's dtype."""
        cos, sin = table
        a, b = x[..., 0::2].float(), x[..., 1::2].float()
        return torch.stack([(a * cos - b * sin).to(x.dtype), (a * sin + b * cos).to(x.dtype)], -1).flatten(-2)

    def read_call(self, transformer: Any, arguments: dict[str, Any]) -> CallInputs:
        hidden_states = arguments.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
            return CallInputs(grid=None)
        p = int(transformer.config.patch_size)
        f, h, w = hidden_states.shape[2], hidden_states.shape[3] // p, hidden_states.shape[4] // p
        return CallInputs(grid=lambda: (f, h, w), num_image_tokens=f * h * w)

    def prompt_mask(self, call: dict[str, Any], num_text_tokens: int) -> torch.Tensor | None:
        mask = call.get("encoder_attention_mask")  # nonzero = attended
        return mask != 0 if isinstance(mask, torch.Tensor) else None

    def capture_points(self, block: nn.Module) -> dict[str, tuple[nn.Module, Converter]]:
        attn: Any = block.attn1
        return {"key": (attn.norm_k, lambda x: x), "value": (attn.to_v, split_heads(attn.heads))}

    def prompt_attention_points(self, block: nn.Module) -> dict[str, tuple[nn.Module, Converter]]:
        attn: Any = block.attn1
        return {"image_query": (attn.norm_q, lambda x: x), "prompt_key": (attn.norm_added_k, lambda x: x)}

    def output_point(self, block: Any) -> nn.Module:
        return block.attn1.to_out[0]

    def text_step(self, block: Any, hidden: torch.Tensor, modulation: Any) -> TextStep:
        """The text stream's RMS ada-norm and projections; ``finish`` its two sandwich-normed, tanh-gated updates."""
        attn = block.attn1
        if block.context_pre_only:
            normed, gates = block.norm1_context(hidden, modulation), None
        else:
            normed, *rest = block.norm1_context(hidden, modulation)
            gates = tuple(rest)  # gate_msa, scale_mlp, gate_mlp
        q, k, v = self.text_qkv(attn, normed)

        def finish(attention_output: torch.Tensor) -> torch.Tensor | None:
            if gates is None:
                return None
            gate_msa, scale_mlp, gate_mlp = gates
            out = hidden + block.norm2_context(attn.to_add_out(attention_output), torch.tanh(gate_msa).unsqueeze(1))
            ff = block.ff_context(block.norm3_context(out, 1 + scale_mlp.unsqueeze(1).float()))
            return out + block.norm4_context(ff, torch.tanh(gate_mlp).unsqueeze(1))

        return TextStep(q, k, v, finish)

    # ----- pipeline side ----------------------------------------------------------------------------
    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        return pipe.tokenizer, 0

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        device = pipe._execution_device
        return pipe._get_t5_prompt_embeds(prompt=words, max_sequence_length=max_length, device=device)[0]

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        return pipe.tokenizer, 0, max_length - 1  # a truncated prompt keeps T5's end token in its last slot

    def latents(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """``[3, T, H, W]`` -> the VAE mean, normalised by the inverse of what the pipeline decodes."""
        vae, config = pipe.vae, pipe.vae.config
        z = vae.encode((pixels[None] * 2 - 1).to(pipe._execution_device, vae.dtype)).latent_dist.mean
        stats = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if stats[0] is None or stats[1] is None:
            return z * config.scaling_factor
        mean, std = (torch.tensor(v, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1) for v in stats)
        return (z - mean) * config.scaling_factor / std

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        """The prompt's call as the pipeline makes it: T5 states and mask, the scheduler's timestep for t."""
        device, dtype, s = pipe._execution_device, pipe.transformer.dtype, noisy.shape[0]
        embeds, mask, _, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, num_videos_per_prompt=s, max_sequence_length=max_length
        )
        config = pipe.scheduler.config
        step = (1.0 - t if getattr(config, "invert_sigmas", False) else t) * config.num_train_timesteps
        return dict(
            hidden_states=noisy.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            timestep=torch.full((s,), step, device=device, dtype=dtype),
            encoder_attention_mask=mask,
            return_dict=False,
        )

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_spatial_scale_factor * pipe.transformer.config.patch_size

    def valid_frames(self, pipe: Any, frames: int) -> int:
        ratio = int(pipe.vae_temporal_scale_factor)
        return 0 if frames < 1 else (frames - 1) // ratio * ratio + 1

    def default_size(self, pipe: Any) -> int:
        return max(pipe.default_height, pipe.default_width)
