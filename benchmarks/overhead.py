"""Cost of ConceptAttention relative to the plain transformer, measured in paired rounds. Prints JSON.

Comparisons, each of ours against its plain twin on the same inputs:

- ``forward``: one full transformer forward with K concepts (the config's layers) vs without;
- ``forward_all_double_layers``: the same with every double-stream block read;
- ``real_image_pass``: the pass a real image needs (stop after the last read double-stream block)
  with K concepts, vs the plain model stopped after the same block;
- ``real_image_pass_vs_all_double_blocks``: that pass vs a plain pass through all double blocks;
- ``method:NAME`` (with ``--methods``): a full forward recording readout NAME alone (a follow-up
  method such as ``bounce_2``, or any ``NAME:key=value`` spec) vs the plain forward.

Method. Every round times each comparison's two sides back to back; the comparisons' order within a
round is shuffled, and so is which side of a pair goes first (balanced: ours first in half the
rounds, +-1), all from one seeded RNG (``--seed``, recorded). The statistic is the median over
rounds of the per-round ratio ours / plain, with its quartiles and min / max; wall time
(``perf_counter``) and CPU time (``process_time``: all threads of the process, summed) are both
reported, as ratios and as absolute medians. ``--warmup`` rounds run first and are not recorded.
The encode throughput (images/s of the real-image pass with 5 noise draws batched) is timed on its
own after the paired rounds, so a large batch never runs just before a plain measurement. On CUDA,
peak memory with vs without maps is measured last.

    python benchmarks/overhead.py                          # CPU, mid-size random FLUX.1 (the CI-size check)
    python benchmarks/overhead.py --config sd3-mid         # CPU, mid-size random SD3
    python benchmarks/overhead.py --config all-cpu         # every mid-size config (unsupported ones reported)
    python benchmarks/overhead.py --methods all            # + every map method's cost, in the same rounds
    python benchmarks/overhead.py --config flux-schnell --device cuda --dtype bfloat16   # GPU, full size
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from torch import nn

from conceptattention import FOLLOWUPS, ConceptAttention
from conceptattention.errors import UnsupportedModelError

# ----- configs: one table row per (family, size) ---------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One row of the table: how to build the transformer, how to call it, which layers to read.

    ``build()`` returns the real diffusers class with random weights, created in the current default
    device and dtype; ``inputs(batch)`` returns the forward's keyword arguments on the CPU in fp32
    (:func:`make_inputs` moves them); ``layers`` are the double-stream blocks to read (None: the
    library's default for the model's depth).
    """

    cls: str
    model: dict
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict]
    text_dim: int
    image_tokens: int
    text_tokens: int
    layers: tuple[int, ...] | None = None
    blocks: str = "transformer_blocks"  # attribute holding the double-stream blocks
    size: str = "cpu"  # "cpu": mid size, for 2 CPU cores; "gpu": full size


def _diffusers(cls: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        if not hasattr(diffusers, cls):
            raise SystemExit(f"overhead.py: error: diffusers {diffusers.__version__} has no {cls}; upgrade diffusers")
        return getattr(diffusers, cls)(**kwargs)

    return build


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _grid_ids(h: int, w: int, axes: int = 3) -> torch.Tensor:
    """Position ids of an h x w token grid, ``[h*w, axes]``: row in column 1, column in column 2, the rest 0."""
    ids = torch.zeros(h, w, axes)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, axes)


def flux_inputs(batch: int, *, grid: tuple[int, int], text: int, channels: int, text_dim: int, pooled: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = grid
    return dict(
        hidden_states=_randn(g, batch, h * w, channels),
        encoder_hidden_states=_randn(g, batch, text, text_dim),
        pooled_projections=_randn(g, batch, pooled),
        timestep=torch.full((batch,), 0.5),
        img_ids=_grid_ids(h, w),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


def sd3_inputs(batch: int, *, latent: int, text: int, channels: int, text_dim: int, pooled: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=_randn(g, batch, channels, latent, latent),
        encoder_hidden_states=_randn(g, batch, text, text_dim),
        pooled_projections=_randn(g, batch, pooled),
        timestep=torch.full((batch,), 500.0),  # SD3 pipelines pass t in [0, 1000]
        return_dict=False,
    )


def flux2_inputs(batch: int, *, grid: tuple[int, int], text: int, channels: int, text_dim: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = grid
    txt_ids = torch.zeros(text, 4)  # (t, h, w, l): text tokens along l
    txt_ids[:, 3] = torch.arange(text)
    return dict(
        hidden_states=_randn(g, batch, h * w, channels),
        encoder_hidden_states=_randn(g, batch, text, text_dim),
        timestep=torch.full((batch,), 0.5),
        img_ids=_grid_ids(h, w, axes=4),  # (t, h, w, l) with t = l = 0
        txt_ids=txt_ids,
        guidance=torch.full((batch,), 4.0),
        return_dict=False,
    )


def qwen_image_inputs(batch: int, *, grid: tuple[int, int], text: int, channels: int, text_dim: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = grid
    return dict(
        hidden_states=_randn(g, batch, h * w, channels),
        encoder_hidden_states=_randn(g, batch, text, text_dim),
        encoder_hidden_states_mask=torch.ones(batch, text, dtype=torch.long),
        timestep=torch.full((batch,), 0.5),
        img_shapes=[[(1, h, w)]] * batch,
        return_dict=False,
    )


def chroma_inputs(batch: int, *, grid: tuple[int, int], text: int, channels: int, text_dim: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = grid
    return dict(
        hidden_states=_randn(g, batch, h * w, channels),
        encoder_hidden_states=_randn(g, batch, text, text_dim),
        timestep=torch.full((batch,), 0.5),
        img_ids=_grid_ids(h, w),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


def hunyuan_image_inputs(batch: int, *, grid: tuple[int, int], text: int, channels: int, text_dim: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = grid
    return dict(
        hidden_states=_randn(g, batch, channels, h, w),  # patch size 1: one token per latent pixel
        timestep=torch.full((batch,), 500.0),  # the pipeline passes t in [0, 1000]
        encoder_hidden_states=_randn(g, batch, text, text_dim),
        encoder_attention_mask=torch.ones(batch, text, dtype=torch.long),
        return_dict=False,
    )


def auraflow_inputs(batch: int, *, latent: int, text: int, channels: int, text_dim: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=_randn(g, batch, channels, latent, latent),
        encoder_hidden_states=_randn(g, batch, text, text_dim),
        timestep=torch.full((batch,), 0.5),  # the pipeline passes t / 1000
        return_dict=False,
    )


def _row(cls: str, inputs: Callable[..., dict], text_dim: int, image_tokens: int, text_tokens: int, **kw) -> Config:
    """A table row; ``kw``: the constructor's arguments plus ``input_args`` / ``layers`` / ``blocks`` / ``size``."""
    input_args = kw.pop("input_args")
    extra = {k: kw.pop(k) for k in ("layers", "blocks", "size") if k in kw}
    return Config(
        cls=cls,
        model=kw,
        build=_diffusers(cls, **kw),
        inputs=functools.partial(inputs, **input_args, text_dim=text_dim),
        text_dim=text_dim,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        **extra,
    )


# Mid size: hidden 768 = 12 heads x 64, 6 double-stream blocks (+ 6 single-stream where the family has
# them), 32 x 32 = 1024 image tokens, 128 prompt tokens; text widths are the real models'.
CONFIGS: dict[str, Config] = {
    "flux-mid": _row(
        "FluxTransformer2DModel",
        flux_inputs,
        text_dim=4096,
        image_tokens=1024,
        text_tokens=128,
        input_args=dict(grid=(32, 32), text=128, channels=64, pooled=768),
        num_layers=6,
        num_single_layers=6,
        attention_head_dim=64,
        num_attention_heads=12,
        in_channels=64,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=(8, 28, 28),
    ),
    # SD3.0 shapes: joint blocks only (the last one context_pre_only), 64 x 64 latent in 2 x 2 patches
    "sd3-mid": _row(
        "SD3Transformer2DModel",
        sd3_inputs,
        text_dim=4096,
        image_tokens=1024,
        text_tokens=128,
        input_args=dict(latent=64, text=128, channels=16, pooled=2048),
        sample_size=64,
        patch_size=2,
        in_channels=16,
        num_layers=6,
        attention_head_dim=64,
        num_attention_heads=12,
        joint_attention_dim=4096,
        caption_projection_dim=768,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=64,
    ),
    # SD3.5-Medium shapes: RMS qk-norm, dual-attention (MMDiT-X) blocks in the first half
    "sd35-mid": _row(
        "SD3Transformer2DModel",
        sd3_inputs,
        text_dim=4096,
        image_tokens=1024,
        text_tokens=128,
        input_args=dict(latent=64, text=128, channels=16, pooled=2048),
        sample_size=64,
        patch_size=2,
        in_channels=16,
        num_layers=6,
        attention_head_dim=64,
        num_attention_heads=12,
        joint_attention_dim=4096,
        caption_projection_dim=768,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=64,
        dual_attention_layers=(0, 1, 2),
        qk_norm="rms_norm",
    ),
    # FLUX.2 [dev] layout: 4-axis RoPE ids (t, h, w, l), guidance embedding, shared modulation
    "flux2-mid": _row(
        "Flux2Transformer2DModel",
        flux2_inputs,
        text_dim=15360,
        image_tokens=1024,
        text_tokens=128,
        input_args=dict(grid=(32, 32), text=128, channels=128),
        in_channels=128,
        num_layers=6,
        num_single_layers=6,
        attention_head_dim=64,
        num_attention_heads=12,
        joint_attention_dim=15360,
        axes_dims_rope=(16, 16, 16, 16),
        guidance_embeds=True,
    ),
    # Qwen-Image: double-stream blocks only; 2 x 2-packed latents (64 channels), RoPE from img_shapes
    "qwen-image-mid": _row(
        "QwenImageTransformer2DModel",
        qwen_image_inputs,
        text_dim=3584,
        image_tokens=1024,
        text_tokens=128,
        input_args=dict(grid=(32, 32), text=128, channels=64),
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=6,
        attention_head_dim=64,
        num_attention_heads=12,
        joint_attention_dim=3584,
        axes_dims_rope=(8, 28, 28),
    ),
    # Chroma: FLUX.1 blocks with the modulation from a distilled approximator (hidden width 5120 / 3072 of it)
    "chroma-mid": _row(
        "ChromaTransformer2DModel",
        chroma_inputs,
        text_dim=4096,
        image_tokens=1024,
        text_tokens=128,
        input_args=dict(grid=(32, 32), text=128, channels=64),
        in_channels=64,
        num_layers=6,
        num_single_layers=6,
        attention_head_dim=64,
        num_attention_heads=12,
        joint_attention_dim=4096,
        axes_dims_rope=(8, 28, 28),
        approximator_hidden_dim=1280,
    ),
    # HunyuanImage 2.1: [B, C, H, W] latents in 1 x 1 patches, a token refiner on the prompt, 2-axis RoPE
    # (the optional second, ByT5 text stream is left out)
    "hunyuan-image-mid": _row(
        "HunyuanImageTransformer2DModel",
        hunyuan_image_inputs,
        text_dim=3584,
        image_tokens=1024,
        text_tokens=128,
        input_args=dict(grid=(32, 32), text=128, channels=64),
        in_channels=64,
        out_channels=64,
        num_attention_heads=12,
        attention_head_dim=64,
        num_layers=6,
        num_single_layers=6,
        num_refiner_layers=2,
        patch_size=(1, 1),
        text_embed_dim=3584,
        rope_axes_dim=(32, 32),
    ),
    # AuraFlow: MMDiT blocks in joint_transformer_blocks, learned positions, 8 register tokens before the prompt
    "auraflow-mid": _row(
        "AuraFlowTransformer2DModel",
        auraflow_inputs,
        text_dim=2048,
        image_tokens=1024,
        text_tokens=128,
        input_args=dict(latent=64, text=128, channels=4),
        blocks="joint_transformer_blocks",
        sample_size=64,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_mmdit_layers=6,
        num_single_dit_layers=6,
        attention_head_dim=64,
        num_attention_heads=12,
        joint_attention_dim=2048,
        caption_projection_dim=768,
        pos_embed_max_size=1024,
    ),
    # FLUX.1-schnell's shapes: 19 double + 38 single blocks, hidden 3072 = 24 x 128; 1024x1024 px
    "flux-schnell": _row(
        "FluxTransformer2DModel",
        flux_inputs,
        text_dim=4096,
        image_tokens=4096,
        text_tokens=256,
        input_args=dict(grid=(64, 64), text=256, channels=64, pooled=768),
        size="gpu",
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        in_channels=64,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
    ),
    # SD3.5-Large's shapes: 38 joint blocks, hidden 2432 = 38 x 64, RMS qk-norm; 1024x1024 px
    "sd35-large": _row(
        "SD3Transformer2DModel",
        sd3_inputs,
        text_dim=4096,
        image_tokens=4096,
        text_tokens=333,
        input_args=dict(latent=128, text=333, channels=16, pooled=2048),
        size="gpu",
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=38,
        attention_head_dim=64,
        num_attention_heads=38,
        joint_attention_dim=4096,
        caption_projection_dim=2432,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
        qk_norm="rms_norm",
    ),
}
ALIASES = {"mid": "flux-mid"}
ALL_CPU = "all-cpu"


class NotSupported(Exception):
    """ConceptAttention does not read this config's transformer class (yet)."""


# ----- building and calling --------------------------------------------------------------------------


def build_model(cfg: Config, device: str, dtype: torch.dtype) -> nn.Module:
    """Random weights (seed 0), built directly on the target device in the target dtype (full size: 12B)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cfg.build().eval()
    finally:
        torch.set_default_dtype(previous)


def make_inputs(cfg: Config, device: str, dtype: torch.dtype, batch: int = 1) -> dict:
    """The config's call inputs on ``device``; floating tensors in ``dtype`` except position ids (fp32)."""

    def place(key: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point() and not key.endswith("_ids"):
            return value.to(device, dtype)
        return value.to(device)

    return {key: place(key, value) for key, value in cfg.inputs(batch).items()}


def concept_embeds(cfg: Config, k: int, device: str, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(k, cfg.text_dim, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def open_session(model: nn.Module, embeds: torch.Tensor, name: str, cfg: Config, **kwargs: Any) -> ConceptAttention:
    try:
        return ConceptAttention(model, embeds, **kwargs)
    except UnsupportedModelError as error:
        raise NotSupported(
            f"config {name!r} ({cfg.cls}) is not supported by ConceptAttention yet: {str(error).splitlines()[0]}"
        ) from error


class _Stop(Exception):
    pass


def plain_until(model: nn.Module, blocks: str, last_block: int, inputs: dict) -> None:
    """The plain model, stopped after double-stream block ``last_block`` (no hooks of ours)."""

    def stop(*_):
        raise _Stop

    handle = getattr(model, blocks)[last_block].register_forward_hook(stop)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----- timing --------------------------------------------------------------------------------------------

Clock = Callable[[], float]


def time_call(fn: Callable[[], Any], device: str, wall: Clock = time.perf_counter, cpu: Clock = time.process_time):
    """(wall seconds, CPU seconds of the whole process) of one call, synchronised on CUDA."""
    sync(device)
    w0, c0 = wall(), cpu()
    fn()
    sync(device)
    return wall() - w0, cpu() - c0


def balanced_orders(rounds: int, rng: random.Random) -> list[bool]:
    """Per round, whether ours goes first: True in half the rounds (the odd one out by coin), shuffled."""
    orders = [True] * (rounds // 2) + [False] * (rounds // 2)
    if rounds % 2:
        orders.append(rng.random() < 0.5)
    rng.shuffle(orders)
    return orders


def paired_rounds(
    pairs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]],
    rounds: int,
    warmup: int,
    seed: int,
    device: str = "cpu",
    wall: Clock = time.perf_counter,
    cpu: Clock = time.process_time,
    collect: bool = True,
) -> dict[str, dict[str, list]]:
    """Time every (plain, ours) pair in ``warmup + rounds`` rounds; the warm-up rounds are not recorded.

    Within a round the pairs run in a shuffled order and each pair's two sides run back to back, ours
    first in a balanced, shuffled half of the rounds. Returns, per pair, the recorded rounds' wall and
    CPU seconds of both sides, whether ours went first, and the order the pairs ran in.
    """
    rng = random.Random(seed)
    names = list(pairs)
    orders = {name: balanced_orders(warmup, rng) + balanced_orders(rounds, rng) for name in names}
    record: dict[str, dict[str, list]] = {
        name: {"plain_wall": [], "ours_wall": [], "plain_cpu": [], "ours_cpu": [], "ours_first": [], "position": []}
        for name in names
    }
    for r in range(warmup + rounds):
        order = names[:]
        rng.shuffle(order)
        if collect:  # no garbage collection inside a round (it would land on one side of a pair)
            gc.collect()
            gc.disable()
        try:
            timed_round = []
            for name in order:
                plain, ours = pairs[name]
                ours_first = orders[name][r]
                sides = [("ours", ours), ("plain", plain)] if ours_first else [("plain", plain), ("ours", ours)]
                timed_round.append((name, ours_first, {side: time_call(fn, device, wall, cpu) for side, fn in sides}))
        finally:
            if collect:
                gc.enable()
        if r < warmup:
            continue
        for position, (name, ours_first, timed) in enumerate(timed_round):
            rec = record[name]
            for side in ("plain", "ours"):
                rec[f"{side}_wall"].append(timed[side][0])
                rec[f"{side}_cpu"].append(timed[side][1])
            rec["ours_first"].append(ours_first)
            rec["position"].append(position)
    return record


def ratio_stats(plain: list[float], ours: list[float]) -> dict:
    """Median, quartiles and extremes of the per-round ratios ours / plain, and both sides' median seconds."""
    ratios = [o / p if p > 0 else float("inf") for p, o in zip(plain, ours)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "plain_median_s": statistics.median(plain),
        "ours_median_s": statistics.median(ours),
        "ratios": ratios,
    }


def summarise(rec: dict[str, list]) -> dict:
    return {
        "wall": ratio_stats(rec["plain_wall"], rec["ours_wall"]),
        "cpu": ratio_stats(rec["plain_cpu"], rec["ours_cpu"]),
        "rounds_ours_first": sum(rec["ours_first"]),
    }


def peak_memory(fn: Callable[[], Any], device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


# ----- one config ----------------------------------------------------------------------------------------


def measure(name: str, cfg: Config, args: argparse.Namespace) -> dict:
    """Every comparison for one config; raises NotSupported when ConceptAttention cannot read its class."""
    device, dtype = args.device, getattr(torch, args.dtype)
    model = build_model(cfg, device, dtype)
    embeds = concept_embeds(cfg, args.concepts, device, dtype, seed=1)
    image_embeds = concept_embeds(cfg, args.image_concepts, device, dtype, seed=2)
    # Sessions are built once (attaching costs nothing per call); the first says whether the class is read.
    session = open_session(model, embeds, name, cfg, layers=cfg.layers)
    n_blocks = len(getattr(model, cfg.blocks))
    all_session = open_session(model, embeds, name, cfg, layers=list(range(n_blocks)))
    image_session = open_session(model, image_embeds, name, cfg, layers=cfg.layers)
    last_read = image_session.layers[-1]
    inputs = make_inputs(cfg, device, dtype)
    results: dict = {
        "benchmark": "overhead",
        "config": name,
        "class": cfg.cls,
        "model": cfg.model,
        "image_tokens": cfg.image_tokens,
        "text_tokens": cfg.text_tokens,
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "load_average_at_start": _load_average(),
        "method": (
            "paired rounds: per round, each comparison's plain and ours run back to back, the comparisons "
            "in a shuffled order and ours first in a balanced shuffled half of the rounds (seeded RNG); "
            "statistic: median over rounds of the per-round ratio ours/plain; wall = perf_counter, "
            "cpu = process_time (all threads); warm-up rounds not recorded; encode throughput timed apart"
        ),
    }

    with torch.inference_mode():

        def forward_with(s: ConceptAttention) -> Callable[[], None]:
            def run() -> None:
                with s:
                    model(**inputs)
                s.reset()

            return run

        def image_pass(batch_inputs: dict) -> Callable[[], None]:
            def run() -> None:
                with image_session:
                    image_session.forward_until_last_layer(**batch_inputs)
                image_session.reset()

            return run

        def plain_forward() -> None:
            model(**inputs)

        ours_image = image_pass(inputs)
        method_sessions = {
            f"method:{m}": open_session(model, embeds, name, cfg, layers=cfg.layers, readouts=[m]) for m in args.methods
        }
        pairs = {
            "forward": (plain_forward, forward_with(session)),
            "forward_all_double_layers": (plain_forward, forward_with(all_session)),
            "real_image_pass": (lambda: plain_until(model, cfg.blocks, last_read, inputs), ours_image),
            "real_image_pass_vs_all_double_blocks": (
                lambda: plain_until(model, cfg.blocks, n_blocks - 1, inputs),
                ours_image,
            ),
            **{key: (plain_forward, forward_with(s)) for key, s in method_sessions.items()},
        }
        described = {
            "forward": dict(
                concepts=args.concepts, layers=list(session.layers), ours="full forward with maps", plain="full forward"
            ),
            "forward_all_double_layers": dict(
                concepts=args.concepts,
                layers=list(all_session.layers),
                ours="full forward with maps",
                plain="full forward",
            ),
            "real_image_pass": dict(
                concepts=args.image_concepts,
                layers=list(image_session.layers),
                ours=f"stop after block {last_read}, with maps",
                plain=f"plain model stopped after block {last_read}",
            ),
            "real_image_pass_vs_all_double_blocks": dict(
                concepts=args.image_concepts,
                layers=list(image_session.layers),
                ours=f"stop after block {last_read}, with maps",
                plain=f"plain model through all {n_blocks} double-stream blocks",
            ),
            **{
                key: dict(
                    concepts=args.concepts,
                    layers=list(range(s.last_block + 1)) if s.last_block > s.layers[-1] else list(s.layers),
                    readout=next(iter(s.readouts.values())).settings(),
                    ours=f"full forward with the {key.removeprefix('method:')} maps only",
                    plain="full forward",
                )
                for key, s in method_sessions.items()
            },
        }
        record = paired_rounds(pairs, args.repeats, args.warmup, args.seed, device)
        comparisons = {key: {**described[key], **summarise(record[key])} for key in pairs}
        results["summary"] = {
            key: {"wall": c["wall"]["ratio_median"], "cpu": c["cpu"]["ratio_median"]} for key, c in comparisons.items()
        }
        results["comparisons"] = comparisons

        # Encode throughput, apart from the paired rounds: one image, its noise draws batched.
        encode = image_pass(make_inputs(cfg, device, dtype, batch=args.samples))
        for _ in range(max(1, args.warmup)):
            encode()
        timed = [time_call(encode, device) for _ in range(args.repeats)]
        wall = statistics.median(t[0] for t in timed)
        results["encode_throughput"] = {
            "noise_samples_per_image": args.samples,
            "concepts": args.image_concepts,
            "images_per_second": 1.0 / wall,
            "wall_median_s": wall,
            "cpu_median_s": statistics.median(t[1] for t in timed),
            "note": "transformer pass only (VAE encode and text encoding excluded); timed after the paired rounds",
        }

        if device.startswith("cuda"):
            plain_peak = peak_memory(plain_forward, device)
            ours_peak = peak_memory(forward_with(all_session), device)
            plain_image_peak = peak_memory(lambda: plain_until(model, cfg.blocks, last_read, inputs), device)
            ours_image_peak = peak_memory(ours_image, device)
            assert plain_peak and ours_peak and plain_image_peak and ours_image_peak
            results["peak_memory_bytes"] = {
                "forward": {"plain": plain_peak, "with_maps": ours_peak, "ratio": ours_peak / plain_peak},
                "real_image_pass": {
                    "plain": plain_image_peak,
                    "with_maps": ours_image_peak,
                    "ratio": ours_image_peak / plain_image_peak,
                },
            }
    results["load_average_at_end"] = _load_average()
    return results


def _load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (None where the OS has none): was it quiet?"""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cpu_names = ", ".join(n for n, c in CONFIGS.items() if c.size == "cpu")
    gpu_names = ", ".join(n for n, c in CONFIGS.items() if c.size == "gpu")
    parser.add_argument(
        "--config",
        choices=[*CONFIGS, *ALIASES, ALL_CPU],
        default="flux-mid",
        metavar="NAME",
        help=f"mid size (CPU): {cpu_names}; full size (GPU): {gpu_names}; {ALL_CPU}: every mid-size config "
        "('mid' = flux-mid)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--concepts", type=int, default=10, help="concepts for the full forward")
    parser.add_argument("--image-concepts", type=int, default=7, help="concepts for the real-image pass")
    parser.add_argument("--samples", type=int, default=5, help="noise draws per image for the encode throughput")
    parser.add_argument("--repeats", type=int, default=7, help="recorded paired rounds")
    parser.add_argument("--warmup", type=int, default=2, help="paired rounds run first and not recorded")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order randomisation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--methods",
        default="",
        help="also time these map methods, each alone against the plain forward: 'all' (concept_attention and "
        "every follow-up), or names / NAME:key=value specs separated by commas",
    )
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.methods = ["concept_attention", *FOLLOWUPS] if wanted == ["all"] else wanted
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = ALIASES.get(args.config, args.config)
    if name == ALL_CPU:
        runs: dict = {}
        for key, cfg in CONFIGS.items():
            if cfg.size != "cpu":
                continue
            print(f"overhead.py: {key} ...", file=sys.stderr, flush=True)
            try:
                runs[key] = measure(key, cfg, args)
            except NotSupported as error:
                print(f"overhead.py: skipped: {error}", file=sys.stderr, flush=True)
                runs[key] = {"config": key, "class": cfg.cls, "unsupported": str(error)}
        output: dict = {"benchmark": "overhead", "config": ALL_CPU, "configs": runs}
    else:
        try:
            output = measure(name, CONFIGS[name], args)
        except NotSupported as error:
            print(f"overhead.py: error: {error}", file=sys.stderr)
            return 2
    text = json.dumps(output, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
