"""Text encoder, training (loss goes down, exact resume) and the shapes pipeline/CLI on a tiny config."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conceptattention import ConceptAttentionError
from conceptattention.cli import app
from conceptattention.pipelines.shapes import ShapesPipeline
from conceptattention.shapes import world
from conceptattention.shapes.model import WORD_TO_ID, ShapesConfig, ShapesModel, pack, tokenize, unpack
from conceptattention.shapes.train import TrainConfig, batch_loss, read_blocks, reader_heads, text_reads, train

TINY = ShapesConfig(text_dim=32, text_layers=1, text_heads=2, num_layers=3, num_single_layers=1,
                    attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6))


def train_briefly(out: Path, *options: str, steps: int = 2):
    """``train-shapes`` for a few float32 steps at batch 2 (the CLI result)."""
    return CliRunner().invoke(app, ["train-shapes", "--out", str(out), *options, "--steps", str(steps), "--batch", "2",
                                    "--precision", "fp32", "--quiet"])


def run_meta(run: Path) -> dict:
    """The metadata a train-shapes run exports next to its weights (config, steps, train_config)."""
    return json.loads((run / "weights" / "config.json").read_text())


def generate_briefly(model: Path, out: Path):
    """``generate`` of one short caption in two steps with ``model`` (the CLI result)."""
    return CliRunner().invoke(app, ["generate", "a red circle", "--concepts", "circle", "red", "--model", str(model),
                                    "--steps", "2", "--out", str(out), "--quiet"])


def saved_without(weights: Path, field: str, out: Path) -> Path:
    """A copy of ``weights`` whose config lacks ``field``, as weights saved before that field existed."""
    meta = json.loads((weights / "config.json").read_text())
    meta["config"].pop(field)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(meta))
    (out / "model.safetensors").write_bytes((weights / "model.safetensors").read_bytes())
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_shapes")
    ShapesModel(TINY).save(directory)
    return directory


def test_tokenize_and_unknown_words():
    ids = tokenize(["a red circle", "grass"], 6)
    assert ids.shape == (2, 6) and ids[1, 1:].eq(0).all()
    with pytest.raises(ConceptAttentionError, match="does not know 'dog'.*vocabulary is: a an and .*background"):
        tokenize(["a dog"], 6)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 3, 64, 64)
    for p in (4, 8):
        tokens = pack(x, p)
        assert tokens.shape == (2, (64 // p) ** 2, 3 * p * p)
        assert torch.equal(unpack(tokens, p), x)
    # token (row 1, col 2) of an 8x8 patching holds pixels [8:16, 16:24]
    assert torch.equal(pack(x, 8)[0, 1 * 8 + 2].view(3, 8, 8), x[0, :, 8:16, 16:24])


def test_concepts_are_encoded_alone_as_first_token():
    model = ShapesModel(TINY).eval()
    with torch.no_grad():
        embeds = model.encode_concepts(["circle", "red"])
        tokens, _ = model.encode_text(["circle"])
    assert embeds.shape == (2, TINY.text_dim)
    torch.testing.assert_close(embeds[0], tokens[0, 0])
    with pytest.raises(ConceptAttentionError, match="not one word"):
        model.encode_concepts(["red circle"])


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
    from conceptattention.shapes.train import lr_at

    cfg = TrainConfig(steps=6, batch=4, bf16=False, checkpoint_every=100, log_every=1, warmup=2)
    whole = torch.load(train(tmp_path / "whole", cfg, TINY, progress=False).parent / "checkpoint.pt",
                       weights_only=True)
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
    cfg = TrainConfig(steps=2, batch=2, bf16=False, checkpoint_every=1, log_every=1, warmup=1, reader_weight=0.1,
                      reader_blocks=(0, -1))
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
    from conceptattention.shapes import world
    from conceptattention.shapes.train import pixel_weights

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


def test_pipeline_generate_and_encode(tiny_dir, tmp_path):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    res = pipe.generate("a red circle on grass", ["circle", "grass", "red"], steps=3, seed=1)
    assert res.maps.shape == (3, 64, 64) and res.token_maps.shape == (3, 8, 8)
    torch.testing.assert_close(res.maps.sum(0), torch.ones(64, 64), rtol=1e-4, atol=1e-4)
    again = pipe.generate("a red circle on grass", ["circle", "grass", "red"], steps=3, seed=1)
    assert np.array_equal(np.asarray(res.image), np.asarray(again.image))
    files = res.save(tmp_path / "gen")
    maps = np.load(files["maps"])
    assert maps.dtype == np.float32 and maps.shape == (3, 64, 64)
    assert Image.open(files["grid"]).size[0] == 4 * (192 + 4)
    info = json.loads(files["result"].read_text())
    assert info["concepts"] == ["circle", "grass", "red"] and info["steps"] == 3

    enc = pipe.encode(files["image"], ["circle", "grass"], caption="a red circle on grass", samples=3, seed=2)
    singles = [pipe.encode(files["image"], ["circle", "grass"], caption="a red circle on grass", samples=1, seed=s)
               for s in (10, 11)]
    assert enc.maps.shape == (2, 64, 64) and torch.isfinite(enc.maps).all()
    assert not torch.allclose(singles[0].token_maps, singles[1].token_maps)


def test_encode_batched_samples_equal_mean_of_single_runs(tiny_dir):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    # 8-bit pixel values, as from an image file (encode reads images as 8-bit RGB)
    image = (torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    caption, words = "a blue circle in the sky", ["circle", "sky"]
    batched = pipe.encode(image, words, caption=caption, samples=3, seed=4)
    singles = [pipe.encode(image, words, caption=caption, samples=1, seed=4 + i) for i in range(3)]
    assert batched.settings["layers"] == [2]
    mean = torch.stack([r.token_maps for r in singles]).mean(0)
    torch.testing.assert_close(batched.token_maps, mean, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(singles[0].token_maps, singles[1].token_maps)


def test_bad_inputs(tiny_dir, tmp_path):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    with pytest.raises(ConceptAttentionError, match="concept list is empty"):
        pipe.generate("a red circle", [])
    with pytest.raises(ConceptAttentionError, match="does not know 'dog'"):
        pipe.generate("a red circle", ["dog"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ConceptAttentionError, match="cannot read .*broken.png as an image"):
        pipe.encode(bad, ["circle"])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ConceptAttentionError, match="image file is empty"):
        pipe.encode(empty, ["circle"])
    with pytest.raises(ConceptAttentionError, match="not found"):
        pipe.encode(tmp_path / "missing.png", ["circle"])
    tiny = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(tiny)
    with pytest.raises(ConceptAttentionError, match="1x1 pixels"):
        pipe.encode(tiny, ["circle"])
    gray, rgba = tmp_path / "gray.png", tmp_path / "rgba.png"
    Image.new("L", (30, 50), 128).save(gray)
    Image.new("RGBA", (70, 40), (255, 0, 0, 128)).save(rgba)
    for path in (gray, rgba):
        assert pipe.encode(path, ["circle"]).maps.shape == (1, 64, 64)
    with pytest.raises(ConceptAttentionError, match="no shapes model in"):
        ShapesPipeline.from_pretrained(tmp_path)


def test_encode_center_crops_a_non_square_image_and_records_it(tiny_dir, tmp_path):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    wide = np.zeros((200, 300, 3), np.uint8)
    wide[:, :50], wide[:, 50:250], wide[:, 250:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)  # margins differ
    Image.fromarray(wide).save(tmp_path / "wide.png")
    res = pipe.encode(tmp_path / "wide.png", ["circle", "sky"], caption="a blue circle in the sky", samples=1)
    seen = np.asarray(res.image)
    assert seen.shape == (64, 64, 3) and (seen == (0, 0, 255)).all()  # the centre only, not squashed margins
    assert res.settings["input_fit"] == "center-crop 300x200 to 200x200, resized to 64x64"
    centre = pipe.encode(Image.fromarray(wide[:, 50:250]).resize((64, 64), Image.BICUBIC), ["circle", "sky"],
                         caption="a blue circle in the sky", samples=1)
    torch.testing.assert_close(res.token_maps, centre.token_maps)  # the maps are those of the centre
    assert centre.settings["input_fit"] == "unchanged (64x64)"
    big = pipe.encode(Image.new("RGB", (128, 128), "red"), ["circle"], samples=1)
    assert big.settings["input_fit"] == "resized 128x128 to 64x64"
    assert pipe.encode(torch.rand(3, 64, 64), ["circle"], samples=1).settings["input_fit"] == "unchanged (64x64)"
    info = json.loads(res.save(tmp_path / "out")["result"].read_text())
    assert info["input_fit"] == res.settings["input_fit"]


def test_cli_generate_encode_and_errors(tiny_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli_gen"
    r = runner.invoke(app, ["generate", "a red circle and a blue square on grass", "--concepts", "circle", "square",
                            "grass", "--out", str(out), "--model", str(tiny_dir), "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert np.load(out / "maps.npy").shape == (3, 64, 64)
    for name in ("image.png", "grid.png", "segmentation.png", "maps_raw.npy", "result.json", "circle.png", "grass.png"):
        assert (out / name).is_file()
    r = runner.invoke(app, ["encode", str(out / "image.png"), "--concepts", "circle", "--caption", "a red circle",
                            "--out", str(tmp_path / "cli_enc"), "--model", str(tiny_dir)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cli_enc" / "result.json").read_text())["mode"] == "encode"
    r = runner.invoke(app, ["generate", "a red dog", "--concepts", "circle", "--model", str(tiny_dir),
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "error: the shapes model does not know 'dog'" in r.output
    r = runner.invoke(app, ["encode", str(tmp_path / "nope.png"), "--concepts", "circle", "--model", str(tiny_dir)])
    assert r.exit_code == 2 and "image file not found" in r.output


def test_sampler_timestep_shift(tiny_dir, tmp_path):
    from conceptattention.shapes.model import sampling_times

    assert torch.equal(sampling_times(4), torch.linspace(1.0, 0.0, 5))  # shift 1: evenly spaced, as before
    # shift s maps u to s u / (1 + (s - 1) u): u = 1/2 -> s / (s + 1), u = 1/4 -> s / (s + 3)
    assert sampling_times(4, 3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    for bad, message in (((0, 1.0), "at least 1"), ((4, 0.0), "must be positive"), ((4, float("nan")), "must be positive")):
        with pytest.raises(ConceptAttentionError, match=message):
            sampling_times(*bad)

    # the sampler calls the model at exactly those noise levels: given shift, else the model's default
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    seen = []

    def velocity(x_t, t, tokens, pooled):
        seen.append(sorted(set(t.tolist())))
        return torch.zeros_like(x_t)

    pipe.model.velocity = velocity
    pipe.sample(["a red circle"], [0], steps=2, shift=3.0)
    assert seen == [[1.0], [0.75]]
    seen.clear()
    pipe.model.config.default_shift = 7.0
    pipe.sample(["a red circle"], [0], steps=2)
    assert seen[1] == [pytest.approx(7 / 8)]

    # the CLI: --shift reaches the sampler and result.json; for a diffusers model it is refused before loading
    runner = CliRunner()
    r = runner.invoke(app, ["generate", "a red circle", "--concepts", "circle", "--model", str(tiny_dir), "--steps", "2",
                            "--shift", "3", "--out", str(tmp_path / "g"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g" / "result.json").read_text())["shift"] == 3.0
    r = runner.invoke(app, ["generate", "a dog", "--concepts", "dog", "--model", str(tmp_path / "no-such-flux"),
                            "--shift", "3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--shift sets the shapes model's sampler" in r.output
    assert not (tmp_path / "x").exists()
    r = runner.invoke(app, ["shapes-benchmark", "--model", str(tiny_dir), "--images", "3", "--sample-images", "3",
                            "--shift", "3", "--out", str(tmp_path / "b"), "--quiet"])
    assert r.exit_code == 0, r.output
    samples = json.loads((tmp_path / "b" / "shapes_benchmark.json").read_text())["samples"]
    assert samples["shift"] == 3.0
    # the breakdowns partition the objects: by count in the caption, and each wrong shape has one reason
    groups = samples["by_objects"].values()
    assert sum(g["images"] for g in groups) == 3 and sum(g["objects"] for g in groups) == samples["objects"]
    right = sum(g["shapes_right"] for g in groups)
    assert right == round(samples["shape_accuracy"] * samples["objects"])
    assert sum(samples["shape_errors"].values()) == samples["objects"] - right
    # the no-binding baseline: every object of a one-object caption, and the groups add up to the total
    if "1" in samples["by_objects"]:
        assert samples["by_objects"]["1"]["unbound_shapes_right"] == samples["by_objects"]["1"]["objects"]
    assert sum(g["unbound_shapes_right"] for g in groups) == pytest.approx(samples["unbound_shape_accuracy"] * samples["objects"])
    assert "Shapes right by objects in the caption: " in r.output
    assert "| steps 20, guidance 4.0, shift 3.0 | 3 |" in r.output
    n = samples["objects"]  # each accuracy is printed with its count, which a rounded share could hide
    assert f"% ({right} of {n}) |" in r.output and f"% ({round(samples['color_accuracy'] * n)} of {n}) |" in r.output


def test_model_card_lists_every_training_stage(tiny_dir, tmp_path):
    import shutil

    from conceptattention.shapes.card import stage_record, training_minutes, write_card

    # a resumed run: the clock restarts at 0 in the second segment -> 2 + 3 minutes
    assert training_minutes([{"seconds": 60}, {"seconds": 120}, {"seconds": 60}, {"seconds": 180}]) == 5.0
    runs = []
    for i, (steps, init) in enumerate(((40, ""), (20, "shapes"))):
        run = tmp_path / f"run{i}"
        (run / "weights").mkdir(parents=True)
        meta = {"config": {"prediction": "sample", "patch": 4, "text_layers": 0} if i else {"patch": 8}, "steps": steps, "train_config": {"lr": 0.001 * (i + 1), "init_from": init, "seed": i,
                                                                "warmup": 5, "object_weight": 1.0 + 3 * i,
                                                                **({"multi_object_rate": 0.5, "reader_weight": 0.05, "reader_blocks": [3, 5], "reader_at": "attention", "concept_weight": 0.02, "coreference_weight": 0.002} if i else {})}}
        (run / "weights" / "config.json").write_text(json.dumps(meta))
        (run / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s, "seconds": 6.0 * s})
                                                  for s in range(10, steps + 1, 10)))
        runs.append(stage_record(run, f"train-shapes --out run{i}", "a note" if i == 0 else "", "a GPU" if i else ""))
    weights = tmp_path / "weights"
    shutil.copytree(tiny_dir, weights)
    maps = {"images": 1, "seed": 7, "layers": [1], "t": 0.5, "samples": 1, "concepts": ["circle"],
            "readouts": {"concept_attention": {"pixel_accuracy": 0.5, "miou": 0.4, "paper_compatible_miou": 0.33,
                                               "map": 0.6, "shape_pick": 0.7}}}
    card = write_card(weights, runs, {"maps": maps, "samples": None}, {"seed": 1}, "a test machine").read_text()
    assert "| 1 | scratch | 40 | 0.001 |" in card and "| 2 | stage 1 weights | 20 | 0.002 |" in card
    assert "| a test machine | 4 | `train-shapes --out run0`" in card and "| a GPU | 2 | `train-shapes --out run1`" in card
    assert "`train-shapes --out run1`" in card and "Stage 1: a note" in card and "60 steps in 2 stage(s)" in card
    # each stage's reading weight and map objectives (0 and none for a config from before the options), patch
    # size, text layers (2 likewise) and what it predicts
    assert "| 1.0 | 0.0 | 0.0 | 0.0 | 0.0 | none | 8 | 2 | velocity |" in card
    assert ("| 4.0 | 0.0 | 0.0 | 0.5 | 0.05 at blocks 3, 5 (attention outputs) | image labels 0.02, co-reference 0.002 "
            "| 4 | 0 | sample |") in card
    assert "RoPE positions are token indices" not in card  # positions are plain token indices (rope_scale 1)
    assert "prompt tokens' position ids:\n  zeros, as Flux's pipelines pass them;" in card
    assert "| 60 | 0.0500 |" in card  # the second stage's last log line, counted from the first stage
    assert "| 70.0% | n/a |" in card  # a report from before the colour pick existed still renders
    assert (weights / "loss_curve.png").is_file()
    assert "shape pick and colour pick" not in card  # the shipped card's layers were chosen by mIoU alone
    chosen = {"seed": 1, "concept_attention_by_layers": {"1": {"miou": 0.4, "score": 0.5}}}
    card = write_card(weights, runs, {"maps": maps, "samples": None}, chosen, "a test machine").read_text()
    assert "the layers by the mean of the maps' mIoU, shape pick and colour pick, the guidance, then the shift" in card
    for record, says in (({"colour_plus_shape_accuracy_by_guidance_and_shift": {"6.0,6.0": 1.8}}, "shift together"),
                         ({"sampler_kept_from_the_previous_release": {"guidance": 6.0, "shift": 6.0}}, "shift kept from the previous release")):
        card = write_card(weights, runs, {"maps": maps, "samples": None}, {**chosen, **record}, "a machine").read_text()
        assert f"shape pick and colour pick; the guidance and {says}" in card


def test_recorded_stages_give_the_card_a_loss_log_without_the_run_directories(tiny_dir, tmp_path):
    import shutil

    from conceptattention.shapes.card import loss_points, recorded_stages, stage_record, write_card

    log = [{"step": s, "loss": 1.0 / s, "seconds": s} for s in range(1, 252)]
    points = loss_points(log, most=100)  # every third record, and the last
    assert [p[0] for p in points] == list(range(1, 252, 3)) + [251] and points[1] == [4, 0.25]
    assert loss_points([]) == []
    runs = []
    for i, steps in enumerate((40, 20)):
        run = tmp_path / f"run{i}"
        (run / "weights").mkdir(parents=True)
        (run / "weights" / "config.json").write_text(json.dumps({"config": {}, "steps": steps, "train_config": {}}))
        (run / "weights" / "model.safetensors").write_bytes(b"")  # present (only the release script looks)
        (run / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s, "seconds": 6.0 * s})
                                                  for s in range(10, steps + 1, 10)))
        runs.append(stage_record(run, f"train-shapes --out run{i}"))
    weights = tmp_path / "weights"
    shutil.copytree(tiny_dir, weights)
    maps = {"images": 1, "seed": 7, "layers": [1], "t": 0.5, "samples": 1, "concepts": ["circle"],
            "readouts": {"concept_attention": {"pixel_accuracy": 0.5, "miou": 0.4, "paper_compatible_miou": 0.3,
                                               "map": 0.6, "shape_pick": 0.7}}}
    write_card(weights, runs, {"maps": maps, "samples": None}, {"seed": 1}, "a test machine")
    meta = json.loads((weights / "config.json").read_text())
    meta["stages"] = [{k: v for k, v in st.items() if k != "log"} for st in runs]  # as release_shapes.py stores them
    (weights / "config.json").write_text(json.dumps(meta))
    again = recorded_stages(weights)
    assert [st["loss_points"] for st in again] == [[[10, 0.1], [20, 0.05], [30, 0.033333], [40, 0.025]],
                                                   [[10, 0.1], [20, 0.05]]]
    assert again[1]["log"][1] == {"step": 20, "loss": 0.05} and again[0]["command"] == "train-shapes --out run0"
    # stages released before loss points were kept: the card's loss table, split at the stage boundaries
    for st in meta["stages"]:
        del st["loss_points"]
    (weights / "config.json").write_text(json.dumps(meta))
    from_card = recorded_stages(weights)  # the card lists every log line here, and the last one twice
    assert [st["loss_points"] for st in from_card] == [[[10, 0.1], [20, 0.05], [30, 0.0333], [40, 0.025]],
                                                       [[10, 0.1], [20, 0.05], [20, 0.05]]]
    write_card(weights, from_card, {"maps": maps, "samples": None}, {"seed": 1}, "a test machine")  # redraws

    # scripts/release_shapes.py: a listed stage whose run directory is gone comes from the shipped record
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "release_shapes.py"
    spec = importlib.util.spec_from_file_location("release_shapes", path)
    release = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(release)
    release.WEIGHTS_DIR = weights
    shutil.rmtree(tmp_path / "run0")
    listed = [{"run": str(tmp_path / f"run{i}"), "command": f"train-shapes --out run{i}", "note": f"n{i}"} for i in (0, 1)]
    gathered = release.gather_stages(listed)
    assert gathered[0]["loss_points"] == from_card[0]["loss_points"] and gathered[0]["note"] == "n0"
    assert gathered[1]["log"] == runs[1]["log"] and gathered[1]["note"] == "n1"  # read from its run directory
    with pytest.raises(SystemExit, match="records no stage 1 with that command"):
        release.gather_stages([{**listed[0], "command": "something else"}, listed[1]])
    assert release.released_weights(listed) == tmp_path / "run1" / "weights"
    shutil.rmtree(tmp_path / "run1")
    # the released stage's directory gone too: the shipped model records both stages, so it is that stage's
    recorded = [st["loss_points"] for st in recorded_stages(weights)]
    assert [st["loss_points"] for st in release.gather_stages(listed)] == recorded and len(recorded) == 2
    assert release.released_weights(listed) == weights
    third = listed + [{"run": str(tmp_path / "run2"), "command": "train-shapes --out run2"}]
    with pytest.raises(SystemExit, match="the released stage itself must be present"):
        release.gather_stages(third)  # a new stage the shipped model does not record
    assert release.released_weights(third) == tmp_path / "run2" / "weights"


def test_choose_sampler_searches_the_whole_grid_and_resumes_from_its_cache(tiny_dir, tmp_path, monkeypatch):
    from conceptattention.shapes import benchmark

    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    cache = tmp_path / "validation_samples.jsonl"
    guidance, shift, scores = benchmark.choose_sampler(pipe, (2.0, 4.0), (1.0, 3.0), n=2, cache=cache, tag="w1",
                                                       progress=False)
    assert sorted(scores) == ["2.0,1.0", "2.0,3.0", "4.0,1.0", "4.0,3.0"]
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert [(r["guidance"], r["shift"], r["tag"]) for r in lines] == [(2.0, 1.0, "w1"), (2.0, 3.0, "w1"),
                                                                     (4.0, 1.0, "w1"), (4.0, 3.0, "w1")]
    # every score is that pair's colours + shapes right on the validation seed, and the best pair is returned
    direct = benchmark.sample_quality(pipe, 2, benchmark.VALIDATION_SEED, guidance=4.0, shift=3.0, progress=False)
    assert scores["4.0,3.0"] == pytest.approx(direct["color_accuracy"] + direct["shape_accuracy"])
    assert scores[f"{guidance},{shift}"] == max(scores.values())

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached pair was sampled again")

    monkeypatch.setattr(benchmark, "sample_quality", no_sampling)
    assert benchmark.choose_sampler(pipe, (2.0, 4.0), (1.0, 3.0), n=2, cache=cache, tag="w1") == (guidance, shift, scores)
    with pytest.raises(AssertionError, match="sampled again"):  # other weights (tag) or another size: measured anew
        benchmark.choose_sampler(pipe, (2.0,), (1.0,), n=2, cache=cache, tag="w2")
    with pytest.raises(ValueError, match="at least one"):
        benchmark.choose_sampler(pipe, (), (1.0,), n=2)


def test_budgeted_training_exports_small_shards_that_join_back(tiny_dir, tmp_path):
    """scripts/gpu_train_shapes.py: a timed stage exported as shards under a size cap, joined back bit for bit."""
    import importlib.util
    import sys

    from safetensors.torch import load_file

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_train_shapes.py"
    spec = importlib.util.spec_from_file_location("gpu_train_shapes", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run, export, joined = tmp_path / "run", tmp_path / "export", tmp_path / "joined"
    argv = [str(path), "--run", str(run), "--export", str(export), "--device", "cpu", "--budget", "600", "--chunk", "0.1",
            "--chunk-overhead", "0", "--margin", "1", "--probe-steps", "4", "--max-steps", "3",
            "--batch", "2", "--init-from", str(tiny_dir), "--shard-mb", "0.05", "--precision", "fp32",
            "--binding-images", "30"]
    old_argv, sys.argv = sys.argv, argv
    try:
        script.main()
    finally:
        sys.argv = old_argv
    summary = json.loads((export / "summary.json").read_text())
    steps = run_meta(run)["steps"]
    assert summary["steps_done"] == steps == summary["planned_steps"] == 3
    # the binding measure after every chunk, the last one at the exported step
    bound = summary["binding_t0.9"]
    assert bound[-1]["step"] == 3 and all(r["order"] >= 0 and 0 <= r["prefers"] <= 1 for r in bound)
    shards = sorted(export.glob("model-*.safetensors"))
    assert len(shards) == summary["shards"] > 1
    largest_tensor = max(t.numel() * t.element_size() for t in load_file(str(run / "weights" / "model.safetensors")).values())
    assert all(s.stat().st_size <= max(0.05e6, largest_tensor) + 10_000 for s in shards)  # cap, plus a header
    script.join(export, joined)
    a, b = load_file(str(run / "weights" / "model.safetensors")), load_file(str(joined / "weights" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (joined / "log.jsonl").read_text() == (run / "log.jsonl").read_text()


def test_cli_trains_a_new_architecture_from_scratch_and_it_runs_end_to_end(tmp_path, tiny_dir):
    """`train-shapes --patch 4 ...` (the next model's shape: 16x16 tokens) trains, saves, and generates maps."""
    from conceptattention.shapes.model import rope_axes

    assert rope_axes(32) == (4, 14, 14) and rope_axes(128) == (16, 56, 56) and sum(rope_axes(16)) == 16
    runner = CliRunner()
    out = tmp_path / "p4"
    r = runner.invoke(app, ["train-shapes", "--out", str(out), "--steps", "2", "--batch", "2", "--patch", "4",
                            "--layers", "2", "--single-layers", "1", "--heads", "2", "--head-dim", "16", "--precision", "fp32",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    config = run_meta(out)["config"]
    assert (config["patch"], config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (4, 2, 2, 16)
    r = generate_briefly(out / "weights", tmp_path / "gen")
    assert r.exit_code == 0, r.output
    maps = np.load(tmp_path / "gen" / "maps.npy")
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
    # the architecture of a resumed run cannot be changed, nor that of --init-from weights but for their patch size
    for extra in (["--out", str(out), "--patch", "4"], ["--out", str(tmp_path / "q"), "--init-from", str(tiny_dir),
                                                         "--layers", "2"]):
        r = runner.invoke(app, ["train-shapes", *extra, "--steps", "3", "--quiet"])
        assert r.exit_code == 2 and "keeps its architecture" in r.output and "only --patch" in r.output
    r = runner.invoke(app, ["train-shapes", "--out", str(tmp_path / "bad"), "--patch", "5", "--quiet"])
    assert r.exit_code == 2 and "must divide 64" in r.output


def test_sample_prediction_turns_the_clean_image_guess_into_the_flow_velocity(tiny_dir, tmp_path):
    """A sample-predicting model's velocity is (x_t - x0_hat) / t: one Euler step from t to 0 lands on its guess."""
    from conceptattention.shapes.model import SAMPLE_T_MIN

    torch.manual_seed(0)
    model = ShapesModel(replace(TINY, prediction="sample")).eval()
    tokens, pooled = model.encode_text(["a red circle", "grass"])
    x_t = torch.randn(2, model.grid ** 2, 3 * TINY.patch ** 2)
    t = torch.tensor([0.6, 0.01])
    with torch.no_grad():
        guess = model.transformer(**model.transformer_inputs(x_t, t, tokens, pooled))[0]
        v = model.velocity(x_t, t, tokens, pooled)
    torch.testing.assert_close(x_t[0] - 0.6 * v[0], guess[0])  # t above the floor: exact
    torch.testing.assert_close(v[1], (x_t[1] - guess[1]) / SAMPLE_T_MIN)  # below it: divided by the floor
    # a velocity model's output is its velocity
    plain = ShapesModel.load(tiny_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.velocity(x_t, t, tokens, pooled),
                                   plain.transformer(**plain.transformer_inputs(x_t, t, tokens, pooled))[0])

    # switching a velocity model to samples restarts only the output projection, and the choice is saved
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    plain.predict_as("sample")
    changed = {k for k, v in plain.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"transformer.proj_out.weight", "transformer.proj_out.bias"}
    assert plain.transformer.proj_out.weight.abs().sum() == 0
    plain.save(tmp_path / "s")
    assert ShapesModel.load(tmp_path / "s").config.prediction == "sample"
    assert ShapesModel.load(tiny_dir).config.prediction == "velocity"  # the default of older weights
    with pytest.raises(ConceptAttentionError, match="prediction must be one of velocity, sample"):
        plain.predict_as("noise")


def test_cli_fine_tunes_into_sample_prediction_and_refuses_it_on_resume(tiny_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "x"
    r = train_briefly(out, "--init-from", str(tiny_dir), "--prediction", "sample")
    assert r.exit_code == 0, r.output
    assert run_meta(out)["config"]["prediction"] == "sample"
    r = generate_briefly(out / "weights", tmp_path / "gen")
    assert r.exit_code == 0, r.output
    assert np.isfinite(np.load(tmp_path / "gen" / "maps.npy")).all()
    r = runner.invoke(app, ["train-shapes", "--out", str(out), "--prediction", "velocity", "--steps", "3", "--quiet"])
    assert r.exit_code == 2 and "fix what the model predicts" in r.output
    r = runner.invoke(app, ["train-shapes", "--out", str(tmp_path / "y"), "--prediction", "noise", "--quiet"])
    assert r.exit_code == 2 and "'velocity' or 'sample'" in r.output


def test_repatch_keeps_every_block_and_reads_small_patches_as_tiled_large_ones(tiny_dir):
    """8x8 -> 4x4: a token of a 4x4 patch embeds like the 8x8 patch made of four copies of it, the head predicts
    a 4x4 patch as the mean of the 8x8 head's four quadrants, RoPE positions keep their unit, and nothing else moves."""
    old = ShapesModel.load(tiny_dir).eval()
    new = ShapesModel.load(tiny_dir).eval()
    new.repatch(4)
    assert (new.config.patch, new.config.rope_scale, new.grid) == (4, 0.5, 16)
    kept = {k: v for k, v in old.state_dict().items() if ".x_embedder." not in k and not k.startswith("transformer.proj_out.")}
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in kept.items())

    torch.manual_seed(1)
    small = torch.randn(5, 3, 4, 4)
    tiled = small.repeat(1, 1, 2, 2)  # [5, 3, 8, 8]: the 4x4 patch in each quadrant
    with torch.no_grad():
        torch.testing.assert_close(new.transformer.x_embedder(small.reshape(5, -1)),
                                   old.transformer.x_embedder(tiled.reshape(5, -1)))
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
        new.repatch(3)


def test_cli_repatches_init_weights_and_the_result_generates_maps_on_the_finer_grid(tiny_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r"
    r = train_briefly(out, "--init-from", str(tiny_dir), "--patch", "4")
    assert r.exit_code == 0, r.output
    meta = run_meta(out)
    assert (meta["config"]["patch"], meta["config"]["rope_scale"], meta["train_config"]["patch"]) == (4, 0.5, 4)
    # a run directory is a model too (its weights/ are read); maps come on the 16x16 token grid
    r = generate_briefly(out, tmp_path / "gen")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "gen" / "result.json").read_text())
    assert result["token_grid"] == [16, 16] and np.load(tmp_path / "gen" / "maps.npy").shape == (2, 64, 64)
    # resuming it keeps the new patch size; a size that does not divide the weights' is one clear error
    r = train_briefly(out, steps=3)
    assert r.exit_code == 0, r.output
    assert run_meta(out)["config"]["patch"] == 4
    r = runner.invoke(app, ["train-shapes", "--out", str(tmp_path / "bad"), "--init-from", str(tiny_dir), "--patch", "3",
                            "--quiet"])
    assert r.exit_code == 2 and "size that divides 8, not 3" in r.output
    with pytest.raises(ConceptAttentionError, match="re-patches --init-from weights"):
        train(tmp_path / "scratch", TrainConfig(steps=1, batch=2, patch=4, bf16=False), TINY)


def test_drop_text_mixing_makes_each_prompt_token_its_word_plus_its_position(tiny_dir):
    """Without mixing, a prompt token is norm(embedding + position): it does not depend on the other words, and a
    concept alone equals the same word at position 0 of a caption; the transformer is untouched."""
    old = ShapesModel.load(tiny_dir).eval()
    model = ShapesModel.load(tiny_dir).eval()
    model.drop_text_mixing()
    assert model.config.text_layers == 0 and model.text_encoder.config.text_layers == 0
    assert all(torch.equal(v, model.transformer.state_dict()[k]) for k, v in old.transformer.state_dict().items())
    enc = old.text_encoder
    with torch.no_grad():
        tokens, pooled = model.encode_text(["a red circle", "red"])
        ids = tokenize(["a red circle"], TINY.max_tokens)[0, :3]
        expected = torch.nn.functional.layer_norm(enc.embed.weight[ids] + enc.position[:3], (TINY.text_dim,),
                                                  enc.norm.weight, enc.norm.bias)
        torch.testing.assert_close(tokens[0, :3], expected)
        torch.testing.assert_close(pooled[0], expected.mean(0))
        torch.testing.assert_close(model.encode_concepts(["red"])[0], tokens[1, 0])
        # with mixing, "red" after "a" differs from "red" alone at the same position (the check is not vacuous)
        mixed, _ = old.encode_text(["a red", "a blue"])
        assert not torch.allclose(mixed[0, 0], mixed[1, 0])
    assert not any(k.startswith("text_encoder.layers.") for k in model.state_dict())
    with pytest.raises(ConceptAttentionError, match="cannot be negative, not -1"):
        replace(TINY, text_layers=-1)


def test_cli_drops_text_mixing_of_init_weights_and_the_result_reloads_and_generates(tiny_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "u"
    r = train_briefly(out, "--init-from", str(tiny_dir), "--text-layers", "0")
    assert r.exit_code == 0, r.output
    meta = run_meta(out)
    assert meta["config"]["text_layers"] == 0 and meta["train_config"]["drop_text_mixing"] is True
    reloaded = ShapesModel.load(out / "weights")  # loads strictly: no mixing weights are expected or present
    assert isinstance(reloaded.text_encoder.layers, torch.nn.Identity)
    r = generate_briefly(out, tmp_path / "gen")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "gen" / "maps.npy").shape == (2, 64, 64)
    r = train_briefly(out, steps=3)  # resuming keeps the architecture of the checkpoint
    assert r.exit_code == 0, r.output
    assert run_meta(out)["config"]["text_layers"] == 0
    r = runner.invoke(app, ["train-shapes", "--out", str(tmp_path / "bad"), "--init-from", str(tiny_dir),
                            "--text-layers", "1", "--quiet"])
    assert r.exit_code == 2 and "can only be dropped (--text-layers 0)" in r.output
    assert not (tmp_path / "bad").exists()
    r = runner.invoke(app, ["train-shapes", "--out", str(out), "--text-layers", "0", "--quiet"])
    assert r.exit_code == 2 and "keeps its architecture" in r.output
    # from scratch, --text-layers sets the architecture
    scratch = tmp_path / "s"
    r = train_briefly(scratch, "--text-layers", "0", "--layers", "1", "--single-layers", "1", steps=1)
    assert r.exit_code == 0, r.output
    assert run_meta(scratch)["config"]["text_layers"] == 0


def test_cli_trains_with_colorless_captions_or_more_objects_and_checks_the_shares(tiny_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "c"
    r = train_briefly(out, "--init-from", str(tiny_dir), "--colorless-rate", "0.5", steps=1)
    assert r.exit_code == 0, r.output
    assert run_meta(out)["train_config"]["colorless_rate"] == 0.5
    r = train_briefly(tmp_path / "m", "--init-from", str(tiny_dir), "--multi-object-rate", "0.25", steps=1)
    assert r.exit_code == 0, r.output
    assert run_meta(tmp_path / "m")["train_config"]["multi_object_rate"] == 0.25
    for flag in ("--colorless-rate", "--t-uniform", "--multi-object-rate"):
        r = runner.invoke(app, ["train-shapes", "--out", str(tmp_path / "bad"), flag, "1.5", "--quiet"])
        assert r.exit_code == 2 and f"Invalid value for '{flag}': 1.5 is above 1" in r.output, r.output
    assert not (tmp_path / "bad").exists()


def test_text_positions_give_prompt_tokens_word_order_ids_and_change_what_the_transformer_sees(tiny_dir):
    from conceptattention.shapes.model import text_ids

    assert torch.equal(text_ids(4), torch.zeros(4, 3))  # Flux's convention, the default
    assert text_ids(4, ordered=True).tolist() == [[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0]]
    model = ShapesModel.load(tiny_dir).eval()
    tokens, pooled = model.encode_text(["a red circle and a blue square"])
    x_t, t = torch.randn(1, model.grid ** 2, 3 * model.config.patch ** 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0.6])
    with torch.no_grad():
        before = model.velocity(x_t, t, tokens, pooled)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        model.order_text_positions()
        ids = model.transformer_inputs(x_t, t, tokens, pooled)["txt_ids"]
        after = model.velocity(x_t, t, tokens, pooled)
    assert model.config.text_positions and model.text_encoder.config.text_positions
    assert ids[:, 0].tolist() == list(range(model.config.max_tokens)) and not ids[:, 1:].any()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # no weight changes
    assert not torch.allclose(before, after, atol=1e-5)  # the positions reach the transformer


def test_cli_trains_with_text_positions_and_the_result_reloads_and_generates(tiny_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "p"
    r = train_briefly(out, "--init-from", str(tiny_dir), "--text-positions")
    assert r.exit_code == 0, r.output
    assert run_meta(out)["config"]["text_positions"] is True
    assert ShapesModel.load(out / "weights").config.text_positions
    r = generate_briefly(out, tmp_path / "gen")
    assert r.exit_code == 0, r.output
    # resuming keeps them without the option, and refuses the option itself
    r = train_briefly(out, steps=3)
    assert r.exit_code == 0, r.output
    assert run_meta(out)["config"]["text_positions"] is True
    r = runner.invoke(app, ["train-shapes", "--out", str(out), "--text-positions", "--quiet"])
    assert r.exit_code == 2 and "keeps its own text positions" in r.output
    # weights saved before the option existed load with Flux's zero ids
    assert ShapesModel.load(saved_without(tiny_dir, "text_positions", tmp_path / "old")).config.text_positions is False


def test_text_neighbours_start_as_a_no_op_and_then_add_the_maps_of_the_words_beside_each_token():
    torch.manual_seed(0)
    model = ShapesModel(replace(TINY, text_layers=0)).eval()  # a token is its word and position, then the norm
    captions = ["a red circle and a blue square", "circle"]
    with torch.no_grad():
        plain, plain_pooled = model.encode_text(captions)
        model.mix_text_neighbours()
        zero, zero_pooled = model.encode_text(captions)
    assert model.config.text_neighbours and model.text_encoder.config.text_neighbours
    assert torch.equal(plain, zero) and torch.equal(plain_pooled, zero_pooled)  # the maps start at zero
    enc = model.text_encoder
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        enc.before.weight.copy_(torch.randn(enc.before.weight.shape, generator=g) * 0.1)
        enc.after.weight.copy_(torch.randn(enc.after.weight.shape, generator=g) * 0.1)
        tokens, _ = model.encode_text(captions)
        concepts = model.encode_concepts(["circle", "red"])
        e, pos = enc.embed.weight, enc.position
        ids = [WORD_TO_ID[w] for w in captions[0].split()]
        for i, word in enumerate(ids):  # each word by hand: itself, its position, the maps of its neighbours
            x = e[word] + pos[i]
            if i > 0:
                x = x + enc.before.weight @ e[ids[i - 1]]
            if i + 1 < len(ids):
                x = x + enc.after.weight @ e[ids[i + 1]]
            torch.testing.assert_close(tokens[0, i], enc.norm(x))
        # padding neither lends nor borrows; a word alone (a concept) has no neighbours
        torch.testing.assert_close(tokens[0, len(ids):], plain[0, len(ids):])
        torch.testing.assert_close(tokens[1], plain[1])
        torch.testing.assert_close(concepts[0], plain[1, 0])
        assert (tokens[0, :len(ids)] - plain[0, :len(ids)]).abs().amax() > 1e-2
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.mix_text_neighbours()  # a model that has them keeps them
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_cli_trains_with_text_neighbours_and_the_result_reloads_and_generates(tiny_dir, tmp_path):
    out = tmp_path / "n"
    r = train_briefly(out, "--init-from", str(tiny_dir), "--text-neighbours")
    assert r.exit_code == 0, r.output
    assert run_meta(out)["config"]["text_neighbours"] is True
    loaded = ShapesModel.load(out / "weights")
    assert loaded.config.text_neighbours and loaded.text_encoder.before.weight.abs().amax() > 0  # trained
    assert generate_briefly(out, tmp_path / "gen").exit_code == 0
    r = CliRunner().invoke(app, ["train-shapes", "--out", str(out), "--text-neighbours", "--quiet"])
    assert r.exit_code == 2 and "keeps its own text encoder" in r.output
    old = saved_without(tiny_dir, "text_neighbours", tmp_path / "old")  # weights saved before the option existed
    assert ShapesModel.load(old).config.text_neighbours is False


def test_drop_next_word_keeps_the_previous_words_map_so_only_the_shape_word_carries_the_binding():
    torch.manual_seed(0)
    model = ShapesModel(replace(TINY, text_layers=0)).eval()
    model.mix_text_neighbours()
    enc = model.text_encoder
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        enc.before.weight.copy_(torch.randn(enc.before.weight.shape, generator=g) * 0.1)
        enc.after.weight.copy_(torch.randn(enc.after.weight.shape, generator=g) * 0.1)
    kept = enc.before.weight.clone()
    model.drop_next_word()
    assert model.config.text_next_word is False and model.text_encoder.config.text_next_word is False
    assert enc.after is None and torch.equal(enc.before.weight, kept)
    assert not any(".after." in k for k in model.state_dict())
    captions = ["a red circle and a blue square", "a red square and a blue circle", "a blue circle and a red square",
                "circle"]
    with torch.no_grad():
        tokens, _ = model.encode_text(captions)
        concepts = model.encode_concepts(["circle"])
        e, pos = enc.embed.weight, enc.position
        ids = [WORD_TO_ID[w] for w in captions[0].split()]
        for i, word in enumerate(ids):  # by hand: the word, its position and the map of the word before it only
            x = e[word] + pos[i] + (kept @ e[ids[i - 1]] if i > 0 else 0)
            torch.testing.assert_close(tokens[0, i], enc.norm(x))
    # "red" no longer depends on the shape after it; "circle" still depends on the colour before it
    torch.testing.assert_close(tokens[0, 1], tokens[1, 1])
    assert (tokens[0, 2] - tokens[2, 2]).abs().amax() > 1e-2
    torch.testing.assert_close(concepts[0], tokens[3, 0])  # a word alone has no neighbours
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.drop_next_word()  # a model without the next word's map is left as it is
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    fresh = ShapesModel(replace(TINY, text_layers=0))  # a model without maps gets the previous word's, at zero
    fresh.drop_next_word()
    assert fresh.config.text_neighbours and fresh.text_encoder.after is None
    assert not fresh.text_encoder.before.weight.any()


def test_cli_trains_with_drop_next_word_and_the_result_reloads_and_generates(tiny_dir, tmp_path):
    out = tmp_path / "d"
    r = train_briefly(out, "--init-from", str(tiny_dir), "--drop-next-word")
    assert r.exit_code == 0, r.output
    meta = run_meta(out)["config"]
    assert meta["text_neighbours"] is True and meta["text_next_word"] is False
    loaded = ShapesModel.load(out / "weights")
    assert loaded.text_encoder.after is None and loaded.text_encoder.before.weight.abs().amax() > 0  # trained
    assert generate_briefly(out, tmp_path / "gen").exit_code == 0
    r = CliRunner().invoke(app, ["train-shapes", "--out", str(out), "--drop-next-word", "--quiet"])
    assert r.exit_code == 2 and "keeps its own text encoder" in r.output
    # weights saved with both maps before the option existed keep both
    both = tmp_path / "both"
    model = ShapesModel.load(tiny_dir)
    model.mix_text_neighbours()
    model.save(both)
    old = saved_without(both, "text_next_word", tmp_path / "old")
    assert ShapesModel.load(old).text_encoder.after is not None


def test_binding_measure_is_zero_for_a_bag_of_words_model_and_sees_word_order_otherwise():
    from conceptattention.shapes import world
    from conceptattention.shapes.binding import binding, swap_shapes, third_shape, two_object_scenes, with_shapes

    scenes = two_object_scenes(60, seed=3)
    assert len(scenes) >= 5 and all(len(scenes.objects(i)) == 2 for i in range(len(scenes)))
    true, swapped, other = (world.captions(s) for s in (scenes, swap_shapes(scenes), third_shape(scenes)))
    for i in range(len(scenes)):
        (c0, s0), (c1, s1) = scenes.objects(i)
        assert c0 != c1 and s0 != s1
        assert swapped[i] != true[i] and sorted(swapped[i].split()) == sorted(true[i].split())  # same words
        assert f"{c0} {s1}" in swapped[i] and f"{c1} {s0}" in swapped[i]  # bound the other way
        changed = [(a, b) for a, b in zip(true[i].split(), other[i].split()) if a != b]
        assert changed == [(s0, ({"circle", "square", "triangle"} - {s0, s1}).pop())]  # one word: the third shape

    # no mixing layers, no position embeddings, Flux's zero text ids: the transformer cannot see word order
    torch.manual_seed(0)
    model = ShapesModel(replace(TINY, text_layers=0)).eval()
    with torch.no_grad():
        model.text_encoder.position.zero_()
    blind = binding(model, scenes, [0.5, 0.9], samples=1)
    assert all(r["order"] < 1e-8 for r in blind.values()), blind
    # word order through position embeddings, or through RoPE ids: a swap moves the prediction
    with torch.no_grad():
        model.text_encoder.position.normal_()
    assert all(r["order"] > 1e-3 for r in binding(model, scenes, [0.5, 0.9], samples=1).values())
    with torch.no_grad():
        model.text_encoder.position.zero_()
    model.order_text_positions()
    seen = binding(model, scenes, [0.5, 0.9], samples=1)
    assert all(r["order"] > 1e-3 and 0 <= r["prefers"] <= 1 for r in seen.values()), seen
    # or through maps of the neighbouring words, with zero ids and no position embeddings
    blind_again = ShapesModel(replace(TINY, text_layers=0)).eval()
    with torch.no_grad():
        blind_again.text_encoder.position.zero_()
        blind_again.mix_text_neighbours()
        blind_again.text_encoder.before.weight.normal_(std=0.1)
    assert all(r["order"] > 1e-3 for r in binding(blind_again, scenes, [0.5, 0.9], samples=1).values())
    same = with_shapes(scenes, torch.zeros_like(scenes.shape))  # two circles: a swap changes nothing
    with pytest.raises(ValueError, match="two objects of different shapes"):
        binding(model, same, [0.5])


def test_reader_targets_ask_shape_words_the_colour_only_the_image_can_tell():
    from conceptattention.shapes import world
    from conceptattention.shapes.train import reader_targets

    scenes = world.sample_scenes(400, seed=5)
    pick = {}  # one scene each: two objects of different colours and shapes; two of one shape in two colours
    for i in range(len(scenes)):
        objs = scenes.objects(i)
        if len(objs) == 2 and objs[0][0] != objs[1][0]:
            pick.setdefault("same shape" if objs[0][1] == objs[1][1] else "differ", i)
    chosen = scenes.select(torch.tensor([pick["differ"], pick["differ"], pick["differ"], pick["same shape"], pick["differ"]]))
    (c0, s0), (c1, s1) = chosen.objects(0)
    (_, same), _ = chosen.objects(3)
    texts = [f"a {s1} and a {s0} on grass",  # no colour named: both shape words are asked
             f"a {c0} {s0} and a {c1} {s1} on grass",  # the caption names the colours: nothing to read
             s0,  # a lone shape word, as a concept is encoded: asked
             f"a {same} and a {same} on grass",  # two of that shape in two colours: no single answer
             ""]  # a dropped caption
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
    r = train_briefly(out, "--init-from", str(tiny_dir), "--reader-weight", "0.1", "--colorless-rate", "0.5")
    assert r.exit_code == 0, r.output
    assert run_meta(out)["train_config"]["reader_weight"] == 0.1
    assert "reader" in torch.load(out / "checkpoint.pt", weights_only=True)
    loaded = ShapesModel.load(out / "weights")  # the exported weights are the model alone
    assert set(loaded.state_dict()) == set(ShapesModel.load(tiny_dir).state_dict())
    r = train_briefly(out, steps=3)  # resuming without the objective would drop the head's training
    assert r.exit_code == 2 and "resume with the same --reader-weight" in r.output, r.output
    r = CliRunner().invoke(app, ["train-shapes", "--out", str(tmp_path / "bad"), "--reader-weight", "-1", "--quiet"])
    assert r.exit_code == 2 and "Invalid value for '--reader-weight': -1 is below 0" in r.output, r.output
    assert not (tmp_path / "bad").exists()


def test_reading_at_several_blocks_reads_each_with_its_own_head(tiny_dir, tmp_path):
    torch.manual_seed(0)
    model = ShapesModel(TINY)  # 3 double-stream blocks
    cfg = TrainConfig(batch=8, bf16=False, colorless_rate=1.0, multi_object_rate=0.5, reader_weight=0.5,
                      reader_blocks=(-1, 0))
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
    r = train_briefly(out, "--init-from", str(tiny_dir), "--reader-weight", "0.1", "--reader-block", "0",
                      "--reader-block", "-1")
    assert r.exit_code == 0, r.output
    assert run_meta(out)["train_config"]["reader_blocks"] == [0, -1]
    r = train_briefly(out, "--reader-weight", "0.1", steps=3)  # the same weight, read at other blocks
    assert r.exit_code == 2 and "resume with the same --reader-block options" in r.output, r.output
    r = train_briefly(out, "--reader-weight", "0.1", "--reader-block", "0", "--reader-block", "2", steps=3)
    assert r.exit_code == 0, r.output  # -1 and 2 name the same block

    old = tmp_path / "old"  # a checkpoint from before several blocks could be read: one bare head
    assert train_briefly(old, "--init-from", str(tiny_dir), "--reader-weight", "0.1").exit_code == 0
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    state["reader"] = {k.split(".", 1)[1]: v for k, v in state["reader"].items()}
    state["train_config"].pop("reader_blocks")
    torch.save(state, old / "checkpoint.pt")
    r = train_briefly(old, "--reader-weight", "0.1", steps=3)
    assert r.exit_code == 0, r.output

    for options, message in ((["--reader-block", "7", "--reader-weight", "0.1"], "not double-stream blocks"),
                             (["--reader-block", "0"], "give it a --reader-weight above 0"),
                             (["--reader-at", "attention"], "give it a --reader-weight above 0"),
                             (["--reader-at", "keys", "--reader-weight", "0.1"], "reads block or attention, not 'keys'")):
        r = train_briefly(tmp_path / "bad", "--init-from", str(tiny_dir), *options)
        assert r.exit_code == 2 and message in r.output, r.output


def test_reading_attention_outputs_reads_what_the_output_projection_gets(tiny_dir, tmp_path):
    torch.manual_seed(0)
    model = ShapesModel(TINY).eval()
    attn = model.transformer.transformer_blocks[1].attn
    projected = {}
    watch = attn.register_forward_hook(lambda module, args, output: projected.update(text=output[1]))
    p = model.config.patch
    x = torch.randn(2, model.grid ** 2, 3 * p * p)
    tokens, pooled = model.encode_text(["a red circle on grass", "square"])
    with torch.no_grad(), text_reads(model, [1, 2], "attention") as states:
        model.velocity(x, torch.tensor([0.3, 0.7]), tokens, pooled)
    watch.remove()
    assert set(states) == {1, 2} and states[1].shape == (2, model.config.max_tokens, model.transformer.inner_dim)
    # the states are the text tokens' attention outputs: projected, they are what the attention returns for text
    assert torch.allclose(attn.to_add_out(states[1]), projected["text"], atol=1e-6)
    assert not attn.to_add_out._forward_pre_hooks and not model.transformer.transformer_blocks[2]._forward_hooks

    out = tmp_path / "r"
    r = train_briefly(out, "--init-from", str(tiny_dir), "--reader-weight", "0.1", "--reader-at", "attention")
    assert r.exit_code == 0, r.output
    assert run_meta(out)["train_config"]["reader_at"] == "attention"
    r = train_briefly(out, "--reader-weight", "0.1", steps=3)  # the heads read other vectors: refused
    assert r.exit_code == 2 and "resume with the same --reader-at" in r.output, r.output


def test_true_concepts_are_the_words_whose_masks_are_not_empty():
    scenes = world.sample_scenes(64, seed=5)
    _, labels = world.render(scenes)
    expected = torch.stack([world.concept_mask(scenes, labels, word).flatten(1).any(1) for word in world.CONCEPTS], 1)
    assert torch.equal(world.true_concepts(scenes), expected)
    assert 0 < expected[:, :3].sum(1).float().mean() < 3  # some images hold one shape, some several


def test_true_concept_loss_is_minus_log_the_true_share_of_the_softmax():
    from conceptattention.shapes.train import true_concept_loss

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
    from conceptattention.shapes.train import concept_blocks, concept_scores, true_concept_loss

    torch.manual_seed(0)
    model = ShapesModel(TINY)  # 3 double-stream blocks, no map layers of its own: the core default
    cfg = TrainConfig(batch=6, bf16=False, concept_weight=0.5)
    assert concept_blocks(cfg, model) == list(ShapesPipeline(model).default_layers)  # what the maps read by default
    assert concept_blocks(replace(cfg, concept_blocks=(-1, 0)), model) == [0, 2]
    with pytest.raises(ConceptAttentionError, match="not double-stream blocks of this model; it has 3"):
        concept_blocks(replace(cfg, concept_blocks=(5,)), model)
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
    assert len(scores) == 2 and scores[0].shape == (2, len(world.CONCEPTS), model.grid ** 2)
    assert states[1].shape[1] == model.config.max_tokens  # the reading hooks keep the prompt's states, not the concepts'
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
    r = train_briefly(out, "--init-from", str(tiny_dir), "--concept-weight", "0.1", "--coreference-weight", "0.01",
                      "--concept-block", "2")
    assert r.exit_code == 0, r.output
    meta = run_meta(out)["train_config"]
    assert meta["concept_weight"] == 0.1 and meta["coreference_weight"] == 0.01 and meta["concept_blocks"] == [2]
    r = CliRunner().invoke(app, ["train-shapes", "--out", str(tmp_path / "bad"), "--concept-block", "1", "--quiet"])
    assert r.exit_code == 2 and "give it a --concept-weight or --coreference-weight above 0 too" in r.output


def test_coreferent_concepts_are_the_pairs_whose_masks_are_the_same():
    scenes = world.sample_scenes(96, seed=6)
    _, labels = world.render(scenes)
    masks = torch.stack([world.concept_mask(scenes, labels, word).flatten(1) for word in world.CONCEPTS], 1)
    same_mask = (masks[:, :, None] == masks[:, None]).all(-1) & masks.any(-1)[:, :, None]
    expected = same_mask & ~torch.eye(len(world.CONCEPTS), dtype=torch.bool)
    pairs = world.coreferent_concepts(scenes)
    assert torch.equal(pairs, expected)
    shape_colour = pairs[:, :3, 3:7].sum((1, 2))
    assert (shape_colour == 0).any() and (shape_colour >= 2).any()  # some images share a colour, some bind two


def test_coreference_loss_asks_words_that_name_the_same_pixels_to_split_them_evenly():
    import math

    from conceptattention.shapes.train import coreference_loss

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
