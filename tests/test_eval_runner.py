"""The benchmark runner (eval/runner.py): a sample scored by hand, the blur, per-concept sums, an oracle method
scoring 100%; a run killed and resumed, and two processes, give exactly the numbers of one uninterrupted run; the
``eval`` CLI on tiny real-format files with a tiny Flux pipeline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from tiny_datasets import tiny_imagenet_seg, tiny_voc

from conceptattention.eval import shapes_report
from conceptattention.eval.datasets import BinaryTarget, MultiTarget, PickTarget, Sample, load_dataset
from conceptattention.eval.methods import METHODS, register_method
from conceptattention.eval.metrics import BinarySegmentation
from conceptattention.eval.runner import (
    evaluate,
    gaussian_blur,
    markdown_table,
    merge_concepts,
    per_concept_table,
    score_sample,
    summarise,
)


# ----- scoring ---------------------------------------------------------------------------------------------------
def test_gaussian_blur_keeps_constants_and_spreads_a_point():
    flat = torch.full((2, 5, 5), 3.0)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat)
    point = torch.zeros(1, 5, 5)
    point[0, 2, 2] = 1.0
    out = gaussian_blur(point, 1.0)[0]
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / 2)
    g = g / g.sum()
    assert out[2, 2] == pytest.approx(float(g[1] * g[1]))
    assert out[1, 2] == pytest.approx(float(g[0] * g[1])) and out[1, 1] == pytest.approx(float(g[0] * g[0]))
    assert out.sum() == pytest.approx(1.0) and out[0].abs().sum() == 0
    assert torch.equal(gaussian_blur(point, 0.0), point)


def test_score_sample_counts_by_hand():
    # two concepts on a 2x2 token grid, nearest-upsampled to 4x4 labels
    maps = torch.tensor([[[0.9, 0.1], [0.2, 0.0]], [[0.1, 0.9], [0.8, 1.0]]])
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True  # concept 0 is the top-left quadrant
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[3, 3] = False
    label = torch.zeros(4, 4, dtype=torch.long)
    label[:, 2:] = 1
    label[0, 0] = -1
    truth = torch.full((4, 4), -1, dtype=torch.long)
    truth[:2, :2], truth[2:, 2:] = 0, 1
    sample = Sample(
        "s",
        None,
        "",
        ["a", "b"],
        [BinaryTarget(0, mask, valid)],
        MultiTarget(label, [0, 1], [0, 1]),
        PickTarget((0, 1), truth),
        PickTarget((1, 0), truth),
    )
    r = score_sample(maps, sample, {"blur": 0.0, "upsample": "nearest"}, num_classes=2)
    # concept 0 map: min-max -> [1, .111; .222, 0], mean .333: only the top-left quadrant is on = the mask
    assert r["binary"]["correct"] == 15 and r["binary"]["labelled"] == 15 and r["binary"]["void"] == 1
    assert r["binary"]["inter"] == [11, 4] and r["binary"]["union"] == [11, 4] and r["binary"]["ap"] == [1.0]
    # argmax: concept 0 wins the top-left quadrant only -> class 0 there, class 1 elsewhere
    # labelled 15; correct: top-left 3 (one void) + right half 8 = 11
    assert r["multi"]["correct"] == 11 and r["multi"]["labelled"] == 15 and r["multi"]["void"] == 1
    assert r["pick"] == [8, 8]
    assert r["color_pick"] == [0, 8]  # the same pixels with the two concepts swapped: always the wrong one


def test_a_tie_between_the_two_maps_is_no_pick():
    """A single layer's softmax can saturate and leave both shape maps at exactly 0 over an object; a tie
    must count as wrong at the pixels of both objects, not as right wherever the second object is."""
    truth = torch.full((4, 4), -1, dtype=torch.long)
    truth[:2, :2], truth[2:, 2:] = 0, 1
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 0.5  # one pixel of object 0 where its concept wins; every other pixel a tie
    sample = Sample("s", None, "", ["a", "b"], pick=PickTarget((0, 1), truth))
    r = score_sample(maps, sample, {"blur": 0.0, "upsample": "nearest"}, num_classes=2)
    assert r["pick"] == [1, 8]


def test_per_concept_scores_by_hand():
    """Each concept's own sums, kept beside the pooled ones: they add up to the pooled numbers, a concept
    scored in two images sums over both, and a group of concepts scores like its targets pooled."""
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # "a": top-left, "b": right half
    top_left = torch.zeros(4, 4, dtype=torch.bool)
    top_left[:2, :2] = True
    right = torch.zeros(4, 4, dtype=torch.bool)
    right[:, 2:] = True
    left = ~right
    settings = {"blur": 0.0, "upsample": "nearest"}
    one = score_sample(
        maps,
        Sample("1", None, "", ["a", "b"], [BinaryTarget(0, top_left), BinaryTarget(1, right)]),
        settings,
        num_classes=2,
    )
    # image 2 scores "a" against the left half: the map finds 4 of its 8 pixels
    two = score_sample(maps, Sample("2", None, "", ["a", "b"], [BinaryTarget(0, left)]), settings, num_classes=2)
    per = one["binary"]["by_concept"]
    assert per["a"]["inter"] == [12, 4] and per["a"]["union"] == [12, 4]  # exact
    assert per["b"]["inter"] == [8, 8] and per["b"]["union"] == [8, 8]
    for key in ("inter", "union"):
        assert [x + y for x, y in zip(per["a"][key], per["b"][key])] == one["binary"][key]
    assert two["binary"]["by_concept"]["a"]["inter"] == [8, 4] and two["binary"]["by_concept"]["a"]["union"] == [12, 8]

    records = [{"methods": {"m": one}}, {"methods": {"m": two}}]
    res = summarise(records, ["m"], ["x", "y"])["m"]["binary"]
    a, b = res["by_concept"]["a"], res["by_concept"]["b"]
    assert a["targets"] == 2 and b["targets"] == 1
    assert a["iou_background"] == pytest.approx(20 / 24) and a["iou_foreground"] == pytest.approx(8 / 12)
    assert a["pixel_accuracy"] == pytest.approx(28 / 32) and b["miou"] == 1.0
    # the group of both words scores exactly like all three targets pooled, which is the overall result
    group = merge_concepts(res["by_concept"], ["a", "b", "not-scored"])
    for key in ("pixel_accuracy", "miou", "iou_foreground", "iou_background", "map"):
        assert group[key] == pytest.approx(res[key])
    assert group["targets"] == 3 and merge_concepts(res["by_concept"], ["not-scored"]) is None
    table = "\n".join(per_concept_table({"m": {"binary": res}}))
    assert "| method | a | b |" in table and f"| m | {100 * a['miou']:.1f} | 100.0 |" in table
    wide = {"m": {"binary": {"by_concept": {f"w{i}": a for i in range(30)}}}}
    assert per_concept_table(wide) == []  # too many concepts for a table: results.json only

    # a record written before per-concept sums existed (a resumed old run): no per-concept result at all
    old = json.loads(json.dumps(two))
    del old["binary"]["by_concept"]
    mixed = summarise([{"methods": {"m": one}}, {"methods": {"m": old}}], ["m"], ["x", "y"])["m"]["binary"]
    assert "by_concept" not in mixed
    pooled = BinarySegmentation()
    for r in (one, two):
        b = r["binary"]
        pooled = pooled.merge(BinarySegmentation(b["correct"], b["labelled"], b["inter"], b["union"], b["ap"]))
    assert mixed["miou"] == pytest.approx(pooled.result()["miou"])


def test_shapes_eval_in_memory_matches_scorer_ground_truth():
    """An oracle method that returns the true masks must score 100%."""
    ds = load_dataset("shapes", images=20)
    two = [ds[i] for i in range(len(ds)) if len(ds.scenes.objects(i)) == 2]
    assert any(x.pick for x in two) and any(x.color_pick for x in two)  # the held-out seed has both kinds
    for i in range(len(ds)):
        objects, sample = ds.scenes.objects(i), ds[i]
        differ = [len(objects) == 2 and objects[0][part] != objects[1][part] for part in (1, 0)]
        assert [sample.pick is not None, sample.color_pick is not None] == differ
        if sample.color_pick is not None:
            assert [ds.concepts[k] for k in sample.color_pick.concepts] == [objects[0][0], objects[1][0]]

    @register_method("oracle_test_method", "the true masks")
    def oracle(pipe, images, concepts, captions, settings):
        out = torch.zeros(len(images), len(concepts), 64, 64)
        for b, caption in enumerate(captions):
            index = next(i for i in range(len(ds)) if ds[i].caption == caption and torch.equal(ds[i].image, images[b]))
            for k, word in enumerate(concepts):
                out[b, k] = ds.word_masks[word][index].float()
        return out

    class NoModel:
        name = "none"
        default_layers = (0,)
        default_t, default_samples = 0.5, 4  # the noise defaults a pipeline states (as ShapesPipeline's)

    try:
        r = evaluate(NoModel(), ds, ["oracle_test_method"], None, progress=False, batch=4)
        report = shapes_report.map_quality(NoModel(), len(ds), ds.seed, readouts=["oracle_test_method"], progress=False)
    finally:
        METHODS.pop("oracle_test_method")
    kinds = report["readouts"]["oracle_test_method"]["by_kind"]
    assert set(kinds) == {"shape", "colour", "scene", "background"} and all(k["miou"] == 1.0 for k in kinds.values())
    assert "| oracle_test_method | 100.0 | 100.0 | 100.0 | 100.0 |" in shapes_report.markdown_table(report)
    res = r["methods"]["oracle_test_method"]
    assert res["binary"]["pixel_accuracy"] == 1.0 and res["binary"]["miou"] == 1.0 and res["binary"]["map"] == 1.0
    assert res["multi"]["pixel_accuracy"] > 0.99
    assert res["pick"]["accuracy"] == 1.0 and res["color_pick"]["accuracy"] == 1.0  # the true masks pick right
    table = markdown_table(r)
    assert "| shape pick (2 objects) | colour pick (2 objects) |" in table and "| 100.00 | 100.00 |" in table
    scored = {w for i in range(len(ds)) for w in ds.captions[i].split() if w in ds.concepts} | {"background"}
    assert set(res["binary"]["by_concept"]) == scored
    assert all(c["miou"] == 1.0 for c in res["binary"]["by_concept"].values())


# ----- runs of the CLI: resumed, in two processes, on real-format files ------------------------------------------
def run_cli(args, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "conceptattention", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


EVAL_ARGS = [
    "eval",
    "--dataset",
    "shapes",
    "--images",
    "24",
    "--batch",
    "2",
    "--samples",
    "1",
    "--method",
    "concept_attention,cross_attention,daam",
    "--quiet",
]


def test_eval_killed_and_resumed_gives_identical_numbers(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = run_cli([*EVAL_ARGS, "--out", str(whole)])
    assert r.returncode == 0, r.stderr
    expected = json.loads((whole / "results.json").read_text())

    proc = subprocess.Popen(
        [sys.executable, "-m", "conceptattention", *EVAL_ARGS, "--out", str(cut)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    records = cut / "records-0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if records.is_file() and records.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "results.json").exists(), "the run finished before it could be killed"
    with records.open("a") as f:
        f.write('{"chunk": 5, "images": [{"ind')  # what a kill in the middle of a write leaves
    r = run_cli([*EVAL_ARGS, "--out", str(cut)])
    assert r.returncode == 0, r.stderr
    resumed = json.loads((cut / "results.json").read_text())
    assert resumed["methods"] == expected["methods"]
    assert len(set(resumed["methods"])) == 3 and resumed["images"] == 24

    r = run_cli([*EVAL_ARGS[:-1], "--t", "0.3", "--out", str(cut)])  # other settings, same folder
    assert r.returncode != 0 and "other settings" in r.stderr


def test_resume_cuts_a_torn_last_line_before_appending(tmp_path, monkeypatch):
    """A kill in the middle of a write leaves a torn last line. The resumed run must cut it off before appending
    its first record, or that record is glued to the torn piece, unreadable, and recomputed on every resume."""
    from conceptattention.eval import runner
    from conceptattention.pipelines import load_pipeline

    pipe, ds = load_pipeline("shapes"), load_dataset("shapes", images=6)
    options = {"progress": False, "batch": 2, "samples": 1, "rank": 0, "world": 1}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    expected = evaluate(pipe, ds, ["concept_attention"], whole, **options)
    lines = (whole / "records-0.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 3  # 6 images in chunks of 2
    cut.mkdir()
    (cut / "run.json").write_text((whole / "run.json").read_text())
    (cut / "records-0.jsonl").write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # chunk 1 torn mid-write

    computed = []
    real = runner.run_methods

    def counting(pipe, chosen, images, *args):
        computed.append(len(images))
        return real(pipe, chosen, images, *args)

    monkeypatch.setattr(runner, "run_methods", counting)
    resumed = evaluate(pipe, ds, ["concept_attention"], cut, **options)
    assert computed == [2, 2]  # chunks 1 and 2, not chunk 0
    assert resumed["methods"] == expected["methods"]
    entries = [json.loads(line) for line in (cut / "records-0.jsonl").read_text().splitlines()]  # every line parses
    assert sorted(e["chunk"] for e in entries) == [0, 1, 2]
    assert (cut / "records-0.jsonl").read_text().endswith("\n")

    computed.clear()
    before = (cut / "records-0.jsonl").read_bytes()
    again = evaluate(pipe, ds, ["concept_attention"], cut, **options)  # everything is recorded: nothing to compute
    assert computed == [] and (cut / "records-0.jsonl").read_bytes() == before
    assert again["methods"] == expected["methods"]


def test_follow_up_settings_are_recorded_in_results_json(tmp_path):
    from conceptattention.pipelines import load_pipeline

    pipe, ds = load_pipeline("shapes"), load_dataset("shapes", images=2)
    methods = ["concept_attention", "bounce_2", "concept_attention:anchors=2:spread=2"]
    evaluate(pipe, ds, methods, tmp_path, progress=False, batch=2, samples=1)
    results = json.loads((tmp_path / "results.json").read_text())
    recorded = results["method_settings"]
    assert list(recorded) == methods and list(results["methods"]) == methods
    assert recorded["concept_attention"]["bounces"] == 0 and recorded["bounce_2"]["bounces"] == 2
    assert recorded["concept_attention:anchors=2:spread=2"]["anchors"] == 2
    assert recorded["concept_attention:anchors=2:spread=2"]["spread"] == 2
    assert "with anchors=2, spread=2" in results["descriptions"]["concept_attention:anchors=2:spread=2"]
    table = (tmp_path / "results.md").read_text()
    assert (
        "- `bounce_2`: bounces=2" in table and "- `concept_attention:anchors=2:spread=2`: anchors=2, spread=2" in table
    )
    assert "- `concept_attention`" not in table  # the paper's own settings are the reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_numbers_of_one(tmp_path):
    pytest.importorskip("accelerate")
    one, two = tmp_path / "one", tmp_path / "two"
    # one thread in every process (accelerate's default for its workers): a matrix product split over a different
    # number of threads sums in another order, and a pixel at the mean threshold can flip
    single = {"OMP_NUM_THREADS": "1"}
    r = run_cli([*EVAL_ARGS, "--out", str(one)], env=single)
    assert r.returncode == 0, r.stderr
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "conceptattention",
        *EVAL_ARGS,
        "--out",
        str(two),
    ]
    r = subprocess.run(launch, capture_output=True, text=True, timeout=600, env={**os.environ, **single})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [
        json.loads(line)["chunk"] % 2
        for p in ("records-0.jsonl", "records-1.jsonl")
        for line in (two / p).read_text().splitlines()
    ]
    assert sorted(set(ranks)) == [0, 1]  # both processes did work
    assert sorted(
        set(json.loads(line)["chunk"] for line in (two / "records-1.jsonl").read_text().splitlines())
    ) == list(range(1, 12, 2))
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert a["methods"] == b["methods"]


def test_eval_cli_on_real_format_files_with_a_flux_pipeline(tmp_path):
    from tiny_pipelines import tiny_flux_pipeline

    path, _, _ = tiny_imagenet_seg(tmp_path)
    model_dir = tmp_path / "tiny-flux"
    tiny_flux_pipeline().save_pretrained(model_dir)
    cmap = tmp_path / "classes.json"
    cmap.write_text(json.dumps({"n02085620": "dog", "strawberry": "cat"}))
    out = tmp_path / "imnet"
    r = run_cli(
        [
            "eval",
            "--dataset",
            "imagenet-seg",
            "--data",
            str(path),
            "--class-map",
            str(cmap),
            "--model",
            str(model_dir),
            "--size",
            "32x32",
            "--samples",
            "2",
            "--method",
            "concept_attention,daam",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["blur"] == 1.0 and res["settings"]["upsample"] == "nearest"
    for name in ("concept_attention", "daam"):
        b = res["methods"][name]["binary"]
        assert b["targets"] == 2 and 0 <= b["pixel_accuracy"] <= 1 and 0 <= b["miou"] <= 1
    table = (out / "results.md").read_text()
    assert "| concept_attention |" in table and "paper-compatible mIoU" in table

    root, _ = tiny_voc(tmp_path)
    out = tmp_path / "voc"
    r = run_cli(
        [
            "eval",
            "--dataset",
            "voc-multi",
            "--data",
            str(root),
            "--model",
            str(model_dir),
            "--size",
            "32x32",
            "--samples",
            "1",
            "--method",
            "concept_attention",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert r.returncode == 0, r.stderr
    multi = json.loads((out / "results.json").read_text())["methods"]["concept_attention"]["multi"]
    assert 0 <= multi["pixel_accuracy"] <= 1 and multi["void_pixels"] > 0
