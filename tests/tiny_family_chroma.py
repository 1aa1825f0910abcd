"""Chroma for the cross-family tests (tests/test_families.py): tiny real classes, built offline.

The transformer is a tiny ``ChromaTransformer2DModel`` (3 double blocks, one single block, a one-layer
approximator); the pipeline a real ``ChromaPipeline`` with a tiny T5 encoder, the T5 tokenizer of
:mod:`tiny_pipelines`, a tiny ``AutoencoderKL`` and the real flow-matching scheduler.
"""

from __future__ import annotations

import tempfile

import torch

FAMILY = "chroma"
TEXT_WIDTH = 32
TEXT_TOKENS = 8
#: MMDiTPipeline.generate / encode keyword arguments of a quick run (a non-square image); guidance > 1
#: runs the pipeline's true CFG (a negative-prompt call after each prompt call).
GENERATE = dict(height=32, width=48, steps=2, guidance=3.0, max_sequence_length=16)
ENCODE = dict(size=(48, 32), max_sequence_length=16)


def transformer(seed: int = 0, layers: int = 3, single: int = 1):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()


def text_mask(lengths: list[int], text: int, num_image: int) -> torch.Tensor:
    """The mask ChromaPipeline passes: 0/1 floats keeping each prompt's tokens, its first padding token and
    every image token (``_get_t5_prompt_embeds`` then ``_prepare_attention_mask``)."""
    keep = (torch.arange(text)[None] <= torch.tensor(lengths)[:, None]).float()
    return torch.cat([keep, torch.ones(len(lengths), num_image, dtype=torch.bool)], dim=1)


def call_inputs(model, batch: int = 2, h: int = 3, w: int = 5, seed: int = 1, t: float = 0.5) -> dict:
    """A transformer call as the pipeline makes it, on an h x w token grid; batch items have prompts of
    different lengths (3, 5, ... tokens of 8), so padding is masked differently in each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    lengths = [min(3 + 2 * b, TEXT_TOKENS - 1) for b in range(batch)]
    return dict(
        hidden_states=torch.randn(batch, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH, generator=g),
        timestep=torch.full((batch,), t),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
        attention_mask=text_mask(lengths, TEXT_TOKENS, h * w),
        return_dict=False,
    )


def pipeline(seed: int = 0):
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
    from tiny_pipelines import _t5, _vae, t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer(tempfile.mkdtemp())
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=_t5(tokenizer, TEXT_WIDTH),
        tokenizer=tokenizer,
        transformer=transformer(seed),
        image_encoder=None,
        feature_extractor=None,
    )
