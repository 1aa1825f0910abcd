"""An independent re-computation of the maps for ``CogVideoXTransformer3DModel``, without the package's hooks.

The transformer is run block by block by hand. In every block the joint attention is recomputed explicitly:
the expert adaLN (``CogVideoXLayerNormZero`` written out: six chunks of ``linear(silu(temb))``, the first three
for the video tokens, the last three for the text tokens, affine layer norms in float32), the shared q/k/v
projections on [text; video], the per-head layer norms, 3-D RoPE on the video part only, and softmax attention
as plain matrix products; so ``o_x``, the video keys and values come from here, on the (F, h, w) token grid.
The concept tokens start as ``text_proj(concepts)`` plus the position row the prompt's first token got in the
same call (read off the model's own patch embedding as ``embedded text - text_proj(text)``), take the text
halves of both norms and the shared weights, attend to [concept; video] keys only, and are updated as
``c + g1 * to_out(o_c)`` then ``+ g2 * ff(n2)``, the feed-forward written out as ``W2 gelu_tanh(W1 x)``. The
model's own block then advances the video and text tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reference import attend, concept_attention, heads, merge, rotate, scores


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """``nn.LayerNorm`` over the last axis written out (float32), with its affine parameters when it has them."""
    y = x.float()
    mean = y.mean(-1, keepdim=True)
    out = (y - mean) / torch.sqrt((y - mean).pow(2).mean(-1, keepdim=True) + norm.eps)
    if norm.weight is not None:
        out = out * norm.weight.float() + (norm.bias.float() if norm.bias is not None else 0)
    return out.to(x.dtype)


def expert_norm(norm, x: torch.Tensor, temb: torch.Tensor, text: bool):
    """One half of ``CogVideoXLayerNormZero``: ``LN(x) * (1 + scale) + shift`` and the gate ``[B, 1, D]``."""
    chunks = linear(F.silu(temb), norm.linear).chunk(6, dim=1)
    shift, scale, gate = chunks[3:] if text else chunks[:3]
    return layer_norm(x, norm.norm) * (1 + scale[:, None]) + shift[:, None], gate[:, None]


def feed_forward(ff, x: torch.Tensor) -> torch.Tensor:
    """diffusers' FeedForward with "gelu-approximate" written out."""
    return linear(F.gelu(linear(x, ff.net[0].proj), approximate="tanh"), ff.net[2])


def _embed(t, inputs):
    """Video tokens, text tokens, temb, the RoPE tables, and the position row the first text token got."""
    hs, enc_in = inputs["hidden_states"], inputs["encoder_hidden_states"]
    temb = t.time_embedding(t.time_proj(inputs["timestep"]).to(hs.dtype))
    seq = t.patch_embed(enc_in, hs)
    n = enc_in.shape[1]
    first_row = (seq[:, :1] - linear(enc_in[:, :1], t.patch_embed.text_proj))[:1]  # zero unless a learned table
    return seq[:, n:], seq[:, :n], temb, inputs.get("image_rotary_emb"), first_row


def _joint_qkv(block, x, enc, temb, rope):
    """The joint attention's queries, keys and values ``[B, H, S_text + N, Dh]`` (text first, video rotated)."""
    attn, nh, n = block.attn1, block.attn1.heads, enc.shape[1]
    nx, _ = expert_norm(block.norm1, x, temb, text=False)
    ne, _ = expert_norm(block.norm1, enc, temb, text=True)
    joint = torch.cat([ne, nx], 1)
    q, k, v = (heads(linear(joint, p), nh) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = layer_norm(q, attn.norm_q), layer_norm(k, attn.norm_k)
    if rope is not None:
        cos, sin = rope
        q = torch.cat([q[:, :, :n], rotate(q[:, :, n:], cos, sin)], 2)
        k = torch.cat([k[:, :, :n], rotate(k[:, :, n:], cos, sin)], 2)
    return q, k, v


@torch.no_grad()
def reference_maps(
    transformer,
    calls: list[dict],
    concepts: torch.Tensor,
    layers: list[int],
    stream: str,
    space: str,
    softmax: bool,
    concept_norm: str = "none",
) -> torch.Tensor:
    """Mean over ``layers`` and ``calls`` of the per-layer maps ``[B, K, F*h*w]`` (float64 accumulation)."""
    total, count = None, 0
    for inputs in calls:
        for layer_scores in _one_call(transformer, inputs, concepts, layers, stream, space, concept_norm):
            s = layer_scores.softmax(dim=1) if softmax else layer_scores
            total = s.double() if total is None else total + s.double()
            count += 1
    return (total / count).float()


def _one_call(t, inputs, concepts, layers, stream, space, concept_norm):
    x, enc, temb, rope, first_row = _embed(t, inputs)
    c = concepts if concepts.ndim == 3 else concepts.unsqueeze(0)
    c = (linear(c.to(x.dtype), t.patch_embed.text_proj) + first_row).expand(x.shape[0], -1, -1)
    n_txt = enc.shape[1]
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        attn, nh = block.attn1, block.attn1.heads
        Q, K, V = _joint_qkv(block, x, enc, temb, rope)
        o_x, k_x, v_x = merge(attend(Q, K, V)[:, :, n_txt:]), K[:, :, n_txt:], V[:, :, n_txt:]

        # --- the concept stream: text halves of the expert norms, the shared weights, no rotation
        nc, g1 = expert_norm(block.norm1, c, temb, text=True)
        cq, ck, cv = (heads(linear(nc, p), nh) for p in (attn.to_q, attn.to_k, attn.to_v))
        cq, ck = layer_norm(cq, attn.norm_q), layer_norm(ck, attn.norm_k)
        o_c = concept_attention(stream, cq, ck, cv, k_x, v_x)
        if index in layers:
            yield scores(space, o_x, merge(o_c), v_x, cv, k_x, cq, concept_norm).float()
        c = c + g1 * linear(merge(o_c), attn.to_out[0])
        n2, g2 = expert_norm(block.norm2, c, temb, text=True)
        c = c + g2 * feed_forward(block.ff, n2)

        # --- advance the real model's video and text tokens (the block returns video first)
        x, enc = block(hidden_states=x, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)


@torch.no_grad()
def reference_prompt_attention(t, inputs: dict, layers: list[int]) -> torch.Tensor:
    """Mean over ``layers`` of softmax over all text tokens (CogVideoX masks none) of (rotated video query .
    text key) / sqrt(d), mean over heads: ``[B, S_text, F*h*w]``."""
    x, enc, temb, rope, _ = _embed(t, inputs)
    n_txt, total = enc.shape[1], []
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        if index in layers:
            Q, K, _ = _joint_qkv(block, x, enc, temb, rope)
            logits = Q[:, :, n_txt:].double() @ K[:, :, :n_txt].double().transpose(-1, -2) / Q.shape[-1] ** 0.5
            total.append(logits.softmax(-1).mean(1).transpose(1, 2))  # [B, S, N]
        x, enc = block(hidden_states=x, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
    return (sum(total) / len(total)).float()
