"""An independent recomputation of ConceptAttention maps for ``Flux2Transformer2DModel`` (FLUX.2).

Like tests/reference.py, the transformer is run block by block by hand and nothing of the package is used.
Everything the image stream's joint attention needs is recomputed explicitly: the timestep and guidance
embedding and the shared modulations (SiLU then the model's linear maps), the plain LayerNorms, the
q / k / v projections, the RMS qk-norms, RoPE (tables built here from the ids, four axes, written out) and
softmax attention as matrix products. The concept tokens go through the block's text-stream weights by
explicit calls (projections, norms, ``to_add_out``, the SwiGLU MLP written out), with the stream modes of
tests/reference.py. The model's own block is then called to advance the image and prompt tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reference import attend, concept_attention, heads, merge, rotate, scores


def rope_tables(ids: torch.Tensor, axes_dims, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``[S, Dh]`` for ids ``[S, A]``: per axis of width d, angles id * theta^(-2j/d), j < d/2,
    each angle stored for both channels of its pair (float64, then float32)."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append((ids[:, axis].double()[:, None] * freqs[None]).repeat_interleave(2, dim=1))
    angle = torch.cat(angles, dim=1)
    return angle.cos().float(), angle.sin().float()


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim, no affine parameters."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """RMSNorm with the module's weight and eps."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def modulation(module, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A ``Flux2Modulation``: SiLU, its linear map, six chunks ``[B, 1, D]`` (shift, scale, gate of the
    attention, then of the MLP)."""
    return tuple((F.silu(temb) @ module.linear.weight.T)[:, None].chunk(6, dim=-1))


def swiglu(ff, x: torch.Tensor) -> torch.Tensor:
    """A ``Flux2FeedForward``: linear in, SiLU(first half) * second half, linear out."""
    a, b = (x @ ff.linear_in.weight.T).chunk(2, dim=-1)
    return (F.silu(a) * b) @ ff.linear_out.weight.T


def _start(t, inputs: dict):
    """Embedded image and prompt tokens, both modulations, the hand-made RoPE tables, and what the model's
    blocks are called with."""
    x = inputs["hidden_states"] @ t.x_embedder.weight.T
    enc = inputs["encoder_hidden_states"] @ t.context_embedder.weight.T
    embed = t.time_guidance_embed
    temb = embed.timestep_embedder(embed.time_proj(inputs["timestep"] * 1000))
    if inputs.get("guidance") is not None and embed.guidance_embedder is not None:
        temb = temb + embed.guidance_embedder(embed.time_proj(inputs["guidance"] * 1000))
    txt_ids, img_ids = inputs["txt_ids"], inputs["img_ids"]
    txt_ids, img_ids = (i[0] if i.ndim == 3 else i for i in (txt_ids, img_ids))
    ids = torch.cat([txt_ids, img_ids], 0)
    cos, sin = rope_tables(ids, t.config.axes_dims_rope, t.config.rope_theta)
    mods = modulation(t.double_stream_modulation_img, temb), modulation(t.double_stream_modulation_txt, temb)
    # the model's own block advances the real tokens, with the model's own RoPE tables and modulations
    model_rope = tuple(torch.cat(pair, 0) for pair in zip(t.pos_embed(txt_ids), t.pos_embed(img_ids)))
    block_kwargs = dict(
        temb_mod_img=t.double_stream_modulation_img(temb),
        temb_mod_txt=t.double_stream_modulation_txt(temb),
        image_rotary_emb=model_rope,
    )
    return x, enc, mods, (cos, sin), block_kwargs


def _qk(attn, normed, prefix: str):
    """Projections of one stream ``[B, H, S, Dh]``, with the stream's RMS qk-norms."""
    nh = attn.heads
    proj = (attn.to_q, attn.to_k, attn.to_v) if prefix == "" else (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    q, k, v = (heads(normed @ p.weight.T, nh) for p in proj)
    norms = (attn.norm_q, attn.norm_k) if prefix == "" else (attn.norm_added_q, attn.norm_added_k)
    return rms_norm(q, norms[0]), rms_norm(k, norms[1]), v


@torch.no_grad()
def reference_maps(
    transformer,
    calls: list[dict],
    concepts: torch.Tensor,
    layers: list[int],
    readouts: dict,
    concept_position: int | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: maps [B, K, N]}`` for each readout (fields stream, space, softmax, concept_norm): the mean over
    ``layers`` and ``calls`` of the per-layer maps (float64 accumulation), each stream run once. Concept tokens
    are rotated to ids (0, 0, 0, concept_position), or not rotated for None."""
    total: dict[str, torch.Tensor] = {}
    for stream in {r.stream for r in readouts.values()}:
        chosen = {name: r for name, r in readouts.items() if r.stream == stream}
        for inputs in calls:
            for parts in _one_call(transformer, inputs, concepts, layers, stream, concept_position):
                for name, r in chosen.items():
                    s = scores(r.space, *parts, r.concept_norm).float()
                    s = (s.softmax(dim=1) if r.softmax else s).double()
                    total[name] = s if name not in total else total[name] + s
    count = len(calls) * len(layers)
    return {name: (t / count).float() for name, t in total.items()}


def _one_call(t, inputs, concepts, layers, stream, concept_position):
    """Per read layer: (o_x, o_c, v_x, v_c, k_x, q_c) of one call, the arguments of ``scores``."""
    x, enc, (mod_img, mod_txt), (cos, sin), block_kwargs = _start(t, inputs)
    shift, scale, _, _, _, _ = mod_img
    c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = mod_txt
    if concept_position is not None:
        cc, cs = rope_tables(torch.tensor([[0, 0, 0, concept_position]]), t.config.axes_dims_rope, t.config.rope_theta)
    c = concepts if concepts.ndim == 3 else concepts.unsqueeze(0)
    c = (c @ t.context_embedder.weight.T).expand(x.shape[0], -1, -1)
    n_txt = enc.shape[1]
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        attn = block.attn
        # --- the image stream's joint attention, recomputed explicitly
        q, k, v = _qk(attn, (1 + scale) * layer_norm(x) + shift, "")
        eq, ek, ev = _qk(attn, (1 + c_scale) * layer_norm(enc) + c_shift, "added")
        Q, K, V = (
            rotate(torch.cat([eq, q], 2), cos, sin),
            rotate(torch.cat([ek, k], 2), cos, sin),
            torch.cat([ev, v], 2),
        )
        out = attend(Q, K, V)
        o_x, k_x, v_x = merge(out[:, :, n_txt:]), K[:, :, n_txt:], V[:, :, n_txt:]

        # --- the concept stream through the text-stream weights, modulated like the prompt
        cq, ck, cv = _qk(attn, (1 + c_scale) * layer_norm(c) + c_shift, "added")
        if concept_position is not None:
            cq, ck = rotate(cq, cc, cs), rotate(ck, cc, cs)
        o_c = concept_attention(stream, cq, ck, cv, k_x, v_x)
        if index in layers:
            yield o_x, merge(o_c), v_x, cv, k_x, cq
        c = c + c_gate * (merge(o_c) @ attn.to_add_out.weight.T)
        c = c + c_gate2 * swiglu(block.ff_context, (1 + c_scale2) * layer_norm(c) + c_shift2)

        # --- advance the real model's image and prompt tokens with its own block
        enc, x = block(hidden_states=x, encoder_hidden_states=enc, **block_kwargs)


@torch.no_grad()
def reference_prompt_attention(t, inputs: dict, layers: list[int]) -> torch.Tensor:
    """Mean over ``layers`` of softmax over all prompt tokens (the model masks none) of (image query . prompt
    key) / sqrt(d) after RoPE, mean over heads: ``[B, S_text, N]``."""
    x, enc, (mod_img, mod_txt), (cos, sin), block_kwargs = _start(t, inputs)
    n_txt, total = enc.shape[1], []
    for index, block in enumerate(t.transformer_blocks[: max(layers) + 1]):
        attn = block.attn
        q, _, _ = _qk(attn, (1 + mod_img[1]) * layer_norm(x) + mod_img[0], "")
        _, ek, _ = _qk(attn, (1 + mod_txt[1]) * layer_norm(enc) + mod_txt[0], "added")
        if index in layers:
            qi, kp = rotate(q, cos[n_txt:], sin[n_txt:]), rotate(ek, cos[:n_txt], sin[:n_txt])
            logits = qi.double() @ kp.double().transpose(-1, -2) / q.shape[-1] ** 0.5
            total.append(logits.softmax(-1).mean(1).transpose(1, 2))
        enc, x = block(hidden_states=x, encoder_hidden_states=enc, **block_kwargs)
    return (sum(total) / len(total)).float()
