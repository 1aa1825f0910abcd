"""Train a stage inside a fixed wall-clock budget (a lent GPU), and bring the weights home
(``lab/scripts/gpu_train_shapes.py``).

A lent accelerator gives a few minutes and returns only small files, so this:

1. times ``--probe-steps`` steps of the stage's settings (in a scratch directory) and from that plans the
   number of steps that fits the budget, at most the stage's ``steps``, so the learning-rate schedule runs
   to its end (a stage's ``stop_after`` stops it there, as ``train-shapes`` does);
2. trains that run in chunks (each chunk resumes the checkpoint, exactly as ``train-shapes`` does) and
   after every chunk exports the EMA weights to ``--export`` as bf16 safetensors shards of at most
   ``--shard-mb`` MB, with ``config.json``, ``log.jsonl`` and ``summary.json``: whatever the machine
   returns if it is stopped early is a complete, loadable stage. It also prints, and records in the
   summary, :func:`conceptattention_lab.binding.binding` of those weights at t = 0.9 (``order``: 0 for a
   model that reads its caption as a bag of words), so a run that starts to bind shape words can be seen
   while it runs;
3. ``--join EXPORT --run RUN`` (on any machine) turns an export back into a train-shapes run directory
   (``RUN/weights/model.safetensors``, ``RUN/weights/config.json``, ``RUN/log.jsonl``) that the release
   and a next stage's ``init_from`` read.

The training settings come only from the stage file; the options here are the budget's.

    python lab/scripts/gpu_train_shapes.py --config lab/stages/stage03.json --run /tmp/run --export OUT/train \\
        --budget 420 --chunk 100
    python lab/scripts/gpu_train_shapes.py --join OUT/train --run runs/s3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from conceptattention.errors import ConceptAttentionError
from conceptattention.shapes.model import ShapesModel
from conceptattention.shapes.world import VALIDATION_SEED

from .binding import binding, two_object_scenes
from .train import PRECISIONS, TrainConfig, load_stage, train

SHARD_PATTERN = "model-{index:02d}.safetensors"


def export(run: Path, dest: Path, shard_mb: float, summary: dict) -> None:
    """EMA weights of ``run`` as shards in ``dest``; each file is written whole, then renamed into place."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    state = load_file(str(run / "weights" / "model.safetensors"))
    shards, current, size = [], {}, 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if current and size + nbytes > shard_mb * 1e6:
            shards.append(current)
            current, size = {}, 0
        current[name] = state[name]
        size += nbytes
    shards.append(current)
    for old in dest.glob("model-*.safetensors"):
        old.unlink()
    for index, shard in enumerate(shards):
        tmp = dest / f".tmp-{index}"
        save_file(shard, str(tmp))
        os.replace(tmp, dest / SHARD_PATTERN.format(index=index))
    for name, source in (("config.json", run / "weights" / "config.json"), ("log.jsonl", run / "log.jsonl")):
        shutil.copy(source, dest / f".tmp-{name}")
        os.replace(dest / f".tmp-{name}", dest / name)
    (dest / ".tmp-summary").write_text(json.dumps({**summary, "shards": len(shards)}, indent=2))
    os.replace(dest / ".tmp-summary", dest / "summary.json")


def join(export_dir: Path, run: Path) -> Path:
    """The inverse of :func:`export`: a run directory with one ``weights/model.safetensors``."""
    from safetensors.torch import load_file, save_file

    shards = sorted(export_dir.glob("model-*.safetensors"))
    if not shards or not (export_dir / "config.json").is_file():
        raise SystemExit(f"{export_dir} holds no exported stage (expected model-NN.safetensors and config.json)")
    state: dict = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    (run / "weights").mkdir(parents=True, exist_ok=True)
    save_file(state, str(run / "weights" / "model.safetensors"))
    shutil.copy(export_dir / "config.json", run / "weights" / "config.json")
    shutil.copy(export_dir / "log.jsonl", run / "log.jsonl")
    if (export_dir / "summary.json").is_file():
        shutil.copy(export_dir / "summary.json", run / "summary.json")
    return run


def seconds_per_step(scratch: Path, cfg: TrainConfig, device: str, steps: int = 40) -> float:
    """Seconds per step of ``cfg`` without the warm-up: the second half of a short run of it in ``scratch``."""
    probe = replace(cfg, steps=steps, log_every=steps // 2, checkpoint_every=10**9, warmup=min(cfg.warmup, steps))
    train(scratch, probe, device=device, progress=False)
    log = [json.loads(line) for line in (scratch / "log.jsonl").read_text().splitlines()]
    return (log[-1]["seconds"] - log[-2]["seconds"]) / (steps // 2)


def binding_now(weights: Path, device: str, images: int = 800) -> dict:
    """:func:`~conceptattention_lab.binding.binding` of the exported EMA weights at t = 0.9 on the validation
    images with two objects (a second or two on a GPU)."""
    model = ShapesModel.load(weights, device=device, dtype=torch.float32).eval()
    return binding(model, two_object_scenes(images, VALIDATION_SEED), [0.9], samples=2)["0.9"]


def budgeted(
    config: Path,
    run: Path,
    export_dir: Path,
    budget: float,
    chunk: float,
    shard_mb: float = 12.0,
    chunk_overhead: float = 6.0,
    margin: float = 10.0,
    device: str = "cuda",
    precision: str | None = None,
    probe_steps: int = 40,
    binding_images: int = 800,
) -> dict:
    """Train the stage of ``config`` into ``run`` within ``budget`` seconds (see the module's description);
    the summary that the last export holds."""
    began = time.time()
    stage = load_stage(config)
    cfg = stage.cfg
    if precision is not None:
        if precision not in PRECISIONS:
            raise ConceptAttentionError(f"--precision must be {' or '.join(PRECISIONS)}, not {precision!r}")
        cfg = replace(cfg, bf16=precision == "bf16")
    cfg = replace(cfg, log_every=50, checkpoint_every=10**9)
    per_step = seconds_per_step(run.parent / f"{run.name}-calibration", cfg, device, max(2, probe_steps))
    left = budget - (time.time() - began)
    chunks = max(1, int(left // chunk))
    fits = max(1, int((left - chunk_overhead * chunks) / per_step))
    steps = min(cfg.steps, fits)
    if steps < cfg.steps:
        print(
            f"the budget fits {steps} of the stage's {cfg.steps} steps: the schedule is shortened to {steps}",
            flush=True,
        )
    cfg = replace(cfg, steps=steps)
    stop_after = stage.stop_after if stage.stop_after is not None and stage.stop_after < steps else None
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    summary = {
        "device": device_name,
        "torch": torch.__version__,
        "seconds_per_step": per_step,
        "planned_steps": steps,
        "stage": str(config),
        "train_config": asdict(cfg),
    }
    print(json.dumps(summary), flush=True)

    done, last = 0, stop_after or steps
    while done < last:
        remaining = budget - (time.time() - began)
        if remaining < margin:
            print(f"budget spent at step {done} of {steps}", flush=True)
            break
        train(run, cfg, device=device, progress=False, max_seconds=min(chunk, remaining - 5), stop_after=stop_after)
        done = json.loads((run / "weights" / "config.json").read_text())["steps"]
        bound = binding_now(run / "weights", device, binding_images)
        summary.setdefault("binding_t0.9", []).append({"step": done, **bound})
        summary.update(steps_done=done, seconds=time.time() - began)
        export(run, export_dir, shard_mb, summary)
        lines = (run / "log.jsonl").read_text().splitlines()
        loss = f"loss {json.loads(lines[-1])['loss']:.4f}  " if lines else ""
        print(
            f"step {done}/{steps}  {loss}binding order {bound['order']:.4f} prefers {bound['prefers']:.1%}  "
            f"{time.time() - began:.0f} s",
            flush=True,
        )
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="gpu_train_shapes.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, help="the stage's settings (lab/stages/stageNN.json)")
    p.add_argument("--run", type=Path, required=True, help="run directory (checkpoint, log, weights)")
    p.add_argument("--export", type=Path, help="where the shards go after every chunk")
    p.add_argument("--join", type=Path, help="turn this export back into --run, then stop")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for calibration plus training")
    p.add_argument("--chunk", type=float, default=90.0, help="seconds between exports")
    p.add_argument("--shard-mb", type=float, default=12.0)
    p.add_argument(
        "--chunk-overhead",
        type=float,
        default=6.0,
        help="seconds each chunk spends reloading, exporting and measuring binding",
    )
    p.add_argument("--margin", type=float, default=10.0, help="no new chunk with fewer seconds than this left")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="override the stage's precision")
    p.add_argument("--probe-steps", type=int, default=40, help="steps timed to plan the run (the second half counts)")
    p.add_argument(
        "--binding-images",
        type=int,
        default=800,
        help="validation scenes drawn for the binding measure after each chunk (about 1 in 5 qualifies)",
    )
    a = p.parse_args(argv)
    if a.join:
        print(f"joined into {join(a.join, a.run)}")
        return
    if a.config is None or a.export is None:
        p.error("--config and --export are required when training")
    try:
        budgeted(
            a.config,
            a.run,
            a.export,
            a.budget,
            a.chunk,
            a.shard_mb,
            a.chunk_overhead,
            a.margin,
            a.device,
            a.precision,
            a.probe_steps,
            a.binding_images,
        )
    except ConceptAttentionError as err:
        p.exit(2, f"error: {err}\n")
