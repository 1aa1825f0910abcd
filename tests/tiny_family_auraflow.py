"""AuraFlow for the cross-family tests (tests/test_families.py): tiny real classes, built offline.

The tokenizer is a real ``LlamaTokenizer`` (AuraFlow ships a Llama-style sentencepiece tokenizer: no start
token, ``</s>`` appended, padded on the right) over a small BPE vocabulary whose merges spell each known word
as one ``▁word`` token; other words fall apart into letters.
"""

from __future__ import annotations

import torch

FAMILY = "auraflow"
TEXT_WIDTH = 32
REGISTERS = 8  # AuraFlowTransformer2DModel's register tokens
#: MMDiTPipeline.generate / encode keyword arguments of a quick run (a non-square image, CFG on).
GENERATE = dict(height=32, width=48, steps=2, guidance=2.5, max_sequence_length=32)
ENCODE = dict(size=(48, 32), max_sequence_length=32)
WORDS = ["a", "dog", "cat", "tree", "sky", "grass", "background", "red", "the", "on", "photo", "of", "and"]


def transformer(seed: int = 0, layers: int = 3, dtype: torch.dtype = torch.float32):
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(seed)
    model = AuraFlowTransformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=layers,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        caption_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=256,  # a 16 x 16 grid of learned positions
    ).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def call_inputs(model, batch: int = 2, h: int = 3, w: int = 5, seed: int = 1, text: int = 7) -> dict:
    """Latents of 2h x 2w (patch 2), a random prompt, flow time 0.5 (AuraFlow takes t in [0, 1])."""
    g, dtype = torch.Generator().manual_seed(seed), model.dtype
    return dict(
        hidden_states=torch.randn(batch, 4, 2 * h, 2 * w, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text, TEXT_WIDTH, generator=g).to(dtype),
        timestep=torch.full((batch,), 0.5).to(dtype),
        return_dict=False,
    )


def tokenizer(padding_side: str = "right", add_bos: bool = False):
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, "<s>": 3, "\u2581": 4}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in WORDS:
        parts = ["\u2581", *word]
        while len(parts) > 1:  # merge left to right until the word is one token
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    return LlamaTokenizer(
        vocab=vocab,
        merges=list(dict.fromkeys(merges)),
        add_bos_token=add_bos,
        add_eos_token=True,
        pad_token="<pad>",
        padding_side=padding_side,
        legacy=False,
    )


def text_encoder(vocab_size: int, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_WIDTH,
        d_ff=2 * TEXT_WIDTH,
        d_kv=8,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.5,
    ).eval()


def pipeline(seed: int = 0, padding_side: str = "right", add_bos: bool = False):
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

    tok = tokenizer(padding_side, add_bos)
    model = transformer(seed)
    torch.manual_seed(seed)
    return AuraFlowPipeline(
        tokenizer=tok,
        text_encoder=text_encoder(len(tok), seed),
        vae=vae(),
        transformer=model,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
