"""HunyuanVideo's maps recomputed independently of the package's hooks (see tests/reference.py), on the 3-D grid.

The model is run block by block by hand. The RoPE tables of the video grid are written out here (per axis: frame,
row, column of a row-major F x h x w grid, ``1 / theta^(2i / d)`` times the index, each angle for both channels of a
pair), and only video tokens are rotated. Prompt padding is masked out of the joint attention by hand with the
model's rule (the first ``encoder_attention_mask.sum()`` text tokens are valid). The concept stream's modulation is
the condition embedder's with a zero pooled vector (or the prompt's), each concept is embedded by the token refiner's
math written out for a one-token prompt (tests/reference_hunyuanimage.py), and it goes through each block's
text-stream submodules by explicit calls; the model's own block then advances the video and prompt tokens.
"""

from __future__ import annotations

import torch
from reference import concept_attention, heads, merge, rotate, scores
from reference_hunyuanimage import embed_concepts


def rope_tables(transformer, f: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[f*h*w, Dh]`` of a row-major F x h x w grid: the frame axis's channels, then row's, then column's."""
    theta, dims = transformer.config.rope_theta, transformer.config.rope_axes_dim
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (f, h, w)), indexing="ij")
    angles = []
    for pos, d in zip((a.reshape(-1) for a in axes), dims):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles.append((pos[:, None] * inv[None]).repeat_interleave(2, dim=1))
    angle = torch.cat(angles, dim=1)
    return angle.cos(), angle.sin()


def text_mask(inputs: dict, num_text: int) -> torch.Tensor:
    """``[B, S]`` True for the text tokens the model attends to: the first ``mask.sum()`` of each item."""
    valid = inputs["encoder_attention_mask"].sum(1).long()
    return torch.stack([torch.tensor([j < int(n) for j in range(num_text)]) for n in valid])


def _prepare(t, inputs, pooled: str = "zero"):
    hs, ts = inputs["hidden_states"], inputs["timestep"]
    p, pt = t.config.patch_size, t.config.patch_size_t
    f, h, w = hs.shape[2] // pt, hs.shape[3] // p, hs.shape[4] // p
    temb = t.time_text_embed(ts, inputs["pooled_projections"], inputs.get("guidance"))[0]
    zero = torch.zeros_like(inputs["pooled_projections"])
    temb_c = t.time_text_embed(ts, zero, inputs.get("guidance"))[0] if pooled == "zero" else temb
    x = t.x_embedder(hs)
    enc = t.context_embedder(inputs["encoder_hidden_states"], ts, inputs["encoder_attention_mask"])
    cos, sin = rope_tables(t, f, h, w)
    valid = text_mask(inputs, enc.shape[1])
    key_mask = torch.cat([torch.ones(x.shape[0], x.shape[1], dtype=torch.bool), valid], dim=1)  # [B, N + S]
    return x, enc, temb, temb_c, (cos, sin), key_mask, valid


def _joint(block, x, enc, temb, cos, sin, key_mask):
    """The video stream's joint attention by hand: (o_x, rotated video keys, video values, Q, K)."""
    attn, nh = block.attn, block.attn.heads
    nx = block.norm1(x, emb=temb)[0]
    ne = block.norm1_context(enc, emb=temb)[0]
    q = attn.norm_q(attn.to_q(nx).unflatten(-1, (nh, -1))).transpose(1, 2)
    k = attn.norm_k(attn.to_k(nx).unflatten(-1, (nh, -1))).transpose(1, 2)
    v = heads(attn.to_v(nx), nh)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # video tokens only
    eq = attn.norm_added_q(attn.add_q_proj(ne).unflatten(-1, (nh, -1))).transpose(1, 2)
    ek = attn.norm_added_k(attn.add_k_proj(ne).unflatten(-1, (nh, -1))).transpose(1, 2)
    ev = heads(attn.add_v_proj(ne), nh)
    Q, K, V = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)  # video first
    logits = (Q @ K.transpose(-1, -2) / Q.shape[-1] ** 0.5).masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = logits.softmax(-1) @ V
    n = x.shape[1]
    return merge(out[:, :, :n]), k, v, Q, K


def _advance(block, x, enc, temb, cos, sin, key_mask):
    return block(x, enc, temb, key_mask[:, None, None, :], (cos, sin))


@torch.no_grad()
def reference_maps(transformer, calls, concepts, layers, readouts: dict, pooled: str = "zero") -> dict:
    """``{name: mean over layers and calls of the per-layer maps [B, K, N]}`` (float64 accumulation) for
    ``readouts`` (``{name: Readout}``); one pass per call and concept stream serves every readout of that stream."""
    totals: dict[str, torch.Tensor] = {}
    count = 0
    for inputs in calls:
        for stream in sorted({r.stream for r in readouts.values()}):
            chosen = {n: r for n, r in readouts.items() if r.stream == stream}
            for per_layer in _one_call(transformer, inputs, concepts, layers, stream, chosen, pooled):
                for name, layer_scores in per_layer.items():
                    s = (layer_scores.softmax(dim=1) if readouts[name].softmax else layer_scores).double()
                    totals[name] = s if name not in totals else totals[name] + s
        count += len(layers)
    return {name: (total / count).float() for name, total in totals.items()}


def _one_call(t, inputs, concepts, layers, stream, readouts, pooled):
    x, enc, temb, temb_c, (cos, sin), key_mask, _ = _prepare(t, inputs, pooled)
    c = embed_concepts(t, concepts.to(x.dtype), inputs["timestep"])
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        attn, nh = block.attn, block.attn.heads
        o_x, k_x, v_x, _, _ = _joint(block, x, enc, temb, cos, sin, key_mask)
        nc, g_msa, shift, scale, g_mlp = block.norm1_context(c, emb=temb_c)
        cq = attn.norm_added_q(attn.add_q_proj(nc).unflatten(-1, (nh, -1))).transpose(1, 2)
        ck = attn.norm_added_k(attn.add_k_proj(nc).unflatten(-1, (nh, -1))).transpose(1, 2)
        cv = heads(attn.add_v_proj(nc), nh)
        o_c = concept_attention(stream, cq, ck, cv, k_x, v_x)  # no RoPE on concepts; no prompt keys, so no mask
        if index in layers:
            yield {
                name: scores(r.space, o_x, merge(o_c), v_x, cv, k_x, cq, r.concept_norm).float()
                for name, r in readouts.items()
            }
        c = c + attn.to_add_out(merge(o_c)) * g_msa[:, None]
        c = c + g_mlp[:, None] * block.ff_context(block.norm2_context(c) * (1 + scale[:, None]) + shift[:, None])
        x, enc = _advance(block, x, enc, temb, cos, sin, key_mask)


@torch.no_grad()
def reference_prompt_attention(t, inputs: dict, layers: list[int]) -> torch.Tensor:
    """Mean over ``layers`` of softmax over the valid prompt tokens of (rotated video query . prompt key) /
    sqrt(d), mean over heads: ``[B, S, N]`` (zero on padding)."""
    x, enc, temb, _, (cos, sin), key_mask, valid = _prepare(t, inputs)
    n, total = x.shape[1], []
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        if index in layers:
            _, _, _, Q, K = _joint(block, x, enc, temb, cos, sin, key_mask)
            logits = Q[:, :, :n].double() @ K[:, :, n:].double().transpose(-1, -2) / Q.shape[-1] ** 0.5
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
            total.append(logits.softmax(-1).mean(1).transpose(1, 2))  # [B, S, N]
        x, enc = _advance(block, x, enc, temb, cos, sin, key_mask)
    return (sum(total) / len(total)).float()
