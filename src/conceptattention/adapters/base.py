"""What the core needs to know about one family of multi-modal diffusion transformers.

An adapter *declares* where things are (the double-stream blocks, the text-stream modules inside
each, the time embedding, the rotary embedding) and supplies the few lines that differ between
families (tensor layouts, how the token grid is read from the forward's inputs). It never replaces
or copies a block's ``forward``: the stock model runs untouched, and the concept tokens are pushed
through the block's own text-stream submodules by direct calls.

The generic :class:`MMDiTAdapter` fits diffusers' joint-attention blocks (``norm1_context``,
``attn.add_{q,k,v}_proj``, ``attn.norm_added_{q,k}``, ``attn.to_add_out``, ``norm2_context``,
``ff_context``), which is what Flux.1 and SD3/SD3.5 use. A new family with the same block layout is
a subclass of ~50 lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Layout = Literal["BNHD", "BHND"]


@dataclass
class CallInputs:
    """What the core keeps from one transformer call's arguments (no host sync to read them)."""

    grid: Callable[[], tuple[int, int]] | None  # evaluated lazily, after the call
    num_image_tokens: int | None = None


@dataclass
class TextStep:
    """One double-stream block applied to concept tokens, up to and after attention.

    query / key / value are ``[B, H, K, Dh]``; ``finish(attention_output)`` applies the gated residual
    updates and returns the next concept hidden states ``[B, K, D]`` (or None after the last block
    of a model whose final block has no text-stream update).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    finish: Callable[[torch.Tensor], torch.Tensor | None]


class MMDiTAdapter:
    """Generic adapter for diffusers joint-attention (MM-DiT) transformers."""

    #: Human-readable family name.
    name: str = "mmdit"
    #: ``(module path, class name)`` pairs of the transformers this adapter reads.
    transformer_classes: tuple[tuple[str, str], ...] = ()
    #: Layout of the image key as it leaves ``attn.norm_k`` (when the model has one).
    key_norm_layout: Layout = "BNHD"
    #: Whether the model clips fp16 text-stream states to the fp16 range after each block.
    clip_fp16: bool = False

    # ----- where things are -------------------------------------------------------------------
    def double_blocks(self, transformer: nn.Module) -> Sequence[nn.Module]:
        """The double-stream blocks, in execution order."""
        blocks: Any = transformer.transformer_blocks  # an nn.ModuleList
        return blocks

    def text_dim(self, transformer: nn.Module) -> int:
        """Width of the text-encoder space concept embeddings live in."""
        embedder: Any = transformer.context_embedder
        return embedder.in_features

    def embed_concepts(self, transformer: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
        """Text-encoder space ``[B, K, text_dim]`` -> transformer width ``[B, K, D]``."""
        embedder: Any = transformer.context_embedder
        return embedder(embeds)

    def time_embedder(self, transformer: nn.Module) -> nn.Module:
        """Module that maps (timestep, [guidance,] pooled text) to the modulation vector ``temb``."""
        embedder: Any = transformer.time_text_embed
        return embedder

    def rope_module(self, transformer: nn.Module) -> nn.Module | None:
        """Module whose output is the rotary embedding of all tokens, or None (no RoPE)."""
        return None

    def image_rope(self, rope_output: Any, num_image_tokens: int, dtype: torch.dtype) -> Any:
        """The image tokens' rotation tables from ``rope_module``'s output, prepared once per call."""
        return None

    def apply_rope(self, key: torch.Tensor, rope: Any) -> torch.Tensor:
        """Rotate image keys ``[B, N, H, Dh]`` by their positions (concept positions are 0: identity)."""
        return key

    def text_rope(self, rope_output: Any, num_text_tokens: int, dtype: torch.dtype) -> Any:
        """The prompt tokens' rotation tables (None: prompt keys are not rotated)."""
        return None

    def read_call(self, transformer: nn.Module, arguments: dict[str, Any]) -> CallInputs:
        """Token grid (h, w) and image-token count from one forward call's bound arguments."""
        return CallInputs(grid=None)

    # ----- the text stream applied to concept tokens ------------------------------------------
    def capture_points(self, block: nn.Module) -> dict[str, tuple[nn.Module, Callable[[Any], torch.Tensor]]]:
        """Submodules whose outputs carry the image stream's key and value, with a converter each.

        Converters return ``[B, N, H, Dh]``. The key is taken after the qk-norm (RoPE not yet
        applied); the value straight from its projection.
        """
        attn: Any = block.attn
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (heads, -1))

        fused = bool(getattr(attn, "fused_projections", False)) and hasattr(attn, "to_qkv")
        points: dict[str, tuple[nn.Module, Callable[[Any], torch.Tensor]]] = {}
        if getattr(attn, "norm_k", None) is not None:
            if self.key_norm_layout == "BHND":
                points["key"] = (attn.norm_k, lambda x: x.transpose(1, 2))
            else:
                points["key"] = (attn.norm_k, lambda x: x)
        elif fused:
            points["key"] = (attn.to_qkv, lambda x: split(x.chunk(3, dim=-1)[1]))
        else:
            points["key"] = (attn.to_k, split)
        if fused:
            points["value"] = (attn.to_qkv, lambda x: split(x.chunk(3, dim=-1)[2]))
        else:
            points["value"] = (attn.to_v, split)
        return points

    def prompt_attention_points(self, block: nn.Module) -> dict[str, tuple[nn.Module, Callable[[Any], torch.Tensor]]]:
        """Submodules giving the image queries and the prompt keys ``[B, N|S, H, Dh]`` (after the qk-norms,
        before RoPE), for image-to-prompt attention (see ``prompt_attention.py``)."""
        attn: Any = block.attn
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (heads, -1))

        def normed(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2) if self.key_norm_layout == "BHND" else x

        fused = bool(getattr(attn, "fused_projections", False))
        points: dict[str, tuple[nn.Module, Callable[[Any], torch.Tensor]]] = {}
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

    def output_point(self, block: nn.Module) -> nn.Module:
        """Module whose *input* is the image tokens' attention output ``[B, N, H*Dh]``."""
        attn: Any = block.attn
        return attn.to_out[0]

    def text_projections(self, attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Concept tokens ``[B, K, D]`` -> q, k, v ``[B, K, H*Dh]`` with the text stream's projections."""
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
            return attn.to_added_qkv(x).chunk(3, dim=-1)
        return attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)

    def text_step(self, block: Any, hidden: torch.Tensor, temb: torch.Tensor) -> TextStep:
        """Concept hidden states ``[B, K, D]`` through the block's text-stream weights (see TextStep)."""
        attn = block.attn
        context_pre_only = bool(getattr(block, "context_pre_only", False))
        if context_pre_only:
            normed = block.norm1_context(hidden, temb)
            gates = None
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(hidden, emb=temb)
            gates = (gate_msa, shift_mlp, scale_mlp, gate_mlp)

        heads = attn.heads
        q, k, v = (t.unflatten(-1, (heads, -1)) for t in self.text_projections(attn, normed))
        if getattr(attn, "norm_added_q", None) is not None:
            q = attn.norm_added_q(q)
        if getattr(attn, "norm_added_k", None) is not None:
            k = attn.norm_added_k(k)

        def finish(attention_output: torch.Tensor) -> torch.Tensor | None:
            if gates is None:
                return None
            gate_msa, shift_mlp, scale_mlp, gate_mlp = gates
            out = hidden + gate_msa.unsqueeze(1) * attn.to_add_out(attention_output)
            ff_in = block.norm2_context(out) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            out = out + gate_mlp.unsqueeze(1) * block.ff_context(ff_in)
            if self.clip_fp16 and out.dtype == torch.float16:
                out = out.clip(-65504, 65504)
            return out

        return TextStep(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), finish)

    # ----- registry support ---------------------------------------------------------------------
    def matches(self, transformer: nn.Module) -> bool:
        """Whether ``transformer`` is an instance of one of :attr:`transformer_classes`."""
        import importlib

        for module_path, class_name in self.transformer_classes:
            try:
                cls = getattr(importlib.import_module(module_path), class_name)
            except (ImportError, AttributeError):
                continue
            if isinstance(transformer, cls):
                return True
        return False
