"""The release (``conceptattention_lab.release``): the stage files in order, each stage's record from its run
directory or the shipped config.json, and the layer and sampler choices on the validation seed."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from lab_helpers import stage_file

from conceptattention.eval import shapes_report
from conceptattention.pipelines.shapes import WEIGHTS_DIR, ShapesPipeline
from conceptattention.shapes.world import VALIDATION_SEED
from conceptattention_lab import release
from conceptattention_lab.card import recorded_stages

STAGES = Path(__file__).resolve().parents[1] / "stages"
MAPS = {
    "images": 1,
    "seed": 7,
    "layers": [1],
    "t": 0.5,
    "samples": 1,
    "concepts": ["circle"],
    "readouts": {
        "concept_attention": {
            "pixel_accuracy": 0.5,
            "miou": 0.4,
            "paper_compatible_miou": 0.3,
            "map": 0.6,
            "shape_pick": 0.7,
            "color_pick": 0.9,
        }
    },
}


def test_the_shipped_model_records_exactly_the_stage_files():
    listed = release.listed_stages(STAGES)
    assert release.is_shipped(listed, recorded_stages(WEIGHTS_DIR))
    assert not release.is_shipped(listed[:-1], recorded_stages(WEIGHTS_DIR))


def test_stage_files_are_numbered_from_one_without_gaps(tmp_path):
    stage_file(tmp_path / "stage01.json")
    stage_file(tmp_path / "stage03.json")
    (tmp_path / "notes.json").write_text("{}")  # not a stage file
    with pytest.raises(SystemExit, match=r"numbered 1 to 2 without gaps, not \[1, 3\]"):
        release.stage_files(tmp_path)
    with pytest.raises(SystemExit, match="holds no stage files"):
        release.stage_files(tmp_path / "none")


def _run(run: Path, cfg, steps: int) -> None:
    """A finished run directory as train-shapes leaves it (the weights file's contents are never read here)."""
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "config.json").write_text(
        json.dumps({"config": {"patch": 8}, "steps": steps, "train_config": asdict(cfg)})
    )
    (run / "weights" / "model.safetensors").write_bytes(b"")
    (run / "log.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 1.0 / s, "seconds": 6.0 * s}) for s in range(10, steps + 1, 10))
    )


def test_a_stage_whose_run_is_gone_comes_from_the_shipped_record_with_the_same_settings(
    tiny_dir, tmp_path, monkeypatch
):
    stages, runs, weights = tmp_path / "stages", tmp_path / "runs", tmp_path / "weights"
    stage_file(stages / "stage01.json", steps=40, seed=0, note="n1", hardware="a CPU")
    stage_file(stages / "stage02.json", steps=20, seed=1, init_from="runs/s1/weights", note="n2")
    listed = release.listed_stages(stages, runs)
    assert [st["command"] for st in listed] == [
        f"conceptattention train-shapes --config {(stages / f'stage0{n}.json').as_posix()} --out "
        f"{(runs / f's{n}').as_posix()}"
        for n in (1, 2)
    ]
    for st, steps in zip(listed, (40, 20)):
        _run(st["run"], st["cfg"], steps)
    shutil.copytree(tiny_dir, weights)
    monkeypatch.setattr(release, "WEIGHTS_DIR", weights)
    gathered = release.gather_stages(listed)  # from the run directories
    assert [st["note"] for st in gathered] == ["n1", "n2"] and gathered[0]["hardware"] == "a CPU"
    assert gathered[1]["loss_points"] == [[10, 0.1], [20, 0.05]] and gathered[1]["command"] == listed[1]["command"]
    meta = json.loads((weights / "config.json").read_text())
    meta["stages"] = [{k: v for k, v in st.items() if k != "log"} for st in gathered]  # as a release stores them
    meta["validation"] = {"seed": VALIDATION_SEED}
    (weights / "config.json").write_text(json.dumps(meta))

    shutil.rmtree(runs / "s1")
    again = release.gather_stages(listed)
    assert again[0]["loss_points"] == gathered[0]["loss_points"] and again[0]["note"] == "n1"
    assert again[1]["log"] == gathered[1]["log"]  # read from its run directory
    other = stage_file(tmp_path / "other" / "stage01.json", steps=40, seed=5)  # another seed: another stage
    shutil.copy(stages / "stage02.json", other.parent / "stage02.json")
    with pytest.raises(SystemExit, match="records no stage 1 with its settings"):
        release.gather_stages(release.listed_stages(other.parent, runs))
    assert release.released_weights(listed) == runs / "s2" / "weights"
    shutil.rmtree(runs / "s2")
    # the released stage's directory gone too: the shipped model records both stages, so it is that stage's
    assert [st["loss_points"] for st in release.gather_stages(listed)] == [st["loss_points"] for st in gathered]
    assert release.released_weights(listed) == weights
    # --card-only redraws the card from the records and the held-out report
    (runs / "s2" / "heldout").mkdir(parents=True)
    (runs / "s2" / "heldout" / "shapes_benchmark.json").write_text(json.dumps({"maps": MAPS, "samples": None}))
    release.main(["--stages", str(stages), "--runs", str(runs), "--card-only"])
    card = (weights / "MODEL_CARD.md").read_text()
    assert "60 steps in 2 stage(s)" in card and listed[1]["command"] in card and "Stage 2: n2" in card

    stage_file(stages / "stage03.json", steps=10, seed=3)
    third = release.listed_stages(stages, runs)
    with pytest.raises(SystemExit, match="the released stage itself must be present"):
        release.gather_stages(third)  # a new stage the shipped model does not record
    assert release.released_weights(third) == runs / "s3" / "weights"
    with pytest.raises(SystemExit, match="do not list the shipped model's stages"):
        release.rewrite_card(runs / "s2", release.gather_stages(third[:2])[:1])


def test_the_layer_choice_is_the_best_mean_of_miou_shape_pick_and_colour_pick(monkeypatch):
    """The release's layer choice: best mean of mIoU, shape pick and colour pick on the validation seed."""
    measured = {  # per candidate: (mIoU, shape pick, colour pick) as map_quality would report them
        (5,): (0.50, 0.52, 0.60),  # best mIoU, but its colour pick collapses: mean 0.540
        (0, 1): (0.46, 0.55, 0.98),  # mean 0.663
        (3,): (0.40, 0.50, 0.99),  # mean 0.630
    }
    seen = []

    def fake_map_quality(pipe, n, seed, *, readouts, layers, progress):
        seen.append((tuple(layers), seed, n, tuple(readouts)))
        miou, shape, colour = measured[tuple(layers)]
        return {"readouts": {"concept_attention": {"miou": miou, "shape_pick": shape, "color_pick": colour}}}

    monkeypatch.setattr(release, "map_quality", fake_map_quality)
    chosen, scores = release.choose_layers(None, [[5], [0, 1], [3]], n=7, progress=False)
    assert chosen == [0, 1]
    assert scores["0,1"]["score"] == pytest.approx((0.46 + 0.55 + 0.98) / 3)
    assert scores["5"]["miou"] == 0.50 and scores["5"]["color_pick"] == 0.60
    assert seen == [
        ((5,), VALIDATION_SEED, 7, ("concept_attention",)),
        ((0, 1), VALIDATION_SEED, 7, ("concept_attention",)),
        ((3,), VALIDATION_SEED, 7, ("concept_attention",)),
    ]
    # a pick that could not be measured (no two-object image of that kind) is left out of the mean
    assert release.layer_choice_score({"miou": 0.4, "shape_pick": float("nan"), "color_pick": 0.8}) == pytest.approx(
        0.6
    )
    with pytest.raises(ValueError, match="at least one candidate"):
        release.choose_layers(None, [], progress=False)


@pytest.mark.slow  # run with: python -m pytest -m slow
def test_choose_sampler_searches_the_whole_grid_and_resumes_from_its_cache(tiny_dir, tmp_path, monkeypatch):
    pipe = ShapesPipeline.from_pretrained(tiny_dir)
    cache = tmp_path / "validation_samples.jsonl"
    guidance, shift, scores = release.choose_sampler(
        pipe, (2.0, 4.0), (1.0, 3.0), n=2, cache=cache, tag="w1", progress=False
    )
    assert sorted(scores) == ["2.0,1.0", "2.0,3.0", "4.0,1.0", "4.0,3.0"]
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert [(r["guidance"], r["shift"], r["tag"]) for r in lines] == [
        (2.0, 1.0, "w1"),
        (2.0, 3.0, "w1"),
        (4.0, 1.0, "w1"),
        (4.0, 3.0, "w1"),
    ]
    # every score is that pair's colours + shapes right on the validation seed, and the best pair is returned
    direct = shapes_report.sample_quality(pipe, 2, VALIDATION_SEED, guidance=4.0, shift=3.0, progress=False)
    assert scores["4.0,3.0"] == pytest.approx(direct["color_accuracy"] + direct["shape_accuracy"])
    assert scores[f"{guidance},{shift}"] == max(scores.values())

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached pair was sampled again")

    monkeypatch.setattr(release, "sample_quality", no_sampling)
    assert release.choose_sampler(pipe, (2.0, 4.0), (1.0, 3.0), n=2, cache=cache, tag="w1") == (guidance, shift, scores)
    with pytest.raises(AssertionError, match="sampled again"):  # other weights (tag) or another size: measured anew
        release.choose_sampler(pipe, (2.0,), (1.0,), n=2, cache=cache, tag="w2")
    with pytest.raises(ValueError, match="at least one"):
        release.choose_sampler(pipe, (), (1.0,), n=2)


def test_weights_versions_count_the_releases_of_each_last_stage():
    from conceptattention_lab.release import next_weights_version

    assert next_weights_version("15.2", 15) == "15.3"  # the same stage released again (e.g. a new sampler)
    assert next_weights_version("15.2", 16) == "16.1"  # a new last stage
    assert next_weights_version(None, 1) == "1.1"
    assert next_weights_version("garbage", 3) == "3.1"
