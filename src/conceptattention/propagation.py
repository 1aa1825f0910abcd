"""Maps refined through one layer's image self-attention, without ever forming its N x N matrix.

The image tokens' self-attention of one head, ``A = softmax(q k^T / sqrt(d))`` over image keys
only, is a row-stochastic N x N matrix: a Markov chain on the image tokens (Erel et al., "Attention
(as Discrete-Time Markov) Chains", 2025). Everything here needs only products ``A @ X`` for a few
columns X, and one product is one fused attention call with X as the values, so memory stays
O(N * d) per head whatever N is:

- :func:`bounce`: ``A^n m`` for each concept's map m (a token gets the mean of the map over the tokens
  it attends to, n times); ``n = inf`` iterates to the chain's stationary limit.
- :func:`second_eigenvalue`: ``|lambda_2|`` of each head's chain by subspace iteration on the
  complement of the constant vector (the Attention Chains head weighting).
- :func:`anchor_spread`: each concept's most confident tokens, spread over the chain, and gated at
  every step by output-space similarity to the anchors (in the spirit of AnchorDiff, 2026).
- :func:`entropy_weights`, :func:`layer_confidence`: label-free weights of heads and layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "anchor_spread",
    "attend",
    "bounce",
    "entropy_weights",
    "layer_confidence",
    "second_eigenvalue",
]

#: ``bounces=inf`` stops when no map value moves by more than this, or after :data:`MAX_BOUNCES`.
STATIONARY_TOLERANCE = 1e-5
MAX_BOUNCES = 1000


def attend(query: torch.Tensor, key: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``A @ columns`` per head, float32: query / key ``[B, H, N, d]``, columns ``[B, H, N, C]``.

    Fused attention calls with the columns as values, ``d`` columns at a time (the last group
    zero-padded, every group contiguous): a value width other than the query's, or columns that are not
    contiguous, send PyTorch to its reference kernel, which materialises the N x N matrix.
    """
    d, width = query.shape[-1], columns.shape[-1]
    parts = []
    for start in range(0, width, d):
        part = columns[..., start : start + d].to(query.dtype)
        n = part.shape[-1]
        part = F.pad(part, (0, d - n)) if n < d else part.contiguous()
        parts.append(F.scaled_dot_product_attention(query, key, part)[..., :n])
    return torch.cat(parts, dim=-1).float()


def _per_head(maps: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, K, N]`` -> the same columns for every head, ``[B, H, N, K]``."""
    return maps.transpose(1, 2)[:, None].expand(-1, heads, -1, -1)


def bounce(
    query: torch.Tensor, key: torch.Tensor, maps: torch.Tensor, bounces: float, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_h w_h A_h^n m`` for every concept map m: maps ``[B, K, N]``, weights ``[B, H]`` -> ``[B, K, N]``.

    Each head runs its own chain; ``bounces`` is an int >= 0 or ``math.inf`` (until no value moves by
    more than :data:`STATIONARY_TOLERANCE`, at most :data:`MAX_BOUNCES` times). A map that is a
    distribution over concepts at every token stays one.
    """
    columns = _per_head(maps.float(), query.shape[1])
    if math.isinf(bounces):
        for done in range(1, MAX_BOUNCES + 1):
            moved = attend(query, key, columns)
            # checked every 8 bounces: each check waits for the device
            settled = done % 8 == 0 and bool((moved - columns).abs().amax() <= STATIONARY_TOLERANCE)
            columns = moved
            if settled:
                break
    else:
        for _ in range(int(bounces)):
            columns = attend(query, key, columns)
    return torch.einsum("bh,bhnk->bkn", weights.float(), columns)


def _basis(num_tokens: int, width: int, device: torch.device) -> torch.Tensor:
    """A fixed start for subspace iteration, ``[N, width]`` (its own generator: the global RNG is left alone)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(num_tokens, width, generator=generator).to(device)


def second_eigenvalue(query: torch.Tensor, key: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """``|lambda_2|`` of each head's image self-attention chain, ``[B, H]`` float32.

    ``A 1 = 1``, so the other eigenvalues are those of ``A`` acting on vectors modulo the constant one.
    Subspace iteration there (``d`` vectors, ``A`` applied by :func:`attend`, mean removed,
    re-orthonormalised) then Rayleigh-Ritz on the subspace; exact once ``d >= N - 1``.
    """
    b, h, n, d = query.shape
    if n < 2:
        return torch.zeros(b, h, device=query.device)
    width = min(d, n - 1)
    x = _basis(n, width, query.device).expand(b, h, n, width)

    def centred(y: torch.Tensor) -> torch.Tensor:
        return y - y.mean(dim=-2, keepdim=True)

    basis = torch.linalg.qr(centred(x)).Q
    for _ in range(iterations):
        basis = torch.linalg.qr(centred(attend(query, key, basis))).Q
    projected = basis.transpose(-1, -2) @ centred(attend(query, key, basis))  # [B, H, w, w]
    return torch.linalg.eigvals(projected).abs().amax(dim=-1).float()


def normalised(weights: torch.Tensor) -> torch.Tensor:
    """Non-negative ``[B, H]`` -> rows summing to 1 (uniform where a row is all zero)."""
    weights = weights.float().clamp_min(0)
    total = weights.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / weights.shape[-1])
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(torch.float32).tiny), uniform)


def entropy_weights(head_scores: torch.Tensor) -> torch.Tensor:
    """Head weights ``[B, H]`` from per-head scores ``[B, H, K, N]``: how far each head's maps (softmax over
    tokens) are from uniform, ``log N - entropy``, averaged over concepts, normalised over heads."""
    logp = head_scores.float().log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1).mean(dim=-1)  # [B, H]
    return normalised(math.log(head_scores.shape[-1]) - entropy)


def anchor_spread(
    query: torch.Tensor,
    key: torch.Tensor,
    maps: torch.Tensor,
    image_out: torch.Tensor,
    weights: torch.Tensor,
    anchors: int = 1,
    steps: int = 1,
) -> torch.Tensor:
    """Each concept's ``anchors`` highest tokens of ``maps`` ``[B, K, N]``, spread ``steps`` times over the
    head-weighted chain (``weights`` ``[B, H]``) and gated at every step by the cosine similarity (clipped
    at 0) of each token's output ``image_out`` ``[B, N, D]`` to the anchors' mean output; ``[B, K, N]``,
    each map scaled to a maximum of 1."""
    b, k, n = maps.shape
    count = max(1, min(int(anchors), n))
    top = maps.float().topk(count, dim=-1).indices  # [B, K, a]
    seed = torch.zeros(b, k, n, device=maps.device).scatter_(-1, top, 1.0 / count)
    features = F.normalize(image_out.float(), dim=-1)  # [B, N, D]
    picked = torch.gather(
        features[:, None].expand(-1, k, -1, -1), 2, top[..., None].expand(-1, -1, -1, features.shape[-1])
    )
    centre = F.normalize(picked.mean(dim=2), dim=-1)  # [B, K, D]
    gate = torch.einsum("bkd,bnd->bkn", centre, features).clamp_min(0)
    spread = seed
    for _ in range(max(1, int(steps))):
        spread = torch.einsum("bh,bhnk->bkn", weights.float(), attend(query, key, _per_head(spread, query.shape[1])))
        spread = spread * gate
    return spread / spread.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def layer_confidence(scores: torch.Tensor) -> torch.Tensor:
    """How decided one layer's maps are, ``[B]`` in [0, 1]: per token the margin of the largest concept
    probability (softmax over concepts of ``scores`` ``[B, K, N]``) above chance, averaged over tokens."""
    k = scores.shape[1]
    if k < 2:
        return torch.ones(scores.shape[0], device=scores.device)
    top = scores.float().softmax(dim=1).amax(dim=1)  # [B, N]
    return ((top - 1.0 / k) / (1.0 - 1.0 / k)).mean(dim=-1)
