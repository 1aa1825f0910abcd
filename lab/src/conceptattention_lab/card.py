"""The model card of the shipped shapes weights: config, data, training, loss curve, held-out numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from conceptattention.eval.shapes_report import markdown_table
from conceptattention.shapes.model import SAMPLE_T_MIN


def loss_curve_png(log: list[dict], path: Path, size: tuple[int, int] = (480, 240)) -> None:
    """A plain line plot of the logged training loss (log-scale y)."""
    w, h = size
    pad = 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    steps = [r["step"] for r in log]
    losses = [math.log10(max(r["loss"], 1e-6)) for r in log]
    lo, hi = min(losses), max(losses)

    def x(s: float) -> float:
        return pad + (w - 2 * pad) * (s - steps[0]) / max(1, steps[-1] - steps[0])

    def y(v: float) -> float:
        return h - pad - (h - 2 * pad) * (v - lo) / max(1e-9, hi - lo)

    draw.rectangle([pad, pad, w - pad, h - pad], outline="gray")
    draw.line([(x(s), y(v)) for s, v in zip(steps, losses)], fill=(40, 80, 220), width=2)
    draw.text((pad, 8), f"training loss (log10), steps {steps[0]}-{steps[-1]}", fill="black")
    draw.text((4, pad), f"{10**hi:.3f}", fill="black")
    draw.text((4, h - pad - 10), f"{10**lo:.3f}", fill="black")
    img.save(path)


def training_minutes(log: list[dict]) -> float:
    """Wall time over all segments of a resumed run (each segment's clock restarts at 0)."""
    total, last = 0.0, 0.0
    for record in log:
        if record["seconds"] < last:
            total += last
        last = record["seconds"]
    return (total + last) / 60


#: Most points of a stage's loss log that its record in the shipped config.json keeps (``loss_points``), so
#: that a later release can draw the loss curve without the stage's run directory.
LOSS_POINTS = 100


def loss_points(log: list[dict], most: int = LOSS_POINTS) -> list[list[float]]:
    """``[step, loss]`` of every k-th log record (at most about ``most``), and always the last."""
    if not log:
        return []
    picked = log[:: math.ceil(len(log) / most)]
    if picked[-1] is not log[-1]:
        picked.append(log[-1])
    return [[r["step"], round(float(r["loss"]), 6)] for r in picked]


def stage_record(run: Path, command: str, note: str = "", hardware: str = "") -> dict:
    """What the card says about one training stage: its config, steps, minutes, log, command and hardware."""
    meta = json.loads((run / "weights" / "config.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return {
        "train_config": meta.get("train_config", {}),
        "steps": meta.get("steps"),
        "minutes": training_minutes(log),
        "prediction": meta.get("config", {}).get("prediction", "velocity"),
        "patch": meta.get("config", {}).get("patch"),
        "text_layers": meta.get("config", {}).get("text_layers", 2),
        "log": log,
        "loss_points": loss_points(log),
        "command": command,
        "note": note,
        "hardware": hardware,
    }


def recorded_stages(weights: Path) -> list[dict]:
    """The stages of the model in ``weights`` as its config.json records them, each with a ``log`` for the card
    made of the record's ``loss_points``. For releasing on top of stages whose run directories are gone."""
    meta = json.loads((weights / "config.json").read_text())
    return [
        {**record, "log": [{"step": s, "loss": v} for s, v in record["loss_points"]]}
        for record in meta.get("stages", [])
    ]


def _reading(train_config: dict) -> str:
    """A stage's reading weight, with the blocks it read when they were named (the last block otherwise)."""
    weight, blocks = train_config.get("reader_weight", 0.0), train_config.get("reader_blocks") or []
    text = f"{weight} at blocks {', '.join(str(b) for b in blocks)}" if weight and blocks else f"{weight}"
    return text + (" (attention outputs)" if weight and train_config.get("reader_at") == "attention" else "")


def _map_objectives(train_config: dict) -> str:
    """A stage's objectives on the maps, with their weights and the blocks they scored when named ("none")."""
    weights = {
        "image labels": train_config.get("concept_weight", 0.0),
        "co-reference": train_config.get("coreference_weight", 0.0),
    }
    named = ", ".join(f"{name} {w}" for name, w in weights.items() if w)
    blocks = train_config.get("concept_blocks") or []
    return (named + (f" at blocks {', '.join(str(b) for b in blocks)}" if blocks else "")) if named else "none"


def _precision(cfg: dict) -> str:
    return "bf16 autocast" if cfg.get("bf16", True) else "float32 (TF32 on CUDA)"


def _choice_criteria(validation: dict) -> str:
    """How the release chose its default settings, from the validation record it kept."""
    layers = ": the layers by the mean of the maps' mIoU, shape pick and colour pick"
    if "sampler_kept_from_the_previous_release" in validation:
        return layers + "; the guidance and shift kept from the previous release"
    return layers + "; the guidance and shift together, by colours plus shapes right"


def write_card(weights: Path, stages: list[dict], report: dict, validation: dict, hardware: str) -> Path:
    """MODEL_CARD.md (+ loss_curve.png) next to the weights; ``stages`` from :func:`stage_record`, in order;
    ``hardware`` names the machine of any stage that does not name its own."""
    meta = json.loads((weights / "config.json").read_text())
    log, offset = [], 0
    for stage in stages:  # one curve over all stages, steps counted from the first
        log += [{**r, "step": r["step"] + offset} for r in stage["log"]]
        offset += stage["steps"]
    loss_curve_png(log, weights / "loss_curve.png")
    cfg, first = meta["config"], stages[0]["train_config"]
    criteria = _choice_criteria(validation)
    patch = cfg["patch"]
    target = (
        "the transformer outputs the velocity"
        if cfg.get("prediction", "velocity") == "velocity"
        else 'the transformer outputs the clean image `x_0` ("sample"), turned into the velocity '
        f"`(x_t - x_0) / max(t, {SAMPLE_T_MIN})`: a clean image lies on a far smaller set than noise, which "
        "matters where a token holds about as many values as the model is wide (here "
        f"{3 * patch * patch} values, width {cfg['num_attention_heads'] * cfg['attention_head_dim']})"
    )
    positions = (
        ""
        if cfg.get("rope_scale", 1.0) == 1.0
        else f"; RoPE positions are token indices x {cfg['rope_scale']} (re-patched: positions keep the unit of "
        f"{round(patch / cfg['rope_scale'])}-px patches)"
    )
    size_mb = (weights / "model.safetensors").stat().st_size / 2**20
    every = max(1, len(log) // 12)
    rows = "\n".join(f"| {r['step']} | {r['loss']:.4f} |" for r in log[::every] + log[-1:])
    stage_rows = "\n".join(
        f"| {i + 1} | {(f'stage {i} weights' if i else s['train_config'].get('init_from')) if s['train_config'].get('init_from') else 'scratch'} | {s['steps']} | {s['train_config'].get('lr')} | "
        f"{s['train_config'].get('warmup')} | {s['train_config'].get('seed')} | {s['train_config'].get('batch')} | "
        f"{s['train_config'].get('object_weight', 1.0)} | {s['train_config'].get('t_uniform', 0.0)} | "
        f"{s['train_config'].get('colorless_rate', 0.0)} | {s['train_config'].get('multi_object_rate', 0.0)} | "
        f"{_reading(s['train_config'])} | {_map_objectives(s['train_config'])} | {s.get('patch') or '?'} | {s.get('text_layers', 2)} | {s.get('prediction', 'velocity')} | "
        f"{_precision(s['train_config'])} | {s.get('hardware') or hardware} | {s['minutes']:.0f} | `{s['command']}` |"
        for i, s in enumerate(stages)
    )
    notes = " ".join(f"Stage {i + 1}: {s['note']}" for i, s in enumerate(stages) if s["note"])
    total = sum(s["steps"] for s in stages)
    weighted_note = (
        "\nA stage with an object weight logs the weighted mean loss, on a different scale from the others.\n"
        if any(s["train_config"].get("object_weight", 1.0) != 1.0 for s in stages)
        else ""
    )
    text_layers = (
        f"{cfg['text_layers']} transformer layers"
        if cfg.get("text_layers", 2)
        else "no mixing layers (a prompt token is its word's embedding plus its position, normalised)"
    )
    if cfg.get("text_neighbours"):
        text_layers += (
            "; each prompt word also adds learned linear maps of the words just before and after it "
            "(`text_neighbours`; a concept encoded alone has none)"
        )
    text = f"""# The shapes model

A diffusers `FluxTransformer2DModel` and a word-level text encoder, trained by this project on the
shapes world (`conceptattention.shapes.world`) so that ConceptAttention runs offline on the same
code path as on FLUX.1. Weights: `model.safetensors` ({size_mb:.1f} MB, bfloat16), config: `config.json`.

## Architecture
- transformer: {cfg["num_layers"]} double-stream + {cfg["num_single_layers"]} single-stream blocks, hidden
  {cfg["num_attention_heads"] * cfg["attention_head_dim"]} = {cfg["num_attention_heads"]} heads x {cfg["attention_head_dim"]},
  RoPE axes {cfg["axes_dims_rope"]}, no guidance embedding;
- image "latents": pixels in [-1, 1], {cfg["patch"]}x{cfg["patch"]} patches -> {(64 // cfg["patch"]) ** 2} tokens of {3 * cfg["patch"] ** 2} values{positions};
- text encoder: vocabulary of {len(cfg["vocab"]) - 1} words + padding, width {cfg["text_dim"]}, {text_layers};
  at most {cfg["max_tokens"]} words; pooled vector = mean over real words; prompt tokens' position ids:
  zeros, as Flux's pipelines pass them;
- maps read from double-stream blocks {cfg.get("map_layers")} by default, guidance {cfg.get("default_guidance")}, timestep
  shift {cfg.get("default_shift", 1.0)} (chosen on the validation seed{criteria}).

## Data and training
- fresh batches from the shapes world every step (1-3 objects; 3 shapes x 4 colours; gray / grass / sky);
  {100 * first.get("single_word_rate", 0):.0f}% of captions are a single true word (so concepts encoded alone are in
  distribution), {100 * first.get("caption_dropout", 0):.0f}% are empty (classifier-free guidance);
- rectified flow as in Flux (`x_t = t noise + (1 - t) x_0`, velocity `noise - x_0`); {target}. The loss is
  the squared error of the velocity in either case ("predicts" per stage below); logit-normal t
  (mean {first.get("t_mean")}, std {first.get("t_std")}); AdamW (linear warm-up, cosine to 10% of the peak
  learning rate), EMA {first.get("ema")}, gradient clipping {first.get("grad_clip")}; batch, precision and
  hardware per stage below; "object weight" is the loss weight of pixels on or within 2 px of an object,
  "uniform t" the share of timesteps drawn uniformly instead of logit-normal, "no-colour captions" the share
  of captions that name the shapes without their colours, "2-3 object share" the share of each batch drawn
  from scenes asking for two or three objects (the rest from the world's own mix, 60% single objects),
  "reading weight" the weight of the reading objective (in captions that name no colour, each shape word's
  token names its object's colour from the image through a linear head used only in training; 0: none),
  read where the last double-stream block leaves the text stream unless blocks are named ("at blocks 3, 4, 5":
  one head each, their cross-entropies averaged) and, with "(attention outputs)", reading the text tokens'
  attention outputs before the output projection instead; "map objectives" the weights of the objectives on
  ConceptAttention's maps at the model's map layers (all the world's concept words encoded alone): "image
  labels", at every image token the words true of the image must hold the softmax over concepts (which words
  are true, never where), and "co-reference", words that the caption makes name the same pixels (an object's
  colour and shape, the scene's name and "background") must score every token alike;
- {total} steps in {len(stages)} stage(s), {sum(s["minutes"] for s in stages):.0f} minutes of training.
  Each stage's settings are `lab/stages/stageNN.json` in the repository, and its command trains it again
  with the lab installed (`pip install -e lab`; a stage starting from weights reads the previous stage's
  exported `weights/`); every run resumes from `DIR/checkpoint.pt`. {notes}

| stage | starts from | steps | peak lr | warm-up | seed | batch | object weight | uniform t | no-colour captions | 2-3 object share | reading weight | map objectives | patch | text layers | predicts | precision | hardware | minutes | command |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{stage_rows}

| step (all stages) | loss |
|---|---|
{rows}
{weighted_note}
![loss curve](loss_curve.png)

## Held-out quality (seed {report["maps"]["seed"]}, never trained on)

{markdown_table(report["maps"], report.get("samples"))}

Validation (seed {validation.get("seed")}) used to choose settings: {json.dumps({k: v for k, v in validation.items() if k != "seed"})}

Reproduce: `conceptattention shapes-benchmark --out runs/bench`; the benchmark table of every method:
`conceptattention eval --dataset shapes --method all --out runs/eval-shapes`.
"""
    path = weights / "MODEL_CARD.md"
    path.write_text(text + hand_written_tail(path))
    return path


#: The card's last section, written by hand: every rewrite of the card keeps it as it is.
HAND_WRITTEN = "## Training history (hand-written)"


def hand_written_tail(card: Path) -> str:
    """The hand-written section at the end of an existing card (from :data:`HAND_WRITTEN` on), or ``""``."""
    if not card.is_file():
        return ""
    old = card.read_text()
    at = old.find("\n" + HAND_WRITTEN)
    return "" if at < 0 else "\n" + old[at + 1 :].rstrip("\n") + "\n"
