"""The stage files: every one is a valid trainer config, in order, and stage 1 still trains bit for bit as the
trainer did before it moved into the lab."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import torch
from typer.testing import CliRunner

from conceptattention.cli import app
from conceptattention_lab.release import listed_stages, stage_files
from conceptattention_lab.train import TrainConfig, load_stage

STAGES = Path(__file__).resolve().parents[1] / "stages"
BOOKKEEPING = {"log_every", "checkpoint_every"}  # how often a run logs and checkpoints: not a stage's setting


def state_digest(state: dict) -> str:
    """SHA-256 of a state dict's tensors' bytes, concatenated in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_every_stage_file_parses_into_the_trainers_config_in_order():
    files = stage_files(STAGES)
    assert [f.name for f in files] == [f"stage{n:02d}.json" for n in range(1, 16)]
    every = {f.name for f in fields(TrainConfig)} - BOOKKEEPING
    for n, path in enumerate(files, 1):
        raw = json.loads(path.read_text())
        assert set(raw) == every | {"stop_after", "note", "hardware"}, path  # every setting named, no other key
        stage = load_stage(path)
        assert stage.note and stage.hardware, path
        # each stage starts from the previous stage's exported weights (stage 1 from scratch)
        assert stage.cfg.init_from == (f"runs/s{n - 1}/weights" if n > 1 else ""), path
        assert stage.stop_after is None or stage.stop_after < stage.cfg.steps
    listed = listed_stages(STAGES)
    assert [str(st["run"]) for st in listed] == [f"runs/s{n}" for n in range(1, 16)]
    assert listed[0]["command"].endswith(
        "train-shapes --config " + (STAGES / "stage01.json").as_posix() + " --out runs/s1"
    )


def test_the_stage_files_are_the_stages_the_shipped_model_records():
    """Each file has the settings its stage's record in the shipped config.json has (the shipped model was made
    with the commands these files replace); where a stage was stopped early, ``stop_after`` is the released step."""
    from conceptattention.pipelines.shapes import WEIGHTS_DIR

    records = json.loads((WEIGHTS_DIR / "config.json").read_text())["stages"]
    assert len(records) == 15
    for n, (record, path) in enumerate(zip(records, stage_files(STAGES)), 1):
        stage = load_stage(path)
        assert (stage.stop_after or stage.cfg.steps) == record["steps"], path
        recorded = record["train_config"]
        for key in (
            "steps",
            "batch",
            "lr",
            "warmup",
            "seed",
            "object_weight",
            "t_uniform",
            "colorless_rate",
            "multi_object_rate",
            "reader_weight",
            "reader_at",
            "concept_weight",
            "coreference_weight",
            "bf16",
            "patch",
            "drop_text_mixing",
            "text_neighbours",
        ):
            if key in recorded and not (key == "patch" and recorded[key] == 0):
                mine = getattr(stage.cfg, key)
                assert recorded[key] == (list(mine) if isinstance(mine, tuple) else mine), (path, key)
        assert list(stage.cfg.reader_blocks) == recorded.get("reader_blocks", []), path
        assert (record["prediction"], record["patch"], record["text_layers"]) == (
            "sample" if n >= 5 else "velocity",
            4 if n >= 6 else 8,
            0 if n >= 8 else 2,
        )


def test_stage01_config_reproduces_the_first_steps(tmp_path):
    """``train-shapes --config lab/stages/stage01.json`` trains the first steps of stage 1 bit for bit.

    The numbers below were recorded with the code before the trainer moved into the lab (this commit's parent,
    39d4896: ``conceptattention train-shapes --out X --stop-after 2 --precision fp32``, stage 1 being that
    command's defaults from scratch), the per-step losses from the same run through ``train()`` with
    ``log_every=1``. Machine: an Intel Xeon @ 2.80 GHz with AVX-512 and no AMX, 2 torch threads, torch
    2.13.0+cpu. Stage 1 itself ran in bf16 autocast, whose CPU kernels differ between CPU types (AMX or not),
    so the check runs in float32 (``--precision fp32``, which overrides the stage's precision). The run stops
    after step 1 and is resumed for step 2 (rerun with the same --out), so each log line holds one step's
    loss, and resuming is checked to equal the uninterrupted recorded run.
    """
    losses = [1.6032122373580933, 1.66818106174469]
    model_sha256 = "c1d03e18bcb1020057c3d02b67efe95f6108f58c04ef36bffecc082d750510e1"
    ema_sha256 = "b2c37bd6978e58e82326ddd3fa392facea3e056805dbb1bfed7ab11c3b0a0f0d"
    exported_sha256 = "0861f4f0574db978cd61a12f1fcdacc8d777a7411a59f0e3e0e210c0306b0e5e"

    out = tmp_path / "s1"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for stop in (1, 2):
            r = CliRunner().invoke(
                app,
                [
                    "train-shapes",
                    "--config",
                    str(STAGES / "stage01.json"),
                    "--out",
                    str(out),
                    "--stop-after",
                    str(stop),
                    "--precision",
                    "fp32",
                    "--quiet",
                ],
            )
            assert r.exit_code == 0, r.output
    finally:
        torch.set_num_threads(threads)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in log] == list(zip((1, 2), losses))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["train_config"]["bf16"] is False
    from safetensors.torch import load_file

    assert (
        state_digest(state["model"]),
        state_digest(state["ema"]),
        state_digest(load_file(str(out / "weights" / "model.safetensors"))),
    ) == (model_sha256, ema_sha256, exported_sha256), "stage 1 no longer trains as recorded (see the docstring)"
