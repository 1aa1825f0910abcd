"""How image tokens attend to the prompt's own tokens: the DAAM-style baseline inside an MM-DiT.

DAAM (Tang et al., 2023) reads a UNet's cross-attention: each image position's softmax over the
prompt's tokens. An MM-DiT has no separate cross-attention, so ``PromptAttention`` recomputes that
quantity from the joint attention's own inputs in each chosen double-stream block: the image
queries and the prompt keys (after the qk-norms and RoPE), ``softmax over prompt tokens of
q_i . k_j / sqrt(d)``, mean over heads, then mean over the chosen layers and calls. Like
``ConceptAttention`` it only reads activations through forward hooks; the model's outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConceptAttentionError
from .families import Family
from .hooks import HookSession, check_layers


class PromptAttention(HookSession):
    """Context manager recording image-to-prompt attention maps ``[B, S, h, w]`` (S prompt tokens)."""

    def __init__(self, transformer: nn.Module, *, layers: Sequence[int], family: Family | None = None) -> None:
        super().__init__(transformer, family)
        self.layers = check_layers(layers, len(self._blocks))
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._grid: Callable[[], tuple[int, ...]] | None = None
        self._call_ended()

    def _call_ended(self) -> None:
        super()._call_ended()
        self._rope: Any = None
        self._tables: tuple[Any, Any] = (None, None)  # (image, prompt) rotations of this call
        self._capture: dict[str, torch.Tensor] = {}

    # ----- hooks ------------------------------------------------------------------------------------
    def _block_hooks(self, index: int, block: nn.Module) -> list[Any]:
        if index not in self.layers:
            return []
        return [
            module.register_forward_hook(self._capture_hook(index, name, convert))
            for name, (module, convert) in self.family.prompt_attention_points(block).items()
        ]

    def _call_started(self, arguments: dict[str, Any]) -> None:
        self._grid = self.family.read_call(self.transformer, arguments).grid

    def _capture_hook(self, index: int, name: str, convert: Callable) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            # the first call inside the block's own forward only
            if self._in_block == index and name not in self._capture:
                self._capture[name] = convert(output)

        return hook

    def _block_ended(self, index: int, block: nn.Module, arguments: dict[str, Any]) -> None:
        if index in self.layers:
            capture, self._capture = self._capture, {}
            with torch.no_grad():
                self._accumulate(index, capture, arguments)

    def _accumulate(self, index: int, capture: dict[str, torch.Tensor], arguments: dict[str, Any]) -> None:
        capture = {name: self.family.image_part(name, t, arguments) for name, t in capture.items()}
        query, key = capture.get("image_query"), capture.get("prompt_key")  # [B, N|S, H, Dh]
        if query is None or key is None:
            raise ConceptAttentionError(
                f"block {index} did not expose its image queries and prompt keys; the "
                f"{self.family.title} family does not match this transformer"
            )
        rope = self.family.rope(arguments)
        if rope is not None:
            if rope is not self._rope:  # once per call, shared by the layers
                self._rope = rope
                self._tables = (
                    self.family.image_rope(rope, query.shape[1], query.dtype),
                    self.family.text_rope(rope, key.shape[1], key.dtype),
                )
            image_rope, text_rope = self._tables
            query = self.family.apply_rope(query, image_rope)
            if text_rope is not None:
                key = self.family.apply_rope(key, text_rope)
        q, k = query.transpose(1, 2).float(), key.transpose(1, 2).float()  # [B, H, N|S, Dh]
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, H, N, S]
        mask = self.family.prompt_mask(self.call_arguments, k.shape[2])
        if mask is not None:  # prompt tokens the model itself never attends to get no weight
            logits = logits.masked_fill(~mask.to(logits.device)[:, None, None, :], float("-inf"))
        scores = logits.softmax(-1).mean(1).transpose(1, 2)  # [B, S, N]
        self._sum = scores if self._sum is None else self._sum + scores
        self._count += 1

    # ----- reading ----------------------------------------------------------------------------------------
    def maps(self) -> torch.Tensor:
        """Mean image-to-prompt attention ``[B, S, h, w]`` float32 (S prompt tokens; video: ``[B, S, F, h, w]``)."""
        if self._sum is None or self._grid is None:
            raise ConceptAttentionError("no prompt attention was recorded: call the transformer inside the block")
        return (self._sum / self._count).unflatten(-1, self._grid())
