"""Qwen-Image for the cross-family tests (tests/test_families.py): tiny real classes, built offline.

The tokenizer is a byte-level BPE ``tokenizers.Tokenizer`` (Qwen2's pre-tokenizer regex, byte-level alphabet,
NFC, the ``<|im_start|>`` / ``<|im_end|>`` specials) wrapped in the real ``Qwen2Tokenizer``. Its merges spell
every word of the pipeline's prompt template as one token, as Qwen's own vocabulary does, so the template's
system part is exactly ``prompt_template_encode_start_idx`` (34) tokens; caption words are one token each
(``Ġword`` after a space, ``word`` at the start), except the words in ``SPACED_ONLY`` (one token only after a
space) and any word outside the vocabulary (several tokens, e.g. "skyscraper").
"""

from __future__ import annotations

import torch

FAMILY = "qwenimage"
TEXT_WIDTH = 32
#: MMDiTPipeline.generate / encode keyword arguments of a quick run (a non-square image); the negative prompt
#: turns on true CFG (the pipeline's default true_cfg_scale is 4), so each step calls the transformer twice.
GENERATE = dict(height=32, width=48, steps=2, guidance=3.0, negative_prompt="blurry")
ENCODE = dict(size=(48, 32))

TEMPLATE_WORDS = ["system", "Describe", "user", "assistant"]  # after a newline: no leading space
SPACED_WORDS = "the image by detailing color shape size texture quantity text spatial relationships of objects and"
CAPTION_WORDS = ["a", "red", "dog", "cat", "tree", "sky", "grass", "background", "on", "photo", "near", "blurry"]
SPACED_ONLY = ["house"]  # "Ġhouse" is one token, "house" at the start of a caption is several
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def qwen_tokenizer():
    """A tiny Qwen2Tokenizer: byte-level BPE whose merges make each listed word a single token."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    words = TEMPLATE_WORDS + CAPTION_WORDS + ["Ġ" + w for w in SPACED_WORDS.split() + CAPTION_WORDS + SPACED_ONLY]
    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    merges: list[tuple[str, str]] = []

    def build() -> Tokenizer:
        tok = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False, byte_fallback=False))
        tok.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        return tok

    changed = True
    while changed:  # add merges until every word is one token (a later merge never undoes an earlier word)
        tok, changed = build(), False
        for word in words:
            pieces = tok.model.tokenize(word)
            if len(pieces) > 1:
                a, b = pieces[0].value, pieces[1].value
                if (a, b) not in merges:
                    merges.append((a, b))
                    vocab.setdefault(a + b, len(vocab))
                    changed = True
    tok = build()
    for word in words:
        assert len(tok.model.tokenize(word)) == 1, word
    tok.add_special_tokens(SPECIALS)
    return Qwen2Tokenizer(tokenizer_object=tok, model_max_length=32768)


def _transformer_config(**extra) -> dict:
    return dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),
        **extra,
    )


def transformer(seed: int = 0, **extra):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**_transformer_config(**extra)).eval()


def call_inputs(model, batch: int = 2, h: int = 3, w: int = 5, seed: int = 1, text: int = 7, t: float = 0.5) -> dict:
    """Keyword arguments of one transformer call: packed latents of an h x w token grid, and prompts whose
    last batch item has its final two tokens padded (masked by ``encoder_hidden_states_mask``)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.long)
    if batch > 1:
        mask[-1, -2:] = 0
    return dict(
        hidden_states=torch.randn(batch, h * w, model.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text, model.config.joint_attention_dim, generator=g),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((batch,), t),
        img_shapes=[[(1, h, w)]] * batch,
        return_dict=False,
    )


def text_encoder(tokenizer, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    n = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 2 * TEXT_WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": n + 3,
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32},
        hidden_size=TEXT_WIDTH,
        vocab_size=n + 3,
        vision_start_token_id=n,
        vision_end_token_id=n + 1,
        vision_token_id=n + 2,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def vae(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    ).eval()


def pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    tokenizer = qwen_tokenizer()
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(seed),
        text_encoder=text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        transformer=transformer(seed),
    )
