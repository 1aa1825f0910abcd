"""Tiny random-weight Flux and SD3 transformers of the real diffusers classes, and their inputs (imported by
the tests by name: a module of its own, since ``conftest`` is a name that lab/tests has too)."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

TEXT_DIM = 32
POOLED_DIM = 24


def tiny_flux(layers: int = 3, single: int = 2, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_sd3(layers: int = 3, dual: tuple[int, ...] = (0, 1), qk_norm: str | None = "rms_norm", seed: int = 0):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=dual,
        qk_norm=qk_norm,
    ).eval()


def flux_inputs(batch=2, h=3, w=5, text=7, t=0.5, seed=1, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(batch, h * w, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text, TEXT_DIM, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, POOLED_DIM, generator=g).to(dtype),
        timestep=torch.full((batch,), t).to(dtype),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


def sd3_inputs(batch=2, h=3, w=5, text=7, t=500.0, seed=1, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 2 * h, 2 * w, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text, TEXT_DIM, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, POOLED_DIM, generator=g).to(dtype),
        timestep=torch.full((batch,), t).to(dtype),
        return_dict=False,
    )


def concepts(k=4, seed=2, batch=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (k, TEXT_DIM) if batch is None else (batch, k, TEXT_DIM)
    return torch.randn(*shape, generator=g)


def hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Number of hooks of every kind on every submodule (to prove nothing of ours is left)."""
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    return {name: tuple(len(getattr(m, k, {})) for k in kinds) for name, m in model.named_modules()}


def processors(model: torch.nn.Module) -> dict[str, type]:
    return {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
