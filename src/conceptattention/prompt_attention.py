"""How image tokens attend to the prompt's own tokens: the DAAM-style baseline inside an MM-DiT.

DAAM (Tang et al., 2023) reads a UNet's cross-attention: each image position's softmax over the
prompt's tokens. An MM-DiT has no separate cross-attention, so ``PromptAttention`` recomputes that
quantity from the joint attention's own inputs in each chosen double-stream block: the image
queries and the prompt keys (after the qk-norms and RoPE), ``softmax over prompt tokens of
q_i . k_j / sqrt(d)``, mean over heads, then mean over the chosen layers and calls. Like
``ConceptAttention`` it only reads activations through forward hooks; the model's outputs are unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .adapters import MMDiTAdapter, get_adapter
from .core import _ATTACHED, _StopForward
from .errors import ConceptAttentionError


class PromptAttention:
    """Context manager recording image-to-prompt attention maps ``[B, S, h, w]`` (S prompt tokens)."""

    def __init__(self, transformer: nn.Module, *, layers: Sequence[int], adapter: MMDiTAdapter | None = None) -> None:
        self.transformer = transformer
        self.adapter = adapter if adapter is not None else get_adapter(transformer)
        self._blocks = list(self.adapter.double_blocks(transformer))
        n = len(self._blocks)
        chosen = sorted({int(i) % n if -n <= int(i) < n else -1 for i in layers})
        if not layers or -1 in chosen:
            raise ConceptAttentionError(f"layers must be indices of the {n} double-stream blocks, not {list(layers)!r}")
        self.layers = tuple(chosen)
        self._signature = inspect.signature(type(transformer).forward)
        self._handles: list[Any] = []
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._rope: Any = None
        self._tables: tuple[Any, Any] | None = None  # (image, prompt) rotation tables of this call
        self._grid: Callable[[], tuple[int, int]] | None = None
        self._capture: dict[str, torch.Tensor] = {}
        self._in_block: int | None = None
        self._stop_early = False

    # ----- attach / detach ----------------------------------------------------------------------
    def __enter__(self) -> PromptAttention:
        if self.transformer in _ATTACHED:
            raise ConceptAttentionError("another session is attached to this transformer; leave its `with` block first")
        try:
            self._register()
        except BaseException:
            self._remove()
            raise
        _ATTACHED.add(self.transformer)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._remove()
        _ATTACHED.discard(self.transformer)

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _register(self) -> None:
        t, adapter = self.transformer, self.adapter
        self._handles.append(t.register_forward_pre_hook(self._on_call, with_kwargs=True))
        rope = adapter.rope_module(t)
        if rope is not None:
            self._handles.append(rope.register_forward_hook(self._on_rope))
        for index in range(self.layers[-1] + 1):
            block = self._blocks[index]
            if index in self.layers:
                for name, (module, convert) in adapter.prompt_attention_points(block).items():
                    self._handles.append(module.register_forward_hook(self._capture_hook(index, name, convert)))
                self._handles.append(block.register_forward_pre_hook(self._enter_block(index)))
            self._handles.append(block.register_forward_hook(self._block_done(index)))

    # ----- hooks ------------------------------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._rope, self._tables, self._capture = None, None, {}
        bound = self._signature.bind_partial(module, *args, **kwargs).arguments
        self._grid = self.adapter.read_call(module, bound).grid

    def _on_rope(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._rope = output

    def _enter_block(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._in_block, self._capture = index, {}

        return hook

    def _capture_hook(self, index: int, name: str, convert: Callable) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            # first call inside the block's own forward only (later calls may be other sessions')
            if self._in_block == index and name not in self._capture:
                self._capture[name] = convert(output)

        return hook

    def _block_done(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if index in self.layers:
                self._in_block = None
                with torch.no_grad():
                    self._accumulate(index)
            if index == self.layers[-1] and self._stop_early:
                raise _StopForward

        return hook

    def _accumulate(self, index: int) -> None:
        query, key = self._capture.get("image_query"), self._capture.get("prompt_key")  # [B, N|S, H, Dh]
        if query is None or key is None:
            raise ConceptAttentionError(
                f"block {index} did not expose its image queries and prompt keys; the "
                f"{self.adapter.name} adapter does not match this transformer"
            )
        if self._rope is not None:
            if self._tables is None:  # once per call, shared by the layers
                self._tables = (
                    self.adapter.image_rope(self._rope, query.shape[1], query.dtype),
                    self.adapter.text_rope(self._rope, key.shape[1], key.dtype),
                )
            image_rope, text_rope = self._tables
            query = self.adapter.apply_rope(query, image_rope)
            if text_rope is not None:
                key = self.adapter.apply_rope(key, text_rope)
        q, k = query.transpose(1, 2).float(), key.transpose(1, 2).float()  # [B, H, N|S, Dh]
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1)  # [B, N, S]
        scores = probs.transpose(1, 2)  # [B, S, N]
        self._sum = scores if self._sum is None else self._sum + scores
        self._count += 1

    # ----- running and reading ----------------------------------------------------------------------
    def forward_until_last_layer(self, *args: Any, **kwargs: Any) -> None:
        """Call the transformer, stopping right after the last read block."""
        self._stop_early = True
        try:
            self.transformer(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            self._stop_early = False

    def maps(self) -> torch.Tensor:
        """Mean image-to-prompt attention ``[B, S, h, w]`` float32 (S prompt tokens)."""
        if self._sum is None or self._grid is None:
            raise ConceptAttentionError("no prompt attention was recorded: call the transformer inside the block")
        h, w = self._grid()
        return (self._sum / self._count).unflatten(-1, (h, w))
