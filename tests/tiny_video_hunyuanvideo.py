"""HunyuanVideo for the cross-family video tests (tests/test_families_video.py): tiny real classes, built offline.

The Llama 3 tokenizer is the real ``PreTrainedTokenizerFast`` (the class Llama 3 checkpoints name) over a
byte-level BPE made here: Llama 3's pre-tokenizer regex, the byte-level alphabet, the ``<|begin_of_text|>`` start
token and the header / end-of-turn specials of the pipeline's prompt template, right padding. Its merges spell every
pre-token of the template as one token, as Llama 3's own vocabulary does, so the template prefix the pipeline crops
is exactly its ``crop_start`` (95) tokens; caption words are one token each (``Ġword`` after a space, ``word`` at
the start of a prompt); other words (e.g. "skyscraper") fall back to several tokens. CLIP (the pooled vector) uses
the CLIP tokenizer of tests/tiny_pipelines.py.
"""

from __future__ import annotations

import tempfile

import torch
from tiny_pipelines import WORDS, _clip, clip_tokenizer

FAMILY = "hunyuanvideo"
TEXT_WIDTH = 32  # Llama hidden size = the transformer's text_embed_dim
POOLED_WIDTH = 16  # CLIP hidden size = pooled_projection_dim
PATCH = 2  # spatial patch (the real model's); the temporal patch is 1, as in the real model
#: MMDiTPipeline.generate / encode keyword arguments of a quick run: 5 frames (2 latent frames), non-square.
GENERATE = dict(height=32, width=48, frames=5, steps=2)
ENCODE = dict(size=(48, 32), frames=5)

#: Llama 3's pre-tokenizer pattern.
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>"]


def llama_tokenizer():
    """A tiny Llama 3 tokenizer: byte-level BPE whose merges make each template pre-token and known word one token."""
    import re

    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    pattern = "(" + "|".join(map(re.escape, SPECIALS)) + ")"
    text = [p for p in re.split(pattern, DEFAULT_PROMPT_TEMPLATE["template"].format("")) if p and p not in SPECIALS]
    words = [piece for part in text for piece, _ in pre.pre_tokenize_str(part)]
    words = list(dict.fromkeys(words + WORDS + ["Ġ" + w for w in WORDS]))
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []

    def build() -> Tokenizer:
        tok = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        return tok

    changed = True
    while changed:  # add merges until every word is one token (a later merge never undoes an earlier word)
        tok, changed = build(), False
        for word in words:
            pieces = tok.model.tokenize(word)
            if len(pieces) > 1 and (pieces[0].value, pieces[1].value) not in merges:
                merges.append((pieces[0].value, pieces[1].value))
                vocab.setdefault(pieces[0].value + pieces[1].value, len(vocab))
                changed = True
    tok = build()
    assert all(len(tok.model.tokenize(w)) == 1 for w in words)
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[(SPECIALS[0], bos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=131072,
    )


def llama_encoder(tokenizer):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=3,  # the pipeline reads hidden_states[-3]: the output of layer 1
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaModel(config).eval()


def transformer(seed: int = 0, **config):
    """A tiny HunyuanVideoTransformer3DModel (3 double-stream blocks, 1 single-stream, 3-axis RoPE 4 + 6 + 6)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    kwargs = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=3,
        num_single_layers=1,
        num_refiner_layers=2,
        patch_size=PATCH,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=TEXT_WIDTH,
        pooled_projection_dim=POOLED_WIDTH,
        rope_axes_dim=(4, 6, 6),
    )
    return HunyuanVideoTransformer3DModel(**{**kwargs, **config}).eval()


def call_inputs(model, batch: int = 2, f: int = 2, h: int = 3, w: int = 5, seed: int = 1) -> dict:
    """Latents of an ``f x h x w`` token grid, a different timestep and guidance per item, a pooled vector, and
    prompts with padding (item 0: 5 of 7 tokens valid, odd items: all 7), right-padded as the pipeline's."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    even = torch.arange(batch)[:, None] % 2 == 0
    return dict(
        hidden_states=torch.randn(
            batch,
            config.in_channels,
            f * config.patch_size_t,
            h * config.patch_size,
            w * config.patch_size,
            generator=g,
        ),
        timestep=400.0 + 300.0 * torch.arange(batch, dtype=torch.float32),
        encoder_hidden_states=torch.randn(batch, 7, TEXT_WIDTH, generator=g),
        encoder_attention_mask=torch.where(even, torch.arange(7) < 5, torch.ones(7, dtype=torch.bool)).float(),
        pooled_projections=torch.randn(batch, POOLED_WIDTH, generator=g),
        guidance=6000.0 - 1000.0 * torch.arange(batch, dtype=torch.float32),
        return_dict=False,
    )


def vae():
    """A tiny AutoencoderKLHunyuanVideo: spatial compression 4, temporal 4 (frames 4k + 1)."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()


def pipeline(seed: int = 0):
    """The tiny HunyuanVideoPipeline: Llama 3 prompt states, CLIP's pooled vector, embedded guidance."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = llama_tokenizer(), clip_tokenizer(tempfile.mkdtemp())
    return HunyuanVideoPipeline(
        text_encoder=llama_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer(seed),
        vae=vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip(CLIPTextModel, tokenizer_2, POOLED_WIDTH),
        tokenizer_2=tokenizer_2,
    )
