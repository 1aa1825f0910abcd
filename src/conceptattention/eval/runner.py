"""One reproducible runner: dataset x methods -> per-image records -> exact dataset-level numbers.

- Images are split into fixed chunks (``batch`` images, in dataset order). A chunk is computed as
  one batch, whatever the number of processes, so every image's maps are the same in any run.
- After each chunk, one JSON line holding the chunk's per-image records (pixel counts, average
  precisions) is appended to ``OUT/records-<rank>.jsonl`` and flushed. A killed run restarted with the
  same ``OUT`` skips the chunks already recorded; a half-written last line is ignored, and cut off before
  the next record is appended.
- Several processes (``accelerate launch``, ``torchrun``, ``mpirun``: rank and world size are read from
  the environment) take every world-th chunk. The final numbers are sums over images in dataset
  order, so 1 process, N processes and an interrupted-and-resumed run give identical results.
- Rank 0 waits for the other ranks' records, then writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import __version__
from ..errors import ConceptAttentionError
from .datasets import Dataset, Sample, subset
from .methods import Method, resolve_methods, run_methods
from .metrics import BinarySegmentation, MultiClassSegmentation, mean_threshold

RUN_FILE, RESULTS_FILE, TABLE_FILE = "run.json", "results.json", "results.md"


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when run alone."""
    for rank_var, size_var in (
        ("RANK", "WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ):
        if rank_var in os.environ and size_var in os.environ:
            rank, world = int(os.environ[rank_var]), int(os.environ[size_var])
            if not 0 <= rank < world:
                raise ConceptAttentionError(f"{rank_var}={rank} is outside {size_var}={world}")
            return rank, world
    return 0, 1


# ----- per-image scoring ---------------------------------------------------------------------------------
def gaussian_blur(maps: torch.Tensor, sigma: float, kernel: int = 3) -> torch.Tensor:
    """``[K, h, w]`` blurred per map by a normalised ``kernel`` x ``kernel`` Gaussian (reflect padding)."""
    if sigma <= 0:
        return maps
    x = torch.arange(kernel, dtype=torch.float32) - (kernel - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    weight = (g[:, None] * g[None, :])[None, None].repeat(maps.shape[0], 1, 1, 1)
    pad = kernel // 2
    if min(maps.shape[-2:]) <= pad:
        return maps
    padded = F.pad(maps[None].float(), (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, weight, groups=maps.shape[0])[0]


def _target_size(sample: Sample) -> tuple[int, int]:
    for t in sample.binary:
        return tuple(t.mask.shape)
    if sample.multi is not None:
        return tuple(sample.multi.label.shape)
    for pick in (sample.pick, sample.color_pick):
        if pick is not None:
            return tuple(pick.truth.shape)
    raise ConceptAttentionError(f"sample {sample.key} has nothing to score")


def score_sample(token_maps: torch.Tensor, sample: Sample, settings: dict, num_classes: int) -> dict:
    """One image's record for one method: sums that add up exactly over a dataset."""
    maps = gaussian_blur(token_maps.float(), settings["blur"])
    mode = settings["upsample"]
    up = F.interpolate(
        maps[None], size=_target_size(sample), mode=mode, **({"align_corners": False} if mode == "bilinear" else {})
    )[0]
    record: dict[str, Any] = {}
    if sample.binary:
        by_concept: dict[str, BinarySegmentation] = {}
        void = 0
        for target in sample.binary:
            seg = by_concept.setdefault(sample.concepts[target.concept], BinarySegmentation())
            seg.add(mean_threshold(up[target.concept]), target.mask, scores=up[target.concept], valid=target.valid)
            if target.valid is not None:
                void += int((~target.valid.bool()).sum())
        pooled = BinarySegmentation()
        for seg in by_concept.values():
            pooled = pooled.merge(seg)
        record["binary"] = {**_sums(pooled), "void": void, "by_concept": {w: _sums(b) for w, b in by_concept.items()}}
    if sample.multi is not None:
        m = sample.multi
        winner = up[m.candidates].argmax(0)
        prediction = torch.tensor(m.classes, dtype=torch.long)[winner]
        seg = MultiClassSegmentation(num_classes)
        seg.add(prediction, m.label)
        record["multi"] = {
            "correct": seg.correct,
            "labelled": seg.labelled,
            "inter": seg.inter,
            "union": seg.union,
            "void": int((m.label < 0).sum()),
        }
    for key, pick in (("pick", sample.pick), ("color_pick", sample.color_pick)):
        if pick is not None:
            a, b = pick.concepts
            # right where the true object's concept is strictly larger: a tie (e.g. two maps that a saturated
            # softmax left at exactly 0) is no pick, for either object
            right = ((pick.truth == 0) & (up[a] > up[b])) | ((pick.truth == 1) & (up[b] > up[a]))
            record[key] = [int(right.sum()), int((pick.truth >= 0).sum())]
    return record


# ----- merging -----------------------------------------------------------------------------------------
def _sums(seg: BinarySegmentation) -> dict:
    """A segmentation's counts as a JSON-ready dict (one concept's part of a record)."""
    return {"correct": seg.correct, "labelled": seg.labelled, "inter": seg.inter, "union": seg.union, "ap": seg.ap}


def _segmentation(sums: dict) -> BinarySegmentation:
    return BinarySegmentation(
        sums["correct"], sums["labelled"], list(sums["inter"]), list(sums["union"]), list(sums["ap"])
    )


def concept_result(seg: BinarySegmentation) -> dict:
    """Scores of one concept from its summed counts: the binary columns plus ``targets`` (how many masks
    were scored) and the sums themselves, so that groups can be merged (:func:`merge_concepts`)."""
    r = seg.result()
    r["targets"] = r.pop("images")
    sums = {k: v for k, v in _sums(seg).items() if k != "ap"}
    return {**r, "sums": sums, "ap_count": len(seg.ap)}


def merge_concepts(by_concept: dict, words: Sequence[str]) -> dict | None:
    """One score for a group of concepts (e.g. every colour word): their sums added, then scored.
    None when none of the words was scored. mAP: the per-concept mAPs weighted by their counts of
    scored APs, which is the mean over every target of the group."""
    present = [by_concept[w] for w in words if w in by_concept]
    if not present:
        return None
    seg = BinarySegmentation()
    for r in present:
        seg = seg.merge(_segmentation({**r["sums"], "ap": []}))
    out = seg.result()
    counted = [(r["map"], r["ap_count"]) for r in present if r["ap_count"]]
    total = sum(n for _, n in counted)
    out["map"] = sum(m * n for m, n in counted) / total if total else float("nan")
    out.pop("images")
    out["targets"] = sum(r["targets"] for r in present)
    return out


def summarise(records: list[dict], methods: Sequence[str], class_names: Sequence[str]) -> dict[str, dict]:
    """Dataset-level numbers per method from per-image records (given in dataset order)."""
    out: dict[str, dict] = {}
    for name in methods:
        binary, multi = BinarySegmentation(), MultiClassSegmentation(max(1, len(class_names)))
        has_binary = has_multi = False
        picks, void_binary, void_multi = {"pick": [0, 0], "color_pick": [0, 0]}, 0, 0
        by_concept: dict[str, BinarySegmentation] | None = {}  # None once a record predates per-concept sums
        for record in records:
            r = record["methods"][name]
            if "binary" in r:
                b, has_binary = r["binary"], True
                binary = binary.merge(_segmentation(b))
                void_binary += b["void"]
                if "by_concept" not in b:
                    by_concept = None
                elif by_concept is not None:
                    for word, sums in b["by_concept"].items():
                        by_concept[word] = by_concept.get(word, BinarySegmentation()).merge(_segmentation(sums))
            if "multi" in r:
                m, has_multi = r["multi"], True
                multi = multi.merge(
                    MultiClassSegmentation(multi.num_classes, m["correct"], m["labelled"], m["inter"], m["union"])
                )
                void_multi += m["void"]
            for key, total in picks.items():
                if key in r:
                    picks[key] = [total[0] + r[key][0], total[1] + r[key][1]]
        result: dict[str, Any] = {}
        if has_binary:
            b = binary.result()
            b["targets"] = b.pop("images")
            result["binary"] = {**b, "void_pixels": void_binary}
            if by_concept:
                result["binary"]["by_concept"] = {w: concept_result(seg) for w, seg in sorted(by_concept.items())}
        if has_multi:
            result["multi"] = {**multi.result(list(class_names)), "void_pixels": void_multi}
        for key, (right, pixels) in picks.items():
            if pixels:
                result[key] = {"accuracy": right / pixels, "pixels": pixels}
        out[name] = result
    return out


def markdown_table(results: dict) -> str:
    """The results as a Markdown table, preceded by every setting used."""
    s = results["settings"]
    lines = [
        f"Dataset **{results['dataset']['dataset']}**, {results['images']} images, model `{results['model']}`.",
        "",
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in s.items()) + ".",
        "",
    ]
    first = next(iter(results["methods"].values()), {})
    head = ["method"]
    if "binary" in first:
        head += ["pixel acc", "mIoU", "paper-compatible mIoU", "mAP"]
    if "multi" in first:
        head += ["multi-class acc", "multi-class mIoU"]
    picks = [
        (key, title)
        for key, title in (("pick", "shape pick (2 objects)"), ("color_pick", "colour pick (2 objects)"))
        if key in first
    ]
    head += [title for _, title in picks]
    rule = ["---"] * len(head)
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]

    def pct(x: float) -> str:
        return "n/a" if x != x else f"{100 * x:.2f}"

    for name, r in results["methods"].items():
        row = [name]
        if "binary" in r:
            b = r["binary"]
            row += [pct(b["pixel_accuracy"]), pct(b["miou"]), pct(b["paper_compatible_miou"]), pct(b["map"])]
        if "multi" in r:
            row += [pct(r["multi"]["pixel_accuracy"]), pct(r["multi"]["miou"])]
        row += [pct(r[key]["accuracy"]) if key in r else "n/a" for key, _ in picks]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Binary columns: the map of each scored concept, min-max normalised and thresholded at its mean, "
        "against the concept's mask; sums over the dataset (mIoU over foreground and background). "
        "Paper-compatible mIoU = acc / (2 - acc), what the authors' ImageNet script reports. "
        "mAP: per-target average precision, averaged.",
    ]
    lines += method_settings_lines(results.get("method_settings", {}))
    lines += per_concept_table(results["methods"])
    return "\n".join(lines) + "\n"


def method_settings_lines(settings: dict[str, dict]) -> list[str]:
    """Markdown lines: each concept-stream method's readout fields that differ from the paper's ConceptAttention."""
    from ..readouts import READOUTS

    paper = READOUTS["concept_attention"].settings()
    rows = []
    for name, fields in settings.items():
        changed = [f"{k}={v}" for k, v in fields.items() if paper.get(k) != v]
        if fields and changed:
            rows.append(f"- `{name}`: {', '.join(changed)}")
    return (
        ["", "Readout settings that differ from ConceptAttention's (all are in results.json):", "", *rows]
        if rows
        else []
    )


PER_CONCEPT_COLUMNS = 24  # wider tables (ImageNet's 445 classes) stay in results.json only


def per_concept_table(methods: dict) -> list[str]:
    """Markdown lines: fg/bg mIoU of every scored concept (columns) for every method (rows)."""
    words = sorted({w for r in methods.values() for w in r.get("binary", {}).get("by_concept", {})})
    if not words or len(words) > PER_CONCEPT_COLUMNS:
        return []
    lines = [
        "",
        "mIoU of each concept's own maps (fg/bg, sums over the images where it is scored):",
        "",
        "| method | " + " | ".join(words) + " |",
        "|---|" + "---|" * len(words),
    ]
    for name, r in methods.items():
        per = r.get("binary", {}).get("by_concept", {})
        cells = [f"{100 * per[w]['miou']:.1f}" if w in per else "n/a" for w in words]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# ----- the runner --------------------------------------------------------------------------------------
def _read_records(out: Path) -> dict[int, list[dict]]:
    """Chunk id -> its per-image records, from every rank's file (torn last lines ignored)."""
    chunks: dict[int, list[dict]] = {}
    for path in sorted(out.glob("records-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption; that chunk is recomputed
            chunks.setdefault(int(entry["chunk"]), entry["images"])
    return chunks


def _open_records(path: Path):
    """``path`` opened for appending records, after cutting a torn last line (one an interruption left without
    its newline) back to the end of the last complete line: a record appended to the torn piece would make
    one unreadable line, so its chunk would be recomputed on every resume."""
    if path.is_file():
        with path.open("r+b") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
    return path.open("a")


def _model_settings(pipe: Any, dataset: Dataset, overrides: dict) -> dict:
    settings = {
        "t": pipe.default_t,
        "samples": pipe.default_samples,
        "seed": 0,
        "layers": None,
        "batch": 50 if dataset.name == "shapes" else 1,
        **dataset.settings,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings["layers"] is None:
        settings["layers"] = list(pipe.default_layers)
    settings["layers"] = [int(x) for x in settings["layers"]]
    if settings["upsample"] not in ("nearest", "bilinear"):
        raise ConceptAttentionError(f"upsample is 'nearest' or 'bilinear', not {settings['upsample']!r}")
    if int(settings["batch"]) < 1:
        raise ConceptAttentionError("batch must be at least 1")
    return settings


def evaluate(
    pipe: Any,
    dataset: Dataset,
    methods: str | list[str] = "all",
    out: str | Path | None = None,
    *,
    limit: int | None = None,
    progress: bool = True,
    rank: int | None = None,
    world: int | None = None,
    wait_seconds: float = 24 * 3600.0,
    **overrides: Any,
) -> dict | None:
    """Run ``methods`` on ``dataset``; returns the results (rank 0) or None (other ranks).

    ``overrides``: t, samples, seed, layers, batch, blur, upsample, size, concept_tokens. With ``out``
    the run is recorded and resumable; without it, everything stays in memory.
    """
    chosen: list[Method] = resolve_methods(methods)
    names = [m.name for m in chosen]
    settings = _model_settings(pipe, dataset, overrides)
    if rank is None or world is None:
        rank, world = distributed_rank()
    indices = list(subset(dataset, limit))
    if not indices:
        raise ConceptAttentionError("no images to evaluate (check --limit and the dataset)")
    batch = int(settings["batch"])
    chunks = [indices[i : i + batch] for i in range(0, len(indices), batch)]
    header = {
        "version": __version__,
        "model": getattr(pipe, "name", type(pipe).__name__),
        "dataset": dataset.describe(),
        "images": len(indices),
        "methods": names,
        "settings": settings,
    }
    header = json.loads(json.dumps(header))  # as it reads back from run.json

    done: dict[int, list[dict]] = {}
    records_file = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        run_file = out / RUN_FILE
        if run_file.is_file():
            previous = json.loads(run_file.read_text())
            if previous != header:
                raise ConceptAttentionError(
                    f"{out} holds a run with other settings ({run_file}); resume it with the same command, "
                    "or pass a new --out"
                )
        elif rank == 0:
            run_file.write_text(json.dumps(header, indent=2))
        done = _read_records(out)
        records_file = _open_records(out / f"records-{rank}.jsonl")

    mine = [c for c in range(len(chunks)) if c % world == rank and c not in done]
    call_settings = {k: settings[k] for k in ("t", "samples", "layers")}
    for key in ("size", "concept_tokens"):
        if settings.get(key) is not None:
            call_settings[key] = settings[key]
    class_names = list(dataset.class_names)
    bar = tqdm(
        total=sum(len(chunks[c]) for c in mine),
        desc=f"eval {dataset.name}" + (f" [{rank}/{world}]" if world > 1 else ""),
        unit="img",
        disable=not progress,
    )
    try:
        for c in mine:
            samples = [dataset[i] for i in chunks[c]]
            images_out: list[dict] = []
            groups: dict[tuple[str, ...], list[int]] = {}
            for j, sample in enumerate(samples):
                groups.setdefault(tuple(sample.concepts), []).append(j)
            per_sample: dict[int, dict] = {}
            for concepts, members in groups.items():
                group = [samples[j] for j in members]
                seeds = [settings["seed"] + 1000 * chunks[c][j] for j in members]
                bar.set_postfix_str(f"maps of {len(group)} images", refresh=True)  # one batched pass
                maps = run_methods(
                    pipe,
                    chosen,
                    [s.image for s in group],
                    list(concepts),
                    [s.caption for s in group],
                    {**call_settings, "seeds": seeds},
                )
                bar.set_postfix_str("scoring", refresh=False)
                for pos, j in enumerate(members):
                    per_sample[j] = {
                        name: score_sample(maps[name][pos], samples[j], settings, len(class_names)) for name in names
                    }
                    bar.update(1)  # the bar moves image by image, every image of the chunk once
            for j, sample in enumerate(samples):
                images_out.append({"index": chunks[c][j], "key": sample.key, "methods": per_sample[j]})
            done[c] = images_out
            if records_file is not None:
                records_file.write(json.dumps({"chunk": c, "images": images_out}) + "\n")
                records_file.flush()
                os.fsync(records_file.fileno())
    finally:
        bar.close()
        if records_file is not None:
            records_file.close()

    if rank != 0:
        return None
    if out is not None and world > 1:
        deadline = time.time() + wait_seconds
        while len(done) < len(chunks):
            if time.time() > deadline:
                missing = len(chunks) - len(done)
                raise ConceptAttentionError(
                    f"{missing} chunks are still missing from {out}; rerun the same command "
                    "to finish them (recorded chunks are kept)"
                )
            time.sleep(1.0)
            done = _read_records(out)
    records = [r for c in range(len(chunks)) for r in done[c]]
    results = {
        **header,
        "methods": summarise(records, names, class_names),
        "descriptions": {m.name: m.description for m in chosen},
        "method_settings": {m.name: m.settings() for m in chosen},
    }
    if out is not None:
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        (out / TABLE_FILE).write_text(markdown_table(results))
    return results
