"""CogVideoX (1.0: 2B, 5B; 1.5: 5B): ``CogVideoXTransformer3DModel`` in ``CogVideoXPipeline`` (T5 text encoder).

Text and video share every block weight but the adaptive norms ("expert adaLN": ``norm1`` / ``norm2`` have a
video and a text half). Where the paper uses the text stream's own weights, concept tokens here take the text
half of both norms and the shared ``to_q/k/v`` (or fused ``to_qkv``), qk layer norms, ``to_out`` and
feed-forward, exactly as prompt tokens do; the text halves are the only text-specific weights. The modulation
is the timestep's alone (no pooled text), so concepts are modulated like the prompt. The processor projects
[text; video] together: captured tensors hold both, and :meth:`image_part` keeps the video tokens (the text
length is that of the block's ``encoder_hidden_states``), or the text tokens for prompt keys. Latents are
``[B, F, C, H, W]`` (frames second); the grid is ``(F / patch_size_t, H / patch, W / patch)``.

Positions: 5B and 1.5 rotate video queries and keys by 3-D RoPE (the pipeline's ``image_rotary_emb``) in place
in the processor, so normed queries and keys are copied when captured and rotated here; text tokens are never
rotated, nor are concepts. 2B adds sin-cos embeddings in ``patch_embed``, zero over the text rows; a learned
table (I2V models) has text rows, and concepts get row 0, where a lone word's first token sits (T5 puts
nothing before a text), whenever the call uses that table. No text token is masked (the pipeline pads prompts
and attends to the padding, T5 unmasked too), so the DAAM-style baseline has no prompt mask. Concepts are
encoded as the pipeline encodes a prompt of the word alone (padded, unmasked T5), read at position 0. The text
length is at most ``max_text_seq_length`` (226, the pipeline's default), exactly that with absolute positions
(the only length those take). CFG is batched [unconditional, conditional], one call per step: prompt last.

Real videos: VAE mean times the scaling factor (the pipeline decodes ``latents / scaling_factor``), frames cut
to ``k * r + 1`` with a latent count ``patch_size_t`` divides. The shared code mixes ``x = t * noise +
(1 - t) * z`` (flow time); this variance-preserving (v-prediction) model takes ``x / sqrt((1 - t)^2 + t^2)``,
exactly its marginal ``sqrt(a) z + sqrt(1 - a) noise`` of equal signal-to-noise ratio, ``a = (1 - t)^2 /
((1 - t)^2 + t^2)``, at the training timestep whose ``alphas_cumprod`` is nearest ``a`` (t = 0.5: a = 0.5).
Videos are saved at 8 fps (CogVideoX 1.0's), 16 for CogVideoX 1.5 (temporal patches).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from . import register_family
from .base import CallInputs, Converter, Family, TextStep, pair_tables, rotate_pairs, split_heads


def text_length(pipe: Any, max_length: int) -> int:
    """``max_length`` capped at ``max_text_seq_length``; exactly that length with absolute positions."""
    config = pipe.transformer.config
    absolute = not config.use_rotary_positional_embeddings or config.use_learned_positional_embeddings
    return config.max_text_seq_length if absolute else min(max_length, config.max_text_seq_length)


def copied(x: torch.Tensor) -> torch.Tensor:
    """A qk-norm output ``[B, H, S, Dh]`` as ``[B, S, H, Dh]``, copied before the processor rotates it in place."""
    return x.transpose(1, 2).clone()


@register_family
class CogVideoX(Family):
    name = "cogvideox"
    title = "CogVideoX"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    pipeline_classes = ("CogVideoXPipeline",)
    examples = ("THUDM/CogVideoX-2b", "THUDM/CogVideoX-5b", "THUDM/CogVideoX1.5-5B")
    video, fps = True, 8

    def video_fps(self, pipe: Any) -> int:
        return 16 if pipe.transformer.config.patch_size_t else 8  # 1.5 patches frames in pairs

    # ----- transformer side -------------------------------------------------------------------------
    def text_dim(self, transformer: nn.Module) -> int:
        return cast(Any, transformer).patch_embed.text_proj.in_features

    def embed_concepts(self, transformer: nn.Module, embeds: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        """``patch_embed.text_proj``, plus row 0 of a learned position table when this call uses it."""
        patch: Any = transformer.patch_embed
        x = patch.text_proj(embeds)
        frames = (call["hidden_states"].shape[1] - 1) * patch.temporal_compression_ratio + 1
        if patch.use_learned_positional_embeddings and frames == patch.sample_frames:  # else sin-cos: zero rows
            x = x + patch.pos_embedding[0, 0].to(x.dtype)
        return x

    def capture_points(self, block: nn.Module) -> dict[str, tuple[nn.Module, Converter]]:
        attn: Any = block.attn1
        split = split_heads(attn.heads)
        value = (attn.to_qkv, lambda x: split(x.chunk(3, dim=-1)[2])) if attn.fused_projections else (attn.to_v, split)
        return {"key": (attn.norm_k, copied), "value": value}

    def prompt_attention_points(self, block: nn.Module) -> dict[str, tuple[nn.Module, Converter]]:
        attn: Any = block.attn1
        return {"image_query": (attn.norm_q, copied), "prompt_key": (attn.norm_k, lambda x: x.transpose(1, 2))}

    def output_point(self, block: nn.Module) -> nn.Module:
        return cast(Any, block).attn1.to_out[0]

    def image_part(self, name: str, tensor: torch.Tensor, arguments: dict[str, Any]) -> torch.Tensor:
        """Tokens ``[text; video]`` on axis 1 -> the text tokens for ``prompt_key``, else the video tokens."""
        n = arguments["encoder_hidden_states"].shape[1]
        return tensor[:, :n] if name == "prompt_key" else tensor[:, n:]

    def image_rope(self, rope: Any, num_image_tokens: int, dtype: torch.dtype) -> Any:
        return pair_tables(rope[0][-num_image_tokens:], rope[1][-num_image_tokens:], dtype)

    def apply_rope(self, x: torch.Tensor, table: Any) -> torch.Tensor:
        return rotate_pairs(x, table)

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        hidden_states, config = arguments.get("hidden_states"), cast(Any, transformer.config)
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
            return CallInputs(grid=None)
        f, (h, w), p = hidden_states.shape[1] // (config.patch_size_t or 1), hidden_states.shape[-2:], config.patch_size
        grid = (f, h // p, w // p)
        return CallInputs(grid=lambda: grid, num_image_tokens=math.prod(grid))

    def text_qkv(self, attn: Any, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The shared projections and qk layer norms (over each head's channels) -> ``[B, H, K, Dh]``."""
        fused = attn.fused_projections
        qkv = attn.to_qkv(normed).chunk(3, -1) if fused else (attn.to_q(normed), attn.to_k(normed), attn.to_v(normed))
        q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in qkv)
        return attn.norm_q(q), attn.norm_k(k), v

    def text_step(self, block: Any, hidden: torch.Tensor, modulation: Any) -> TextStep:
        """``c' = c + g1 * to_out(o)``, ``c'' = c' + g2 * ff(n2)``: ``n1, g1`` / ``n2, g2`` are the text halves of
        ``norm1(c)`` / ``norm2(c')`` (each norm called with the concepts as both halves)."""
        attn = block.attn1
        _, normed, _, gate_msa = block.norm1(hidden, hidden, modulation)
        q, k, v = self.text_qkv(attn, normed)

        def finish(attention_output: torch.Tensor) -> torch.Tensor:
            out = hidden + gate_msa * attn.to_out[1](attn.to_out[0](attention_output))
            _, ff_in, _, gate_ff = block.norm2(out, out, modulation)
            return out + gate_ff * block.ff(ff_in)

        return TextStep(q, k, v, finish)

    # ----- pipeline side ----------------------------------------------------------------------------
    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        return pipe.tokenizer, 0

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        length, device = text_length(pipe, max_length), pipe._execution_device
        return pipe._get_t5_prompt_embeds(prompt=words, max_sequence_length=length, device=device)

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        return pipe.tokenizer, 0, text_length(pipe, max_length) - 1  # a truncated prompt's last slot is </s>

    def latents(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels[None] * 2 - 1).to(pipe._execution_device, pipe.vae.dtype)
        return (pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        device, dtype, (s, f, _, h, w) = pipe._execution_device, pipe.transformer.dtype, noisy.shape
        length, scale = text_length(pipe, max_length), pipe.vae_scale_factor_spatial
        embeds = pipe._get_t5_prompt_embeds(caption, num_videos_per_prompt=s, max_sequence_length=length, device=device)
        step = int((pipe.scheduler.alphas_cumprod.double() - (1 - t) ** 2 / ((1 - t) ** 2 + t**2)).abs().argmin())
        rope = pipe.transformer.config.use_rotary_positional_embeddings
        rope = pipe._prepare_rotary_positional_embeddings(h * scale, w * scale, f, device) if rope else None
        return dict(
            hidden_states=(noisy / math.sqrt((1 - t) ** 2 + t**2)).to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            timestep=torch.full((s,), step, device=device, dtype=torch.long),
            image_rotary_emb=rope,
            return_dict=False,
        )

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size

    def default_size(self, pipe: Any) -> int:
        config = pipe.transformer.config
        return max(config.sample_height, config.sample_width) * pipe.vae_scale_factor_spatial

    def valid_frames(self, pipe: Any, frames: int) -> int:
        """``k * r + 1`` frames whose ``k + 1`` latent frames ``patch_size_t`` divides (CogVideoX 1.5)."""
        ratio, patch = pipe.vae_scale_factor_temporal, pipe.transformer.config.patch_size_t or 1
        latent = ((frames - 1) // ratio + 1) // patch * patch
        return 0 if latent < 1 else (latent - 1) * ratio + 1
