"""The trainer (``conceptattention_lab.train``): the loss falls, runs resume exactly, checkpoints hold plain
values, the objectives, and ``conceptattention train-shapes --config`` with its stage-file checks."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lab_helpers import TINY, run_meta, stage_file, train_briefly
from typer.testing import CliRunner

from conceptattention import ConceptAttentionError
from conceptattention.cli import app
from conceptattention.pipelines.shapes import ShapesPipeline
from conceptattention.shapes import world
from conceptattention.shapes.model import ShapesConfig, ShapesModel, unpack
from conceptattention_lab.train import (
    TrainConfig,
    batch_loss,
    data_seed,
    load_stage,
    lr_at,
    read_blocks,
    reader_heads,
    stage_settings,
    text_reads,
    train,
    training_scenes,
)


@pytest.mark.parametrize("prediction", ["velocity", "sample"])
def test_training_steps_reduce_the_loss(prediction):
    torch.manual_seed(0)
    model = ShapesModel(replace(TINY, prediction=prediction)).train()
    cfg = TrainConfig(batch=16, bf16=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):  # the same batch again and again: the loss must fall
        loss = batch_loss(model, 0, cfg, torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_resumed_training_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(steps=4, batch=4, bf16=False, checkpoint_every=2, log_every=1, warmup=2)
    whole = train(tmp_path / "whole", cfg, TINY, progress=False)
    train(tmp_path / "parts", replace(cfg, steps=2), TINY, progress=False)
    parts = train(tmp_path / "parts", cfg, TINY, progress=False)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]  # the resumed optimiser kept its settings
    for p, moments in a["opt"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["opt"]["state"][p][name]), (p, name)
    logs = [json.loads(line) for line in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert (whole / "model.safetensors").is_file() and (parts / "config.json").is_file()


def test_stop_after_keeps_the_schedule_and_resumes_into_the_whole_run(tmp_path):
    cfg = TrainConfig(steps=6, batch=4, bf16=False, checkpoint_every=100, log_every=1, warmup=2)
    whole = torch.load(train(tmp_path / "whole", cfg, TINY, progress=False).parent / "checkpoint.pt", weights_only=True)
    train(tmp_path / "parts", cfg, TINY, progress=False, stop_after=3)
    early = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert early["step"] == 3 and json.loads((tmp_path / "parts" / "weights" / "config.json").read_text())["steps"] == 3
    logs = [json.loads(line) for line in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logs] == pytest.approx([lr_at(s, cfg) for s in range(3)])  # the 6-step schedule
    train(tmp_path / "parts", cfg, TINY, progress=False, stop_after=2)  # already past it: nothing is trained
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["step"] == 3
    train(tmp_path / "parts", cfg, TINY, progress=False)
    done = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert done["step"] == 6 and all(torch.equal(whole["model"][k], done["model"][k]) for k in whole["model"])
    with pytest.raises(ConceptAttentionError, match="stop_after is a step count"):
        train(tmp_path / "bad", cfg, TINY, progress=False, stop_after=0)
    # a run stopped between log lines logs the steps since the last one, so no step goes unlogged
    sparse = replace(cfg, log_every=4)
    train(tmp_path / "sparse", sparse, TINY, progress=False, stop_after=3)
    train(tmp_path / "sparse", sparse, TINY, progress=False)
    logs = [json.loads(line) for line in (tmp_path / "sparse" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [3, 4, 6]  # stopped at 3; then the log point 4 and the schedule's end


def _plain_values(value) -> bool:
    """Whether ``value`` is built of tensors, str/int-keyed dicts, lists, str, int, float, bool and None only."""
    if isinstance(value, torch.Tensor) or value is None or type(value) in (bool, int, float, str):
        return True
    if isinstance(value, dict) and type(value) in (dict, OrderedDict):  # module state dicts are ordered
        return all(type(k) in (str, int) and _plain_values(v) for k, v in value.items())
    if type(value) is list:
        return all(_plain_values(v) for v in value)
    return False


class _Planted:
    """An object whose unpickling touches a file: what a checkpoint must never be allowed to do on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoints_hold_only_plain_values_and_load_with_weights_only(tmp_path):
    cfg = TrainConfig(
        steps=2,
        batch=2,
        bf16=False,
        checkpoint_every=1,
        log_every=1,
        warmup=1,
        reader_weight=0.1,
        reader_blocks=(0, -1),
    )
    train(tmp_path / "run", cfg, TINY, progress=False, stop_after=1)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)  # no pickled code is run
    assert set(state) == {"model", "ema", "opt", "step", "train_config", "model_config", "reader"}
    assert state["step"] == 1 and _plain_values(state)
    assert state["model_config"]["axes_dims_rope"] == [4, 6, 6] and state["train_config"]["reader_blocks"] == [0, -1]
    assert ShapesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()}) == TINY
    assert state["opt"]["param_groups"][0]["betas"] == [0.9, 0.99]
    train(tmp_path / "run", cfg, TINY, progress=False)  # it resumes from that file
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2

    # a checkpoint that holds a pickled object is refused, and the object's code never runs
    marker = tmp_path / "ran"
    state["planted"] = _Planted(marker)
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ConceptAttentionError, match="holds more than tensors and plain values.*delete it"):
        train(tmp_path / "run", replace(cfg, steps=3), TINY, progress=False)
    assert not marker.exists()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"cut short")
    with pytest.raises(ConceptAttentionError, match="cannot read the checkpoint"):
        train(tmp_path / "run", replace(cfg, steps=3), TINY, progress=False)


def test_object_weighted_loss_and_init_from_weights(tiny_dir, tmp_path):
    from conceptattention_lab.train import pixel_weights

    scenes = world.sample_scenes(3, seed=11)
    _, labels = world.render(scenes)
    w = unpack(pixel_weights(labels, 4.0, TINY.patch), TINY.patch)  # back to [B, 3, 64, 64]
    objects = labels > 0
    assert torch.all(w[:, 0][objects] == 4.0) and torch.all(w[:, 1] == w[:, 0])
    far = torch.nn.functional.max_pool2d(objects.float()[:, None], 9, 1, 4)[:, 0] == 0
    assert torch.all(w[:, 0][far] == 1.0)  # background away from any object keeps weight 1
    rim = (w[:, 0] == 4.0) & ~objects
    assert 0 < rim.sum() < objects.sum()  # a thin rim around the objects

    torch.manual_seed(0)
    model = ShapesModel(TINY)
    cfg = TrainConfig(batch=4, bf16=False)
    plain = batch_loss(model, 3, cfg, torch.device("cpu"))
    assert torch.equal(batch_loss(model, 3, replace(cfg, object_weight=1.0), torch.device("cpu")), plain)
    assert not torch.allclose(batch_loss(model, 3, replace(cfg, object_weight=5.0), torch.device("cpu")), plain)

    # --init-from continues from saved weights: the first exported EMA starts from them
    cont = replace(cfg, steps=1, lr=1e-12, warmup=1, init_from=str(tiny_dir), log_every=1)
    out = train(tmp_path / "cont", cont, progress=False)
    start, after = ShapesModel.load(tiny_dir), ShapesModel.load(out)
    for (name, a), b in zip(start.state_dict().items(), after.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2, msg=name)  # bf16 storage, a step of lr 1e-12


def test_training_batches_mix_in_the_multi_object_share_deterministically():
    plain = TrainConfig(batch=40, seed=3)
    assert torch.equal(training_scenes(plain, 5).present, world.sample_scenes(40, data_seed(3, 5)).present)
    mixed = TrainConfig(batch=40, seed=3, multi_object_rate=0.5)
    a, b = training_scenes(mixed, 5), training_scenes(mixed, 5)
    assert len(a) == 40 and torch.equal(a.center, b.center)
    assert torch.equal(a.present[:20], world.sample_scenes(20, data_seed(3, 5)).present)  # the world's mix first
    assert (a.present[:20].sum(1) == 1).float().mean() > 0.4  # the world's own mix: mostly single objects
    assert (a.present[20:].sum(1) >= 2).all()
    assert not torch.equal(a.shape[20:], a.shape[:20])  # a second seed: the parts do not repeat each other
    # each multi-object scene is one the world draws (rendered labels agree with its object list)
    _, labels = world.render(a.select(torch.arange(20, 40)))
    assert all(len(set(labels[i].unique().tolist()) - {0}) >= 2 for i in range(20))


def test_training_never_draws_the_held_out_scenes():
    assert len({data_seed(s, step) for s in range(3) for step in range(1000)}) == 3000
    seed, step = 19, world.HELDOUT_SEED - 1_000_003 * 20  # the step whose seed would be the held-out one
    assert data_seed(seed, step) == world.HELDOUT_SEED + 1 and data_seed(seed, step - 1) == world.HELDOUT_SEED - 1


def test_reader_targets_ask_shape_words_the_colour_only_the_image_can_tell():
    from conceptattention_lab.train import reader_targets

    scenes = world.sample_scenes(400, seed=5)
    pick = {}  # one scene each: two objects of different colours and shapes; two of one shape in two colours
    for i in range(len(scenes)):
        objs = scenes.objects(i)
        if len(objs) == 2 and objs[0][0] != objs[1][0]:
            pick.setdefault("same shape" if objs[0][1] == objs[1][1] else "differ", i)
    chosen = scenes.select(
        torch.tensor([pick["differ"], pick["differ"], pick["differ"], pick["same shape"], pick["differ"]])
    )
    (c0, s0), (c1, s1) = chosen.objects(0)
    (_, same), _ = chosen.objects(3)
    texts = [
        f"a {s1} and a {s0} on grass",  # no colour named: both shape words are asked
        f"a {c0} {s0} and a {c1} {s1} on grass",  # the caption names the colours: nothing to read
        s0,  # a lone shape word, as a concept is encoded: asked
        f"a {same} and a {same} on grass",  # two of that shape in two colours: no single answer
        "",
    ]  # a dropped caption
    got = reader_targets(chosen, texts, 12)
    want = torch.full((5, 12), -1, dtype=torch.long)
    want[0, 1], want[0, 4] = world.COLOR_NAMES.index(c1), world.COLOR_NAMES.index(c0)
    want[2, 0] = world.COLOR_NAMES.index(c0)
    assert torch.equal(got, want)


def test_reading_objective_trains_a_head_that_stays_out_of_the_weights(tiny_dir, tmp_path):
    torch.manual_seed(0)
    model = ShapesModel(TINY)
    cfg = TrainConfig(batch=8, bf16=False, colorless_rate=1.0, multi_object_rate=0.5, reader_weight=0.5)
    reader = reader_heads(cfg, model)
    assert len(reader) == 1 and reader[0].out_features == len(world.COLOR_NAMES)  # one head, on the last block
    plain = batch_loss(model, 0, cfg, torch.device("cpu"))
    parts = {}
    total = batch_loss(model, 0, cfg, torch.device("cpu"), reader, parts)
    assert 0 < parts["reader"] and torch.allclose(total, plain + 0.5 * parts["reader"])
    total.backward()  # the reading objective reaches the transformer's text stream, not only its head
    assert reader[0].weight.grad.abs().sum() > 0
    assert model.transformer.transformer_blocks[0].attn.add_q_proj.weight.grad.abs().sum() > 0

    out = tmp_path / "r"
    config = stage_file(tmp_path / "r.json", init_from=str(tiny_dir), reader_weight=0.1, colorless_rate=0.5)
    r = train_briefly(out, config)
    assert r.exit_code == 0, r.output
    assert run_meta(out)["train_config"]["reader_weight"] == 0.1
    assert "reader" in torch.load(out / "checkpoint.pt", weights_only=True)
    loaded = ShapesModel.load(out / "weights")  # the exported weights are the model alone
    assert set(loaded.state_dict()) == set(ShapesModel.load(tiny_dir).state_dict())
    # resuming without the objective would drop the head's training: another stage's settings are refused
    r = train_briefly(out, stage_file(tmp_path / "r3.json", init_from=str(tiny_dir), colorless_rate=0.5, steps=3))
    assert r.exit_code == 2 and "was trained with other settings (reader_weight 0.1 there, 0.0 now)" in r.output, (
        r.output
    )
    r = train_briefly(tmp_path / "bad", stage_file(tmp_path / "bad.json", reader_weight=-1))
    assert r.exit_code == 2 and "'reader_weight' must be at least 0, not -1" in r.output, r.output
    assert not (tmp_path / "bad").exists()


def test_reading_at_several_blocks_reads_each_with_its_own_head(tiny_dir, tmp_path):
    torch.manual_seed(0)
    model = ShapesModel(TINY)  # 3 double-stream blocks
    cfg = TrainConfig(
        batch=8, bf16=False, colorless_rate=1.0, multi_object_rate=0.5, reader_weight=0.5, reader_blocks=(-1, 0)
    )
    assert read_blocks(cfg, model) == [0, 2]
    both = reader_heads(cfg, model)
    parts = {}
    total = batch_loss(model, 0, cfg, torch.device("cpu"), both, parts)
    assert parts["reader_each"].shape == (2,) and torch.allclose(parts["reader"], parts["reader_each"].mean())
    assert torch.allclose(total, batch_loss(model, 0, cfg, torch.device("cpu")) + 0.5 * parts["reader"])
    for k, block in enumerate((0, 2)):  # each block's cross-entropy is what that block read alone gives
        alone = torch.nn.ModuleList([both[k]])
        one = {}
        batch_loss(model, 0, replace(cfg, reader_blocks=(block,)), torch.device("cpu"), alone, one)
        assert torch.allclose(one["reader"], parts["reader_each"][k])
    assert not torch.allclose(parts["reader_each"][0], parts["reader_each"][1])  # two blocks, two reads
    total.backward()  # the first block's head is trained too
    assert both[0].weight.grad.abs().sum() > 0

    with pytest.raises(ConceptAttentionError, match="not double-stream blocks of this model; it has 3"):
        read_blocks(replace(cfg, reader_blocks=(3,)), model)
    out = tmp_path / "r"
    r = train_briefly(
        out, stage_file(tmp_path / "r.json", init_from=str(tiny_dir), reader_weight=0.1, reader_blocks=[0, -1])
    )
    assert r.exit_code == 0, r.output
    assert run_meta(out)["train_config"]["reader_blocks"] == [0, -1]
    longer = stage_file(
        tmp_path / "r4.json", init_from=str(tiny_dir), reader_weight=0.1, reader_blocks=[0, -1], steps=4
    )
    assert train_briefly(out, longer).exit_code == 0  # a longer schedule of the same stage resumes
    assert run_meta(out)["steps"] == 4
    r = train_briefly(out, stage_file(tmp_path / "other.json", init_from=str(tiny_dir), reader_weight=0.1, steps=5))
    assert r.exit_code == 2 and "reader_blocks [0, -1] there, [] now" in r.output, r.output  # read at other blocks

    for settings, message in (
        ({"reader_blocks": [7], "reader_weight": 0.1}, "not double-stream blocks"),
        ({"reader_blocks": [0]}, "give it a reader_weight above 0"),
        ({"reader_at": "attention"}, "give it a reader_weight above 0"),
        ({"reader_at": "keys", "reader_weight": 0.1}, "'reader_at' must be one of 'block', 'attention', not 'keys'"),
    ):
        r = train_briefly(tmp_path / "bad", stage_file(tmp_path / "bad.json", init_from=str(tiny_dir), **settings))
        assert r.exit_code == 2 and message in r.output, r.output


def test_reading_attention_outputs_reads_what_the_output_projection_gets(tiny_dir, tmp_path):
    torch.manual_seed(0)
    model = ShapesModel(TINY).eval()
    attn = model.transformer.transformer_blocks[1].attn
    projected = {}
    watch = attn.register_forward_hook(lambda module, args, output: projected.update(text=output[1]))
    p = model.config.patch
    x = torch.randn(2, model.grid**2, 3 * p * p)
    tokens, pooled = model.encode_text(["a red circle on grass", "square"])
    with torch.no_grad(), text_reads(model, [1, 2], "attention") as states:
        model.velocity(x, torch.tensor([0.3, 0.7]), tokens, pooled)
    watch.remove()
    assert set(states) == {1, 2} and states[1].shape == (2, model.config.max_tokens, model.transformer.inner_dim)
    # the states are the text tokens' attention outputs: projected, they are what the attention returns for text
    assert torch.allclose(attn.to_add_out(states[1]), projected["text"], atol=1e-6)
    assert not attn.to_add_out._forward_pre_hooks and not model.transformer.transformer_blocks[2]._forward_hooks

    out = tmp_path / "r"
    r = train_briefly(
        out, stage_file(tmp_path / "a.json", init_from=str(tiny_dir), reader_weight=0.1, reader_at="attention")
    )
    assert r.exit_code == 0, r.output
    assert run_meta(out)["train_config"]["reader_at"] == "attention"
    r = train_briefly(out, stage_file(tmp_path / "b.json", init_from=str(tiny_dir), reader_weight=0.1, steps=3))
    assert r.exit_code == 2 and 'reader_at "attention" there, "block" now' in r.output, r.output  # other vectors


def test_true_concept_loss_is_minus_log_the_true_share_of_the_softmax():
    from conceptattention_lab.train import true_concept_loss

    torch.manual_seed(0)
    scores = [torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 4, 5)]
    true = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    asked = torch.tensor([True, True, False])
    expected = []
    for raw in scores:  # per block: images 0 and 1, every token, -log(sum of the true concepts' softmax shares)
        share = raw.softmax(1)
        expected.append(torch.stack([-(share[i] * true[i, :, None]).sum(0).log() for i in (0, 1)]).mean())
    loss = true_concept_loss(scores, true, asked)
    assert torch.allclose(loss, torch.stack(expected).mean())
    loss.backward()
    assert scores[0].grad[2].abs().sum() == 0 and scores[0].grad[:2].abs().sum() > 0  # image 2 is not asked
    # an image whose every concept is true costs nothing; none asked: zero, still differentiable
    assert true_concept_loss(scores, true, torch.tensor([False, False, True])).abs() < 1e-6
    assert true_concept_loss(scores, true, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_the_image_label_objective_scores_the_concept_streams_maps_and_trains_them(tiny_dir, tmp_path):
    from conceptattention_lab.train import concept_scores, map_blocks, true_concept_loss

    torch.manual_seed(0)
    model = ShapesModel(TINY)  # 3 double-stream blocks, no map layers of its own: the core default
    cfg = TrainConfig(batch=6, bf16=False, concept_weight=0.5)
    assert map_blocks(model) == list(ShapesPipeline(model).default_layers)  # what the maps read by default
    assert map_blocks(ShapesModel(replace(TINY, map_layers=(0, -1)))) == [0, 2]  # or the model's own
    plain = batch_loss(model, 0, replace(cfg, concept_weight=0.0), torch.device("cpu"))
    parts = {}
    total = batch_loss(model, 0, cfg, torch.device("cpu"), parts=parts)
    assert parts["concepts"] > 0 and torch.allclose(total, plain + 0.5 * parts["concepts"])
    both = {}
    with_pairs = batch_loss(model, 0, replace(cfg, coreference_weight=0.3), torch.device("cpu"), parts=both)
    assert both["coreference"] > 0 and torch.allclose(both["concepts"], parts["concepts"])
    assert torch.allclose(with_pairs, total + 0.3 * both["coreference"])
    total.backward()  # the objective reaches the concept stream's text weights and the image side
    block = model.transformer.transformer_blocks[1]
    assert block.attn.add_q_proj.weight.grad.abs().sum() > 0 and block.attn.to_q.weight.grad.abs().sum() > 0

    # the scores are ConceptAttention's: their softmax averaged over the blocks is the pipeline's map
    pipe = ShapesPipeline(model.eval())
    scenes = world.sample_scenes(2, seed=3)
    images, _ = world.render(scenes)
    captions = world.captions(scenes)
    inputs, _ = pipe._noisy_inputs(list(images), captions, 0.5, 1, [7, 8])
    with torch.no_grad(), concept_scores(model, [1, 2]) as scores, text_reads(model, [1], "attention") as states:
        model.transformer(**inputs)
    assert len(scores) == 2 and scores[0].shape == (2, len(world.CONCEPTS), model.grid**2)
    assert (
        states[1].shape[1] == model.config.max_tokens
    )  # the reading hooks keep the prompt's states, not the concepts'
    maps = pipe.token_maps(list(images), list(world.CONCEPTS), captions, samples=1, seeds=[7, 8], layers=[1, 2])
    expected = torch.stack([s.softmax(1) for s in scores]).mean(0)
    torch.testing.assert_close(maps["concept_attention"].flatten(2), expected, atol=1e-5, rtol=1e-4)
    true = world.true_concepts(scenes)
    assert true_concept_loss(scores, true, torch.ones(2, dtype=torch.bool)) > 0
    assert not model.transformer.transformer_blocks[1]._forward_hooks  # the stream is unhooked on exit

    # a few steps lower it
    model = ShapesModel(TINY)
    cfg = TrainConfig(batch=8, bf16=False, concept_weight=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen = []
    for _ in range(9):
        parts = {}
        loss = batch_loss(model, 0, cfg, torch.device("cpu"), parts=parts)
        seen.append(parts["concepts"].item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert seen[-1] < 0.5 * seen[0], seen

    out = tmp_path / "c"
    r = train_briefly(
        out, stage_file(tmp_path / "c.json", init_from=str(tiny_dir), concept_weight=0.1, coreference_weight=0.01)
    )
    assert r.exit_code == 0, r.output
    meta = run_meta(out)["train_config"]
    assert meta["concept_weight"] == 0.1 and meta["coreference_weight"] == 0.01


def test_coreference_loss_asks_words_that_name_the_same_pixels_to_split_them_evenly():
    import math

    from conceptattention_lab.train import coreference_loss

    torch.manual_seed(0)
    raw = torch.randn(2, 4, 6) * 3
    scores = [raw.clone().requires_grad_(True)]
    same = torch.zeros(2, 4, 4, dtype=torch.bool)
    same[0, 1, 3] = same[0, 3, 1] = same[1, 0, 2] = same[1, 2, 0] = True
    asked = torch.tensor([True, True])
    expected = []
    for image, a, b in ((0, 1, 3), (1, 0, 2)):
        share = raw[image].softmax(0)
        joint = share[a] + share[b]
        split = share[a] / joint  # the pair's split of their joint share
        bce = -(0.5 * split.log() + 0.5 * (1 - split).log()) - math.log(2)
        expected.append((bce * joint).sum() / joint.sum())
    loss = coreference_loss(scores, same, asked)
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)
    loss.backward()
    grad = scores[0].grad
    assert grad[0, [1, 3]].abs().sum() > 0 and grad[0, [0, 2]].abs().sum() == 0  # only the pair's scores move
    even = raw.clone()
    even[0, 3], even[1, 2] = even[0, 1], even[1, 0]
    assert coreference_loss([even], same, asked).abs() < 1e-6  # equal scores: an even split costs nothing
    assert coreference_loss(scores, same, torch.tensor([False, True])) > 0
    assert coreference_loss(scores, same, torch.tensor([False, False])).item() == 0.0


def test_cli_trains_with_colorless_captions_or_more_objects_and_checks_the_shares(tiny_dir, tmp_path):
    out = tmp_path / "c"
    r = train_briefly(out, stage_file(tmp_path / "c.json", init_from=str(tiny_dir), colorless_rate=0.5, steps=1))
    assert r.exit_code == 0, r.output
    assert run_meta(out)["train_config"]["colorless_rate"] == 0.5
    r = train_briefly(
        tmp_path / "m", stage_file(tmp_path / "m.json", init_from=str(tiny_dir), multi_object_rate=0.25, steps=1)
    )
    assert r.exit_code == 0, r.output
    assert run_meta(tmp_path / "m")["train_config"]["multi_object_rate"] == 0.25
    for key in ("colorless_rate", "t_uniform", "multi_object_rate"):
        r = train_briefly(tmp_path / "bad", stage_file(tmp_path / "bad.json", **{key: 1.5}))
        assert r.exit_code == 2 and f"'{key}' must be between 0 and 1, not 1.5" in r.output, r.output
    assert not (tmp_path / "bad").exists()


def test_stage_files_are_checked_key_by_key_with_one_clear_error(tmp_path):
    stage = load_stage(
        stage_file(
            tmp_path / "ok.json",
            lr=1e-3,
            object_weight=4,
            stop_after=1,
            note="n",
            hardware="h",
            reader_weight=0.1,
            reader_blocks=[3, 4],
        )
    )
    assert stage.cfg == TrainConfig(
        steps=2, batch=2, warmup=1, bf16=False, lr=1e-3, object_weight=4.0, reader_weight=0.1, reader_blocks=(3, 4)
    )
    assert (stage.stop_after, stage.note, stage.hardware) == (1, "n", "h")
    assert isinstance(stage.cfg.object_weight, float)
    assert load_stage(stage_file(tmp_path / "defaults.json")).cfg == TrainConfig(steps=2, batch=2, warmup=1, bf16=False)
    for settings, message in (
        ({"lrr": 0.1}, "unknown setting 'lrr' (did you mean 'lr'?); the settings are steps, batch"),
        ({"text_positions": True}, "unknown setting 'text_positions'"),
        ({"steps": 2.5}, "'steps' must be a whole number, not 2.5 (a number)"),
        ({"steps": "10"}, "'steps' must be a whole number, not \"10\" (a string)"),
        ({"steps": True}, "'steps' must be a whole number, not true"),
        ({"bf16": 1}, "'bf16' must be true or false, not 1"),
        ({"lr": 0}, "'lr' must be above 0, not 0"),
        ({"batch": 0}, "'batch' must be at least 1, not 0"),
        ({"ema": 1.0}, "'ema' must be at least 0 and below 1, not 1"),
        ({"caption_dropout": -0.1}, "'caption_dropout' must be between 0 and 1, not -0.1"),
        ({"reader_blocks": [3, "4"]}, "'reader_blocks' must be a list of whole numbers"),
        ({"init_from": None}, "'init_from' must be a string, not null"),
        ({"prediction": "noise", "init_from": "shapes"}, "'prediction' must be one of '', 'velocity', 'sample'"),
        ({"note": 3}, "'note' must be a string, not 3"),
        ({"stop_after": 0}, "'stop_after' must be a step count, 1 or more (or null), not 0"),
        ({"stop_after": 3}, "'stop_after' (3) is past the schedule's 2 steps"),
        ({"patch": 4}, "patch, prediction, drop_text_mixing and text_neighbours change the init_from weights"),
    ):
        path = stage_file(tmp_path / "bad.json", **settings)
        with pytest.raises(ConceptAttentionError, match="bad.json: " + re.escape(message)):
            load_stage(path)
    with pytest.raises(ConceptAttentionError, match="must hold a JSON object of training settings, not a list"):
        stage_settings([], "x.json")
    (tmp_path / "broken.json").write_text('{"steps": 2,}')
    with pytest.raises(ConceptAttentionError, match=re.escape("broken.json is not valid JSON (line 1, column 13")):
        load_stage(tmp_path / "broken.json")
    with pytest.raises(ConceptAttentionError, match="no stage config at .*missing.json"):
        load_stage(tmp_path / "missing.json")
    # through the CLI: one error line, exit status 2, nothing written
    r = train_briefly(tmp_path / "out", stage_file(tmp_path / "bad.json", lrr=0.1))
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "out").exists()
    r = train_briefly(tmp_path / "out", tmp_path / "missing.json")
    assert r.exit_code == 2 and "error: no stage config at" in r.output
    r = train_briefly(tmp_path / "out", stage_file(tmp_path / "ok.json"), "--precision", "fp16")
    assert r.exit_code == 2 and "--precision must be bf16 or fp32, not 'fp16'" in r.output


def test_the_front_end_trains_a_stage_resumes_it_and_overrides_its_precision_and_stop(tiny_dir, tmp_path):
    config = stage_file(tmp_path / "s.json", init_from=str(tiny_dir), steps=3, stop_after=2, bf16=True)
    out = tmp_path / "run"
    r = train_briefly(out, config, "--precision", "fp32")
    assert r.exit_code == 0 and f"weights: {out / 'weights'}" in r.output, r.output
    meta = run_meta(out)
    assert meta["steps"] == 2 and meta["train_config"]["bf16"] is False  # the stage's stop; the precision overridden
    r = train_briefly(out, config)  # the stage's own precision is not the run's: refused
    assert r.exit_code == 2 and "bf16 false there, true now" in r.output, r.output
    r = train_briefly(out, config, "--precision", "fp32", "--stop-after", "3")  # resumed past the stage's stop
    assert r.exit_code == 0, r.output
    assert run_meta(out)["steps"] == 3
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 3]
    r = CliRunner().invoke(app, ["train-shapes", "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "Missing option '--config'" in r.output
    r = CliRunner().invoke(app, ["train-shapes", "--config", str(config), "--out", str(out), "--steps", "4"])
    assert r.exit_code == 2 and "No such option: --steps" in r.output  # a stage's settings come from its file only
