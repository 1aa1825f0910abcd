"""The shapes report (eval/shapes_report.py), as ``conceptattention shapes-benchmark`` writes and prints it for a
tiny model: the breakdowns partition the objects, the no-binding baseline adds up, each accuracy shows its count."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conceptattention.cli import app


def test_shapes_benchmark_records_the_shift_and_its_breakdowns_partition_the_objects(tiny_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "shapes-benchmark",
            "--model",
            str(tiny_dir),
            "--images",
            "3",
            "--sample-images",
            "3",
            "--shift",
            "3",
            "--out",
            str(tmp_path / "b"),
            "--quiet",
        ],
    )
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
    assert sum(g["unbound_shapes_right"] for g in groups) == pytest.approx(
        samples["unbound_shape_accuracy"] * samples["objects"]
    )
    assert "Shapes right by objects in the caption: " in r.output
    assert "| steps 20, guidance 4.0, shift 3.0 | 3 |" in r.output
    n = samples["objects"]  # each accuracy is printed with its count, which a rounded share could hide
    assert f"% ({right} of {n}) |" in r.output and f"% ({round(samples['color_accuracy'] * n)} of {n}) |" in r.output
