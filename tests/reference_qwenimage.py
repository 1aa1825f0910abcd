"""Qwen-Image maps recomputed by hand, independent of the package's hooks (like tests/reference.py).

The ``QwenImageTransformer2DModel`` is run block by block. In every block the image stream's joint attention is
recomputed explicitly: modulation ``Linear(SiLU(temb))`` split into shift / scale / gate, layer norms,
projections, RMS qk-norms, RoPE from angles written out below (image rows and columns centred on 0, text
positions after the image's largest index), and attention as plain matrix products with the padded prompt
tokens masked out. The concept tokens go through the block's text-stream weights by explicit calls, rotated
at the first text position, with the one-directional attention of each stream mode; the model's own block
then advances the image and prompt tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from reference import concept_attention, heads, merge, scores


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine weights over the last axis."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """RMSNorm over the last axis with ``norm``'s weight and eps."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def modulation(mod, temb: torch.Tensor) -> list[torch.Tensor]:
    """``mod = Sequential(SiLU, Linear)`` on ``temb`` -> shift1, scale1, gate1, shift2, scale2, gate2 ``[B, 1, D]``."""
    return [m[:, None] for m in linear(mod[1], F.silu(temb)).chunk(6, dim=-1)]


def mlp(ff, x: torch.Tensor) -> torch.Tensor:
    """diffusers' FeedForward with tanh-approximate GELU."""
    return linear(ff.net[2], F.gelu(linear(ff.net[0].proj, x), approximate="tanh"))


def angles(axes_dim, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE angles ``[S, Dh/2]`` for integer positions ``[S, 3]`` (frame, row, column), axis by axis."""
    parts = []
    for axis, dim in enumerate(axes_dim):
        inverse = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(positions[:, axis : axis + 1].double() * inverse)
    return torch.cat(parts, dim=-1)


def image_positions(h: int, w: int) -> torch.Tensor:
    """Frame 0; rows and columns centred: ``-(h - h//2) .. h//2 - 1`` (row-major tokens)."""
    rows = torch.arange(h) - (h - h // 2)
    cols = torch.arange(w) - (w - w // 2)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros(h * w, 1, dtype=torch.long), grid], dim=1)


def text_positions(h: int, w: int, n: int) -> torch.Tensor:
    """Text token j sits at ``max(h//2, w//2) + j`` on every axis."""
    return (max(h // 2, w // 2) + torch.arange(n))[:, None].expand(n, 3)


def rotate(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, Dh]`` rotated by angles ``[S, Dh/2]``: pair (p, q) -> (p cos - q sin, p sin + q cos)."""
    cos, sin = a.cos().to(x.dtype), a.sin().to(x.dtype)
    p, q = x[..., 0::2], x[..., 1::2]
    return torch.stack([p * cos - q * sin, p * sin + q * cos], dim=-1).flatten(-2)


def masked_attend(q, k, v, keep: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with keys where ``keep [B, S]`` is False given no weight."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if keep is not None:
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1) @ v


def _run(t, inputs: dict, concepts: torch.Tensor | None, last: int, stream: str = "cross+self"):
    """Per block up to ``last``: a dict of the block's recomputed attention quantities (and concept stream)."""
    hs, enc_in, ts = inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"]
    mask = inputs.get("encoder_hidden_states_mask")
    keep_text = None if mask is None else mask.bool()
    (_, h, w) = inputs["img_shapes"][0][0]
    x = linear(t.img_in, hs)
    temb = t.time_text_embed(ts.to(x.dtype), x, inputs.get("additional_t_cond"))
    enc = linear(t.txt_in, rms_norm(enc_in, t.txt_norm))
    n_txt, n_img, axes = enc.shape[1], x.shape[1], t.config.axes_dims_rope
    a_img, a_txt = angles(axes, image_positions(h, w)), angles(axes, text_positions(h, w, n_txt))
    keep = None if keep_text is None else torch.cat([keep_text, torch.ones(x.shape[0], n_img, dtype=torch.bool)], 1)
    model_rope = t.pos_embed(inputs["img_shapes"], max_txt_seq_len=n_txt, device=x.device)
    c = None
    if concepts is not None:
        c = concepts if concepts.ndim == 3 else concepts.unsqueeze(0)
        c = linear(t.txt_in, rms_norm(c.to(x.dtype), t.txt_norm)).expand(x.shape[0], -1, -1)

    for index, block in enumerate(t.transformer_blocks[: last + 1]):
        attn, nh = block.attn, block.attn.heads
        i_shift1, i_scale1, _, _, _, _ = modulation(block.img_mod, temb)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = modulation(block.txt_mod, temb)
        nx = layer_norm(x) * (1 + i_scale1) + i_shift1
        ne = layer_norm(enc) * (1 + t_scale1) + t_shift1
        q = rotate(rms_norm(heads(linear(attn.to_q, nx), nh), attn.norm_q), a_img)
        k = rotate(rms_norm(heads(linear(attn.to_k, nx), nh), attn.norm_k), a_img)
        v = heads(linear(attn.to_v, nx), nh)
        eq = rotate(rms_norm(heads(linear(attn.add_q_proj, ne), nh), attn.norm_added_q), a_txt)
        ek = rotate(rms_norm(heads(linear(attn.add_k_proj, ne), nh), attn.norm_added_k), a_txt)
        ev = heads(linear(attn.add_v_proj, ne), nh)
        out = masked_attend(torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2), keep)
        got = dict(o_x=merge(out[:, :, n_txt:]), q_x=q, k_x=k, v_x=v, k_txt=ek, keep_text=keep_text)

        if c is not None:  # the concept stream through the text-stream weights, at the first text position
            nc = layer_norm(c) * (1 + t_scale1) + t_shift1
            cq = rotate(rms_norm(heads(linear(attn.add_q_proj, nc), nh), attn.norm_added_q), a_txt[:1])
            ck = rotate(rms_norm(heads(linear(attn.add_k_proj, nc), nh), attn.norm_added_k), a_txt[:1])
            cv = heads(linear(attn.add_v_proj, nc), nh)
            o_c = concept_attention(stream, cq, ck, cv, k, v)
            got.update(o_c=merge(o_c), q_c=cq, v_c=cv)
            c = c + t_gate1 * linear(attn.to_add_out, merge(o_c))
            c = c + t_gate2 * mlp(block.txt_mlp, layer_norm(c) * (1 + t_scale2) + t_shift2)
        yield index, got

        enc, x = block(
            hidden_states=x,
            encoder_hidden_states=enc,
            encoder_hidden_states_mask=keep_text,
            temb=temb,
            image_rotary_emb=model_rope,
        )


@torch.no_grad()
def reference_readouts(transformer, calls: list[dict], concepts: torch.Tensor, layers: list[int], readouts: dict):
    """``{name: [B, K, N]}`` for readouts (objects with stream, space, softmax, concept_norm): the mean over
    ``layers`` and ``calls`` of each per-layer map (float64 accumulation), one concept stream per stream mode."""
    out = {}
    for stream in dict.fromkeys(r.stream for r in readouts.values()):
        chosen = {name: r for name, r in readouts.items() if r.stream == stream}
        total = dict.fromkeys(chosen, 0.0)
        for inputs in calls:
            for index, g in _run(transformer, inputs, concepts, max(layers), stream):
                for name, r in chosen.items() if index in layers else ():
                    s = scores(r.space, g["o_x"], g["o_c"], g["v_x"], g["v_c"], g["k_x"], g["q_c"], r.concept_norm)
                    total[name] = total[name] + (s.float().softmax(dim=1) if r.softmax else s.float()).double()
        out.update({name: (t / (len(calls) * len(layers))).float() for name, t in total.items()})
    return out


def reference_maps(transformer, calls, concepts, layers, stream, space, softmax, concept_norm="none"):
    """One readout's reference maps ``[B, K, N]`` (see :func:`reference_readouts`)."""
    spec = SimpleNamespace(stream=stream, space=space, softmax=softmax, concept_norm=concept_norm)
    return reference_readouts(transformer, calls, concepts, layers, {"map": spec})["map"]


@torch.no_grad()
def reference_prompt_attention(transformer, inputs: dict, layers: list[int]) -> torch.Tensor:
    """Mean over ``layers`` of softmax over the unmasked prompt tokens of (image query . prompt key) / sqrt(d),
    mean over heads: ``[B, S_text, N]``."""
    total = []
    for index, g in _run(transformer, inputs, None, max(layers)):
        if index in layers:
            keep = g["keep_text"]
            logits = g["q_x"].double() @ g["k_txt"].double().transpose(-1, -2) / g["q_x"].shape[-1] ** 0.5
            if keep is not None:
                logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
            total.append(logits.softmax(-1).mean(1).transpose(1, 2))
    return (sum(total) / len(total)).float()
