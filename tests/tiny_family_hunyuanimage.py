"""HunyuanImage 2.1 for the cross-family tests (tests/test_families.py): tiny real classes, built offline.

The Qwen2.5-VL tokenizer is the real ``Qwen2Tokenizer`` (its own byte-level pre-tokenizer) over a byte-level BPE
trained here on the pipeline's prompt template and a few words, so that, as with the real vocabulary, the template
prefix the pipeline drops is exactly its 34 tokens and every known word is one token (with or without its space);
other words fall back to several tokens. The glyph encoder is a tiny T5 behind the real ``ByT5Tokenizer``.
"""

from __future__ import annotations

import json

import torch
from tiny_pipelines import WORDS

FAMILY = "hunyuanimage"
TEXT_WIDTH = 32  # Qwen2.5-VL hidden size = the transformer's text_embed_dim
GLYPH_WIDTH = 32  # ByT5 d_model = text_embed_2_dim
PATCH = 2
#: MMDiTPipeline.generate / encode keyword arguments of a quick run (a non-square image).
GENERATE = dict(height=32, width=48, steps=2)
ENCODE = dict(size=(48, 32))
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>"
)  # HunyuanImagePipeline.prompt_template_encode


def qwen_tokenizer():
    """The real Qwen2Tokenizer class over a byte-level BPE trained on the template and WORDS."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, min_frequency=1, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False
    )
    template = TEMPLATE.format("")
    for special in SPECIAL:
        template = template.replace(special, "\n")
    bpe.train_from_iterator([template, " " + " ".join(WORDS), *WORDS], trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_tokens([AddedToken(s, special=True) for s in SPECIAL])
    return tokenizer


def qwen_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    text = dict(
        hidden_size=TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=3,  # the pipeline reads hidden_states[-3]: the output of layer 1
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
        **ids,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_WIDTH)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def glyph_encoder():
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=GLYPH_WIDTH,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval(), tokenizer


def transformer(seed: int = 0, **config):
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(seed)
    kwargs = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=3,
        num_single_layers=1,
        num_refiner_layers=2,
        patch_size=(PATCH, PATCH),
        text_embed_dim=TEXT_WIDTH,
        text_embed_2_dim=GLYPH_WIDTH,
        rope_axes_dim=(4, 4),
    )
    return HunyuanImageTransformer2DModel(**{**kwargs, **config}).eval()


def call_inputs(model, batch: int = 2, h: int = 3, w: int = 5, seed: int = 1) -> dict:
    """Latents of a ``2h x 2w`` grid (patch 2), a different timestep per item, prompts with padding (item 0: 5 of
    7 Qwen tokens, odd items: all 7) and glyph tokens (item 0: 2 of 6 valid, odd items: 3), as the model reorders
    them (valid glyph tokens, valid prompt tokens, padding)."""
    g = torch.Generator().manual_seed(seed)
    even = torch.arange(batch)[:, None] % 2 == 0
    return dict(
        hidden_states=torch.randn(batch, 4, PATCH * h, PATCH * w, generator=g),
        timestep=400.0 + 300.0 * torch.arange(batch, dtype=torch.float32),
        encoder_hidden_states=torch.randn(batch, 7, TEXT_WIDTH, generator=g),
        encoder_attention_mask=torch.where(even, torch.arange(7) < 5, torch.ones(7, dtype=torch.bool)).long(),
        encoder_hidden_states_2=torch.randn(batch, 6, GLYPH_WIDTH, generator=g),
        encoder_attention_mask_2=torch.where(even, torch.arange(6) < 2, torch.arange(6) < 3).long(),
        return_dict=False,
    )


def vae():
    from diffusers import AutoencoderKLHunyuanImage

    return AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32),
        layers_per_block=1,
        scaling_factor=0.476986,
        spatial_compression_ratio=2,
        sample_size=32,
    ).eval()


def pipeline(seed: int = 0, distilled: bool = False):
    """The tiny HunyuanImagePipeline: CFG through its AdaptiveProjectedMixGuidance guiders (two transformer calls a
    step, the prompt's first), or ``distilled``: guidance and MeanFlow embeddings, no guider."""
    from diffusers import AdaptiveProjectedMixGuidance, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    glyph, glyph_tokenizer = glyph_encoder()
    model = transformer(seed, guidance_embeds=distilled, use_meanflow=distilled)
    guider = None if distilled else AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=0)
    ocr_guider = None if distilled else AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=0)
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        vae=vae(),
        text_encoder=qwen_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=glyph,
        tokenizer_2=glyph_tokenizer,
        transformer=model,
        guider=guider,
        ocr_guider=ocr_guider,
    )
    # shorter text sequences than the real 1000 Qwen / 128 ByT5 tokens keep CPU runs quick (a pipeline reloaded
    # from a folder has the real lengths again)
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = 64, 32
    return pipe
