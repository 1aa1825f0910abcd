"""An independent re-computation of the maps for ``AuraFlowTransformer2DModel``, without the package's hooks.

The transformer is run block by block by hand. In every joint block the image stream's attention is
recomputed explicitly: the ada-norm modulation (timestep only), the q/k/v projections, the parameter-free
float32 layer norms over each head (written out), the text sequence as [register tokens; prompt tokens],
and softmax attention as plain matrix products; so ``o_x``, the image keys and values come from here. The
concept tokens go through the block's text-stream weights with the same explicit formulas, attend to
[concept; image] keys only (never to registers or prompt tokens), and are updated post-norm:
``c + gate_mlp * ff(LN(c + gate_msa * to_add_out(o_c)) * (1 + scale) + shift)``, the feed-forward
written out as ``out(silu(W1 x) * W2 x)``. The model's own block then advances the image and text tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reference import attend, concept_attention, heads, merge, scores


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Layer norm over the last axis without affine parameters, computed in float32, back in x's dtype."""
    y = x.float()
    mean = y.mean(-1, keepdim=True)
    var = (y - mean).pow(2).mean(-1, keepdim=True)
    return ((y - mean) / torch.sqrt(var + eps)).to(x.dtype)


def ada_norm(norm, x: torch.Tensor, temb: torch.Tensor):
    """AdaLayerNormZero written out: LN(x) * (1 + scale_msa) + shift_msa, and the four other chunks."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = F.linear(F.silu(temb), norm.linear.weight).chunk(
        6, dim=1
    )
    normed = layer_norm(x, norm.norm.eps) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return normed, gate_msa, shift_mlp, scale_mlp, gate_mlp


def feed_forward(ff, x: torch.Tensor) -> torch.Tensor:
    """AuraFlow's SwiGLU feed-forward written out."""
    hidden = F.silu(F.linear(x, ff.linear_1.weight)) * F.linear(x, ff.linear_2.weight)
    return F.linear(hidden, ff.out_projection.weight)


def _embed(t, inputs):
    """Image tokens (patch embed with learned positions), temb, and the text sequence [registers; prompt]."""
    hs, enc_in, ts = inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"]
    x = t.pos_embed(hs)
    temb = t.time_step_proj(t.time_step_embed(ts).to(x.dtype))
    enc = F.linear(enc_in, t.context_embedder.weight)
    enc = torch.cat([t.register_tokens.to(enc.dtype).expand(enc.shape[0], -1, -1), enc], dim=1)
    return x, temb, enc


def _joint_qkv(block, x, enc, temb):
    """The joint attention's queries, keys and values ``[B, H, S_text + N, Dh]`` (text first)."""
    attn, nh = block.attn, block.attn.heads
    nx = ada_norm(block.norm1, x, temb)[0]
    ne = ada_norm(block.norm1_context, enc, temb)[0]
    eps = attn.norm_q.eps
    q, k, v = (heads(F.linear(nx, p.weight), nh) for p in (attn.to_q, attn.to_k, attn.to_v))
    eq, ek, ev = (heads(F.linear(ne, p.weight), nh) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    q, k, eq, ek = (layer_norm(y, eps) for y in (q, k, eq, ek))
    return torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)


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
    """Mean over ``layers`` and ``calls`` of the per-layer maps ``[B, K, N]`` (float64 accumulation)."""
    total, count = None, 0
    for inputs in calls:
        for layer_scores in _one_call(transformer, inputs, concepts, layers, stream, space, concept_norm):
            s = layer_scores.softmax(dim=1) if softmax else layer_scores
            total = s.double() if total is None else total + s.double()
            count += 1
    return (total / count).float()


def _one_call(t, inputs, concepts, layers, stream, space, concept_norm):
    x, temb, enc = _embed(t, inputs)
    c = concepts if concepts.ndim == 3 else concepts.unsqueeze(0)
    c = F.linear(c.to(x.dtype), t.context_embedder.weight).expand(x.shape[0], -1, -1)
    n_txt = enc.shape[1]
    for index, block in enumerate(t.joint_transformer_blocks[: max(layers) + 1]):
        attn, nh = block.attn, block.attn.heads
        Q, K, V = _joint_qkv(block, x, enc, temb)
        o_x, k_x, v_x = merge(attend(Q, K, V)[:, :, n_txt:]), K[:, :, n_txt:], V[:, :, n_txt:]

        # --- the concept stream through the text-stream weights (the prompt's modulation: timestep only)
        nc, g_msa, shift, scale, g_mlp = ada_norm(block.norm1_context, c, temb)
        cq, ck, cv = (heads(F.linear(nc, p.weight), nh) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        cq, ck = layer_norm(cq, attn.norm_added_q.eps), layer_norm(ck, attn.norm_added_k.eps)
        o_c = concept_attention(stream, cq, ck, cv, k_x, v_x)
        if index in layers:
            yield scores(space, o_x, merge(o_c), v_x, cv, k_x, cq, concept_norm).float()
        post = layer_norm(c + g_msa[:, None] * F.linear(merge(o_c), attn.to_add_out.weight), block.norm2_context.eps)
        c = c + g_mlp[:, None] * feed_forward(block.ff_context, post * (1 + scale[:, None]) + shift[:, None])

        # --- advance the real model's image and text tokens
        enc, x = block(hidden_states=x, encoder_hidden_states=enc, temb=temb)


@torch.no_grad()
def reference_prompt_attention(t, inputs: dict, layers: list[int]) -> torch.Tensor:
    """Mean over ``layers`` of softmax over the text sequence [registers; prompt] of (image query . text key)
    / sqrt(d), mean over heads: ``[B, S_registers + S_prompt, N]`` (AuraFlow masks no text token)."""
    x, temb, enc = _embed(t, inputs)
    n_txt, total = enc.shape[1], []
    for index, block in enumerate(t.joint_transformer_blocks[: max(layers) + 1]):
        if index in layers:
            Q, K, _ = _joint_qkv(block, x, enc, temb)
            logits = Q[:, :, n_txt:].double() @ K[:, :, :n_txt].double().transpose(-1, -2) / Q.shape[-1] ** 0.5
            total.append(logits.softmax(-1).mean(1).transpose(1, 2))  # [B, S, N]
        enc, x = block(hidden_states=x, encoder_hidden_states=enc, temb=temb)
    return (sum(total) / len(total)).float()
