"""Budgeted training on a lent GPU (``conceptattention_lab.gpu_train``, run here on the CPU): a stage planned
from a timed probe, exported after every chunk as shards under a size cap, and joined back bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from lab_helpers import run_meta, stage_file
from safetensors.torch import load_file

from conceptattention_lab import gpu_train


@pytest.mark.slow  # run with: python -m pytest -m slow
def test_budgeted_training_exports_small_shards_that_join_back(tiny_dir, tmp_path):
    run, export, joined = tmp_path / "run", tmp_path / "export", tmp_path / "joined"
    config = stage_file(tmp_path / "stage.json", init_from=str(tiny_dir), steps=3, bf16=True)
    gpu_train.main(
        [
            "--config",
            str(config),
            "--run",
            str(run),
            "--export",
            str(export),
            "--device",
            "cpu",
            "--budget",
            "600",
            "--chunk",
            "0.1",
            "--chunk-overhead",
            "0",
            "--margin",
            "1",
            "--probe-steps",
            "4",
            "--shard-mb",
            "0.05",
            "--precision",
            "fp32",
            "--binding-images",
            "30",
        ]
    )
    summary = json.loads((export / "summary.json").read_text())
    steps = run_meta(run)["steps"]
    assert summary["steps_done"] == steps == summary["planned_steps"] == 3  # the stage's steps cap the plan
    assert summary["train_config"]["bf16"] is False and summary["stage"] == str(config)  # --precision overrides
    # the binding measure after every chunk, the last one at the exported step
    bound = summary["binding_t0.9"]
    assert bound[-1]["step"] == 3 and all(r["order"] >= 0 and 0 <= r["prefers"] <= 1 for r in bound)
    shards = sorted(export.glob("model-*.safetensors"))
    assert len(shards) == summary["shards"] > 1
    largest_tensor = max(
        t.numel() * t.element_size() for t in load_file(str(run / "weights" / "model.safetensors")).values()
    )
    assert all(s.stat().st_size <= max(0.05e6, largest_tensor) + 10_000 for s in shards)  # cap, plus a header
    gpu_train.main(["--join", str(export), "--run", str(joined)])
    a, b = (
        load_file(str(run / "weights" / "model.safetensors")),
        load_file(str(joined / "weights" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (joined / "log.jsonl").read_text() == (run / "log.jsonl").read_text()


def test_a_stages_stop_after_stops_the_budgeted_run_there(tiny_dir, tmp_path, capsys):
    config = stage_file(tmp_path / "stage.json", init_from=str(tiny_dir), steps=4, stop_after=2)
    summary = gpu_train.budgeted(
        config,
        tmp_path / "run",
        tmp_path / "export",
        budget=600,
        chunk=0.1,
        chunk_overhead=0,
        margin=1,
        device="cpu",
        probe_steps=4,
        binding_images=30,
    )
    assert summary["planned_steps"] == 4 and summary["steps_done"] == 2  # the schedule of 4, stopped after 2
    with pytest.raises(SystemExit):
        gpu_train.main(["--run", str(tmp_path / "r"), "--export", str(tmp_path / "e")])  # no --config
    assert "--config and --export are required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        gpu_train.main(
            [
                "--config",
                str(stage_file(tmp_path / "bad.json", lrr=1)),
                "--run",
                str(tmp_path / "r"),
                "--export",
                str(tmp_path / "e"),
                "--device",
                "cpu",
            ]
        )
    assert stopped.value.code == 2 and "unknown setting 'lrr'" in capsys.readouterr().err
