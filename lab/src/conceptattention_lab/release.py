"""Turn the chain of training stages into the shipped model (``lab/scripts/release_shapes.py``).

1. choose the layers read by default (:func:`choose_layers`: best mean of mIoU, shape pick and colour pick
   of the maps) and the sampler's guidance scale and timestep shift together (:func:`choose_sampler`: most
   colours + shapes right over the grid) on the validation seed, never the held-out seed. Each grid point
   is cached in RUN/validation_samples.jsonl, so a rerun on the same weights resumes; ``--keep-sampler``
   keeps the guidance and shift of the model shipped now instead (the grid costs nine validation sample
   runs, about 45 minutes on 2 CPU cores);
2. measure the held-out report (``conceptattention.eval.shapes_report``: sample quality + every readout);
3. write config.json (with map_layers, every stage's record and the validation record), model.safetensors,
   MODEL_CARD.md and loss_curve.png into the installed package's ``shapes/weights/``.

``--card-only`` measures nothing: it rewrites MODEL_CARD.md from the shipped config.json's records and the
released run's held-out report, RUN/heldout/shapes_benchmark.json.

The stages are the files ``stageNN.json`` of the stages directory (default ``lab/stages``), in order, the
released one last. Stage NN trains into ``RUNS/sNN`` (default ``runs/sNN``) with
``conceptattention train-shapes --config lab/stages/stageNN.json --out runs/sNN``; a release reads each
run's ``weights/`` and ``log.jsonl`` (a stage trained on a lent GPU is brought back with
``lab/scripts/gpu_train_shapes.py --join``). A stage whose run directory is gone (runs/ is not in git) is
taken from the shipped config.json, which records every stage with up to 100 points of its loss log, when
that record has the stage's settings (:func:`same_stage`). So is the released stage when the shipped
model is that stage (it records exactly the listed stages): a release on a fresh checkout then measures
the shipped weights again, e.g. to search the sampler grid that ``--keep-sampler`` skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from conceptattention.eval.shapes_report import map_quality, sample_quality
from conceptattention.eval.shapes_report import run as heldout_report
from conceptattention.pipelines.shapes import WEIGHTS_DIR, ShapesPipeline
from conceptattention.shapes.world import VALIDATION_SEED

from .card import recorded_stages, stage_record, write_card
from .train import TrainConfig, load_stage

LAYER_CANDIDATES = ([0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [2, 3, 4, 5], [3, 4, 5], [2, 3, 4], [4], [5])
GUIDANCE_CANDIDATES = (4.0, 6.0, 8.0)  # every pair with every shift is tried
SHIFT_CANDIDATES = (3.0, 6.0, 12.0)
#: What :func:`choose_layers` weighs, equally: the pooled mIoU and the two pick rates of two-object images.
LAYER_CHOICE_MEASURES: tuple[str, ...] = ("miou", "shape_pick", "color_pick")
#: The settings that identify a stage in a release's record: its seed, schedule and batch.
STAGE_IDENTITY: tuple[str, ...] = ("seed", "steps", "batch", "lr", "warmup")
STAGE_FILE = re.compile(r"stage(\d+)\.json")


# ----- choosing the release's settings ----------------------------------------------------------
def layer_choice_score(readout: dict) -> float:
    """Mean of :data:`LAYER_CHOICE_MEASURES` in one readout's map-quality result (a pick rate that could
    not be measured, NaN, is left out)."""
    values = [float(readout[k]) for k in LAYER_CHOICE_MEASURES if not math.isnan(readout[k])]
    return sum(values) / len(values) if values else float("nan")


def choose_layers(
    pipe, candidates: Sequence[Sequence[int]], n: int = 200, progress: bool = True
) -> tuple[list[int], dict]:
    """The candidate layer set with the best :func:`layer_choice_score` of ConceptAttention on the
    validation seed, and every candidate's measures (keyed "0,1,2")."""
    if not candidates:
        raise ValueError("choose_layers needs at least one candidate layer set")
    scores = {}
    for layers in candidates:
        r = map_quality(pipe, n, VALIDATION_SEED, readouts=["concept_attention"], layers=layers, progress=progress)
        ca = r["readouts"]["concept_attention"]
        scores[",".join(map(str, layers))] = {
            **{k: ca[k] for k in LAYER_CHOICE_MEASURES},
            "score": layer_choice_score(ca),
        }
    best = max(scores, key=lambda key: scores[key]["score"])
    return [int(x) for x in best.split(",")], scores


def choose_sampler(
    pipe,
    guidances: Sequence[float],
    shifts: Sequence[float],
    n: int = 200,
    *,
    steps: int = 20,
    cache: Path | None = None,
    tag: str = "",
    progress: bool = True,
) -> tuple[float, float, dict]:
    """The (guidance, shift) pair with the most colours + shapes right on the validation seed, searched over
    the whole grid, and every pair's score (keyed "guidance,shift").

    Each pair's sample-quality result is appended to ``cache`` (JSON lines, ``tag`` naming the weights) as
    soon as it is measured; a later call with the same tag reads those back instead of sampling again, so
    an interrupted release resumes where it stopped.
    """
    if not guidances or not shifts:
        raise ValueError("choose_sampler needs at least one guidance scale and one shift")
    done = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            if (r.get("tag"), r["images"], r["seed"], r["steps"]) == (tag, n, VALIDATION_SEED, steps):
                done[(float(r["guidance"]), float(r["shift"]))] = r
    scores = {}
    for guidance in guidances:
        for shift in shifts:
            r = done.get((float(guidance), float(shift)))
            if r is None:
                r = {
                    **sample_quality(
                        pipe, n, VALIDATION_SEED, steps=steps, guidance=guidance, shift=shift, progress=progress
                    ),
                    "tag": tag,
                }
                if cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    with cache.open("a") as f:
                        f.write(json.dumps(r) + "\n")
            scores[f"{float(guidance)},{float(shift)}"] = r["color_accuracy"] + r["shape_accuracy"]
    best = max(scores, key=scores.get)  # the first listed wins a tie
    guidance, shift = (float(x) for x in best.split(","))
    return guidance, shift, scores


# ----- the stages --------------------------------------------------------------------------------
def stage_files(directory: Path) -> list[Path]:
    """The stage files ``stageNN.json`` of ``directory``, in stage order; they must be numbered 1, 2, ... with
    none missing."""
    directory = Path(directory)
    found = sorted((int(m.group(1)), p) for p in directory.glob("stage*.json") if (m := STAGE_FILE.fullmatch(p.name)))
    if not found:
        raise SystemExit(f"{directory} holds no stage files (stage01.json, stage02.json, ...)")
    numbers = [n for n, _ in found]
    if numbers != list(range(1, len(found) + 1)):
        raise SystemExit(
            f"the stage files of {directory} must be numbered 1 to {len(found)} without gaps, not {numbers}"
        )
    return [p for _, p in found]


def listed_stages(directory: Path, runs: Path = Path("runs")) -> list[dict]:
    """Every stage of ``directory`` (:func:`stage_files`) with what a release needs: its settings (``cfg``),
    ``note`` and ``hardware``, its run directory ``RUNS/sNN`` and the command that trains it there."""
    stages = []
    for path in stage_files(directory):
        stage = load_stage(path)
        number = int(STAGE_FILE.fullmatch(path.name).group(1))
        run = Path(runs) / f"s{number}"
        stages.append(
            {
                "file": path,
                "cfg": stage.cfg,
                "run": run,
                "note": stage.note,
                "hardware": stage.hardware,
                "command": f"conceptattention train-shapes --config {path.as_posix()} --out {run.as_posix()}",
            }
        )
    return stages


def same_stage(record: dict, cfg: TrainConfig) -> bool:
    """Whether a release's record of a stage (its ``train_config``) has the settings :data:`STAGE_IDENTITY`
    of the stage ``cfg``."""
    recorded = record.get("train_config", {})
    return all(recorded.get(k) == getattr(cfg, k) for k in STAGE_IDENTITY)


def run_files_missing(run: Path) -> list[str]:
    """The files of a run directory that a release reads and that are not there."""
    return [
        name for name in ("weights/model.safetensors", "weights/config.json", "log.jsonl") if not (run / name).is_file()
    ]


def is_shipped(listed: list[dict], shipped: list[dict] | None = None) -> bool:
    """Whether the shipped model (its recorded stages, read unless given) records exactly the listed stages
    (:func:`same_stage`, in order): then its weights are the released stage's, and a release can re-measure
    them when that stage's run directory is gone."""
    shipped = recorded_stages(WEIGHTS_DIR) if shipped is None else shipped
    return len(shipped) == len(listed) and all(same_stage(r, st["cfg"]) for r, st in zip(shipped, listed))


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
    layers and sampler again. Every record gets the stage's command, note and hardware."""
    shipped = recorded_stages(WEIGHTS_DIR)
    again = is_shipped(listed, shipped)
    stages = []
    for i, stage in enumerate(listed):
        about = {"command": stage["command"], "note": stage["note"], "hardware": stage["hardware"]}
        missing = run_files_missing(Path(stage["run"]))
        if not missing:
            stages.append(stage_record(Path(stage["run"]), **about))
        elif (i < len(listed) - 1 or again) and i < len(shipped) and same_stage(shipped[i], stage["cfg"]):
            stages.append({**shipped[i], **about})
        else:
            raise SystemExit(
                f"stage {i + 1} ({stage['run']}) lacks {', '.join(missing)}, and the shipped config.json "
                f"records no stage {i + 1} with its settings (the released stage itself must be present, "
                "unless the shipped model is that stage)"
            )
    return stages


def rewrite_card(run: Path, stages: list[dict]) -> None:
    """MODEL_CARD.md again from what the release recorded; the weights, config and numbers are untouched."""
    meta = json.loads((WEIGHTS_DIR / "config.json").read_text())
    report_file = run / "heldout" / "shapes_benchmark.json"
    if "validation" not in meta or not report_file.is_file():
        raise SystemExit(
            f"--card-only needs the shipped config.json's validation record and {report_file}; "
            "run the full release instead"
        )
    if [st["steps"] for st in meta.get("stages", [])] != [st["steps"] for st in stages]:
        raise SystemExit("the stage files do not list the shipped model's stages; check them or run the full release")
    write_card(WEIGHTS_DIR, stages, json.loads(report_file.read_text()), meta["validation"], "(not recorded)")
    print(f"rewrote {WEIGHTS_DIR / 'MODEL_CARD.md'}")


def next_weights_version(previous: str | None, last_stage: int) -> str:
    """The weights version of a release whose last stage is ``last_stage``: ``"<stage>.<n>"``, where n counts
    the releases of that stage (a re-release of the same stage, e.g. with a new sampler, is n + 1)."""
    stage, _, n = (previous or "").partition(".")
    if stage == str(last_stage) and n.isdigit():
        return f"{last_stage}.{int(n) + 1}"
    return f"{last_stage}.1"


def release(listed: list[dict], images: int = 500, validation_images: int = 200, keep_sampler: bool = False) -> None:
    """Choose the released stage's settings on validation, measure it held out and write the shipped model."""
    run = Path(listed[-1]["run"])
    stages = gather_stages(listed)
    source = released_weights(listed)
    if source == WEIGHTS_DIR:
        print(
            f"{run} holds no weights or log; the shipped weights are its stage's, so they are measured again",
            flush=True,
        )
    pipe = ShapesPipeline.from_pretrained(source)
    layers, layer_scores = choose_layers(pipe, LAYER_CANDIDATES, n=validation_images)
    if keep_sampler:
        guidance, shift = ShapesPipeline.from_pretrained().sampler_settings(None, None)
        sampler_record = {"sampler_kept_from_the_previous_release": {"guidance": guidance, "shift": shift}}
    else:
        digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
        guidance, shift, grid = choose_sampler(
            pipe,
            GUIDANCE_CANDIDATES,
            SHIFT_CANDIDATES,
            validation_images,
            cache=run / "validation_samples.jsonl",
            tag=digest,
        )
        sampler_record = {"colour_plus_shape_accuracy_by_guidance_and_shift": grid}
    print("layers", layers, layer_scores, "guidance", guidance, "shift", shift, sampler_record, flush=True)

    previous = (
        json.loads((WEIGHTS_DIR / "config.json").read_text()).get("weights_version")
        if (WEIGHTS_DIR / "config.json").is_file()
        else None
    )
    meta = json.loads((source / "config.json").read_text())
    meta = {
        "weights_version": next_weights_version(previous, len(listed)),
        **{k: v for k, v in meta.items() if k != "weights_version"},
    }
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    if source != WEIGHTS_DIR:
        shutil.copy(source / "model.safetensors", WEIGHTS_DIR / "model.safetensors")
    meta["config"]["map_layers"] = layers
    meta["config"]["default_guidance"] = guidance
    meta["config"]["default_shift"] = shift
    (WEIGHTS_DIR / "config.json").write_text(json.dumps(meta, indent=2))

    shipped = ShapesPipeline.from_pretrained()
    report = heldout_report(shipped, run / "heldout", images=images, sample_images=images)
    validation = {
        "seed": VALIDATION_SEED,
        "images": validation_images,
        "concept_attention_by_layers": layer_scores,
        **sampler_record,
    }
    meta["stages"] = [{k: v for k, v in st.items() if k != "log"} for st in stages]
    meta["validation"] = validation
    (WEIGHTS_DIR / "config.json").write_text(json.dumps(meta, indent=2))
    write_card(WEIGHTS_DIR, stages, report, validation, "(not recorded)")
    print((run / "heldout" / "shapes_benchmark.md").read_text())


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="release_shapes.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--stages", type=Path, default=Path("lab/stages"), help="the directory of the stage files")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where stage NN's run directory sNN is")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--validation-images", type=int, default=200)
    p.add_argument(
        "--keep-sampler",
        action="store_true",
        help="keep the shipped model's guidance and shift instead of choosing them on validation",
    )
    p.add_argument(
        "--card-only",
        action="store_true",
        help="measure nothing; rewrite the shipped model card from the recorded validation and held-out results",
    )
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    listed = listed_stages(a.stages, a.runs)
    if a.card_only:
        rewrite_card(Path(listed[-1]["run"]), gather_stages(listed))
        return
    release(listed, a.images, a.validation_images, a.keep_sampler)
