"""CogVideoX for the cross-family video tests (tests/test_families_video.py): tiny real classes, built offline.

The protocol model is CogVideoX-5B-like (3-D RoPE, no temporal patch, 226 text tokens); ``variant`` builds the
others for the family's own tests: "2b" (absolute sin-cos positions, no RoPE), "1.5" (RoPE, temporal patch 2)
and "i2v" (RoPE and a learned position table). The tokenizer is the T5 tokenizer of tests/tiny_pipelines.py;
the VAE is a tiny ``AutoencoderKLCogVideoX`` (8x spatial, 4x temporal compression), the scheduler
``CogVideoXDDIMScheduler`` with CogVideoX-2B's settings (v-prediction, zero terminal SNR, SNR shift 3).
"""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import torch

FAMILY = "cogvideox"
TEXT_WIDTH = 32
#: MMDiTPipeline.generate / encode keyword arguments of a quick run: 9 frames (3 latent frames), 32 x 64
#: pixels (a 3 x 2 x 4 token grid), CFG on.
GENERATE = dict(height=32, width=64, frames=9, steps=2, guidance=4.0)
ENCODE = dict(size=(64, 32), frames=9)

VARIANTS = {
    "5b": dict(use_rotary_positional_embeddings=True, sample_height=4, sample_width=8),
    "2b": dict(max_text_seq_length=7, sample_height=4, sample_width=8),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False),
    "i2v": dict(
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
        sample_height=6,  # the learned table is only used at its own size: 2 x 3 x 5 tokens (call_inputs' default)
        sample_width=10,
        sample_frames=5,
    ),
}


def transformer(seed: int = 0, variant: str = "5b", layers: int = 3, dtype: torch.dtype = torch.float32):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    config = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=TEXT_WIDTH,
        num_layers=layers,
        sample_height=16,
        sample_width=16,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,
    )
    model = CogVideoXTransformer3DModel(**{**config, **VARIANTS[variant]}).eval()
    if variant == "i2v":  # a trained table has rows for the text tokens too
        with torch.no_grad():
            model.patch_embed.pos_embedding.normal_(generator=torch.Generator().manual_seed(seed + 1))
    for block in model.transformer_blocks:  # the stock init leaves some biases and affine norms trivial
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model if dtype == torch.float32 else model.to(dtype)


def rotary(model, f: int, h: int, w: int):
    """The RoPE tables CogVideoXPipeline computes for an f x h x w token grid (None without RoPE)."""
    from diffusers import CogVideoXPipeline

    config = model.config
    if not config.use_rotary_positional_embeddings:
        return None
    holder = SimpleNamespace(vae_scale_factor_spatial=1, transformer=model)  # latent pixels: no VAE factor
    p, pt = config.patch_size, config.patch_size_t or 1
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(holder, p * h, p * w, pt * f, torch.device("cpu"))


def call_inputs(model, batch: int = 2, f: int = 2, h: int = 3, w: int = 5, seed: int = 1, text: int = 7) -> dict:
    """Latents ``[B, f * patch_t, 4, 2h, 2w]``, a random prompt (the model's full length where positions are
    absolute embeddings), timestep 500, and the pipeline's RoPE tables."""
    g, dtype, config = torch.Generator().manual_seed(seed), model.dtype, model.config
    if not config.use_rotary_positional_embeddings or config.use_learned_positional_embeddings:
        text = config.max_text_seq_length
    frames = f * (config.patch_size_t or 1)
    return dict(
        hidden_states=torch.randn(batch, frames, 4, 2 * h, 2 * w, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text, TEXT_WIDTH, generator=g).to(dtype),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        image_rotary_emb=rotary(model, f, h, w),
        return_dict=False,
    )


def text_encoder(vocab_size: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_WIDTH,
        d_ff=2 * TEXT_WIDTH,
        d_kv=8,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def vae(seed: int = 0):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()


def scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
    )


def pipeline(seed: int = 0, variant: str = "5b"):
    from diffusers import CogVideoXPipeline
    from tiny_pipelines import t5_tokenizer

    tok = t5_tokenizer(tempfile.mkdtemp())
    return CogVideoXPipeline(
        tokenizer=tok,
        text_encoder=text_encoder(len(tok), seed),
        vae=vae(seed),
        transformer=transformer(seed, variant),
        scheduler=scheduler(),
    )
