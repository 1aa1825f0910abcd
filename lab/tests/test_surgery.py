"""Model surgery (``conceptattention_lab.surgery``): the changes between stages keep what was learnt, and a
stage file that asks for one trains a model that reloads and generates."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from lab_helpers import TINY, generate_briefly, run_meta, stage_file, train_briefly

from conceptattention import ConceptAttentionError
from conceptattention.shapes.model import ShapesModel, tokenize
from conceptattention_lab import surgery
from conceptattention_lab.train import TrainConfig, start_model, train


def test_predict_as_restarts_only_the_output_projection_and_the_choice_is_saved(tiny_dir, tmp_path):
    plain = ShapesModel.load(tiny_dir).eval()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    surgery.predict_as(plain, "sample")
    changed = {k for k, v in plain.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"transformer.proj_out.weight", "transformer.proj_out.bias"}
    assert plain.transformer.proj_out.weight.abs().sum() == 0
    assert plain.config.prediction == plain.text_encoder.config.prediction == "sample"
    plain.save(tmp_path / "s")
    assert ShapesModel.load(tmp_path / "s").config.prediction == "sample"
    assert ShapesModel.load(tiny_dir).config.prediction == "velocity"
    weights = {k: v.clone() for k, v in plain.state_dict().items()}
    surgery.predict_as(plain, "sample")  # already so: left as it is
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in weights.items())
    with pytest.raises(ConceptAttentionError, match="prediction must be one of velocity, sample"):
        surgery.predict_as(plain, "noise")


def test_a_stage_fine_tunes_into_sample_prediction_and_refuses_another_on_resume(tiny_dir, tmp_path):
    out = tmp_path / "x"
    r = train_briefly(out, stage_file(tmp_path / "x.json", init_from=str(tiny_dir), prediction="sample"))
    assert r.exit_code == 0, r.output
    assert run_meta(out)["config"]["prediction"] == "sample"
    r = generate_briefly(out / "weights", tmp_path / "gen")
    assert r.exit_code == 0, r.output
    assert np.isfinite(np.load(tmp_path / "gen" / "maps.npy")).all()
    r = train_briefly(out, stage_file(tmp_path / "y.json", init_from=str(tiny_dir), prediction="velocity", steps=3))
    assert r.exit_code == 2 and 'prediction "sample" there, "velocity" now' in r.output, r.output


def test_repatch_keeps_every_block_and_reads_small_patches_as_tiled_large_ones(tiny_dir):
    """8x8 -> 4x4: a token of a 4x4 patch embeds like the 8x8 patch made of four copies of it, the head predicts
    a 4x4 patch as the mean of the 8x8 head's four quadrants, RoPE positions keep their unit, and nothing else moves."""
    old = ShapesModel.load(tiny_dir).eval()
    new = ShapesModel.load(tiny_dir).eval()
    surgery.repatch(new, 4)
    assert (new.config.patch, new.config.rope_scale, new.grid) == (4, 0.5, 16)
    kept = {
        k: v
        for k, v in old.state_dict().items()
        if ".x_embedder." not in k and not k.startswith("transformer.proj_out.")
    }
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in kept.items())

    torch.manual_seed(1)
    small = torch.randn(5, 3, 4, 4)
    tiled = small.repeat(1, 1, 2, 2)  # [5, 3, 8, 8]: the 4x4 patch in each quadrant
    with torch.no_grad():
        torch.testing.assert_close(
            new.transformer.x_embedder(small.reshape(5, -1)), old.transformer.x_embedder(tiled.reshape(5, -1))
        )
        hidden = torch.randn(5, old.transformer.proj_out.in_features)
        big = old.transformer.proj_out(hidden).view(5, 3, 8, 8)
        quadrant_mean = (big[..., :4, :4] + big[..., :4, 4:] + big[..., 4:, :4] + big[..., 4:, 4:]) / 4
        torch.testing.assert_close(new.transformer.proj_out(hidden).view(5, 3, 4, 4), quadrant_mean)

    # positions: the 16x16 grid spans the same range as the 8x8 one, in steps of half a unit
    tokens, pooled = new.encode_text(["a red circle"])
    x_t = torch.randn(1, 256, 48)
    ids = new.transformer_inputs(x_t, torch.tensor([0.5]), tokens, pooled)["img_ids"]
    assert ids[:, 1].unique().tolist() == [i / 2 for i in range(16)]
    assert ids.shape == (256, 3) and ids[:, 2].max() == 7.5

    with pytest.raises(ConceptAttentionError, match="size that divides 4, not 3"):
        surgery.repatch(new, 3)


def test_a_stage_repatches_init_weights_and_the_result_generates_maps_on_the_finer_grid(tiny_dir, tmp_path):
    out = tmp_path / "r"
    config = stage_file(tmp_path / "r.json", init_from=str(tiny_dir), patch=4)
    r = train_briefly(out, config)
    assert r.exit_code == 0, r.output
    meta = run_meta(out)
    assert (meta["config"]["patch"], meta["config"]["rope_scale"], meta["train_config"]["patch"]) == (4, 0.5, 4)
    # a run directory is a model too (its weights/ are read); maps come on the 16x16 token grid
    r = generate_briefly(out, tmp_path / "gen")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "gen" / "result.json").read_text())
    assert result["token_grid"] == [16, 16] and np.load(tmp_path / "gen" / "maps.npy").shape == (2, 64, 64)
    # resuming it keeps the new patch size; a size that does not divide the weights' is one clear error
    r = train_briefly(out, stage_file(tmp_path / "r3.json", init_from=str(tiny_dir), patch=4, steps=3))
    assert r.exit_code == 0, r.output
    assert run_meta(out)["config"]["patch"] == 4 and run_meta(out)["steps"] == 3
    r = train_briefly(tmp_path / "bad", stage_file(tmp_path / "bad.json", init_from=str(tiny_dir), patch=3))
    assert r.exit_code == 2 and "size that divides 8, not 3" in r.output
    assert not (tmp_path / "bad").exists()  # a stage that cannot start leaves nothing behind
    with pytest.raises(ConceptAttentionError, match="a model from scratch takes them from its architecture"):
        train(tmp_path / "scratch", TrainConfig(steps=1, batch=2, patch=4, bf16=False), TINY)


def test_drop_text_mixing_makes_each_prompt_token_its_word_plus_its_position(tiny_dir):
    """Without mixing, a prompt token is norm(embedding + position): it does not depend on the other words, and a
    concept alone equals the same word at position 0 of a caption; the transformer is untouched."""
    old = ShapesModel.load(tiny_dir).eval()
    model = ShapesModel.load(tiny_dir).eval()
    surgery.drop_text_mixing(model)
    assert model.config.text_layers == 0 and model.text_encoder.config.text_layers == 0
    assert all(torch.equal(v, model.transformer.state_dict()[k]) for k, v in old.transformer.state_dict().items())
    enc = old.text_encoder
    with torch.no_grad():
        tokens, pooled = model.encode_text(["a red circle", "red"])
        ids = tokenize(["a red circle"], TINY.max_tokens)[0, :3]
        expected = torch.nn.functional.layer_norm(
            enc.embed.weight[ids] + enc.position[:3], (TINY.text_dim,), enc.norm.weight, enc.norm.bias
        )
        torch.testing.assert_close(tokens[0, :3], expected)
        torch.testing.assert_close(pooled[0], expected.mean(0))
        torch.testing.assert_close(model.encode_concepts(["red"])[0], tokens[1, 0])
        # with mixing, "red" after "a" differs from "red" alone at the same position (the check is not vacuous)
        mixed, _ = old.encode_text(["a red", "a blue"])
        assert not torch.allclose(mixed[0, 0], mixed[1, 0])
    assert not any(k.startswith("text_encoder.layers.") for k in model.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.drop_text_mixing(model)  # a model without mixing is left as it is
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_a_stage_drops_the_text_mixing_of_init_weights_and_the_result_reloads_and_generates(tiny_dir, tmp_path):
    out = tmp_path / "u"
    r = train_briefly(out, stage_file(tmp_path / "u.json", init_from=str(tiny_dir), drop_text_mixing=True))
    assert r.exit_code == 0, r.output
    meta = run_meta(out)
    assert meta["config"]["text_layers"] == 0 and meta["train_config"]["drop_text_mixing"] is True
    reloaded = ShapesModel.load(out / "weights")  # loads strictly: no mixing weights are expected or present
    assert isinstance(reloaded.text_encoder.layers, torch.nn.Identity)
    r = generate_briefly(out, tmp_path / "gen")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "gen" / "maps.npy").shape == (2, 64, 64)
    r = train_briefly(out, stage_file(tmp_path / "u3.json", init_from=str(tiny_dir), drop_text_mixing=True, steps=3))
    assert r.exit_code == 0, r.output  # resuming keeps the architecture of the checkpoint
    assert run_meta(out)["config"]["text_layers"] == 0


def test_mixing_in_the_neighbour_maps_starts_as_a_no_op_and_they_are_trained(tiny_dir, tmp_path):
    torch.manual_seed(0)
    model = ShapesModel(replace(TINY, text_layers=0)).eval()
    captions = ["a red circle and a blue square", "circle"]
    with torch.no_grad():
        plain, plain_pooled = model.encode_text(captions)
        surgery.mix_text_neighbours(model)
        zero, zero_pooled = model.encode_text(captions)
    assert model.config.text_neighbours and model.text_encoder.config.text_neighbours
    assert torch.equal(plain, zero) and torch.equal(plain_pooled, zero_pooled)  # the maps start at zero
    with torch.no_grad():
        model.text_encoder.before.weight.normal_(std=0.1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.mix_text_neighbours(model)  # a model that has them keeps them
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())

    out = tmp_path / "n"
    r = train_briefly(out, stage_file(tmp_path / "n.json", init_from=str(tiny_dir), text_neighbours=True))
    assert r.exit_code == 0, r.output
    assert run_meta(out)["config"]["text_neighbours"] is True
    loaded = ShapesModel.load(out / "weights")
    assert loaded.config.text_neighbours and loaded.text_encoder.before.weight.abs().amax() > 0  # trained
    assert generate_briefly(out, tmp_path / "gen").exit_code == 0


def test_a_stage_changes_its_init_weights_in_a_fixed_order(tiny_dir):
    """Re-patched, word mixing dropped, prediction switched, neighbour maps added: one model of each change."""
    cfg = TrainConfig(
        init_from=str(tiny_dir), patch=4, drop_text_mixing=True, prediction="sample", text_neighbours=True
    )
    model = start_model(cfg)
    c = model.config
    assert (c.patch, c.rope_scale, c.text_layers, c.prediction, c.text_neighbours) == (4, 0.5, 0, "sample", True)
    assert model.training and model.text_encoder.config == c
    assert ShapesModel.load(tiny_dir).config.patch == 8  # the weights on disk are untouched
