"""HunyuanVideo (text-to-video): ``HunyuanVideoTransformer3DModel`` in ``HunyuanVideoPipeline``.

Latents ``[B, C, F, H, W]`` are patchified in the model: the grid is ``(F / patch_size_t, H / patch_size,
W / patch_size)`` latent frames x rows x columns, tokens in that row-major order. Joint attention orders tokens
[video, text]; the 3-axis RoPE (frame, row, column: the model's ``rope`` tables, given to each double-stream block
as ``freqs_cis``) rotates video tokens only, so concept tokens, like prompt tokens, get none (no text position to
choose). The modulation ``time_text_embed(timestep, pooled_projections, guidance)`` returns ``(conditioning,
token_replace_emb)``; the concept stream takes the conditioning recomputed with CLIP's pooled vector zeroed (the
paper's choice, as for FLUX.1), timestep and embedded guidance kept.

Concepts: the pipeline puts a prompt in its Llama 3 template (system turn, then the user turn ``{}<|eot_id|>``) and
crops the first ``crop_start`` tokens of the encoded sequence; a concept is its word's first-token state (the
third-last hidden state, as the pipeline reads it) in the prompt made of that word alone, at index
``len(template prefix tokens) - crop_start`` (0 with the real tokenizer, whose prefix is the 95 cropped tokens),
with the pipeline's default ``prompt_template``. The ``context_embedder`` is a token refiner (self-attention among
a prompt's valid tokens, conditioned on the timestep and their masked mean); a concept is one vector, so it is
refined alone as a one-token prompt (one-token mask) at the call's timestep, as HunyuanImage's (whose code this
borrows): it depends on no other concept or prompt word.

Prompt tokens: the model attends to the first ``encoder_attention_mask.sum()`` text tokens of each item (it builds
its mask from that count; the pipeline pads on the right), and ``prompt_mask`` is exactly that. Word positions are
a caption's Llama tokens from the lone word's index on (byte-level BPE: a word after a space takes it along); the
pipeline keeps ``max_sequence_length`` tokens after the crop.

Real videos: latents ``mean(VAE) * scaling_factor`` (the base's; the pipeline decodes ``latents / scaling_factor``),
timestep ``1000 t`` (float32) and guidance ``1000 g`` (transformer dtype), as the pipeline passes them. True CFG
calls the transformer for the prompt, then the negative prompt. Videos are saved at 24 fps, as the authors' script.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConceptAttentionError
from . import register_family
from .base import CallInputs, Family, call_default, pair_tables, rotate_pairs
from .hunyuanimage import HunyuanImage


@register_family
class HunyuanVideo(Family):
    name = "hunyuanvideo"
    title = "HunyuanVideo"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    pipeline_classes = ("HunyuanVideoPipeline",)
    examples = ("hunyuanvideo-community/HunyuanVideo",)
    pooled_text = True
    spaced_words = True
    video = True  # frames: the pipeline's num_frames (the base's frames_argument)
    fps = 24

    # ----- transformer side -------------------------------------------------------------------------
    text_dim = HunyuanImage.text_dim  # the token refiner's input width
    embed_concepts = HunyuanImage.embed_concepts  # each concept refined alone, a one-token prompt

    def without_pooled(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``time_text_embed(timestep, pooled_projection, guidance)`` with the pooled vector zeroed."""
        if "pooled_projection" in kwargs:
            return args, {**kwargs, "pooled_projection": torch.zeros_like(kwargs["pooled_projection"])}
        return (args[0], torch.zeros_like(args[1]), *args[2:]), kwargs

    def text_modulation(self, block: nn.Module, arguments: dict[str, Any], temb: Any) -> Any:
        """The recomputed conditioning (the embedder's first output), else the prompt's ``temb``."""
        return temb[0] if temb is not None else arguments["temb"]

    def rope(self, arguments: dict[str, Any]) -> Any:
        return arguments.get("freqs_cis")

    def image_rope(self, rope: Any, num_image_tokens: int, dtype: torch.dtype) -> Any:
        return pair_tables(rope[0], rope[1], dtype)  # video tokens only: the tables cover them all

    def apply_rope(self, x: torch.Tensor, table: Any) -> torch.Tensor:
        return rotate_pairs(x, table)

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        hidden_states = arguments.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
            return CallInputs(grid=None)
        config: Any = transformer.config  # diffusers' FrozenDict
        p, pt = config.patch_size, config.patch_size_t
        f, h, w = hidden_states.shape[2] // pt, hidden_states.shape[3] // p, hidden_states.shape[4] // p
        return CallInputs(grid=lambda: (f, h, w), num_image_tokens=f * h * w)

    def prompt_mask(self, call: dict[str, Any], num_text_tokens: int) -> torch.Tensor | None:
        """The model's own rule: the first ``encoder_attention_mask.sum()`` text tokens of each item."""
        valid = call["encoder_attention_mask"].sum(1, dtype=torch.int)
        return torch.arange(num_text_tokens, device=valid.device) < valid[:, None]

    # ----- pipeline side ----------------------------------------------------------------------------
    def template(self, pipe: Any) -> dict[str, Any]:
        """The pipeline's default ``prompt_template`` (``{"template": ..., "crop_start": ...}``)."""
        template = call_default(pipe, "prompt_template")
        if not isinstance(template, dict) or template.get("crop_start") is None:
            raise ConceptAttentionError("this pipeline's default prompt_template has no crop_start; it cannot be read")
        return template

    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        template = self.template(pipe)
        prefix = template["template"].split("{}")[0]
        first = len(pipe.tokenizer(prefix).input_ids) - template["crop_start"]
        if first < 0:
            raise ConceptAttentionError("the pipeline crops more tokens than its template prefix has: prompts are cut")
        return pipe.tokenizer, first

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        embeds, _ = pipe._get_llama_prompt_embeds(
            words, self.template(pipe), device=pipe._execution_device, max_sequence_length=max_length
        )
        return embeds

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        tokenizer, first = self.concept_tokenizer(pipe)
        return tokenizer, first, max_length  # the pipeline keeps max_sequence_length tokens after the crop

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        device, dtype, s = pipe._execution_device, pipe.transformer.dtype, noisy.shape[0]
        embeds, pooled, mask = pipe.encode_prompt(
            prompt=caption,
            prompt_template=self.template(pipe),
            num_videos_per_prompt=s,
            device=device,
            max_sequence_length=max_length,
        )
        return dict(
            hidden_states=noisy.to(dtype),
            timestep=torch.full((s,), t * 1000.0, device=device, dtype=torch.float32),
            encoder_hidden_states=embeds.to(dtype),
            encoder_attention_mask=mask.to(dtype),
            pooled_projections=pooled.to(dtype),
            guidance=torch.full((s,), guidance, device=device, dtype=dtype) * 1000.0,
            return_dict=False,
        )

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size

    def default_size(self, pipe: Any) -> int:
        """The longer side of the pipeline's default video (1280 x 720)."""
        return max(call_default(pipe, "height"), call_default(pipe, "width"))

    def calls_per_step(self, pipe: Any, call_kwargs: dict[str, Any]) -> int:
        get = call_kwargs.get
        negative = get("negative_prompt") is not None or (
            get("negative_prompt_embeds") is not None and get("negative_pooled_prompt_embeds") is not None
        )
        return 2 if get("true_cfg_scale", 1.0) > 1 and negative else 1
