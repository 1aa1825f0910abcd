"""The follow-up readouts recomputed with explicit N x N attention matrices, on the layers of tests/reference.py.

Each double-stream block's image self-attention is formed whole here, ``softmax(q_x k_x^T / sqrt(d))``
over image keys from the reference's own image queries and keys, and every follow-up is the matrix
algebra it stands for: a bounce is a matrix power, the stationary limit comes from the left
eigenvector of eigenvalue 1, the head weighting from all eigenvalues.
"""

from __future__ import annotations

import math

import torch
from reference import _one_call

from conceptattention.readouts import Readout


def chain(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, N]``: each head's image self-attention, float64."""
    return (query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])).softmax(dim=-1)


def head_weights(readout: Readout, layer: dict, a: torch.Tensor) -> torch.Tensor:
    b, h = a.shape[:2]
    if readout.heads == "entropy":
        p = layer["per_head"].softmax(dim=-1)
        info = math.log(p.shape[-1]) + (p * p.log()).sum(dim=-1).mean(dim=-1)
        return info / info.sum(dim=-1, keepdim=True)
    if readout.heads == "lambda2":
        second = torch.linalg.eigvals(a).abs().sort(dim=-1, descending=True).values[..., 1]
        return second / second.sum(dim=-1, keepdim=True)
    return torch.full((b, h), 1.0 / h, dtype=torch.float64)


def stationary(a: torch.Tensor) -> torch.Tensor:
    """``[B, H, N]``: pi with pi A = pi, summing to 1."""
    values, vectors = torch.linalg.eig(a.transpose(-1, -2))
    top = values.real.argmax(dim=-1)
    pi = torch.gather(vectors.real, -1, top[..., None, None].expand(-1, -1, a.shape[-1], 1))[..., 0]
    return pi / pi.sum(dim=-1, keepdim=True)


def layer_map(readout: Readout, layer: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's map ``[B, K, N]`` float64 and its per-image weight (None: plain mean)."""
    a = chain(layer["query"], layer["key"])
    w = head_weights(readout, layer, a)
    per_head = layer["per_head"]
    if readout.heads == "uniform":
        raw = layer["scores"]
    else:
        raw = torch.einsum("bh,bhkn->bkn", w, per_head)
        raw = raw if readout.space == "cross_attention" else raw * per_head.shape[1]
    m = raw.softmax(dim=1) if readout.softmax else raw
    if math.isinf(readout.bounces):
        limit = torch.einsum("bhj,bkj->bhk", stationary(a), m)
        m = torch.einsum("bh,bhk->bk", w, limit)[..., None].expand_as(m)
    elif readout.bounces:
        power = torch.linalg.matrix_power(a, int(readout.bounces))
        m = torch.einsum("bh,bhij,bkj->bki", w, power, m)
    elif readout.anchors:
        mixed = torch.einsum("bh,bhij->bij", w, a)
        feats = torch.nn.functional.normalize(layer["image_out"], dim=-1)
        out = torch.zeros_like(m)
        for i in range(m.shape[0]):
            for c in range(m.shape[1]):
                top = m[i, c].topk(min(readout.anchors, m.shape[-1])).indices
                spread = torch.zeros(m.shape[-1], dtype=torch.float64)
                spread[top] = 1.0 / len(top)
                gate = (feats[i] @ torch.nn.functional.normalize(feats[i, top].mean(0), dim=0)).clamp_min(0)
                for _ in range(readout.spread):
                    spread = gate * (mixed[i] @ spread)
                out[i, c] = spread / spread.max()
        m = out
    weight = None
    if readout.layer_weight == "confidence":
        k = raw.shape[1]
        top = raw.softmax(dim=1).amax(dim=1)
        weight = ((top - 1 / k) / (1 - 1 / k)).mean(dim=-1)
    return m, weight


@torch.no_grad()
def reference_followup_maps(
    family: str, transformer, calls: list[dict], concepts, readout: Readout, layers
) -> torch.Tensor:
    """Mean (or confidence-weighted mean) over layers and calls of :func:`layer_map`, ``[B, K, N]``."""
    if readout.layers == "all":
        layers = list(range(len(transformer.transformer_blocks)))
    total, weights, count = None, None, 0
    for inputs in calls:
        for layer in _one_call(
            family,
            transformer,
            inputs,
            concepts,
            layers,
            readout.stream,
            readout.space,
            "zero",
            readout.concept_norm,
            detail=True,
        ):
            m, w = layer_map(readout, layer)
            if w is not None:
                m = m * w[:, None, None]
                weights = w if weights is None else weights + w
            total = m if total is None else total + m
            count += 1
    return (total / (weights[:, None, None] if weights is not None else count)).float()
