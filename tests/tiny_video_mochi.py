"""Mochi for the cross-family video tests (tests/test_families_video.py): tiny real classes, built offline.

A ``MochiTransformer3DModel`` of 3 blocks (the last ``context_pre_only``) whose text stream (12 wide) is
narrower than its video stream (16), with random RoPE frequencies (the model initialises them to zero,
where RoPE is the identity) and random qk-norm weights; a T5 tokenizer made in code (tests/tiny_pipelines.py)
and a tiny T5 encoder; the real ``AutoencoderKLMochi`` (8x spatial, 6x temporal compression, 12 latent
channels with the real latents mean/std) and the real scheduler configured as Mochi 1 ships it
(``invert_sigmas``).
"""

from __future__ import annotations

import tempfile

import torch

FAMILY = "mochi"
TEXT_WIDTH = 32
CHANNELS = 12
#: MMDiTPipeline.generate / encode keyword arguments of a quick run: 13 frames (3 latent frames), 32 x 48 pixels.
GENERATE = dict(height=32, width=48, frames=13, steps=2, guidance=4.5, max_sequence_length=16)
ENCODE = dict(size=(48, 32), frames=7, max_sequence_length=16)


def transformer(seed: int = 0, layers: int = 3, dtype: torch.dtype = torch.float32):
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    model = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=layers,
        pooled_projection_dim=12,
        in_channels=CHANNELS,
        text_embed_dim=TEXT_WIDTH,
        time_embed_dim=8,
        max_sequence_length=16,
    ).eval()
    with torch.no_grad():
        model.pos_frequencies.normal_(0.0, 0.5)
        for module in model.modules():  # the qk-norms' weights start at 1: make each its own
            if type(module).__name__ == "MochiRMSNorm" and module.weight is not None:
                module.weight.normal_(1.0, 0.3)
    return model if dtype == torch.float32 else model.to(dtype)


def call_inputs(model, batch: int = 2, f: int = 2, h: int = 3, w: int = 5, seed: int = 1, text: int = 7) -> dict:
    """Latents of f frames x 2h x 2w (patch 2), a random prompt whose second item has its last 3 tokens masked
    (as T5 padding), a timestep in [0, 1000]."""
    g, dtype = torch.Generator().manual_seed(seed), model.dtype
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[1:, text - 3 :] = False
    return dict(
        hidden_states=torch.randn(batch, CHANNELS, f, 2 * h, 2 * w, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text, TEXT_WIDTH, generator=g).to(dtype),
        timestep=(torch.linspace(200.0, 800.0, batch) + 10 * seed).to(dtype),
        encoder_attention_mask=mask,
        return_dict=False,
    )


def vae():
    from diffusers import AutoencoderKLMochi

    torch.manual_seed(0)
    return AutoencoderKLMochi(
        latent_channels=CHANNELS,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),  # the VAE's group norms take 32 groups
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        scaling_factor=1.25,
    ).eval()


def pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline
    from tiny_pipelines import _t5, t5_tokenizer

    tok = t5_tokenizer(tempfile.mkdtemp())
    model = transformer(seed)
    torch.manual_seed(seed)
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=vae(),
        text_encoder=_t5(tok, TEXT_WIDTH),
        tokenizer=tok,
        transformer=model,
    )
