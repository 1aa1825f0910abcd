"""HunyuanVideo-1.5 for the cross-family video tests (tests/test_families_video.py): tiny real classes, built offline.

A ``HunyuanVideo15Transformer3DModel`` of 3 double-stream blocks (patch 1, RoPE over frames x rows x columns); the
Qwen2.5-VL text model behind the real ``Qwen2Tokenizer`` over a byte-level BPE trained here on the pipeline's own
system message and a few words, so that, as with the real vocabulary, every piece of the chat-template prefix is one
token and the prefix is exactly the 108 tokens the pipeline drops (``prompt_template_encode_start_idx``); the chat
template is Qwen2.5-VL's. The glyph encoder is a tiny T5 behind the real ``ByT5Tokenizer``; the VAE the real
``AutoencoderKLHunyuanVideo15`` (4x spatial, 2x temporal compression, 4 latent channels); the guider the real
classifier-free guidance at the model's default scale (two transformer calls a step, the prompt's first).
"""

from __future__ import annotations

import json

import torch
from tiny_pipelines import WORDS

FAMILY = "hunyuanvideo15"
TEXT_WIDTH = 32  # Qwen2.5-VL hidden size = the transformer's text_embed_dim
GLYPH_WIDTH = 32  # ByT5 d_model = text_embed_2_dim
LATENT = 4  # VAE latent channels; the transformer takes [latents; condition latents; mask] = 2 * 4 + 1
IMAGE_WIDTH = 12  # image_embed_dim (SigLIP states of image-to-video, all zero for text-to-video)
#: MMDiTPipeline.generate / encode keyword arguments of a quick run: 5 frames (3 latent frames), 16 x 24 pixels.
GENERATE = dict(height=16, width=24, frames=5, steps=2)
ENCODE = dict(size=(24, 16), frames=5)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Qwen2.5-VL-7B-Instruct's chat template, as the model ships it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def system_message() -> str:
    """The pipeline's system message (its ``_get_mllm_prompt_embeds`` default, the same text as the instance's)."""
    import inspect

    from diffusers import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


def qwen_tokenizer():
    """The real Qwen2Tokenizer class over a byte-level BPE trained on the system message, the template and WORDS."""
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
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=1,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["system\n" + system_message(), "\nuser\n", "\nassistant\n", " " + " ".join(WORDS), *WORDS]
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_tokens([AddedToken(s, special=True) for s in SPECIAL])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen_encoder(tokenizer):
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(
        hidden_size=TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=3,  # the pipeline reads hidden_states[-3]: the output of layer 1
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2_5_VLTextModel(config).eval()


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
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    kwargs = dict(
        in_channels=2 * LATENT + 1,
        out_channels=LATENT,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=3,
        num_refiner_layers=2,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=TEXT_WIDTH,
        text_embed_2_dim=GLYPH_WIDTH,
        image_embed_dim=IMAGE_WIDTH,
        rope_axes_dim=(2, 2, 4),
        target_size=32,
        task_type="t2v",
    )
    return HunyuanVideo15Transformer3DModel(**{**kwargs, **config}).eval()


def call_inputs(model, batch: int = 2, f: int = 2, h: int = 3, w: int = 5, seed: int = 1, image: bool = False) -> dict:
    """Latents of f x h x w (patch 1), a different timestep per item, prompts with padding (item 0: 5 of 7 Qwen
    tokens, odd items: all 7), glyph tokens (item 0: 2 of 6 valid, odd items: 3) and 3 image-embedding tokens, all
    zero (text-to-video) unless ``image``: the model reorders them [valid image, valid glyph, valid prompt, padding]."""
    g = torch.Generator().manual_seed(seed)
    even = torch.arange(batch)[:, None] % 2 == 0
    images = torch.randn(batch, 3, IMAGE_WIDTH, generator=g)
    return dict(
        hidden_states=torch.randn(batch, 2 * LATENT + 1, f, h, w, generator=g),
        timestep=400.0 + 300.0 * torch.arange(batch, dtype=torch.float32),
        encoder_hidden_states=torch.randn(batch, 7, TEXT_WIDTH, generator=g),
        encoder_attention_mask=torch.where(even, torch.arange(7) < 5, torch.ones(7, dtype=torch.bool)).float(),
        encoder_hidden_states_2=torch.randn(batch, 6, GLYPH_WIDTH, generator=g),
        encoder_attention_mask_2=torch.where(even, torch.arange(6) < 2, torch.arange(6) < 3).float(),
        image_embeds=images if image else torch.zeros_like(images),
        return_dict=False,
    )


def vae():
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo15(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT,
        block_out_channels=(16, 16),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
        downsample_match_channel=False,
        upsample_match_channel=False,
    ).eval()


def pipeline(seed: int = 0, guidance_scale: float = 6.0):
    """The tiny HunyuanVideo15Pipeline; ``guidance_scale`` 1 turns classifier-free guidance off (one call a step)."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline

    tokenizer = qwen_tokenizer()
    glyph, glyph_tokenizer = glyph_encoder()
    model = transformer(seed)
    torch.manual_seed(seed)
    pipe = HunyuanVideo15Pipeline(
        text_encoder=qwen_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=model,
        vae=vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=glyph,
        tokenizer_2=glyph_tokenizer,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    # shorter text sequences than the real 1000 Qwen / 256 ByT5 / 729 image tokens keep CPU runs quick (a pipeline
    # reloaded from a folder has the real lengths again)
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 24, 16, 4
    return pipe
