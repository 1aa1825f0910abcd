"""Chroma's maps recomputed by hand, independent of the package's hooks (the Chroma side of tests/reference.py).

The transformer is run block by block. For every double-stream block the modulation is sliced from the
approximator's output at the offsets the model reads, adaLN, qk RMS norms, FLUX RoPE (angles written out
below) and the joint attention with the pipeline's mask (as SDPA applies it: a float mask is added to the
logits, a boolean one drops keys) are recomputed explicitly, so ``o_x``, the image keys and values come from
here. The concept tokens go through the block's text-stream submodules by explicit calls, modulated with
the block's text half, with each stream mode's one-directional attention as plain matrix products; they
never see prompt tokens, so no mask applies to them. The model's own block then advances the image and
prompt tokens to the next block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reference import concept_attention, heads, merge, scores


def rope_angles(ids: torch.Tensor, axes_dims, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX RoPE written out: for each id axis of width d, angle = position * theta^(-2i/d) for channel pair i;
    returns (cos, sin) ``[L, Dh/2]``, one angle per channel pair, axes concatenated."""
    angles = []
    for axis, d in enumerate(axes_dims):
        freqs = theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(ids[:, axis].double()[:, None] * freqs[None])
    a = torch.cat(angles, dim=-1)
    return a.cos().float(), a.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Channel pairs (a, b) of ``[B, H, S, Dh]`` rotate to (a cos - b sin, b cos + a sin)."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def rms(norm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last axis, with the norm's weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def ada(x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's first half: layer norm (no affine, eps 1e-6) * (1 + scale) + shift, with mod ``[B, 6, D]``
    holding (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + mod[:, 1, None]) + mod[:, 0, None]


def masked_attend(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v on ``[B, H, S, Dh]``; mask ``[B, 1, S, S]``: a float one is added to the
    logits, a boolean one drops False keys (what scaled_dot_product_attention does with each)."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(dim=-1) @ v


def modulations(t, timestep: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image, text) modulation ``[B, 6, D]`` of each double block: the approximator's rows after the single
    blocks' three each, the image halves of all double blocks first, then the text halves."""
    vec = t.distilled_guidance_layer(t.time_text_embed(timestep * 1000))
    n_single, n_double = len(t.single_transformer_blocks), len(t.transformer_blocks)
    image0, text0 = 3 * n_single, 3 * n_single + 6 * n_double
    return [
        (vec[:, image0 + 6 * i : image0 + 6 * i + 6], vec[:, text0 + 6 * i : text0 + 6 * i + 6])
        for i in range(n_double)
    ]


def _start(t, inputs):
    x = t.x_embedder(inputs["hidden_states"])
    mods = modulations(t, inputs["timestep"].to(x.dtype))
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]], 0)
    cos, sin = rope_angles(ids, t.config.axes_dims_rope)
    enc = t.context_embedder(inputs["encoder_hidden_states"])
    m = inputs.get("attention_mask")
    pair = None if m is None else m[:, None, None, :] * m[:, None, :, None]  # query x key, as the block combines it
    return x, enc, mods, (cos, sin), t.pos_embed(ids), pair


def _joint(block, x, enc, image_mod, text_mod, cos, sin, pair):
    """The joint attention recomputed: (Q, K, V) after norms and RoPE, the attention output, text count."""
    attn, nh = block.attn, block.attn.heads
    nx, ne = ada(x, image_mod), ada(enc, text_mod)
    q, k, v = (
        rms(attn.norm_q, heads(attn.to_q(nx), nh)),
        rms(attn.norm_k, heads(attn.to_k(nx), nh)),
        heads(attn.to_v(nx), nh),
    )
    eq = rms(attn.norm_added_q, heads(attn.add_q_proj(ne), nh))
    ek = rms(attn.norm_added_k, heads(attn.add_k_proj(ne), nh))
    ev = heads(attn.add_v_proj(ne), nh)
    Q = rotate(torch.cat([eq, q], 2), cos, sin)
    K = rotate(torch.cat([ek, k], 2), cos, sin)
    V = torch.cat([ev, v], 2)
    return Q, K, V, masked_attend(Q, K, V, pair), enc.shape[1]


@torch.no_grad()
def reference_maps(transformer, calls, concepts, layers, stream, space, softmax, concept_norm="none") -> torch.Tensor:
    """Mean over ``layers`` and ``calls`` of the per-layer maps ``[B, K, N]`` (float64 accumulation)."""
    total, count = None, 0
    for inputs in calls:
        for layer_scores in _one_call(transformer, inputs, concepts, layers, stream, space, concept_norm):
            s = layer_scores.softmax(dim=1) if softmax else layer_scores
            total = s.double() if total is None else total + s.double()
            count += 1
    return (total / count).float()


def _one_call(t, inputs, concepts, layers, stream, space, concept_norm):
    x, enc, mods, (cos, sin), model_rope, pair = _start(t, inputs)
    c = concepts if concepts.ndim == 3 else concepts.unsqueeze(0)
    c = t.context_embedder(c.to(x.dtype)).expand(x.shape[0], -1, -1)
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        image_mod, text_mod = mods[index]
        attn, nh = block.attn, block.attn.heads
        Q, K, V, out, n_txt = _joint(block, x, enc, image_mod, text_mod, cos, sin, pair)
        o_x, k_x, v_x = merge(out[:, :, n_txt:]), K[:, :, n_txt:], V[:, :, n_txt:]

        # --- the concept stream through the text-stream weights, modulated by the text half; position 0: no rotation
        nc = ada(c, text_mod)
        cq, ck = (
            rms(attn.norm_added_q, heads(attn.add_q_proj(nc), nh)),
            rms(attn.norm_added_k, heads(attn.add_k_proj(nc), nh)),
        )
        cv = heads(attn.add_v_proj(nc), nh)
        o_c = concept_attention(stream, cq, ck, cv, k_x, v_x)
        if index in layers:
            yield scores(space, o_x, merge(o_c), v_x, cv, k_x, cq, concept_norm).float()
        gate, shift_mlp, scale_mlp, gate_mlp = (text_mod[:, i, None] for i in (2, 3, 4, 5))
        c = c + gate * attn.to_add_out(merge(o_c))
        c = c + gate_mlp * block.ff_context(F.layer_norm(c, c.shape[-1:], eps=1e-6) * (1 + scale_mlp) + shift_mlp)

        # --- advance the real model's image and prompt tokens
        enc, x = block(
            hidden_states=x,
            encoder_hidden_states=enc,
            temb=torch.cat([image_mod, text_mod], dim=1),
            image_rotary_emb=model_rope,
            attention_mask=inputs.get("attention_mask"),
        )


@torch.no_grad()
def reference_prompt_attention(t, inputs: dict, layers: list[int]) -> torch.Tensor:
    """Mean over ``layers`` of softmax over the prompt tokens the pipeline keeps (its mask's nonzero entries;
    padding after the first padding token gets no weight) of (image query . prompt key) / sqrt(d), mean over
    heads: ``[B, S_text, N]``."""
    x, enc, mods, (cos, sin), model_rope, pair = _start(t, inputs)
    m = inputs.get("attention_mask")
    total = []
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        image_mod, text_mod = mods[index]
        Q, K, _, _, n_txt = _joint(block, x, enc, image_mod, text_mod, cos, sin, pair)
        if index in layers:
            logits = Q[:, :, n_txt:].double() @ K[:, :, :n_txt].double().transpose(-1, -2) / Q.shape[-1] ** 0.5
            if m is not None:
                logits = logits.masked_fill(m[:, None, None, :n_txt] == 0, float("-inf"))
            total.append(logits.softmax(-1).mean(1).transpose(1, 2))  # [B, S, N]
        enc, x = block(
            hidden_states=x,
            encoder_hidden_states=enc,
            temb=torch.cat([image_mod, text_mod], dim=1),
            image_rotary_emb=model_rope,
            attention_mask=m,
        )
    return (sum(total) / len(total)).float()
