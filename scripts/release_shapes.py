"""Turn a chain of train-shapes runs into the shipped model.

1. choose the layers read by default (best mean of mIoU, shape pick and colour pick of the maps) and the
   sampler's guidance scale and timestep shift together (most colours + shapes right over the grid) on the
   validation seed, never the held-out seed. Each grid point is cached in RUN/validation_samples.jsonl, so
   a rerun on the same weights resumes; ``--keep-sampler`` keeps the guidance and shift of the model
   shipped now instead (the grid costs nine validation sample runs, about 45 minutes on 2 CPU cores);
2. measure the held-out benchmark (sample quality + every readout);
3. write config.json (with map_layers, every stage's record and the validation record), model.safetensors,
   MODEL_CARD.md and loss_curve.png into src/conceptattention/shapes/weights/.

``--card-only`` measures nothing: it rewrites MODEL_CARD.md (after a change to the card's code) from the
shipped config.json's records and the released run's held-out report, RUN/heldout/shapes_benchmark.json.

    python scripts/release_shapes.py scripts/shapes_stages.json

The stages file lists every training stage in order, the released one last; each stage is
``{"run": DIR, "command": "...", "hardware": "...", "note": "..."}`` where DIR holds the run's
``weights/`` and ``log.jsonl`` (a stage trained on a lent GPU is brought back with
``scripts/gpu_train_shapes.py --join``). An earlier stage whose directory is gone (runs/ is not in git) is
taken from the shipped config.json, which records every stage with up to 100 points of its loss log. So is the
released stage when the shipped model is that stage (it records exactly the listed stages): a release on a fresh
checkout then measures the shipped weights again, e.g. to search the sampler grid that ``--keep-sampler`` skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch

from conceptattention.pipelines.shapes import WEIGHTS_DIR, ShapesPipeline
from conceptattention.shapes import benchmark
from conceptattention.shapes.card import recorded_stages, stage_record, write_card

LAYER_CANDIDATES = ([0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [2, 3, 4, 5], [3, 4, 5], [2, 3, 4], [4], [5])
GUIDANCE_CANDIDATES = (4.0, 6.0, 8.0)  # every pair with every shift is tried
SHIFT_CANDIDATES = (3.0, 6.0, 12.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", type=Path, help="JSON list of stages, the released one last")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--validation-images", type=int, default=200)
    p.add_argument("--keep-sampler", action="store_true",
                   help="keep the shipped model's guidance and shift instead of choosing them on validation")
    p.add_argument("--card-only", action="store_true",
                   help="measure nothing; rewrite the shipped model card from the recorded validation and held-out results")
    a = p.parse_args()
    torch.set_num_threads(2)
    listed = json.loads(a.stages.read_text())
    run = Path(listed[-1]["run"])
    stages = gather_stages(listed)
    if a.card_only:
        rewrite_card(run, stages)
        return

    source = released_weights(listed)
    if source == WEIGHTS_DIR:
        print(f"{run} holds no weights or log; the shipped weights are its stage's, so they are measured again",
              flush=True)
    pipe = ShapesPipeline.from_pretrained(source)
    layers, layer_scores = benchmark.choose_layers(pipe, LAYER_CANDIDATES, n=a.validation_images)
    if a.keep_sampler:
        guidance, shift = ShapesPipeline.from_pretrained().sampler_settings(None, None)
        sampler_record = {"sampler_kept_from_the_previous_release": {"guidance": guidance, "shift": shift}}
    else:
        digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
        guidance, shift, grid = benchmark.choose_sampler(pipe, GUIDANCE_CANDIDATES, SHIFT_CANDIDATES,
                                                         a.validation_images, cache=run / "validation_samples.jsonl",
                                                         tag=digest)
        sampler_record = {"colour_plus_shape_accuracy_by_guidance_and_shift": grid}
    print("layers", layers, layer_scores, "guidance", guidance, "shift", shift, sampler_record, flush=True)

    meta = json.loads((source / "config.json").read_text())
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    if source != WEIGHTS_DIR:
        shutil.copy(source / "model.safetensors", WEIGHTS_DIR / "model.safetensors")
    meta["config"]["map_layers"] = layers
    meta["config"]["default_guidance"] = guidance
    meta["config"]["default_shift"] = shift
    (WEIGHTS_DIR / "config.json").write_text(json.dumps(meta, indent=2))

    shipped = ShapesPipeline.from_pretrained()
    report = benchmark.run(shipped, run / "heldout", images=a.images, sample_images=a.images)
    validation = {"seed": benchmark.VALIDATION_SEED, "images": a.validation_images,
                  "concept_attention_by_layers": layer_scores, **sampler_record}
    meta["stages"] = [{k: v for k, v in st.items() if k != "log"} for st in stages]
    meta["validation"] = validation
    (WEIGHTS_DIR / "config.json").write_text(json.dumps(meta, indent=2))
    write_card(WEIGHTS_DIR, stages, report, validation, "(not recorded)")
    print((run / "heldout" / "shapes_benchmark.md").read_text())


def run_files_missing(run: Path) -> list[str]:
    """The files of a run directory that a release reads and that are not there."""
    return [name for name in ("weights/model.safetensors", "weights/config.json", "log.jsonl")
            if not (run / name).is_file()]


def is_shipped(listed: list[dict], shipped: list[dict] | None = None) -> bool:
    """Whether the shipped model (its recorded stages, read unless given) records exactly the listed stages
    (same commands, in order): then its weights are the released stage's, and a release can re-measure them
    when that stage's run directory is gone."""
    shipped = recorded_stages(WEIGHTS_DIR) if shipped is None else shipped
    return [st["command"] for st in shipped] == [st["command"] for st in listed]


def released_weights(listed: list[dict]) -> Path:
    """The directory holding the released stage's weights: its run's ``weights/``, or, on a checkout without
    that run directory, the shipped weights when they are that stage's (:func:`is_shipped`)."""
    run = Path(listed[-1]["run"])
    if not run_files_missing(run) or not is_shipped(listed):
        return run / "weights"
    return WEIGHTS_DIR


def gather_stages(listed: list[dict]) -> list[dict]:
    """Each listed stage's record from its run directory; a stage whose run directory is gone (a new checkout:
    runs/ is not in git) is taken from the shipped config.json's record of the same stage instead. The released
    (last) stage may be taken so only when the shipped model is that stage (:func:`is_shipped`), to choose its
    layers and sampler again."""
    shipped = recorded_stages(WEIGHTS_DIR)
    again = is_shipped(listed, shipped)
    stages = []
    for i, stage in enumerate(listed):
        missing = run_files_missing(Path(stage["run"]))
        if not missing:
            stages.append(stage_record(Path(stage["run"]), stage["command"], stage.get("note", ""),
                                       stage.get("hardware", "")))
        elif (i < len(listed) - 1 or again) and i < len(shipped) and shipped[i]["command"] == stage["command"]:
            stages.append({**shipped[i], "note": stage.get("note", shipped[i].get("note", "")),
                           "hardware": stage.get("hardware", shipped[i].get("hardware", ""))})
        else:
            raise SystemExit(f"stage {stage['run']} lacks {', '.join(missing)}, and the shipped config.json records no "
                             f"stage {i + 1} with that command (the released stage itself must be present, unless the "
                             "shipped model is that stage)")
    return stages


def rewrite_card(run: Path, stages: list[dict]) -> None:
    """MODEL_CARD.md again from what the release recorded; the weights, config and numbers are untouched."""
    meta = json.loads((WEIGHTS_DIR / "config.json").read_text())
    report_file = run / "heldout" / "shapes_benchmark.json"
    if "validation" not in meta or not report_file.is_file():
        raise SystemExit(f"--card-only needs the shipped config.json's validation record and {report_file}; "
                         "run the full release instead")
    if [st["steps"] for st in meta.get("stages", [])] != [st["steps"] for st in stages]:
        raise SystemExit("the stages file does not list the shipped model's stages; check it or run the full release")
    write_card(WEIGHTS_DIR, stages, json.loads(report_file.read_text()), meta["validation"], "(not recorded)")
    print(f"rewrote {WEIGHTS_DIR / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
