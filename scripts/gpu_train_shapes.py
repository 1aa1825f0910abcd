"""Train a shapes-model stage inside a fixed wall-clock budget (a lent GPU), and bring the weights home.

A lent accelerator gives a few minutes and returns only small files, so this script:

1. times 40 steps of the real configuration (in a scratch directory) and from that picks the number
   of steps that fits the budget, so the learning-rate schedule runs to its end;
2. trains that run in chunks (each chunk resumes the checkpoint, exactly as ``train-shapes`` does)
   and after every chunk exports the EMA weights to ``--export`` as bf16 safetensors shards of at most
   ``--shard-mb`` MB, with ``config.json``, ``log.jsonl`` and ``summary.json``: whatever the machine
   returns if it is stopped early is a complete, loadable stage. It also prints, and records in the
   summary, ``shapes.binding`` of those weights at t = 0.9 (``order``: 0 for a model that reads its
   caption as a bag of words), so a run that starts to bind shape words can be seen while it runs;
3. ``--join EXPORT --run RUN`` (on any machine) turns an export back into a train-shapes run directory
   (``RUN/weights/model.safetensors``, ``RUN/weights/config.json``, ``RUN/log.jsonl``) that
   ``scripts/release_shapes.py`` and ``--init-from`` read.

    python scripts/gpu_train_shapes.py --run /tmp/run --export OUT/train --budget 420 \\
        --init-from shapes --batch 1024 --lr 5e-4 --warmup 200 --seed 3 --object-weight 4
    python scripts/gpu_train_shapes.py --run /tmp/p4 --export OUT/p4 --budget 540 --init-from '' --patch 4 \
        --batch 512 --lr 6e-4 --warmup 300 --seed 10          # a new 16x16-token model from scratch
    python scripts/gpu_train_shapes.py --run /tmp/r4 --export OUT/r4 --budget 450 --init-from shapes --patch 4 \
        --batch 512 --lr 3e-4 --warmup 200 --seed 6           # the shipped model re-patched to 16x16 tokens
    python scripts/gpu_train_shapes.py --join OUT/train --run runs/shapes-gpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from conceptattention.shapes.benchmark import VALIDATION_SEED
from conceptattention.shapes.binding import binding, two_object_scenes
from conceptattention.shapes.model import PREDICTIONS, ShapesModel, architecture
from conceptattention.shapes.train import READ_AT, TrainConfig, train, use_bf16

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


def seconds_per_step(scratch: Path, cfg: TrainConfig, model_cfg, device: str, steps: int = 40) -> float:
    """Median-free but warm-up-free timing: the second half of a short run of the real configuration."""
    probe = replace(cfg, steps=steps, log_every=steps // 2, checkpoint_every=10**9, warmup=min(cfg.warmup, steps))
    train(scratch, probe, model_cfg, device=device, progress=False)
    log = [json.loads(line) for line in (scratch / "log.jsonl").read_text().splitlines()]
    return (log[-1]["seconds"] - log[-2]["seconds"]) / (steps // 2)


def binding_now(weights: Path, device: str, images: int = 800) -> dict:
    """``shapes.binding`` of the exported EMA weights at t = 0.9 on the validation images with two objects
    (a second or two on a GPU): does the run start to bind shape words to their objects?"""
    model = ShapesModel.load(weights, device=device, dtype=torch.float32).eval()
    return binding(model, two_object_scenes(images, VALIDATION_SEED), [0.9], samples=2)["0.9"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory (checkpoint, log, weights)")
    p.add_argument("--export", type=Path, help="where the shards go after every chunk")
    p.add_argument("--join", type=Path, help="turn this export back into --run, then stop")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for calibration plus training")
    p.add_argument("--chunk", type=float, default=90.0, help="seconds between exports")
    p.add_argument("--shard-mb", type=float, default=12.0)
    p.add_argument("--chunk-overhead", type=float, default=6.0,
                   help="seconds each chunk spends reloading, exporting and measuring binding")
    p.add_argument("--margin", type=float, default=10.0, help="no new chunk with fewer seconds than this left")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="fp32")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--init-from", default="shapes")
    p.add_argument("--object-weight", type=float, default=4.0)
    p.add_argument("--t-uniform", type=float, default=0.0)
    p.add_argument("--colorless-rate", type=float, default=0.0, help="share of captions without colour words")
    p.add_argument("--multi-object-rate", type=float, default=0.0, help="share of each batch asking for 2-3 objects")
    p.add_argument("--text-positions", action="store_true", help="prompt tokens get RoPE positions in word order")
    p.add_argument("--text-neighbours", action="store_true",
                   help="prompt tokens add learned maps of the words beside them (ShapesModel.mix_text_neighbours)")
    p.add_argument("--drop-next-word", action="store_true",
                   help="keep only the map of the word before each prompt token (ShapesModel.drop_next_word)")
    p.add_argument("--reader-weight", type=float, default=0.0,
                   help="weight of the reading objective (shape words name their object's colour; train.reader_targets)")
    p.add_argument("--reader-blocks", type=int, nargs="+", default=[],
                   help="double-stream blocks the reading objective reads (default: the last; train.read_blocks)")
    p.add_argument("--reader-at", choices=READ_AT, default=TrainConfig.reader_at,
                   help="what the reading objective reads there (train.READ_AT)")
    p.add_argument("--concept-weight", type=float, default=TrainConfig.concept_weight,
                   help="weight of the image-label objective on the maps (train.true_concept_loss)")
    p.add_argument("--coreference-weight", type=float, default=TrainConfig.coreference_weight,
                   help="weight of the co-reference objective on the maps (train.coreference_loss)")
    p.add_argument("--concept-blocks", type=int, nargs="+", default=[],
                   help="double-stream blocks whose maps it scores (default: the model's map layers; train.concept_blocks)")
    p.add_argument("--prediction", choices=PREDICTIONS, default="",
                   help="what the transformer outputs (default: the weights' own; velocity from scratch)")
    for name in ("patch", "layers", "single-layers", "heads", "head-dim", "text-layers"):
        p.add_argument(f"--{name}", type=int, default=None,
                       help="architecture of a run from scratch (--init-from ''); with --init-from, --patch re-patches "
                       "and --text-layers 0 drops the text encoder's word mixing")
    p.add_argument("--probe-steps", type=int, default=40, help="steps timed to plan the run (the second half counts)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on the step count the budget allows")
    p.add_argument("--binding-images", type=int, default=800,
                   help="validation scenes drawn for the binding measure after each chunk (about 1 in 5 qualifies)")
    a = p.parse_args()
    if a.join:
        print(f"joined into {join(a.join, a.run)}")
        return
    if a.export is None:
        p.error("--export is required when training")

    shape = {"patch": a.patch, "layers": a.layers, "single_layers": a.single_layers, "heads": a.heads,
             "head_dim": a.head_dim, "text_layers": a.text_layers}
    repatch, unmix = 0, False
    if a.init_from and a.patch is not None:  # re-patch the init weights (ShapesModel.repatch)
        repatch, shape["patch"] = a.patch, None
    if a.init_from and a.text_layers == 0:  # drop the init weights' word mixing (ShapesModel.drop_text_mixing)
        unmix, shape["text_layers"] = True, None
    if a.init_from and any(v is not None for v in shape.values()):
        p.error("architecture options other than --patch and --text-layers 0 need a run from scratch: add --init-from ''")
    model_cfg = architecture(**shape)
    began = time.time()
    cfg = TrainConfig(batch=a.batch, lr=a.lr, warmup=a.warmup, seed=a.seed, init_from=a.init_from,
                      object_weight=a.object_weight, t_uniform=a.t_uniform, prediction=a.prediction, patch=repatch,
                      colorless_rate=a.colorless_rate, multi_object_rate=a.multi_object_rate, drop_text_mixing=unmix,
                      text_positions=a.text_positions, text_neighbours=a.text_neighbours,
                      drop_next_word=a.drop_next_word, reader_weight=a.reader_weight, reader_blocks=tuple(a.reader_blocks),
                      reader_at=a.reader_at, concept_weight=a.concept_weight, concept_blocks=tuple(a.concept_blocks),
                      coreference_weight=a.coreference_weight,
                      bf16=use_bf16(a.precision, a.device), log_every=50, checkpoint_every=10**9)
    per_step = seconds_per_step(a.run.parent / f"{a.run.name}-calibration", cfg, model_cfg, a.device,
                                max(2, a.probe_steps))
    left = a.budget - (time.time() - began)
    chunks = max(1, int(left // a.chunk))
    steps = max(1, int((left - a.chunk_overhead * chunks) / per_step))
    if a.max_steps:
        steps = min(steps, a.max_steps)
    cfg = replace(cfg, steps=steps)
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
    summary = {"device": device_name, "torch": torch.__version__, "seconds_per_step": per_step, "planned_steps": steps,
               "train_config": asdict(cfg)}
    print(json.dumps(summary), flush=True)

    done = 0
    while done < steps:
        remaining = a.budget - (time.time() - began)
        if remaining < a.margin:
            print(f"budget spent at step {done} of {steps}", flush=True)
            break
        train(a.run, cfg, model_cfg, device=a.device, progress=False, max_seconds=min(a.chunk, remaining - 5))
        done = json.loads((a.run / "weights" / "config.json").read_text())["steps"]
        bound = binding_now(a.run / "weights", a.device, a.binding_images)
        summary.setdefault("binding_t0.9", []).append({"step": done, **bound})
        summary.update(steps_done=done, seconds=time.time() - began)
        export(a.run, a.export, a.shard_mb, summary)
        lines = (a.run / "log.jsonl").read_text().splitlines()
        loss = f"loss {json.loads(lines[-1])['loss']:.4f}  " if lines else ""
        print(f"step {done}/{steps}  {loss}binding order {bound['order']:.4f} prefers {bound['prefers']:.1%}  "
              f"{time.time() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
