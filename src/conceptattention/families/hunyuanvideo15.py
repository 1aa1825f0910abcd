"""HunyuanVideo-1.5 text-to-video: ``HunyuanVideo15Transformer3DModel`` in ``HunyuanVideo15Pipeline``.

Every block of ``transformer_blocks`` is double-stream (diffusers' joint-attention layout: the base's ``text_step``).
Latents ``[B, C, F, H, W]`` are patched in the model: grid ``(F / p_t, H / p, W / p)``, tokens frame-major. Joint
attention orders tokens [video, text]; RoPE (the blocks' ``freqs_cis``) rotates video tokens only, so concept tokens,
like prompt tokens, get no position. ``time_embed(timestep[, timestep_r])`` has no pooled text vector: the concept
stream is modulated exactly like the prompt. Choices, made so that a lone concept is in distribution:

- **Chat template.** The pipeline puts a prompt in Qwen2.5-VL's chat template (its system message, the prompt as the
  user turn, the assistant turn opened) and drops the first ``prompt_template_encode_start_idx`` tokens (108, the
  template's prefix with the real vocabulary). A concept is its word's first-token state in the prompt of that word
  alone, read by the pipeline's own ``_get_mllm_prompt_embeds``, at index ``len(prefix tokens) - start_idx``. The
  crop removes the prefix from right-padded prompts only (Qwen's tokenizer pads right): left padding is refused.
- **Token refiner.** ``context_embedder`` refines a prompt's tokens together (self-attention, conditioned on the
  timestep and their masked mean): each concept goes through it alone, as a one-token prompt at the call's timestep
  (as for HunyuanImage), then gets the Qwen tokens' ``cond_type_embed`` (type 0), as the model adds it. A lone word
  quotes nothing, so it has no ByT5 glyph tokens; text-to-video has no image tokens (``image_embeds`` all zero).
- **Masks.** The model orders text as [valid image (image-to-video only), valid ByT5, valid Qwen, padding]; video
  queries attend to the valid ones, and ``prompt_mask`` follows. The concept stream attends to concept and video keys
  only: no mask. Word positions are a caption's Qwen tokens, after its quoted text's valid ByT5 tokens; byte-level
  BPE tokenizes a word after a space together with it.

Pipeline side: real videos are ``mean(VAE) * scaling_factor`` (the base's ``latents``: the pipeline decodes
``latents / scaling_factor``), fed as the denoising loop does: [latents, zero condition latents, zero mask], zero
``image_embeds``, timestep ``1000 t``. Guidance is the guider's (``pipe.guider``; the pipeline takes no guidance
keyword, the transformer embeds none): its conditions are the calls per step, the prompt's first.
``HunyuanVideo15ImageToVideoPipeline`` is not registered, so it is refused by class. Videos are 24 fps (as the
authors' generate.py saves them; diffusers' examples use 15).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConceptAttentionError
from . import register_family
from .base import CallInputs, Family, call_default
from .hunyuanimage import HunyuanImage, conditions

MARK = "\x00"  # stands for the user's prompt when the chat template is rendered


@register_family
class HunyuanVideo15(Family):
    name = "hunyuanvideo15"
    title = "HunyuanVideo-1.5"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    pipeline_classes = ("HunyuanVideo15Pipeline",)
    examples = tuple(f"hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-{p}_t2v" for p in ("480p", "720p"))
    spaced_words = True
    video = True
    fps = 24

    # ----- transformer side: HunyuanImage's token refiner and RoPE (video tokens only) ----------------------
    text_dim = HunyuanImage.text_dim
    image_rope = HunyuanImage.image_rope
    apply_rope = HunyuanImage.apply_rope

    def embed_concepts(self, transformer: nn.Module, embeds: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        """Each concept through the token refiner as a one-token prompt at each item's timestep (HunyuanImage's
        code: the same refiner), plus the Qwen tokens' type embedding."""
        refined = HunyuanImage.embed_concepts(self, transformer, embeds, call)  # type: ignore[arg-type]
        types: Any = transformer.cond_type_embed
        return refined + types.weight[0]

    def rope(self, arguments: dict[str, Any]) -> Any:
        return arguments.get("freqs_cis")

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        hidden_states = arguments.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
            return CallInputs(grid=None)
        config: Any = transformer.config  # diffusers' FrozenDict
        p, pt = config.patch_size, config.patch_size_t
        grid = (hidden_states.shape[2] // pt, hidden_states.shape[3] // p, hidden_states.shape[4] // p)
        return CallInputs(grid=lambda: grid, num_image_tokens=math.prod(grid))

    def prompt_mask(self, call: dict[str, Any], num_text_tokens: int) -> torch.Tensor | None:
        """Valid tokens first in the model's order: image tokens (unless every ``image_embeds`` is zero), ByT5, Qwen."""
        mask, glyph, images = call["encoder_attention_mask"], call["encoder_attention_mask_2"], call["image_embeds"]
        image_tokens = (images != 0).any() * images.shape[1]  # the model's own test: all zero means text-to-video
        valid = mask.bool().sum(1) + glyph.bool().sum(1) + image_tokens
        return torch.arange(num_text_tokens, device=mask.device) < valid[:, None]

    # ----- pipeline side ----------------------------------------------------------------------------
    def check_pipeline(self, pipe: Any) -> None:
        """Refuse left padding: there the pipeline's crop of a prompt's first tokens drops padding, not the template."""
        if pipe.tokenizer.padding_side != "right":
            raise ConceptAttentionError(
                f"the Qwen tokenizer pads on the {pipe.tokenizer.padding_side}, where the pipeline's crop drops padding "
                "instead of its template's prefix; set pipe.tokenizer.padding_side = 'right' (Qwen2.5-VL's own)"
            )

    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        """The Qwen tokenizer, and the index of a lone word's first token after the pipeline's crop."""
        chat = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": MARK}]
        rendered = pipe.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        prefix = pipe.tokenizer(rendered.split(MARK)[0], add_special_tokens=False).input_ids
        first = len(prefix) - pipe.prompt_template_encode_start_idx
        if first < 0:
            raise ConceptAttentionError("the pipeline drops more tokens than its template prefix has: prompts are cut")
        return pipe.tokenizer, first

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        """The pipeline's own Qwen path (chat template, third-last hidden state, prefix dropped), one word a prompt."""
        device, crop = pipe._execution_device, pipe.prompt_template_encode_start_idx
        args = (pipe.text_encoder, pipe.tokenizer, words, device, pipe.tokenizer_max_length)
        return pipe._get_mllm_prompt_embeds(*args, system_message=pipe.system_message, crop_start=crop)[0]

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        """Qwen tokens follow the caption's valid ByT5 tokens (its quoted text) in the model's text order."""
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

        tokenizer, first = self.concept_tokenizer(pipe)
        quoted, glyph = extract_glyph_texts(caption), 0
        if quoted is not None:
            glyph = len(pipe.tokenizer_2(quoted, max_length=pipe.tokenizer_2_max_length, truncation=True).input_ids)
        return tokenizer, glyph + first, glyph + pipe.tokenizer_max_length  # it keeps tokenizer_max_length tokens

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        """The denoising loop's inputs: [latents, condition latents, mask], zero image embeddings, ``1000 t``."""
        device, dtype, s = pipe._execution_device, pipe.transformer.dtype, noisy.shape[0]
        embeds, mask, glyph, glyph_mask = pipe.encode_prompt(
            prompt=caption, device=device, dtype=dtype, batch_size=1, num_videos_per_prompt=s
        )
        latents = noisy.to(device, dtype)
        condition, condition_mask = pipe.prepare_cond_latents_and_mask(latents, dtype, device)
        images = torch.zeros(s, pipe.vision_num_semantic_tokens, pipe.vision_states_dim, dtype=dtype, device=device)
        timestep = torch.full((s,), t * 1000.0, device=device, dtype=dtype)
        text = dict(encoder_hidden_states=embeds, encoder_attention_mask=mask)
        glyphs = dict(encoder_hidden_states_2=glyph, encoder_attention_mask_2=glyph_mask)
        video = torch.cat([latents, condition, condition_mask], dim=1)
        return dict(hidden_states=video, image_embeds=images, timestep=timestep, **text, **glyphs, return_dict=False)

    def size_multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size

    def default_size(self, pipe: Any) -> int:
        """The longer side of the pipeline's default video (its default aspect ratio at the model's target size)."""
        width, height = pipe.default_aspect_ratio
        return max(pipe.video_processor.calculate_default_height_width(height, width, pipe.target_size))

    def calls_per_step(self, pipe: Any, call_kwargs: dict[str, Any]) -> int:
        """The guider's conditions per step (guidance is set on ``pipe.guider``, never passed to the call)."""
        if self.guidance_argument in call_kwargs:
            raise ConceptAttentionError(
                "HunyuanVideo-1.5's pipeline takes no guidance scale: set it on its guider, "
                "pipe.guider = pipe.guider.new(guidance_scale=...)"
            )
        steps = call_kwargs.get("num_inference_steps") or call_default(pipe, "num_inference_steps")
        counts = conditions(pipe.guider, steps)
        if len(counts) > 1:
            raise ConceptAttentionError(
                "this pipeline's guider calls the transformer a different number of times at different steps "
                "(guidance on part of the schedule); maps cannot follow the steps"
            )
        return counts.pop()
