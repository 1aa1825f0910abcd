"""The concept stream and its saliency maps, attached to a stock diffusers MM-DiT.

``ConceptAttention`` is a context manager. While it is open, every call of the transformer also
pushes a set of concept tokens through the text-stream weights of the double-stream blocks
(blocks 0 .. last chosen layer), with one-directional attention: concept queries attend to concept
and image keys, while image and prompt tokens never see the concepts. Only read-only forward hooks
are used, so the model's own outputs are bit-for-bit what they are without it. Saliency scores are
accumulated on the model's device without host synchronisation; read them after the calls with
:meth:`ConceptAttention.maps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConceptAttentionError
from .families import CallInputs, Family
from .hooks import HookSession, check_layers
from .propagation import anchor_spread, bounce, entropy_weights, layer_confidence, normalised, second_eigenvalue
from .readouts import STREAMS, Readout, head_scores, layer_scores, resolve_readouts, stream_mask

__all__ = ["ConceptAttention", "default_layers"]


def default_layers(num_blocks: int) -> tuple[int, ...]:
    """Default layers to read: the paper's choice (blocks 14-17 of 19) scaled to any depth.

    From ``floor(0.74 * L)`` to ``L - 2`` inclusive (deep layers, the final block left out), at
    least one block.
    """
    start = int(math.floor(0.74 * num_blocks))
    stop = max(start + 1, num_blocks - 1)
    return tuple(range(min(start, num_blocks - 1), min(stop, num_blocks)))


def uniform_rows(batch: int, heads: int, like: torch.Tensor) -> torch.Tensor:
    """Equal head weights ``[B, H]``."""
    return torch.full((batch, heads), 1.0 / heads, device=like.device)


class ConceptAttention(HookSession):
    """Attach a ConceptAttention concept stream to a diffusers MM-DiT transformer.

    Args:
        transformer: a stock diffusers MM-DiT transformer of a supported family (see
            :func:`conceptattention.families.supported_transformers`).
        concept_embeds: concept embeddings in the text encoder's space, ``[K, D_text]`` (shared by the
            batch) or ``[B, K, D_text]``; one row per concept, each encoded on its own.
        layers: indices of the double-stream blocks to read (negatives count from the end); default
            :func:`default_layers`. The concept stream runs through every block up to the last one.
        calls: which transformer calls (0-based, counted since attach or :meth:`reset`) contribute:
            None for all, a collection of indices, or a predicate ``call_index -> bool``.
        readouts: names from :data:`conceptattention.readouts.READOUTS` or ``Readout`` specs; the first
            is the default of :meth:`maps`.
        concept_pooled: ``"zero"`` (the paper's choice: the concept stream's modulation uses a zero
            pooled-text vector) or ``"prompt"`` (the prompt's own modulation). Families whose
            modulation takes no pooled text vector use the prompt's, which then carries no text.
        grid: token grid ``(h, w)`` of the image, when it cannot be read from the call's inputs.
        concept_position: the text position concept tokens take, for families whose prompt tokens have
            real RoPE positions (the pipelines pass where their template puts a lone word); None: the
            family's first text position.
        family: force a :class:`~conceptattention.families.Family` instead of picking one by the
            transformer's class.
        differentiable: keep the autograd graph through the concept stream and its scores (the concept
            embeddings are not detached), for training objectives on the maps; off by default, where the
            stream runs under ``torch.no_grad`` and costs no memory for gradients.

    Example::

        with ConceptAttention(pipe.transformer, embeds, layers=[14, 15, 16, 17]) as ca:
            pipe(prompt)
        maps = ca.maps()  # [B, K, h, w], float32, on the model's device
    """

    def __init__(
        self,
        transformer: nn.Module,
        concept_embeds: torch.Tensor,
        *,
        layers: Sequence[int] | None = None,
        calls: Iterable[int] | Callable[[int], bool] | None = None,
        readouts: Iterable[str | Readout] | str | Readout = "concept_attention",
        concept_pooled: str = "zero",
        grid: tuple[int, ...] | None = None,
        concept_position: int | None = None,
        family: Family | None = None,
        differentiable: bool = False,
    ) -> None:
        super().__init__(transformer, family)
        self.differentiable = bool(differentiable)
        self.concept_embeds = self._check_embeds(concept_embeds)
        self.num_concepts = self.concept_embeds.shape[-2]
        self.layers = self._check_layers(layers)
        self.readouts = resolve_readouts(readouts)
        self._reads_all = any(r.layers == "all" for r in self.readouts.values())
        self._needs_query = any(r.needs_queries for r in self.readouts.values())
        self._calls = self._check_calls(calls)
        if concept_pooled not in ("zero", "prompt"):
            raise ConceptAttentionError(f"concept_pooled must be 'zero' or 'prompt', not {concept_pooled!r}")
        self.concept_pooled = concept_pooled
        if concept_position is not None and (
            isinstance(concept_position, bool) or not isinstance(concept_position, int)
        ):
            raise ConceptAttentionError(f"concept_position must be an int or None, not {concept_position!r}")
        self.concept_position = concept_position
        if grid is not None and (len(grid) not in (2, 3) or min(int(g) for g in grid) < 1):
            raise ConceptAttentionError(
                f"grid must be (rows, cols), or (frames, rows, cols) for video, of positive ints, not {grid!r}"
            )
        self._grid_override = None if grid is None else tuple(int(g) for g in grid)
        # Streams in a fixed order; ConceptAttention's own stream first.
        wanted = {r.stream for r in self.readouts.values()}
        self._streams = [s for s in STREAMS if s in wanted]
        self._embeds_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.reset()
        self._call_ended()

    @property
    def last_block(self) -> int:
        """The last block read: the last chosen layer, or the last block when a readout reads all."""
        return len(self._blocks) - 1 if self._reads_all else self.layers[-1]

    def _reads(self, readout: Readout, index: int) -> bool:
        return readout.layers == "all" or index in self.layers

    # ----- validation ---------------------------------------------------------------------------
    def _check_embeds(self, embeds: Any) -> torch.Tensor:
        if not isinstance(embeds, torch.Tensor):
            raise ConceptAttentionError(
                f"concept_embeds must be a torch.Tensor [K, D] or [B, K, D], not {type(embeds).__name__}"
            )
        if embeds.ndim not in (2, 3):
            raise ConceptAttentionError(f"concept_embeds must be [K, D] or [B, K, D]; got shape {tuple(embeds.shape)}")
        if embeds.shape[-2] == 0:
            raise ConceptAttentionError("the concept list is empty: give at least one concept")
        width = self.family.text_dim(self.transformer)
        if embeds.shape[-1] != width:
            raise ConceptAttentionError(
                f"concept embeddings are {embeds.shape[-1]} wide but this {type(self.transformer).__name__} "
                f"expects the text encoder's width {width}; encode the concepts with the model's own text encoder"
            )
        if not torch.is_floating_point(embeds):
            raise ConceptAttentionError(f"concept_embeds must be floating point, not {embeds.dtype}")
        return embeds if self.differentiable else embeds.detach()

    def _check_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        n = len(self._blocks)
        if layers is None and n:
            return self.family.default_layers(self.transformer) or default_layers(n)
        return check_layers([] if layers is None else layers, n)

    @staticmethod
    def _check_calls(calls: Any) -> Callable[[int], bool]:
        if calls is None:
            return lambda index: True
        if callable(calls):
            return calls
        try:
            wanted = frozenset(int(c) for c in calls)
        except (TypeError, ValueError):
            raise ConceptAttentionError(
                f"calls must be None, a collection of call indices or a predicate, not {calls!r}"
            ) from None
        return wanted.__contains__

    # ----- state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget accumulated maps and restart call counting at 0."""
        self._sums: dict[str, torch.Tensor] = {}
        self._weight_sums: dict[str, torch.Tensor] = {}  # readouts weighting layers: per-image weight totals
        self._counts: dict[str, int] = {name: 0 for name in self.readouts}
        self.num_calls = 0
        self.recorded_calls = 0
        self._last_call: CallInputs | None = None

    def _call_ended(self) -> None:
        super()._call_ended()
        self._active = False
        self._temb: torch.Tensor | None = None
        self._rope: Any = None
        self._rope_tables: tuple[Any, Any] = (None, None)  # (image, concept) rotations of this call
        self._mask: torch.Tensor | None = None
        self._mask_for: tuple[int, torch.device] | None = None
        self._hidden: torch.Tensor | None = None
        self._capture: dict[str, torch.Tensor] = {}
        self._call_inputs: CallInputs | None = None
        self._in_time_embed = False

    # ----- hooks ----------------------------------------------------------------------------------------
    def _register(self) -> None:
        super()._register()
        if self.family.pooled_text and self.concept_pooled == "zero":
            embedder = self.family.time_embedder(self.transformer)
            self._handles.append(embedder.register_forward_hook(self._on_time_embed, with_kwargs=True))

    def _block_hooks(self, index: int, block: nn.Module) -> list[Any]:
        handles = [
            module.register_forward_hook(self._capture_output(name, convert))
            for name, (module, convert) in self.family.capture_points(block).items()
        ]
        handles.append(self.family.output_point(block).register_forward_pre_hook(self._capture_attn_out))
        if self._needs_query:  # the image queries, for the image tokens' own self-attention
            module, convert = self.family.prompt_attention_points(block)["image_query"]
            handles.append(module.register_forward_hook(self._capture_output("image_query", convert, first=True)))
        return handles

    def _call_started(self, arguments: dict[str, Any]) -> None:
        index = self.num_calls
        self.num_calls += 1
        self._active = bool(self._calls(index))
        if self._active:
            self._call_inputs = self.family.read_call(self.transformer, arguments)

    def _on_time_embed(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        """Recompute the modulation with the pooled text vector zeroed, for the concept stream."""
        if not self._active or self._in_time_embed:
            return
        call_args, call_kwargs = self.family.without_pooled(args, kwargs)
        self._in_time_embed = True
        try:
            with torch.no_grad():
                self._temb = module(*call_args, **call_kwargs)
        finally:
            self._in_time_embed = False

    def _capture_output(self, name: str, convert: Callable[[Any], torch.Tensor], first: bool = False) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._active and self._in_block is not None and not (first and name in self._capture):
                self._capture[name] = convert(output)

        return hook

    def _capture_attn_out(self, module: nn.Module, args: tuple) -> None:
        if self._active and self._in_block is not None:
            self._capture["output"] = args[0]

    def _block_ended(self, index: int, block: nn.Module, arguments: dict[str, Any]) -> None:
        if self._active:
            with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
                self._concept_block(index, block, arguments)

    # ----- the concept stream -----------------------------------------------------------------------------
    def _initial_hidden(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        embeds = self._embeds_on.get((like.device, like.dtype))
        if embeds is None:  # one copy per device/dtype, not one per call
            embeds = self.concept_embeds.to(device=like.device, dtype=like.dtype)
            if not self.differentiable:  # a kept copy would carry one call's graph into the next
                self._embeds_on[(like.device, like.dtype)] = embeds
        if embeds.ndim == 2:
            embeds = embeds.unsqueeze(0)
        if embeds.shape[0] not in (1, batch):
            raise ConceptAttentionError(
                f"concept_embeds has batch {embeds.shape[0]} but the transformer was called with batch {batch}; "
                "give [K, D] to share concepts across the batch, or [B, K, D] with the same B"
            )
        hidden = self.family.embed_concepts(self.transformer, embeds, self.call_arguments).expand(batch, -1, -1)
        return hidden.repeat(1, len(self._streams), 1) if len(self._streams) > 1 else hidden

    def _rotations(self, arguments: dict[str, Any], num_image: int, dtype: torch.dtype) -> tuple[Any, Any]:
        """The (image key, concept query/key) rotations of this call, prepared once per call."""
        rope = self.family.rope(arguments)
        if rope is None:
            return None, None
        if rope is not self._rope:
            self._rope = rope
            self._rope_tables = (
                self.family.image_rope(rope, num_image, dtype),
                self.family.concept_rope(self.transformer, rope, dtype, self.concept_position),
            )
        return self._rope_tables

    def _concept_block(self, index: int, block: nn.Module, arguments: dict[str, Any]) -> None:
        capture, self._capture = self._capture, {}
        capture = {name: self.family.image_part(name, t, arguments) for name, t in capture.items()}
        missing = {"key", "value", "output"} - capture.keys()
        if missing:
            raise ConceptAttentionError(
                f"double-stream block {index} ran without exposing its {', '.join(sorted(missing))}; "
                f"the {self.family.title} family does not match this transformer's implementation"
            )
        if self._temb is None and self.family.pooled_text and self.concept_pooled == "zero":
            raise ConceptAttentionError(
                f"double-stream block {index} ran before the time embedding; the {self.family.title} family "
                "does not match this transformer's implementation"
            )
        image_out = capture["output"]  # [B, N, H*Dh]
        batch, num_image = image_out.shape[0], image_out.shape[1]
        key = capture["key"]  # [B, N, H, Dh]
        image_rope, concept_rope = self._rotations(arguments, num_image, key.dtype)
        if image_rope is not None:
            key = self.family.apply_rope(key, image_rope)
        image_key, image_value = key.transpose(1, 2), capture["value"].transpose(1, 2)  # [B, H, N, Dh]
        image_query = capture.get("image_query")
        if self._needs_query and (index in self.layers or self._reads_all):
            if image_query is None:
                raise ConceptAttentionError(
                    f"double-stream block {index} ran without exposing its image queries; the "
                    f"{self.family.title} family does not match this transformer's implementation"
                )
            if image_rope is not None:
                image_query = self.family.apply_rope(image_query, image_rope)
            image_query = image_query.transpose(1, 2)  # [B, H, N, Dh]

        if self._hidden is None:
            self._hidden = self._initial_hidden(batch, image_out)
        step = self.family.text_step(block, self._hidden, self.family.text_modulation(block, arguments, self._temb))
        if concept_rope is not None:
            step.query, step.key = (
                self.family.apply_rope(x.transpose(1, 2), concept_rope).transpose(1, 2) for x in (step.query, step.key)
            )
        if self._mask_for != (num_image, image_out.device):  # built once per call, not per block
            self._mask = stream_mask(self._streams, self.num_concepts, num_image, image_out.device)
            self._mask_for = (num_image, image_out.device)
        mask = self._mask
        attended = F.scaled_dot_product_attention(
            step.query,
            torch.cat([step.key, image_key.to(step.key.dtype)], dim=2),
            torch.cat([step.value, image_value.to(step.value.dtype)], dim=2),
            attn_mask=mask,
        )
        concept_out = attended.transpose(1, 2).flatten(2)  # [B, S*K, H*Dh]

        if index in self.layers or self._reads_all:
            self._accumulate(index, image_out, concept_out, image_value, image_key, image_query, step)
        if index < self.last_block:
            self._hidden = step.finish(concept_out)
            if self._hidden is None:
                raise ConceptAttentionError(f"block {index} ends the text stream; no later layer can be read")
        else:
            self._hidden = None
            self.recorded_calls += 1
            self._last_call = self._call_inputs

    def _accumulate(
        self,
        index: int,
        image_out: torch.Tensor,
        concept_out: torch.Tensor,
        image_value: torch.Tensor,
        image_key: torch.Tensor,
        image_query: torch.Tensor | None,
        step: Any,
    ) -> None:
        k = self.num_concepts
        raw: dict[tuple, torch.Tensor] = {}
        per_head: dict[tuple, torch.Tensor] = {}
        lambda2: list[torch.Tensor] = []  # computed once per layer, when a readout asks

        def inputs(readout: Readout) -> dict[str, Any]:
            s = self._streams.index(readout.stream)
            sl = slice(s * k, (s + 1) * k)
            return dict(
                image_out=image_out,
                concept_out=concept_out[:, sl],
                image_value=image_value,
                concept_value=step.value[:, :, sl],
                image_key=image_key,
                concept_query=step.query[:, :, sl],
                concept_norm=readout.concept_norm,
            )

        def head_weights(readout: Readout) -> torch.Tensor | None:
            if readout.heads == "lambda2":
                if not lambda2:
                    assert image_query is not None
                    lambda2.append(normalised(second_eigenvalue(image_query, image_key)))
                return lambda2[0]
            if readout.heads == "entropy":
                key = (readout.stream, readout.space, readout.concept_norm)
                if key not in per_head:
                    per_head[key] = head_scores(readout.space, **inputs(readout))
                return entropy_weights(per_head[key])
            return None

        for name, readout in self.readouts.items():
            if not self._reads(readout, index):
                continue
            weights = head_weights(readout)
            key = (readout.stream, readout.space, readout.concept_norm, readout.heads)
            if key not in raw:
                raw[key] = layer_scores(readout.space, **inputs(readout), head_weights=weights)
            scores = raw[key].softmax(dim=1) if readout.softmax else raw[key]
            if readout.bounces or readout.anchors:
                assert image_query is not None
                chain = weights if weights is not None else uniform_rows(scores.shape[0], image_key.shape[1], scores)
                if readout.bounces:
                    scores = bounce(image_query, image_key, scores, readout.bounces, chain)
                else:
                    scores = anchor_spread(
                        image_query, image_key, scores, image_out, chain, readout.anchors, readout.spread
                    )
            weight = layer_confidence(raw[key]) if readout.layer_weight == "confidence" else None
            self._add(name, scores, weight)

    def _add(self, name: str, scores: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Add one layer-call's scores ``[B, K, N]`` (times its per-image ``weight`` ``[B]``, if any)."""
        if weight is not None:
            scores = scores * weight[:, None, None]
            total_weight = self._weight_sums.get(name)
            self._weight_sums[name] = weight.clone() if total_weight is None else total_weight + weight
        total = self._sums.get(name)
        if total is None:
            self._sums[name] = scores.clone()
        elif total.shape != scores.shape:
            raise ConceptAttentionError(
                f"this call's maps are {tuple(scores.shape)} but earlier calls gave {tuple(total.shape)} "
                "(batch, concepts, image tokens); call reset() between inputs of different sizes"
            )
        else:
            total.add_(scores)
        self._counts[name] += 1

    # ----- running and reading -------------------------------------------------------------------------
    def _name(self, readout: str | None) -> str:
        name = next(iter(self.readouts)) if readout is None else readout
        if name not in self.readouts:
            raise ConceptAttentionError(
                f"readout {name!r} was not recorded; this session has {', '.join(self.readouts)}"
            )
        if self._counts[name] == 0:
            raise ConceptAttentionError(
                "no maps were recorded: call the transformer inside the `with ConceptAttention(...)` block "
                f"(calls seen: {self.num_calls}; check the `calls` argument)"
            )
        return name

    def token_maps(self, readout: str | None = None) -> torch.Tensor:
        """Mean saliency over recorded layers and calls, ``[B, K, N]`` float32 (N image tokens)."""
        name = self._name(readout)
        if name in self._weight_sums:
            weights = self._weight_sums[name].clamp_min(torch.finfo(torch.float32).tiny)
            return self._sums[name] / weights[:, None, None]
        return self._sums[name] / self._counts[name]

    def grid(self) -> tuple[int, ...]:
        """Token grid of the last recorded call: ``(h, w)``, or ``(F, h, w)`` for video (latent frames)."""
        if self._grid_override is not None:
            return self._grid_override
        call = self._last_call
        if call is None or call.grid is None:
            raise ConceptAttentionError(
                "the token grid could not be read from the transformer's inputs; pass grid=(rows, cols)"
            )
        return call.grid()

    def maps(self, readout: str | None = None) -> torch.Tensor:
        """Mean saliency on the token grid, float32, on the model's device: ``[B, K, h, w]`` for an image,
        ``[B, K, F, h, w]`` for a video (F latent frames)."""
        tokens = self.token_maps(readout)
        grid = self.grid()
        if math.prod(grid) != tokens.shape[-1]:
            raise ConceptAttentionError(
                f"grid {'x'.join(map(str, grid))} does not hold the {tokens.shape[-1]} image tokens; "
                "pass grid=(rows, cols)"
            )
        return tokens.unflatten(-1, grid)

    def all_maps(self) -> dict[str, torch.Tensor]:
        """Every recorded readout's maps, ``{name: [B, K, h, w]}`` (video: ``[B, K, F, h, w]``)."""
        return {name: self.maps(name) for name in self.readouts if self._counts[name]}
