"""Readouts (readouts.py): what a Readout refuses, and the linear concept norm by hand. Every readout's maps
against the reference are the session's tests (test_core.py)."""

from __future__ import annotations

import pytest
import torch

from conceptattention.errors import ConceptAttentionError
from conceptattention.readouts import Readout, linear_norm


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        pytest.param((), {"space": "keys"}, "unknown space", id="unknown-space"),
        pytest.param(
            ("cross_attention", True, "cross+self", "linear"), {}, "not cross_attention", id="norm-of-cross-attention"
        ),
        pytest.param(("output", True, "cross+self", "l2"), {}, "'none' or 'linear'", id="unknown-concept-norm"),
    ],
)
def test_bad_readouts(args, kwargs, match):
    with pytest.raises(ConceptAttentionError, match=match):
        Readout(*args, **kwargs)


def test_linear_norm_by_hand():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [2.0, 4.0]]])  # [B=1, K=3, D=2]
    torch.testing.assert_close(linear_norm(x, -2), torch.tensor([[[0.0, 0.0], [2 / 3, 2 / 8], [1 / 3, 6 / 8]]]))
