"""The benchmark's methods (eval/methods.py): the registry resolves names and takes new methods."""

from __future__ import annotations

import pytest
import torch

from conceptattention.errors import ConceptAttentionError
from conceptattention.eval.methods import METHODS, register_method, resolve_methods


def test_methods_registry_resolves_and_extends():
    names = [m.name for m in resolve_methods("all")]
    assert names[0] == "concept_attention" and "daam" in names and "cross_attention" in names
    assert [m.name for m in resolve_methods("cross_only, value")] == ["cross_only", "value"]
    with pytest.raises(ConceptAttentionError, match="unknown method"):
        resolve_methods(["sharpest"])

    @register_method("uniform_test_method", "every pixel the same")
    def uniform(pipe, images, concepts, captions, settings):
        return torch.ones(len(images), len(concepts), 2, 2)

    try:
        assert METHODS["uniform_test_method"].description == "every pixel the same"
        with pytest.raises(ConceptAttentionError, match="already registered"):
            register_method("uniform_test_method")(uniform)
    finally:
        METHODS.pop("uniform_test_method")
