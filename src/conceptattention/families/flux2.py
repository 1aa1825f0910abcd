"""FLUX.2 [dev] and [klein]: ``Flux2Transformer2DModel`` in ``Flux2Pipeline`` / ``Flux2KleinPipeline``.

Tokens are packed 2x2-patchified latents; ids are (t, h, w, l), the grid is ``img_ids`` columns 1 and 2.
There is no pooled text vector: the model computes the text stream's shift / scale / gate once from
(timestep, guidance) and hands it to every double block as ``temb_mod_txt``, which the concept stream uses.

Open choices, made so that a lone concept is encoded and placed as the pipeline does a prompt of that word alone:

- **Chat template.** Each concept is the pipeline's own encoding of a prompt of that word alone: [dev]
  ``<s>[SYSTEM_PROMPT]<system message>[/SYSTEM_PROMPT][INST]word[/INST]`` (Mistral), [klein]
  ``<|im_start|>user\\nword<|im_end|>...`` (Qwen3, thinking off), stacked LLM states at the word's tokens.
  ``first``, the word's index in the unpadded prompt, is where an empty and a one-word prompt's tokens first
  differ. [dev]'s tokenizer pads on the left: each lone prompt's states are shifted to put the word there.
- **RoPE.** Prompt tokens have ids (0, 0, 0, i), image tokens (0, row, col, 0). Concept tokens take
  (0, 0, 0, p), p the position of a one-token word in a lone-word prompt padded to the concepts' max length
  (``concept_position``, which the pipeline passes to the session); a bare transformer's session without
  one gets p = 0, RoPE's identity (the paper's choice).
- **Masks.** The model attends to every prompt token, padding included: no prompt mask anywhere.
- **Word positions.** Byte-level BPE: caption words after the first are counted with their space. With left
  padding the caption's start depends on the caption, so ``prompt_tokenizer`` needs it (``caption=``).
- **Guidance.** [dev] embeds the guidance scale (kept in the concept stream's modulation); [klein] embeds
  none and runs true CFG (guidance_scale > 1, not distilled), the prompt's call first in each step.
- **Reference images** (editing) add image tokens with t != 0: ``generate`` refuses them, a call's grid raises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConceptAttentionError
from . import register_family
from .base import CallInputs, TextStep, call_default, pair_tables
from .flux import FluxLayout


@register_family
class Flux2(FluxLayout):
    name = "flux2"
    title = "FLUX.2"
    transformer_classes = ("Flux2Transformer2DModel",)
    pipeline_classes = ("Flux2Pipeline", "Flux2KleinPipeline")
    examples = ("black-forest-labs/FLUX.2-dev", "black-forest-labs/FLUX.2-klein-4B")
    clip_fp16 = True
    spaced_words = True

    # ----- transformer side -------------------------------------------------------------------------
    def text_modulation(self, block: nn.Module, arguments: dict[str, Any], temb: torch.Tensor | None) -> Any:
        return arguments["temb_mod_txt"]

    def text_step(self, block: Any, hidden: torch.Tensor, modulation: Any) -> TextStep:
        """A ``Flux2TransformerBlock``'s text stream: plain LayerNorms, the shared modulation's six chunks."""
        mod = modulation[:, None] if modulation.ndim == 2 else modulation
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        q, k, v = self.text_qkv(block.attn, (1 + scale) * block.norm1_context(hidden) + shift)

        def finish(attention_output: torch.Tensor) -> torch.Tensor:
            out = hidden + gate * block.attn.to_add_out(attention_output)
            ff_in = block.norm2_context(out) * (1 + scale_mlp) + shift_mlp
            return self.clip(out + gate_mlp * block.ff_context(ff_in))

        return TextStep(q, k, v, finish)

    def concept_rope(self, transformer: nn.Module, rope: Any, dtype: torch.dtype, position: int | None) -> Any:
        """The rotation of ids (0, 0, 0, p) by the model's own ``pos_embed`` (None, the identity, if no p)."""
        if not position:
            return None
        ids = torch.zeros(1, 4, device=rope[0].device)
        ids[0, 3] = position
        model: Any = transformer
        cos, sin = model.pos_embed(ids)
        return pair_tables(cos, sin, dtype)

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        """The grid of ``img_ids``; reading it raises when the call has reference-image tokens (t != 0)."""
        inputs = super().read_call(transformer, arguments)
        ids: Any = arguments.get("img_ids")
        grid: Any = inputs.grid

        def checked() -> tuple[int, int]:
            if bool((ids[..., 0] != 0).any()):
                raise ConceptAttentionError("this FLUX.2 call has reference-image tokens; maps cover text-to-image")
            return grid()

        return inputs if grid is None else CallInputs(grid=checked, num_image_tokens=inputs.num_image_tokens)

    # ----- pipeline side ----------------------------------------------------------------------------
    def _klein(self, pipe: Any) -> bool:
        return self.matches(pipe, ("Flux2KleinPipeline",))

    def _tokens(self, pipe: Any, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and attention mask ``[K, L]`` of prompts as the pipeline tokenizes them (chat template, padded)."""
        pad = dict(padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        if self._klein(pipe):
            chat = dict(tokenize=False, add_generation_prompt=True, enable_thinking=False)
            texts = [pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], **chat) for p in prompts]
            out = pipe.tokenizer(texts, **pad)
        else:
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            messages = format_input(prompts, system_message=pipe.system_message)
            out = pipe.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **pad)
        return out["input_ids"], out["attention_mask"].bool()

    def _template(self, pipe: Any, max_length: int) -> tuple[int, int]:
        """``first``, and the index of a one-token word ("a") in its lone prompt padded to ``max_length``."""
        ids, mask = self._tokens(pipe, ["", "a"], max_length)
        empty, word = ids[0][mask[0]].tolist(), ids[1][mask[1]].tolist()
        first = next((i for i, (a, b) in enumerate(zip(empty, word)) if a != b), len(empty))
        return first, int(mask[1].int().argmax()) + first

    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)  # [dev] ships a processor around it
        return tokenizer, self._template(pipe, pipe.tokenizer_max_length)[0]

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        """Each lone word's prompt embeddings, shifted to put it at ``first``."""
        embeds, _ = pipe.encode_prompt(prompt=words, device=pipe._execution_device, max_sequence_length=max_length)
        starts = self._tokens(pipe, words, max_length)[1].int().argmax(1).tolist()  # > 0 with left padding
        return torch.stack([e.roll(-s, 0) for e, s in zip(embeds, starts)])

    def concept_position(self, pipe: Any, max_length: int) -> int | None:
        return self._template(pipe, max_length)[1]

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        """The tokenizer, the caption's start in the text sequence (after left padding), ``max_length``."""
        tokenizer, start = self.concept_tokenizer(pipe)[0], self._template(pipe, max_length)[0]
        if tokenizer.padding_side == "left":
            start += int(self._tokens(pipe, [caption], max_length)[1][0].int().argmax())
        return tokenizer, start, max_length

    def latents(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """The pipeline's VAE encoding: latent mode, 2x2 patches, batch-norm normalised, ``[1, 4C, h, w]``."""
        return pipe._encode_vae_image((pixels[None] * 2 - 1).to(pipe._execution_device, pipe.vae.dtype), None)

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        device, dtype, s = pipe._execution_device, pipe.transformer.dtype, noisy.shape[0]
        embeds, text_ids = pipe.encode_prompt(
            prompt=caption, device=device, num_images_per_prompt=s, max_sequence_length=max_length
        )
        inputs = dict(
            hidden_states=pipe._pack_latents(noisy).to(dtype),
            timestep=torch.full((s,), t, device=device, dtype=dtype),  # the model multiplies by 1000
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=pipe._prepare_latent_ids(noisy).to(device),
            return_dict=False,
        )
        if not self._klein(pipe):  # [dev] embeds the guidance scale; [klein] passes none
            inputs["guidance"] = torch.full((s,), guidance, device=device, dtype=torch.float32)
        return inputs

    def calls_per_step(self, pipe: Any, call_kwargs: dict[str, Any]) -> int:
        """2 with [klein]'s true CFG (the prompt's call first), else 1; reference images are refused."""
        if call_kwargs.get("image") is not None:
            raise ConceptAttentionError("FLUX.2 maps cover text-to-image only; drop the reference image(s)")
        scale = call_kwargs.get("guidance_scale", call_default(pipe, "guidance_scale"))
        cfg = self._klein(pipe) and scale > 1 and not pipe.config.is_distilled
        return 2 if cfg else 1
