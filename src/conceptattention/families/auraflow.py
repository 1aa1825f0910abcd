"""AuraFlow: ``AuraFlowTransformer2DModel`` in ``AuraFlowPipeline`` (text encoder UMT5, Llama-style tokenizer).

The double-stream blocks are ``joint_transformer_blocks``, followed by single-stream blocks the concept
stream does not read. Latents arrive as ``[B, C, H, W]`` and are patchified inside the model, so the
grid is ``(H / patch, W / patch)``; image positions are learned embeddings added in ``pos_embed`` and
text tokens have no position in the transformer (no RoPE anywhere), so concept tokens need none. The
modulation is the timestep's alone (no pooled text vector): the concept stream is modulated exactly
like the prompt. The text stream is post-norm: ``norm2_context`` acts on (residual + gated attention
output), and the gated MLP of that is added to the block's input (``text_step``). The qk-norms are
per-head layer norms on ``[B, N, H, Dh]`` and fused projections (``fuse_qkv_projections``) are read
through ``to_qkv`` / ``to_added_qkv``, so the default capture points fit.

The model prepends its learned register tokens (``transformer.register_tokens``) to the prompt
tokens; the concept stream never attends to them (nor to prompt tokens), and in the text sequence
the image queries see, the caption's tokens start after them. The model masks no text token: the
pipeline zeroes padded embeddings but every register, prompt and padding token is attended to, so
the DAAM-style baseline has no prompt mask either. Classifier-free guidance runs batched as
[unconditional, conditional], one transformer call per step; the prompt's maps are the last item.
A real-image pass is one conditional call (the model has no guidance input).

Concepts are encoded as the pipeline encodes a prompt made of the word alone (``encode_prompt``:
padded to the maximum length, padding zeroed), and read at the position the word's first token has
in that lone prompt: after the special tokens the tokenizer puts before a text (none for AuraFlow's,
which only appends ``</s>``). A tokenizer that pads on the left gets each word's states moved to the
front first; word positions in a caption need right padding (AuraFlow's). Real images are encoded as
the pipeline decodes them: latents times the VAE's scaling factor, no shift; the timestep is the
flow time t in [0, 1], as the pipeline passes it. Default layers: the core's depth-scaled choice
(block 2 of AuraFlow's 4 double-stream blocks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConceptAttentionError
from . import register_family
from .base import CallInputs, Family, TextStep


def special_tokens(tokenizer: Any) -> tuple[int, int]:
    """How many special tokens ``tokenizer`` puts before and after a text (AuraFlow's: 0 and 1)."""
    plain, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    for before in range(len(full) - len(plain) + 1):
        if full[before : before + len(plain)] == plain:
            return before, len(full) - before - len(plain)
    return 0, len(full) - len(plain)


@register_family
class AuraFlow(Family):
    name = "auraflow"
    title = "AuraFlow"
    transformer_classes = ("AuraFlowTransformer2DModel",)
    pipeline_classes = ("AuraFlowPipeline",)
    blocks_attribute = "joint_transformer_blocks"

    # ----- transformer side -------------------------------------------------------------------------
    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        hidden_states = arguments.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 4:
            return CallInputs(grid=None)
        config: Any = transformer.config  # diffusers' FrozenDict
        patch = int(config.patch_size)
        h, w = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
        return CallInputs(grid=lambda: (h, w), num_image_tokens=h * w)

    def text_step(self, block: Any, hidden: torch.Tensor, modulation: Any) -> TextStep:
        """The text stream's ada-norm, projections and qk-norms; ``finish`` is its post-norm update:
        ``h + gate_mlp * ff(norm2(h + gate_msa * out_proj(o)) * (1 + scale) + shift)``."""
        attn = block.attn
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(hidden, emb=modulation)
        q, k, v = self.text_qkv(attn, normed)

        def finish(attention_output: torch.Tensor) -> torch.Tensor:
            out = block.norm2_context(hidden + gate_msa.unsqueeze(1) * attn.to_add_out(attention_output))
            out = out * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            return hidden + gate_mlp.unsqueeze(1) * block.ff_context(out)

        return TextStep(q, k, v, finish)

    # ----- pipeline side ----------------------------------------------------------------------------
    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        return pipe.tokenizer, special_tokens(pipe.tokenizer)[0]

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        embeds, mask, _, _ = pipe.encode_prompt(
            words, do_classifier_free_guidance=False, device=pipe._execution_device, max_sequence_length=max_length
        )
        if pipe.tokenizer.padding_side == "left":  # each word's tokens to the front, as right padding has them
            pads = (mask.reshape(*embeds.shape[:2], -1)[..., 0] == 0).sum(1)  # the mask comes per channel
            embeds = torch.stack([e.roll(-int(p), 0) for e, p in zip(embeds, pads)])
        return embeds

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        tokenizer = pipe.tokenizer
        if tokenizer.padding_side != "right":
            raise ConceptAttentionError(
                "word positions in an AuraFlow caption need a tokenizer that pads on the right (as AuraFlow's does); "
                f"this one pads on the {tokenizer.padding_side}"
            )
        before, after = special_tokens(tokenizer)
        registers = pipe.transformer.register_tokens.shape[1]
        return tokenizer, registers + before, registers + max_length - after

    def latents(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE mean times its scaling factor: the pipeline decodes ``latents / scaling_factor``, never
        shifting, whatever the VAE's config says."""
        vae = pipe.vae
        x = (pixels[None] * 2 - 1).to(pipe._execution_device, vae.dtype)
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        device, dtype, s = pipe._execution_device, pipe.transformer.dtype, noisy.shape[0]
        prompt_embeds, _, _, _ = pipe.encode_prompt(
            caption,
            do_classifier_free_guidance=False,
            num_images_per_prompt=s,
            device=device,
            max_sequence_length=max_length,
        )
        return dict(
            hidden_states=noisy.to(dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            timestep=torch.full((s,), t, device=device, dtype=dtype),
            return_dict=False,
        )

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def default_size(self, pipe: Any) -> int:
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor
