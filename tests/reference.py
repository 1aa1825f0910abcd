"""A straightforward re-computation of the paper's equations, independent of the package's hooks.

The transformer is run block by block by hand. For every double-stream block the image stream's
joint attention is recomputed explicitly (projections, qk-norms, RoPE written out below, softmax of
scaled dot products), so ``o_x``, the image keys and values come from here, not from the package.
The concept tokens are pushed through the block's text-stream submodules by explicit calls, with
the one-directional attention of each stream mode written as plain matrix products. The model's
own block is then called to advance the image and prompt tokens to the next block.
"""

from __future__ import annotations

import torch


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on ``[B, H, S, Dh]`` tensors."""
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)
    return weights @ v


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Flux RoPE on ``[B, H, S, Dh]``: consecutive channel pairs (a, b) rotate by the position angle."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 0::2]  # the model's tables repeat each angle for both channels
    return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, S, H*Dh]`` -> ``[B, H, S, Dh]``."""
    return x.reshape(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def merge(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, Dh]`` -> ``[B, S, H*Dh]``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _maybe(norm, x):
    return x if norm is None else norm(x)


def concept_attention(mode: str, cq, ck, cv, ik, iv):
    """Concept attention outputs ``[B, H, K, Dh]`` for one stream mode."""
    if mode == "cross+self":
        return attend(cq, torch.cat([ck, ik], 2), torch.cat([cv, iv], 2))
    if mode == "cross":
        return attend(cq, ik, iv)
    if mode == "self":
        return attend(cq, ck, cv)
    if mode == "none":  # each concept attends only to itself: its own value
        return cv.clone()
    raise ValueError(mode)


def rescale_concepts(c: torch.Tensor) -> torch.Tensor:
    """The authors' "linear normalisation" of concept vectors ``[B, K, D]``: per channel, minus the
    minimum over concepts, divided by the sum over concepts."""
    shifted = c - c.min(dim=1, keepdim=True).values
    return shifted / shifted.sum(dim=1, keepdim=True)


def scores(space: str, o_x, o_c, v_x, v_c, k_x, q_c, concept_norm: str = "none") -> torch.Tensor:
    """Per-layer scores ``[B, K, N]``."""
    norm = rescale_concepts if concept_norm == "linear" else (lambda c: c)
    if space == "output":
        return torch.einsum("bnd,bkd->bkn", o_x, norm(o_c))
    if space == "value":
        return torch.einsum("bnd,bkd->bkn", merge(v_x), norm(merge(v_c)))
    if space == "cross_attention":
        probs = (q_c @ k_x.transpose(-1, -2) / q_c.shape[-1] ** 0.5).softmax(dim=-1)  # [B, H, K, N]
        return probs.mean(dim=1)
    raise ValueError(space)


def head_scores(space: str, o_x, o_c, v_x, v_c, k_x, q_c, concept_norm: str = "none") -> torch.Tensor:
    """Each head's part of :func:`scores`, ``[B, H, K, N]`` float64 (per-head tensors ``[B, H, S, Dh]``)."""
    if concept_norm == "linear":  # per channel across concepts: the same channels, split by head
        o_c = heads(rescale_concepts(merge(o_c)), o_c.shape[1])
        v_c = heads(rescale_concepts(merge(v_c)), v_c.shape[1])
    if space == "output":
        return torch.einsum("bhnd,bhkd->bhkn", o_x.double(), o_c.double())
    if space == "value":
        return torch.einsum("bhnd,bhkd->bhkn", v_x.double(), v_c.double())
    return (q_c.double() @ k_x.double().transpose(-1, -2) / q_c.shape[-1] ** 0.5).softmax(dim=-1)


@torch.no_grad()
def reference_maps(
    family: str,
    transformer,
    calls: list[dict],
    concepts: torch.Tensor,
    layers: list[int],
    stream: str,
    space: str,
    softmax: bool,
    pooled: str = "zero",
    concept_norm: str = "none",
) -> torch.Tensor:
    """Mean over ``layers`` and ``calls`` of the per-layer maps ``[B, K, N]`` (float64 accumulation)."""
    total = None
    count = 0
    for inputs in calls:
        for layer_scores in _one_call(
            family, transformer, inputs, concepts, layers, stream, space, pooled, concept_norm
        ):
            s = layer_scores.softmax(dim=1) if softmax else layer_scores
            total = s.double() if total is None else total + s.double()
            count += 1
    return (total / count).float()


def _one_call(family, t, inputs, concepts, layers, stream, space, pooled, concept_norm="none", detail=False):
    hs, enc_in, pooled_in, ts = (
        inputs["hidden_states"],
        inputs["encoder_hidden_states"],
        inputs["pooled_projections"],
        inputs["timestep"],
    )
    batch = hs.shape[0]
    if family == "flux":
        x = t.x_embedder(hs)
        t_scaled = ts.to(x.dtype) * 1000
        temb = t.time_text_embed(t_scaled, pooled_in)
        temb_c = t.time_text_embed(t_scaled, torch.zeros_like(pooled_in)) if pooled == "zero" else temb
        cos, sin = t.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]], 0))
    else:
        x = t.pos_embed(hs)
        temb = t.time_text_embed(ts, pooled_in)
        temb_c = t.time_text_embed(ts, torch.zeros_like(pooled_in)) if pooled == "zero" else temb
        cos = sin = None
    enc = t.context_embedder(enc_in)
    c = concepts if concepts.ndim == 3 else concepts.unsqueeze(0)
    c = t.context_embedder(c.to(x.dtype)).expand(batch, -1, -1)
    n_txt = enc.shape[1]

    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        attn, nh = block.attn, block.attn.heads
        # --- the image stream's joint attention, recomputed explicitly
        nx = block.norm1(x, emb=temb)[0]
        if getattr(block, "context_pre_only", False):
            ne = block.norm1_context(enc, temb)
        else:
            ne = block.norm1_context(enc, emb=temb)[0]
        q, k, v = heads(attn.to_q(nx), nh), heads(attn.to_k(nx), nh), heads(attn.to_v(nx), nh)
        q, k = _maybe(attn.norm_q, q), _maybe(attn.norm_k, k)
        eq, ek, ev = heads(attn.add_q_proj(ne), nh), heads(attn.add_k_proj(ne), nh), heads(attn.add_v_proj(ne), nh)
        eq, ek = _maybe(attn.norm_added_q, eq), _maybe(attn.norm_added_k, ek)
        Q, K, V = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
        if cos is not None:
            Q, K = rotate(Q, cos, sin), rotate(K, cos, sin)
        out = attend(Q, K, V)
        o_x, k_x, v_x = merge(out[:, :, n_txt:]), K[:, :, n_txt:], V[:, :, n_txt:]

        # --- the concept stream through the text-stream weights
        if getattr(block, "context_pre_only", False):
            nc, gates = block.norm1_context(c, temb_c), None
        else:
            nc, g_msa, shift, scale, g_mlp = block.norm1_context(c, emb=temb_c)
            gates = (g_msa, shift, scale, g_mlp)
        cq, ck, cv = heads(attn.add_q_proj(nc), nh), heads(attn.add_k_proj(nc), nh), heads(attn.add_v_proj(nc), nh)
        cq, ck = _maybe(attn.norm_added_q, cq), _maybe(attn.norm_added_k, ck)
        o_c = concept_attention(stream, cq, ck, cv, k_x, v_x)

        if index in layers:
            if not detail:
                yield scores(space, o_x, merge(o_c), v_x, cv, k_x, cq, concept_norm).float()
            else:
                yield {
                    "scores": scores(space, o_x, merge(o_c), v_x, cv, k_x, cq, concept_norm).double(),
                    "per_head": head_scores(space, out[:, :, n_txt:], o_c, v_x, cv, k_x, cq, concept_norm),
                    "query": Q[:, :, n_txt:].double(),
                    "key": k_x.double(),
                    "image_out": o_x.double(),
                }
        if gates is not None:
            g_msa, shift, scale, g_mlp = gates
            c = c + g_msa[:, None] * attn.to_add_out(merge(o_c))
            c = c + g_mlp[:, None] * block.ff_context(block.norm2_context(c) * (1 + scale[:, None]) + shift[:, None])

        # --- advance the real model's image and prompt tokens
        if family == "flux":
            enc, x = block(hidden_states=x, encoder_hidden_states=enc, temb=temb, image_rotary_emb=(cos, sin))
        else:
            enc, x = block(hidden_states=x, encoder_hidden_states=enc, temb=temb)


@torch.no_grad()
def reference_prompt_attention(family: str, t, inputs: dict, layers: list[int]) -> torch.Tensor:
    """Mean over ``layers`` of softmax over prompt tokens of (image query . prompt key) / sqrt(d), mean
    over heads: ``[B, S_text, N]``, from the joint attention's inputs recomputed by hand."""
    hs, enc_in, pooled_in, ts = (
        inputs["hidden_states"],
        inputs["encoder_hidden_states"],
        inputs["pooled_projections"],
        inputs["timestep"],
    )
    if family == "flux":
        x = t.x_embedder(hs)
        temb = t.time_text_embed(ts.to(x.dtype) * 1000, pooled_in)
        cos, sin = t.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]], 0))
    else:
        x = t.pos_embed(hs)
        temb = t.time_text_embed(ts, pooled_in)
        cos = sin = None
    enc = t.context_embedder(enc_in)
    n_txt, total = enc.shape[1], []
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        attn, nh = block.attn, block.attn.heads
        nx = block.norm1(x, emb=temb)[0]
        ne = (
            block.norm1_context(enc, temb)
            if getattr(block, "context_pre_only", False)
            else block.norm1_context(enc, emb=temb)[0]
        )
        q = _maybe(attn.norm_q, heads(attn.to_q(nx), nh))
        k = _maybe(attn.norm_k, heads(attn.to_k(nx), nh))
        eq = _maybe(attn.norm_added_q, heads(attn.add_q_proj(ne), nh))
        ek = _maybe(attn.norm_added_k, heads(attn.add_k_proj(ne), nh))
        Q, K = torch.cat([eq, q], 2), torch.cat([ek, k], 2)
        if cos is not None:
            Q, K = rotate(Q, cos, sin), rotate(K, cos, sin)
        if index in layers:
            logits = Q[:, :, n_txt:].double() @ K[:, :, :n_txt].double().transpose(-1, -2) / Q.shape[-1] ** 0.5
            total.append(logits.softmax(-1).mean(1).transpose(1, 2))  # [B, S, N]
        if family == "flux":
            enc, x = block(hidden_states=x, encoder_hidden_states=enc, temb=temb, image_rotary_emb=(cos, sin))
        else:
            enc, x = block(hidden_states=x, encoder_hidden_states=enc, temb=temb)
    return (sum(total) / len(total)).float()
