"""Tiny random-weight FluxPipeline and StableDiffusion3Pipeline of the real classes, built offline.

Tokenizers are made here: a T5 tokenizer from a small unigram model and a CLIP tokenizer from a
small BPE vocabulary whose merges spell each known word.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

WORDS = ["a", "dog", "cat", "tree", "sky", "grass", "background", "red", "the", "on", "photo", "of", "and"]


def t5_tokenizer(directory: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [("\u2581", -3.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = os.path.join(directory, "t5_tokenizer.json")
    tok.save(path)
    return T5TokenizerFast(
        tokenizer_file=path, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0, model_max_length=512
    )


def clip_tokenizer(directory: str):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right until the word is one token
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    try:  # transformers >= 5 takes the vocabulary and merges themselves
        return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
    except TypeError:  # older releases read them from files
        vpath, mpath = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
        with open(vpath, "w") as f:
            json.dump(vocab, f)
        with open(mpath, "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab_file=vpath, merges_file=mpath, model_max_length=77)


def _clip(cls, tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection or hidden,
    )
    return cls(config).eval()


def _t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=8,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _vae():
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
        shift_factor=0.06,
        scaling_factor=1.5,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    d = tempfile.mkdtemp()
    tok, tok2 = clip_tokenizer(d), t5_tokenizer(d)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=3,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=_clip(CLIPTextModel, tok, 16),
        tokenizer=tok,
        text_encoder_2=_t5(tok2, 32),
        tokenizer_2=tok2,
        transformer=transformer,
    )


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    d = tempfile.mkdtemp()
    tok, tok2, tok3 = clip_tokenizer(d), clip_tokenizer(d), t5_tokenizer(d)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=_clip(CLIPTextModelWithProjection, tok, 16),
        tokenizer=tok,
        text_encoder_2=_clip(CLIPTextModelWithProjection, tok2, 16),
        tokenizer_2=tok2,
        text_encoder_3=_t5(tok3, 32) if with_t5 else None,
        tokenizer_3=tok3 if with_t5 else None,
        transformer=transformer,
    )
