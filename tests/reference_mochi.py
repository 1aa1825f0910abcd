"""Mochi maps recomputed by hand on the (frames, rows, columns) grid, independent of the package's hooks.

The ``MochiTransformer3DModel`` is run block by block. Video tokens are embedded frame by frame (the patch
convolution written out); the modulation is the timestep embedding plus the model's attention pool of the
caption, and the concept stream's is the timestep embedding alone (``pooled="zero"``). In every block the
video stream's joint attention is recomputed explicitly: ``Linear(SiLU(temb))`` split into scale / gates, RMS
norms in float32, projections, per-head RMS qk-norms, RoPE from per-head learned frequencies over positions
written out below (frame index; rows and columns as centres of cells spanning a 192 x 192 area), and, per
batch item, softmax attention over [video; the prompt tokens its mask keeps] as plain matrix products. The
concept tokens go through the block's text-stream weights with the same explicit formulas, attend to
[concept; video] keys only, and are updated with Mochi's sandwich norms and tanh gates, the SwiGLU
feed-forward written out; the last (``context_pre_only``) block modulates them with its continuous norm.
The model's own block then advances the video and prompt tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reference import attend, concept_attention, heads, merge, scores


def rms(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """RMS norm over the last axis in float32 (times ``weight`` if given), back in x's dtype."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y if weight is None else y * weight.float()).to(x.dtype)


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def feed_forward(ff, x: torch.Tensor) -> torch.Tensor:
    """diffusers' SwiGLU FeedForward: ``out(a * silu(g))`` with ``a, g = proj(x)`` halves."""
    a, g = linear(ff.net[0].proj, x).chunk(2, dim=-1)
    return linear(ff.net[2], a * F.silu(g))


def rope_tables(t, f: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[f*h*w, H, Dh/2]``: positions (frame, row, column) times the per-head learned frequencies."""
    scale = (192 * 192 / (h * w)) ** 0.5  # MochiRoPE's base 192 x 192

    def centres(n: int) -> torch.Tensor:
        edges = torch.linspace(-n * scale / 2, n * scale / 2, n + 1, dtype=torch.float64)
        return (edges[:-1] + edges[1:]) / 2

    grid = torch.meshgrid(torch.arange(f, dtype=torch.float64), centres(h), centres(w), indexing="ij")
    positions = torch.stack(grid, dim=-1).reshape(-1, 3)
    angles = torch.einsum("nd,dhf->nhf", positions, t.pos_frequencies.detach().double())
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[B, H, N, Dh]`` with per-head tables ``[N, H, Dh/2]``: pairs (a, b) -> (a c - b s, a s + b c)."""
    c, s = cos.transpose(0, 1), sin.transpose(0, 1)
    a, b = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


def _embed(t, inputs, pooled: str = "zero"):
    """Video tokens ``[B, F*h*w, D]`` (frame-major), temb, the concept stream's temb, the caption, the tables."""
    hs, enc_in, mask = inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["encoder_attention_mask"]
    b, _, f, height, width = hs.shape
    p = t.config.patch_size
    conv = t.patch_embed.proj
    frames = F.conv2d(hs.transpose(1, 2).flatten(0, 1), conv.weight, conv.bias, stride=p)  # [B*F, D, h, w]
    x = frames.flatten(2).transpose(1, 2).reshape(b, -1, frames.shape[1])
    time = t.time_embed.timestep_embedder(t.time_embed.time_proj(inputs["timestep"]).to(hs.dtype))
    temb = time + t.time_embed.pooler(enc_in, mask)
    enc = linear(t.time_embed.caption_proj, enc_in)
    return x, temb, (time if pooled == "zero" else temb), enc, rope_tables(t, f, height // p, width // p)


def _video_qkv(block, x, enc, temb, tables):
    """The video queries, keys (rotated), values and the prompt's keys and values ``[B, H, N|S, Dh]``."""
    attn, nh = block.attn1, block.attn1.heads
    nx = rms(x, block.norm1.norm.eps) * (1 + linear(block.norm1.linear, F.silu(temb)).chunk(4, dim=1)[0][:, None])
    if block.context_pre_only:
        ne = rms(enc, block.norm1_context.norm.eps) * (1 + linear(block.norm1_context.linear_1, F.silu(temb))[:, None])
    else:
        mod = linear(block.norm1_context.linear, F.silu(temb)).chunk(4, dim=1)[0]
        ne = rms(enc, block.norm1_context.norm.eps) * (1 + mod[:, None])
    q, k, v = (heads(linear(p, nx), nh) for p in (attn.to_q, attn.to_k, attn.to_v))
    ek, ev = heads(linear(attn.add_k_proj, ne), nh), heads(linear(attn.add_v_proj, ne), nh)
    q, k = rms(q, attn.norm_q.eps, attn.norm_q.weight), rms(k, attn.norm_k.eps, attn.norm_k.weight)
    ek = rms(ek, attn.norm_added_k.eps, attn.norm_added_k.weight)
    return rotate(q, *tables), rotate(k, *tables), v, ek, ev


def _concept_step(block, c, temb_c):
    """Concept q, k, v ``[B, H, K, Dh]`` through the text-stream weights, and their update (None: last block)."""
    attn, nh = block.attn1, block.attn1.heads
    if block.context_pre_only:
        nc = rms(c, block.norm1_context.norm.eps) * (1 + linear(block.norm1_context.linear_1, F.silu(temb_c))[:, None])
        update = None
    else:
        scale_msa, gate_msa, scale_mlp, gate_mlp = linear(block.norm1_context.linear, F.silu(temb_c)).chunk(4, dim=1)
        nc = rms(c, block.norm1_context.norm.eps) * (1 + scale_msa[:, None])

        def update(o_c):
            eps2, eps3, eps4 = (n.norm.eps for n in (block.norm2_context, block.norm3_context, block.norm4_context))
            out = c + rms(linear(attn.to_add_out, merge(o_c)), eps2) * torch.tanh(gate_msa)[:, None]
            ff = feed_forward(block.ff_context, rms(out, eps3) * (1 + scale_mlp[:, None]))
            return out + rms(ff, eps4) * torch.tanh(gate_mlp)[:, None]

    cq, ck, cv = (heads(linear(p, nc), nh) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    cq = rms(cq, attn.norm_added_q.eps, attn.norm_added_q.weight)
    ck = rms(ck, attn.norm_added_k.eps, attn.norm_added_k.weight)
    return cq, ck, cv, update


def _advance(block, x, enc, temb, mask, tables):
    return block(
        hidden_states=x, encoder_hidden_states=enc, temb=temb, encoder_attention_mask=mask, image_rotary_emb=tables
    )


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
    pooled: str = "zero",
) -> torch.Tensor:
    """Mean over ``layers`` and ``calls`` of the per-layer maps ``[B, K, F*h*w]`` (float64 accumulation)."""
    total, count = None, 0
    for inputs in calls:
        for layer_scores in _one_call(transformer, inputs, concepts, layers, stream, space, concept_norm, pooled):
            s = layer_scores.softmax(dim=1) if softmax else layer_scores
            total = s.double() if total is None else total + s.double()
            count += 1
    return (total / count).float()


def _one_call(t, inputs, concepts, layers, stream, space, concept_norm, pooled):
    x, temb, temb_c, enc, tables = _embed(t, inputs, pooled)
    mask = inputs["encoder_attention_mask"]
    c = concepts if concepts.ndim == 3 else concepts.unsqueeze(0)
    c = linear(t.time_embed.caption_proj, c.to(x.dtype)).expand(x.shape[0], -1, -1)
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        q, k_x, v_x, ek, ev = _video_qkv(block, x, enc, temb, tables)
        outs = []
        for b in range(x.shape[0]):  # each item attends to [video; its kept prompt tokens]
            keep = mask[b].nonzero().flatten()
            outs.append(attend(q[b : b + 1], torch.cat([k_x[b : b + 1], ek[b : b + 1, :, keep]], 2),
                               torch.cat([v_x[b : b + 1], ev[b : b + 1, :, keep]], 2)))  # fmt: skip
        o_x = merge(torch.cat(outs))

        cq, ck, cv, update = _concept_step(block, c, temb_c)
        o_c = concept_attention(stream, cq, ck, cv, k_x, v_x)
        if index in layers:
            yield scores(space, o_x, merge(o_c), v_x, cv, k_x, cq, concept_norm).float()
        if update is not None:
            c = update(o_c)
        x, enc = _advance(block, x, enc, temb, mask, tables)


@torch.no_grad()
def reference_prompt_attention(t, inputs: dict, layers: list[int]) -> torch.Tensor:
    """Mean over ``layers`` of softmax over the prompt tokens the mask keeps of (video query . prompt key) /
    sqrt(d), mean over heads: ``[B, S, F*h*w]``, zero at dropped tokens."""
    x, temb, _, enc, tables = _embed(t, inputs)
    mask, total = inputs["encoder_attention_mask"], []
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        if index in layers:
            q, _, _, ek, _ = _video_qkv(block, x, enc, temb, tables)
            logits = q.double() @ ek.double().transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, N, S]
            logits = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
            total.append(logits.softmax(-1).mean(1).transpose(1, 2))
        x, enc = _advance(block, x, enc, temb, mask, tables)
    return (sum(total) / len(total)).float()
