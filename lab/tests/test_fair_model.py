"""The fair benchmark model (``lab/weights/stage10``): the stage-10 weights, trained only to generate.

Since stage 11 a loss term reads the model's text stream or its maps; a method table on those weights
favours the readout they were trained through. Stage 10 is the last stage without one.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conceptattention.cli import app
from conceptattention.pipelines.shapes import ShapesPipeline

LAB = Path(__file__).resolve().parents[1]
WEIGHTS = LAB / "weights" / "stage10"
MAP_OBJECTIVES = ("reader_weight", "concept_weight", "coreference_weight")


def test_no_stage_of_the_fair_model_trained_through_its_maps():
    record = json.loads((WEIGHTS / "config.json").read_text())
    assert len(record["stages"]) == 10 and record["weights_version"] == "stage10"
    for stage in record["stages"]:
        assert all(not stage["train_config"].get(key) for key in MAP_OBJECTIVES), stage["train_config"]
    later = json.loads((LAB / "stages" / "stage11.json").read_text())
    assert later["reader_weight"] > 0  # the next stage is the first that does


def test_the_fair_model_loads_and_runs_the_benchmark_from_its_folder(tmp_path):
    pipe = ShapesPipeline.from_pretrained(WEIGHTS)
    assert pipe.weights_version == "stage10" and pipe.default_layers == (0, 1, 2, 3, 4, 5)
    out = tmp_path / "eval"
    r = CliRunner().invoke(
        app,
        [
            "eval",
            "--dataset",
            "shapes",
            "--images",
            "2",
            "--samples",
            "1",
            "--model",
            str(WEIGHTS),
            "--method",
            "concept_attention,bounce_2,anchor_propagation",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(WEIGHTS) and list(results["methods"]) == [
        "concept_attention",
        "bounce_2",
        "anchor_propagation",
    ]
