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


def test_readout_methods_take_settings_and_report_them():
    (spec,) = resolve_methods("bounce_2:heads=lambda2")
    assert spec.name == "bounce_2:heads=lambda2" and spec.readout == "bounce_2:heads=lambda2"
    assert spec.settings()["bounces"] == 2 and spec.settings()["heads"] == "lambda2"
    assert METHODS["concept_attention"].settings()["bounces"] == 0 and METHODS["daam"].settings() == {}
    assert resolve_methods("concept_attention:bounces=inf")[0].settings()["bounces"] == "inf"
    names = [m.name for m in resolve_methods("all")]
    assert {"bounce_2", "anchor_propagation", "heads_lambda2", "layers_confidence"} <= set(names)
    with pytest.raises(ConceptAttentionError, match="daam takes no settings"):
        resolve_methods("daam:bounces=2")
    with pytest.raises(ConceptAttentionError, match="heads is one of"):
        resolve_methods("bounce_2:heads=loudest")


def test_every_follow_up_is_recorded_in_the_one_shared_pass():
    calls = []

    class Pipe:
        def token_maps(self, images, concepts, captions, readouts, **settings):
            calls.append(list(readouts))
            return {r: torch.full((len(images), len(concepts), 2, 2), float(i)) for i, r in enumerate(readouts)}

    from conceptattention.eval.methods import run_methods

    chosen = resolve_methods("concept_attention,bounce_2,concept_attention:bounces=3")
    out = run_methods(Pipe(), chosen, [object()], ["a", "b"], [""], {})
    assert calls == [["concept_attention", "bounce_2", "concept_attention:bounces=3"]]
    assert [float(out[m.name][0, 0, 0, 0]) for m in chosen] == [0.0, 1.0, 2.0]
