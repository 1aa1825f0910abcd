"""The self-attention chain's maths against explicit N x N matrices (conceptattention.propagation)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conceptattention.propagation import (
    anchor_spread,
    attend,
    bounce,
    entropy_weights,
    layer_confidence,
    second_eigenvalue,
)


def qk(b: int = 2, h: int = 3, n: int = 20, d: int = 8, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g) * scale, torch.randn(b, h, n, d, generator=g) * scale)


def matrix(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The explicit chain: softmax over image keys of q k^T / sqrt(d), ``[B, H, N, N]``, float64."""
    q, k = query.double(), key.double()
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1)


def distributions(b: int, k: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, k, n, generator=torch.Generator().manual_seed(seed)).softmax(dim=1)


@pytest.mark.parametrize("columns", [1, 8, 19])  # fewer than, as many as, more than the head width
def test_attend_is_the_attention_matrix_times_the_columns(columns):
    q, k = qk()
    x = torch.randn(2, 3, 20, columns, generator=torch.Generator().manual_seed(2))
    expected = matrix(q, k) @ x.double()
    torch.testing.assert_close(attend(q, k, x).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_bounce_is_the_head_weighted_matrix_power(n):
    q, k = qk()
    maps = distributions(2, 4, 20)
    weights = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    power = torch.linalg.matrix_power(matrix(q, k), n)  # [B, H, N, N]
    expected = torch.einsum("bh,bhij,bkj->bki", weights.double(), power, maps.double())
    got = bounce(q, k, maps, n, weights)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 20))  # still a distribution over concepts


def test_infinite_bounces_reach_the_stationary_limit():
    q, k = qk(scale=0.5)  # a chain that mixes within a few dozen steps
    maps = distributions(2, 3, 20)
    weights = torch.full((2, 3), 1 / 3)
    a = matrix(q, k)
    eigenvalues, vectors = torch.linalg.eig(a.transpose(-1, -2))  # left eigenvectors of A
    top = eigenvalues.real.argmax(dim=-1)
    pi = torch.gather(vectors.real, -1, top[..., None, None].expand(-1, -1, 20, 1))[..., 0]
    pi = pi / pi.sum(dim=-1, keepdim=True)  # [B, H, N], pi A = pi
    limit = torch.einsum("bhj,bkj->bhk", pi, maps.double())  # every token gets pi . m
    expected = torch.einsum("bh,bhk->bk", weights.double(), limit)[..., None].expand(-1, -1, 20)
    torch.testing.assert_close(bounce(q, k, maps, math.inf, weights).double(), expected, rtol=1e-4, atol=1e-4)


def explicit_lambda2(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    values = torch.linalg.eigvals(matrix(query, key)).abs().sort(dim=-1, descending=True).values
    return values[..., 1]  # the largest is 1, the chain's own


def test_second_eigenvalue_is_exact_when_the_head_is_wide_enough():
    q, k = qk(n=9, d=8, scale=1.5)  # d >= N - 1: the subspace is every non-constant direction
    torch.testing.assert_close(second_eigenvalue(q, k).double(), explicit_lambda2(q, k), rtol=1e-4, atol=1e-5)


def test_second_eigenvalue_by_subspace_iteration_on_a_long_sequence():
    q, k = qk(n=64, d=16, scale=1.5, seed=3)
    got, expected = second_eigenvalue(q, k, iterations=30).double(), explicit_lambda2(q, k)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-3)
    assert (got <= 1 + 1e-5).all()


def test_anchor_spread_against_an_explicit_recomputation():
    q, k = qk(b=1, h=2, n=12, d=4, seed=5)
    maps = distributions(1, 3, 12, seed=6)
    out = torch.randn(1, 12, 10, generator=torch.Generator().manual_seed(7))
    weights = torch.tensor([[0.25, 0.75]])
    a = (weights.double()[..., None, None] * matrix(q, k)).sum(1)[0]  # head-weighted chain [N, N]
    feats = torch.nn.functional.normalize(out[0].double(), dim=-1)
    expected = []
    for c in range(3):
        top = maps[0, c].topk(2).indices
        seed = torch.zeros(12, dtype=torch.float64)
        seed[top] = 0.5
        centre = torch.nn.functional.normalize(feats[top].mean(0), dim=0)
        gate = (feats @ centre).clamp_min(0)
        spread = seed
        for _ in range(2):
            spread = gate * (a @ spread)
        expected.append(spread / spread.max())
    got = anchor_spread(q, k, maps, out, weights, anchors=2, steps=2)
    torch.testing.assert_close(got[0].double(), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_entropy_weights_and_layer_confidence_by_hand():
    scores = torch.tensor([[[[0.0, 0.0, 0.0, 0.0]], [[10.0, 0.0, 0.0, 0.0]]]])  # [B=1, H=2, K=1, N=4]
    p = torch.tensor([10.0, 0.0, 0.0, 0.0]).softmax(0)
    info = math.log(4) + float((p * p.log()).sum())  # the uniform head carries none
    torch.testing.assert_close(entropy_weights(scores), torch.tensor([[0.0, 1.0]]))
    assert info > 0
    decided = torch.tensor([[[50.0, -50.0], [-50.0, 50.0]]])  # [B=1, K=2, N=2]: each token sure
    undecided = torch.zeros(1, 2, 2)
    torch.testing.assert_close(layer_confidence(decided), torch.tensor([1.0]))
    torch.testing.assert_close(layer_confidence(undecided), torch.tensor([0.0]))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_chain_is_never_materialised():
    n = 2048  # one head's matrix: 4.2M elements; what the maps need: concepts x tokens x width
    q, k = qk(b=1, h=2, n=n, d=32)
    maps = distributions(1, 5, n)
    weights = torch.full((1, 2), 0.5)
    with LargestTensor() as seen:
        bounce(q, k, maps, 3, weights)
        anchor_spread(q, k, maps, torch.randn(1, n, 64), weights)
        second_eigenvalue(q, k, iterations=2)
    assert seen.largest < n * n // 4
    with LargestTensor() as naive:  # the detector sees a matrix when one is formed
        torch.nn.functional.scaled_dot_product_attention(q, k, maps.transpose(1, 2)[:, None].expand(-1, 2, -1, -1))
    assert naive.largest >= n * n


def test_a_session_with_every_follow_up_forms_no_token_by_token_tensor_on_a_mid_grid():
    """The whole path (hooks, RoPE, the concept stream, every follow-up at its defaults) on a 32 x 32 token grid."""
    from tiny_models import concepts, flux_inputs, tiny_flux

    from conceptattention import FOLLOWUPS, ConceptAttention

    n = 32 * 32
    model, inputs = tiny_flux(layers=2), flux_inputs(batch=1, h=32, w=32)
    with torch.no_grad(), LargestTensor() as plain:
        model(**inputs)
    session = ConceptAttention(model, concepts(5), layers=[0, 1], readouts=list(FOLLOWUPS))
    with torch.no_grad(), LargestTensor() as ours, session:
        model(**inputs)
    assert session.maps("bounce_8").shape == (1, 5, 32, 32)
    assert plain.largest < n * n // 4 and ours.largest < n * n // 4, (plain.largest, ours.largest)
