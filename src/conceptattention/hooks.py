"""The read-only hook session that ``ConceptAttention`` and ``PromptAttention`` share.

A session registers forward hooks on a stock transformer: one around each call (its bound
arguments), one before and after each double-stream block up to the last one read (the block's
bound arguments, the block's end). Subclasses add their own hooks per block and do their work when a
block ends. Hooks never change a module's inputs or outputs, so the model computes exactly what it
computes without them; every hook is removed on exit, also after an exception. One session at a
time may hold a transformer.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .errors import ConceptAttentionError
from .families import Family, family_for_transformer

_ATTACHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class StopForward(Exception):
    """Raised after the last read block to end a forward early (see ``forward_until_last_layer``)."""


def check_layers(layers: Sequence[int] | int, num_blocks: int) -> tuple[int, ...]:
    """Sorted distinct block indices (negatives count from the end), or one clear error."""
    if num_blocks == 0:
        raise ConceptAttentionError("this transformer has no double-stream blocks to read")
    wanted: Sequence[Any] = [layers] if isinstance(layers, int) else layers
    chosen = set()
    for layer in wanted:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConceptAttentionError(f"layer indices must be ints, got {layer!r}")
        if not -num_blocks <= layer < num_blocks:
            raise ConceptAttentionError(
                f"layer {layer} is out of range: this transformer has {num_blocks} double-stream blocks "
                f"(valid indices {-num_blocks}..{num_blocks - 1})"
            )
        chosen.add(layer % num_blocks)
    if not chosen:
        raise ConceptAttentionError("layers is empty: choose at least one double-stream block to read")
    return tuple(sorted(chosen))


class HookSession:
    """Attach / detach, per-call and per-block arguments, and the early stop after the last read block.

    Subclasses set ``self.layers`` and override :meth:`_block_hooks`, :meth:`_call_started`,
    :meth:`_call_ended` and :meth:`_block_ended`.
    """

    layers: tuple[int, ...]

    @property
    def last_block(self) -> int:
        """The last double-stream block the session hooks (and a real-image pass runs to)."""
        return self.layers[-1]

    def __init__(self, transformer: nn.Module, family: Family | None) -> None:
        self.transformer = transformer
        self.family = family if family is not None else family_for_transformer(transformer)
        self._blocks = list(self.family.double_blocks(transformer))
        self._signature = inspect.signature(type(transformer).forward)
        self._block_signatures = {index: inspect.signature(type(b).forward) for index, b in enumerate(self._blocks)}
        self._handles: list[Any] = []
        self._attached = False
        self._stop_early = False
        self.call_arguments: dict[str, Any] = {}
        self.block_arguments: dict[str, Any] = {}
        self._in_block: int | None = None

    # ----- attach / detach -----------------------------------------------------------------------
    def attach(self) -> HookSession:
        """Register the hooks. Prefer ``with``, which always detaches."""
        if self._attached:
            raise ConceptAttentionError(f"this {type(self).__name__} is already attached")
        if self.transformer in _ATTACHED:
            raise ConceptAttentionError(
                "another session is attached to this transformer; leave its `with` block first "
                "(one ConceptAttention session can hold several readouts)"
            )
        try:
            self._register()
        except BaseException:
            self._remove_handles()
            raise
        _ATTACHED.add(self.transformer)
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove every hook; the transformer is exactly as before. Safe to call twice."""
        self._remove_handles()
        if self._attached:
            _ATTACHED.discard(self.transformer)
        self._attached = False
        self._call_ended()

    def __enter__(self) -> Any:
        return self.attach()

    def __exit__(self, *exc_info: Any) -> None:
        self.detach()

    def _remove_handles(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _register(self) -> None:
        t = self.transformer
        self._handles.append(t.register_forward_pre_hook(self._on_call_start, with_kwargs=True))
        self._handles.append(t.register_forward_hook(self._on_call_end, always_call=True))
        for index, block in enumerate(self._blocks[: self.last_block + 1]):
            self._handles.append(block.register_forward_pre_hook(self._on_block_start(index), with_kwargs=True))
            self._handles.extend(self._block_hooks(index, block))
            self._handles.append(block.register_forward_hook(self._on_block_end(index)))

    # ----- the hooks -----------------------------------------------------------------------------------
    def _on_call_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._call_ended()
        self.call_arguments = self._signature.bind_partial(module, *args, **kwargs).arguments
        self._call_started(self.call_arguments)

    def _on_call_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._call_ended()

    def _on_block_start(self, index: int) -> Callable:
        signature = self._block_signatures[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._in_block = index
            self.block_arguments = signature.bind_partial(module, *args, **kwargs).arguments

        return hook

    def _on_block_end(self, index: int) -> Callable:
        last = self.last_block

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._in_block = None
            self._block_ended(index, module, self.block_arguments)
            if index == last and self._stop_early:
                raise StopForward

        return hook

    # ----- for subclasses ---------------------------------------------------------------------------------
    def _block_hooks(self, index: int, block: nn.Module) -> list[Any]:
        """Extra hook handles for one block (registered between its start and end hooks)."""
        return []

    def _call_started(self, arguments: dict[str, Any]) -> None:
        """A transformer call began, with these bound arguments."""

    def _call_ended(self) -> None:
        """A call ended (or the session detached): drop per-call state."""
        self.call_arguments, self.block_arguments, self._in_block = {}, {}, None

    def _block_ended(self, index: int, block: nn.Module, arguments: dict[str, Any]) -> None:
        """Double-stream block ``index`` ran, called with ``arguments``."""

    # ----- running -------------------------------------------------------------------------------------------
    def forward_until_last_layer(self, *args: Any, **kwargs: Any) -> None:
        """Call the transformer, stopping right after the last read block (real-image passes).

        Nothing after that block runs (no later double or single-stream blocks, no final layer), and
        the call returns None; the results are then read as usual.
        """
        if not self._attached:
            raise ConceptAttentionError(f"attach first: use `with {type(self).__name__}(...) as session:`")
        self._stop_early = True
        try:
            self.transformer(*args, **kwargs)
        except StopForward:
            pass
        else:
            raise ConceptAttentionError("the forward ended without reaching the last read layer")
        finally:
            self._stop_early = False
