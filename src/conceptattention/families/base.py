"""What the package must know about one family of multi-modal diffusion transformers.

A family *declares* where things are and supplies the few lines that differ between families, on
both sides of the model:

- **transformer side** (read by the core): the double-stream blocks; which of a block's
  submodules give the image keys, values and attention output; the text-stream weights the
  concept tokens are pushed through (``text_step``); the concept stream's modulation; the RoPE of
  image keys and the position concept tokens take; how the token grid is read from a call.
- **pipeline side** (read by :mod:`conceptattention.pipelines.mmdit`): concept and prompt encoding
  with the pipeline's own text encoder, word positions, the latents of a real image and the
  transformer inputs for it, defaults, and how the generate call drives the transformer.

A family never replaces or copies a block's ``forward``: the stock model runs untouched, the
core reads activations with forward hooks, and the concept tokens go through the block's own
text-stream submodules by direct calls. The defaults below fit diffusers' joint-attention blocks
(``norm1_context(x, emb=temb)``, ``attn.add_{q,k,v}_proj``, ``attn.norm_added_{q,k}``,
``attn.to_add_out``, ``norm2_context``, ``ff_context``) called with keyword ``temb`` and
``image_rotary_emb``; a family overrides only where its model differs. Register a subclass with
:func:`conceptattention.families.register_family` (every module of this package is imported, so a
new family is one new file).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Layout = Literal["BNHD", "BHND"]
Converter = Callable[[Any], torch.Tensor]


@dataclass
class CallInputs:
    """What the core keeps from one transformer call's arguments (no host sync to read them)."""

    grid: Callable[[], tuple[int, ...]] | None  # (h, w), or (F, h, w) for video; evaluated lazily, after the call
    num_image_tokens: int | None = None


@dataclass
class TextStep:
    """One double-stream block applied to concept tokens, up to and after attention.

    query / key / value are ``[B, H, K, Dh]`` (before any concept RoPE); ``finish(attention_output)``
    applies the block's residual updates and returns the next concept hidden states ``[B, K, D]``
    (or None after a block with no text-stream update).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    finish: Callable[[torch.Tensor], torch.Tensor | None]


def call_default(pipe: Any, name: str) -> Any:
    """The default of one of a diffusers pipeline's own call arguments (None when it has none)."""
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def split_heads(heads: int) -> Converter:
    """``[B, N, H*Dh]`` -> ``[B, N, H, Dh]``."""
    return lambda x: x.unflatten(-1, (heads, -1))


def from_layout(layout: Layout) -> Converter:
    """A qk-norm's output in ``layout`` -> ``[B, N, H, Dh]``."""
    return (lambda x: x.transpose(1, 2)) if layout == "BHND" else (lambda x: x)


def rotate_pairs(x: torch.Tensor, table: Any) -> torch.Tensor:
    """RoPE on ``[B, N, H, Dh]`` with real tables ``(cos [N, 1, Dh], sin [N, 1, Dh/2])``: consecutive
    channel pairs (a, b) rotate to (a cos - b sin, b cos + a sin), in the input's own dtype."""
    cos, sin = table
    out = x * cos
    out[..., 0::2].addcmul_(x[..., 1::2], sin, value=-1)
    out[..., 1::2].addcmul_(x[..., 0::2], sin)
    return out


def pair_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' real RoPE tables ``[N, Dh]`` (each angle stored for both channels of a pair) ->
    the ``(cos [N, 1, Dh], sin [N, 1, Dh/2])`` that :func:`rotate_pairs` takes."""
    return cos[:, None, :].to(dtype), sin[:, None, 0::2].to(dtype)


class Family:
    """A family of diffusers MM-DiTs; the defaults fit diffusers' joint-attention blocks."""

    #: Short name, recorded in result settings.
    name: str = "mmdit"
    #: Human-readable name for the README table and error messages.
    title: str = "MM-DiT"
    #: diffusers class names of the transformers / pipelines of this family.
    transformer_classes: tuple[str, ...] = ()
    pipeline_classes: tuple[str, ...] = ()
    #: Hub ids of models of this family (listed by ``conceptattention models``).
    examples: tuple[str, ...] = ()
    #: Attribute of the transformer holding the double-stream blocks.
    blocks_attribute: str = "transformer_blocks"
    #: Layout of a qk-norm's output in the block's attention processor.
    key_norm_layout: Layout = "BNHD"
    #: Whether the model clips fp16 text-stream states to the fp16 range after each block.
    clip_fp16: bool = False
    #: Whether the modulation takes a pooled text vector, which ``concept_pooled="zero"`` zeroes for
    #: the concept stream (the paper's choice). Families without one modulate the concept stream
    #: exactly like the prompt (timestep and guidance only), whatever ``concept_pooled`` says.
    pooled_text: bool = False

    # ----- transformer side: where things are -------------------------------------------------------
    def double_blocks(self, transformer: nn.Module) -> Sequence[nn.Module]:
        """The double-stream blocks, in execution order."""
        blocks: Any = getattr(transformer, self.blocks_attribute)
        return blocks

    def text_dim(self, transformer: nn.Module) -> int:
        """Width of the text-encoder space concept embeddings live in."""
        embedder: Any = transformer.context_embedder
        return embedder.in_features

    def embed_concepts(self, transformer: nn.Module, embeds: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        """Text-encoder space ``[B, K, text_dim]`` -> transformer width ``[B, K, D]``, as the model embeds
        prompt tokens (``call``: the transformer call's bound arguments)."""
        embedder: Any = transformer.context_embedder
        return embedder(embeds)

    def time_embedder(self, transformer: nn.Module) -> nn.Module:
        """(``pooled_text`` families) The module mapping timestep, [guidance,] pooled text to ``temb``."""
        embedder: Any = transformer.time_text_embed
        return embedder

    def without_pooled(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """(``pooled_text`` families) The time embedder's arguments with the pooled text vector zeroed."""
        kwargs = dict(kwargs)
        if "pooled_projection" in kwargs:
            kwargs["pooled_projection"] = torch.zeros_like(kwargs["pooled_projection"])
            return args, kwargs
        return (*args[:-1], torch.zeros_like(args[-1])), kwargs

    def text_modulation(self, block: nn.Module, arguments: dict[str, Any], temb: torch.Tensor | None) -> Any:
        """What ``text_step`` modulates the concept tokens with in ``block``: ``temb`` when the core
        recomputed it without the pooled vector, else the prompt's own from the block's arguments."""
        return temb if temb is not None else arguments["temb"]

    def rope(self, arguments: dict[str, Any]) -> Any:
        """The rotary tables a block was called with (None: no RoPE)."""
        return arguments.get("image_rotary_emb")

    def image_rope(self, rope: Any, num_image_tokens: int, dtype: torch.dtype) -> Any:
        """The image tokens' rotation from :meth:`rope`'s tables, prepared once per call."""
        return None

    def text_rope(self, rope: Any, num_text_tokens: int, dtype: torch.dtype) -> Any:
        """The prompt tokens' rotation (None: prompt keys are not rotated)."""
        return None

    def concept_rope(self, transformer: nn.Module, rope: Any, dtype: torch.dtype, position: int | None) -> Any:
        """The rotation of concept queries and keys (None: identity). Concept tokens take the position a
        lone concept, encoded as a prompt of its own, would have: ``position`` (from the pipeline side's
        :meth:`concept_position`), or the family's first text position when it is None."""
        return None

    def apply_rope(self, x: torch.Tensor, table: Any) -> torch.Tensor:
        """Rotate ``[B, N, H, Dh]`` by ``table`` (from one of the ``*_rope`` methods)."""
        return x

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        """Token grid (h, w) and image-token count from one forward call's bound arguments."""
        return CallInputs(grid=None)

    def prompt_mask(self, call: dict[str, Any], num_text_tokens: int) -> torch.Tensor | None:
        """``[B, S]`` bool, True for prompt tokens the model attends to (None: all of them)."""
        return None

    # ----- transformer side: the text stream applied to concept tokens --------------------------------
    def capture_points(self, block: nn.Module) -> dict[str, tuple[nn.Module, Converter]]:
        """Submodules whose outputs carry the image stream's ``key`` (after the qk-norm, before RoPE)
        and ``value``, each with a converter to ``[B, N, H, Dh]``."""
        attn: Any = block.attn
        split = split_heads(attn.heads)
        fused = bool(getattr(attn, "fused_projections", False)) and hasattr(attn, "to_qkv")
        points: dict[str, tuple[nn.Module, Converter]] = {}
        if getattr(attn, "norm_k", None) is not None:
            points["key"] = (attn.norm_k, from_layout(self.key_norm_layout))
        elif fused:
            points["key"] = (attn.to_qkv, lambda x: split(x.chunk(3, dim=-1)[1]))
        else:
            points["key"] = (attn.to_k, split)
        if fused:
            points["value"] = (attn.to_qkv, lambda x: split(x.chunk(3, dim=-1)[2]))
        else:
            points["value"] = (attn.to_v, split)
        return points

    def prompt_attention_points(self, block: nn.Module) -> dict[str, tuple[nn.Module, Converter]]:
        """Submodules giving the ``image_query`` and the ``prompt_key`` ``[B, N|S, H, Dh]`` (after the
        qk-norms, before RoPE), for image-to-prompt attention (see ``prompt_attention.py``)."""
        attn: Any = block.attn
        split = split_heads(attn.heads)
        normed = from_layout(self.key_norm_layout)
        fused = bool(getattr(attn, "fused_projections", False))
        points: dict[str, tuple[nn.Module, Converter]] = {}
        if getattr(attn, "norm_q", None) is not None:
            points["image_query"] = (attn.norm_q, normed)
        elif fused and hasattr(attn, "to_qkv"):
            points["image_query"] = (attn.to_qkv, lambda x: split(x.chunk(3, dim=-1)[0]))
        else:
            points["image_query"] = (attn.to_q, split)
        if getattr(attn, "norm_added_k", None) is not None:
            points["prompt_key"] = (attn.norm_added_k, normed)
        elif fused and hasattr(attn, "to_added_qkv"):
            points["prompt_key"] = (attn.to_added_qkv, lambda x: split(x.chunk(3, dim=-1)[1]))
        else:
            points["prompt_key"] = (attn.add_k_proj, split)
        return points

    def image_part(self, name: str, tensor: torch.Tensor, arguments: dict[str, Any]) -> torch.Tensor:
        """A captured tensor (``key``, ``value``, ``output``, ``image_query``, ``prompt_key``) reduced to the
        tokens it stands for, given the block's arguments: identity where the capture points see only
        those (a family whose projections run on [text; image] together slices here)."""
        return tensor

    def output_point(self, block: nn.Module) -> nn.Module:
        """Module whose *input* is the image tokens' attention output ``[B, N, H*Dh]``."""
        attn: Any = block.attn
        return attn.to_out[0]

    def text_projections(self, attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Concept tokens ``[B, K, D]`` -> q, k, v ``[B, K, H*Dh]`` with the text stream's projections."""
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
            return attn.to_added_qkv(x).chunk(3, dim=-1)
        return attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)

    def text_qkv(self, attn: Any, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Modulated concept tokens ``[B, K, D]`` -> q, k, v ``[B, H, K, Dh]`` (text projections and
        the text stream's qk-norms)."""
        q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in self.text_projections(attn, normed))
        if getattr(attn, "norm_added_q", None) is not None:
            q = attn.norm_added_q(q)
        if getattr(attn, "norm_added_k", None) is not None:
            k = attn.norm_added_k(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def clip(self, hidden: torch.Tensor) -> torch.Tensor:
        """The fp16 clip some families apply to the text stream after each block."""
        if self.clip_fp16 and hidden.dtype == torch.float16:
            return hidden.clip(-65504, 65504)
        return hidden

    def text_step(self, block: Any, hidden: torch.Tensor, modulation: Any) -> TextStep:
        """Concept hidden states ``[B, K, D]`` through the block's text-stream weights (see TextStep)."""
        attn = block.attn
        if bool(getattr(block, "context_pre_only", False)):
            normed, gates = block.norm1_context(hidden, modulation), None
        else:
            normed, *rest = block.norm1_context(hidden, emb=modulation)
            gates = tuple(rest)  # gate_msa, shift_mlp, scale_mlp, gate_mlp
        q, k, v = self.text_qkv(attn, normed)

        def finish(attention_output: torch.Tensor) -> torch.Tensor | None:
            if gates is None:
                return None
            gate_msa, shift_mlp, scale_mlp, gate_mlp = gates
            out = hidden + gate_msa.unsqueeze(1) * attn.to_add_out(attention_output)
            ff_in = block.norm2_context(out) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            return self.clip(out + gate_mlp.unsqueeze(1) * block.ff_context(ff_in))

        return TextStep(q, k, v, finish)

    def default_layers(self, transformer: nn.Module) -> tuple[int, ...] | None:
        """The family's own default layers to read (None: the core's depth-scaled default)."""
        return None

    # ----- pipeline side -------------------------------------------------------------------------------
    #: The paper's real-image protocol: noise at t = 0.5, 5 noise draws averaged.
    default_t: float = 0.5
    default_samples: int = 5
    #: Which item of a transformer call's batch is the prompt's (classifier-free guidance batched
    #: as [unconditional, conditional] puts it last).
    prompt_batch_index: int = -1
    #: The pipeline's keyword for the guidance scale.
    guidance_argument: str = "guidance_scale"
    #: Whether the family makes videos: its pipeline returns ``.frames`` (else ``.images``), its grid is
    #: ``(F, h, w)`` latent frames x rows x columns, and ``latents`` takes ``[3, T, H, W]`` pixels.
    video: bool = False
    #: (video) The pipeline's keyword for the number of frames, and the frame rate its videos are saved at.
    frames_argument: str = "num_frames"
    fps: int = 16

    def concept_tokenizer(self, pipe: Any) -> tuple[Any, int]:
        """The tokenizer of the encoder concepts are embedded with, and the index in
        :meth:`token_states`' sequence of a word's first token."""
        raise NotImplementedError

    def token_states(self, pipe: Any, words: list[str], max_length: int) -> torch.Tensor:
        """Per-token text-encoder states ``[K, L, text_dim]`` of each word encoded on its own, exactly
        as the pipeline encodes a prompt."""
        raise NotImplementedError

    #: Whether the prompt tokenizer is byte-level BPE (Qwen, Mistral, Llama 3), which tokenizes a word
    #: after a space together with its space.
    spaced_words: bool = False

    def caption_token_counts(self, tokenizer: Any, words: list[str]) -> list[int]:
        """How many tokens each word of a whitespace-split caption takes inside the caption: each word on
        its own (exact for T5 and CLIP), with its leading space after the first when ``spaced_words``."""
        spaced = [(" " if i and self.spaced_words else "") + w for i, w in enumerate(words)]
        return [len(tokenizer(w, add_special_tokens=False).input_ids) for w in spaced]

    def prompt_tokenizer(self, pipe: Any, max_length: int, caption: str) -> tuple[Any, int, int]:
        """For word positions in ``caption``: the tokenizer of the prompt tokens image queries see, the
        index of the caption's first token in the transformer's text sequence, and the end (exclusive)
        of the positions that survive truncation."""
        raise NotImplementedError

    def concept_position(self, pipe: Any, max_length: int) -> int | None:
        """The text position a lone concept's first token has when the pipeline encodes it as a prompt
        (None: the transformer side's default), for families whose prompt tokens have real positions."""
        return None

    def latents(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[3, H, W]`` in [0, 1] (video: ``[3, T, H, W]``) -> the clean latents the sampler
        denoises, ``[1, ...]`` (noise is drawn in this shape)."""
        vae = pipe.vae
        x = (pixels[None] * 2 - 1).to(pipe._execution_device, vae.dtype)
        z = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def transformer_inputs(
        self, pipe: Any, noisy: torch.Tensor, t: float, caption: str, guidance: float, max_length: int
    ) -> dict[str, Any]:
        """The transformer's keyword arguments for ``S`` noisy latents ``[S, ...]`` at flow time ``t``
        with ``caption`` as the prompt (``return_dict=False``)."""
        raise NotImplementedError

    def size_multiple(self, pipe: Any) -> int:
        """Image sides must be multiples of this (VAE downsampling times the patch size)."""
        return pipe.vae_scale_factor * 2

    def video_fps(self, pipe: Any) -> int:
        """(video) The frame rate this pipeline's videos are saved at (default :attr:`fps`)."""
        return self.fps

    def valid_frames(self, pipe: Any, frames: int) -> int:
        """(video) The largest frame count of at most ``frames`` that the VAE takes (0: none): ``k * r + 1``
        for a VAE of temporal compression r."""
        ratio = int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)
        return 0 if frames < 1 else (frames - 1) // ratio * ratio + 1

    def default_size(self, pipe: Any) -> int:
        """The longer side, in pixels, images are resized to by default."""
        return pipe.default_sample_size * pipe.vae_scale_factor

    def calls_per_step(self, pipe: Any, call_kwargs: dict[str, Any]) -> int:
        """Transformer calls per denoising step, the prompt's first (e.g. 2 with true CFG)."""
        return 1

    def check_pipeline(self, pipe: Any) -> None:
        """Raise ConceptAttentionError for a pipeline of this family that cannot be read."""

    # ----- registry support ------------------------------------------------------------------------
    def matches(self, obj: Any, names: tuple[str, ...]) -> bool:
        """Whether ``obj`` is an instance of a class named in ``names`` (by the class's MRO)."""
        return any(cls.__name__ in names for cls in inspect.getmro(type(obj)))
