"""HunyuanVideo-1.5's maps recomputed independently of the package's hooks (see tests/reference.py), on the 3-D grid.

The model is run block by block by hand. The RoPE tables of the frames x rows x columns grid are written out here
(per axis, ``1 / theta^(2i / d)`` times the frame, row or column index, each angle for both channels of a pair); the
text tokens are put in the model's order (valid image, valid ByT5 glyph and valid Qwen tokens, then the invalid
ones, glyph and Qwen padding zeroed) with their type embeddings by explicit loops, and padding keys are masked out
of the joint attention by hand. Each concept is embedded by the token refiner's math written out for a one-token
prompt (its self-attention over one token returns that token's value), plus the Qwen tokens' type embedding. The
concept stream goes through each block's text-stream submodules by explicit calls; the model's own block then
advances the video and prompt tokens.
"""

from __future__ import annotations

import torch
from reference import concept_attention, heads, merge, rotate, scores


def rope_tables(transformer, f: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[f*h*w, Dh]`` of a frame-major f x h x w grid: the frame axis's channels, the row's, the column's."""
    theta, dims = transformer.config.rope_theta, transformer.config.rope_axes_dim
    frames, rows, cols = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (f, h, w)), indexing="ij")
    angles = []
    for pos, d in zip((frames.reshape(-1), rows.reshape(-1), cols.reshape(-1)), dims):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles.append((pos[:, None] * inv[None]).repeat_interleave(2, dim=1))
    angle = torch.cat(angles, dim=1)
    return angle.cos(), angle.sin()


def lone_token_refiner(refiner, embeds: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The token refiner on one-token prompts ``[M, D_text]`` at ``timestep [M]``: ``[M, D]``."""
    temb = refiner.time_text_embed(timestep, embeds)  # the masked mean of one token is the token
    hidden = refiner.proj_in(embeds[:, None])
    for block in refiner.token_refiner.refiner_blocks:
        attn_out = block.attn.to_out[0](block.attn.to_v(block.norm1(hidden)))  # softmax over a single key is 1
        gate_msa, gate_mlp = block.norm_out(temb)
        hidden = hidden + attn_out * gate_msa
        hidden = hidden + block.ff(block.norm2(hidden)) * gate_mlp
    return hidden[:, 0]


def embed_concepts(transformer, concepts: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """``[K, D_text]`` or ``[B, K, D_text]`` -> ``[B, K, D]``: each concept of each item refined alone, plus type 0."""
    batch = timestep.shape[0]
    c = (concepts if concepts.ndim == 3 else concepts.unsqueeze(0)).expand(batch, -1, -1)
    refiner, qwen_type = transformer.context_embedder, transformer.cond_type_embed.weight[0]
    rows = [lone_token_refiner(refiner, c[b], timestep[b].repeat(c.shape[1])) + qwen_type for b in range(batch)]
    return torch.stack(rows)


def text_sequence(transformer, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt tokens ``[B, S, D]`` in the order the blocks see them, and their mask ``[B, S]`` (True: valid)."""
    t, types = transformer, transformer.cond_type_embed.weight
    mask, glyph_mask = inputs["encoder_attention_mask"].bool(), inputs["encoder_attention_mask_2"].bool()
    qwen = t.context_embedder(inputs["encoder_hidden_states"], inputs["timestep"], mask) + types[0]
    glyph = t.context_embedder_2(inputs["encoder_hidden_states_2"]) + types[1]
    images = inputs["image_embeds"]
    text_to_video = bool((images == 0).all())
    image = t.image_embedder(images) * (0.0 if text_to_video else 1.0) + types[2]
    image_mask = torch.full(images.shape[:2], not text_to_video)
    tokens, masks = [], []
    for b in range(qwen.shape[0]):
        valid, invalid = [], []
        for states, keep, zero_invalid in ((image, image_mask, False), (glyph, glyph_mask, True), (qwen, mask, True)):
            for i in range(states.shape[1]):
                if keep[b, i]:
                    valid.append(states[b, i])
                else:
                    invalid.append(states[b, i] * 0.0 if zero_invalid else states[b, i])
        tokens.append(torch.stack(valid + invalid))
        masks.append(torch.arange(len(valid) + len(invalid)) < len(valid))
    return torch.stack(tokens), torch.stack(masks)


def _prepare(t, inputs):
    hs = inputs["hidden_states"]
    p, pt = t.config.patch_size, t.config.patch_size_t
    f, h, w = hs.shape[2] // pt, hs.shape[3] // p, hs.shape[4] // p
    temb = t.time_embed(inputs["timestep"], timestep_r=inputs.get("timestep_r"))
    x = t.x_embedder(hs)
    enc, text_mask = text_sequence(t, inputs)
    cos, sin = rope_tables(t, f, h, w)
    key_mask = torch.cat([torch.ones(x.shape[0], x.shape[1], dtype=torch.bool), text_mask], dim=1)  # [B, N + S]
    return x, enc, temb, (cos, sin), key_mask, text_mask


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
    n = x.shape[1]
    Q, K, V = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)  # video first
    logits = (Q[:, :, :n] @ K.transpose(-1, -2) / Q.shape[-1] ** 0.5).masked_fill(
        ~key_mask[:, None, None, :], float("-inf")
    )
    return merge(logits.softmax(-1) @ V), k, v, Q, K


def _advance(block, x, enc, temb, cos, sin, text_mask):
    return block(x, enc, temb, text_mask, (cos, sin))


@torch.no_grad()
def reference_maps(transformer, calls, concepts, layers, readouts: dict) -> dict[str, torch.Tensor]:
    """``{name: mean over layers and calls of the per-layer maps [B, K, N]}`` (float64 accumulation) for
    ``readouts`` (``{name: Readout}``); one pass per call and concept stream serves every readout of that stream."""
    totals: dict[str, torch.Tensor] = {}
    count = 0
    for inputs in calls:
        for stream in sorted({r.stream for r in readouts.values()}):
            chosen = {n: r for n, r in readouts.items() if r.stream == stream}
            for per_layer in _one_call(transformer, inputs, concepts, layers, stream, chosen):
                for name, layer_scores in per_layer.items():
                    s = (layer_scores.softmax(dim=1) if readouts[name].softmax else layer_scores).double()
                    totals[name] = s if name not in totals else totals[name] + s
        count += len(layers)
    return {name: (total / count).float() for name, total in totals.items()}


def _one_call(t, inputs, concepts, layers, stream, readouts):
    x, enc, temb, (cos, sin), key_mask, text_mask = _prepare(t, inputs)
    c = embed_concepts(t, concepts.to(x.dtype), inputs["timestep"])
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        attn, nh = block.attn, block.attn.heads
        o_x, k_x, v_x, _, _ = _joint(block, x, enc, temb, cos, sin, key_mask)
        # the concept stream through the text-stream weights, modulated like the prompt (no pooled text)
        nc, g_msa, shift, scale, g_mlp = block.norm1_context(c, emb=temb)
        cq = attn.norm_added_q(attn.add_q_proj(nc).unflatten(-1, (nh, -1))).transpose(1, 2)
        ck = attn.norm_added_k(attn.add_k_proj(nc).unflatten(-1, (nh, -1))).transpose(1, 2)
        cv = heads(attn.add_v_proj(nc), nh)
        o_c = concept_attention(stream, cq, ck, cv, k_x, v_x)  # no RoPE on concepts, no mask needed
        if index in layers:
            yield {
                name: scores(r.space, o_x, merge(o_c), v_x, cv, k_x, cq, r.concept_norm).float()
                for name, r in readouts.items()
            }
        c = c + attn.to_add_out(merge(o_c)) * g_msa[:, None]
        c = c + g_mlp[:, None] * block.ff_context(block.norm2_context(c) * (1 + scale[:, None]) + shift[:, None])
        x, enc = _advance(block, x, enc, temb, cos, sin, text_mask)


@torch.no_grad()
def reference_prompt_attention(t, inputs: dict, layers: list[int]) -> torch.Tensor:
    """Mean over ``layers`` of softmax over the valid prompt tokens of (rotated video query . prompt key) /
    sqrt(d), mean over heads: ``[B, S, N]`` (zero on padding)."""
    x, enc, temb, (cos, sin), key_mask, text_mask = _prepare(t, inputs)
    n, total = x.shape[1], []
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        if index in layers:
            _, _, _, Q, K = _joint(block, x, enc, temb, cos, sin, key_mask)
            logits = Q[:, :, :n].double() @ K[:, :, n:].double().transpose(-1, -2) / Q.shape[-1] ** 0.5
            logits = logits.masked_fill(~text_mask[:, None, None, :], float("-inf"))
            total.append(logits.softmax(-1).mean(1).transpose(1, 2))  # [B, S, N]
        x, enc = _advance(block, x, enc, temb, cos, sin, text_mask)
    return (sum(total) / len(total)).float()
