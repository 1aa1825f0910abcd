"""The model card of the shipped shapes weights: config, data, training, loss curve, held-out numbers."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw


def loss_curve_png(log: list[dict], path: Path, size: tuple[int, int] = (480, 240)) -> None:
    """A plain line plot of the logged training loss (log-scale y)."""
    import math

    w, h = size
    pad = 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    steps = [r["step"] for r in log]
    losses = [math.log10(max(r["loss"], 1e-6)) for r in log]
    lo, hi = min(losses), max(losses)
    x = lambda s: pad + (w - 2 * pad) * (s - steps[0]) / max(1, steps[-1] - steps[0])
    y = lambda v: h - pad - (h - 2 * pad) * (v - lo) / max(1e-9, hi - lo)
    draw.rectangle([pad, pad, w - pad, h - pad], outline="gray")
    draw.line([(x(s), y(v)) for s, v in zip(steps, losses)], fill=(40, 80, 220), width=2)
    draw.text((pad, 8), f"training loss (log10), steps {steps[0]}-{steps[-1]}", fill="black")
    draw.text((4, pad), f"{10 ** hi:.3f}", fill="black")
    draw.text((4, h - pad - 10), f"{10 ** lo:.3f}", fill="black")
    img.save(path)


def training_minutes(log: list[dict]) -> float:
    """Wall time over all segments of a resumed run (each segment's clock restarts at 0)."""
    total, last = 0.0, 0.0
    for record in log:
        if record["seconds"] < last:
            total += last
        last = record["seconds"]
    return (total + last) / 60


def write_card(weights: Path, run: Path, report: dict, validation: dict, hardware: str, history: str = "") -> Path:
    """MODEL_CARD.md (+ loss_curve.png) next to the weights."""
    meta = json.loads((weights / "config.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    loss_curve_png(log, weights / "loss_curve.png")
    from .benchmark import markdown_table

    cfg, train = meta["config"], meta.get("train_config", {})
    size_mb = (weights / "model.safetensors").stat().st_size / 2**20
    every = max(1, len(log) // 10)
    rows = "\n".join(f"| {r['step']} | {r['loss']:.4f} | {training_minutes(log[: log.index(r) + 1]):.1f} |"
                     for r in log[::every] + log[-1:])
    text = f"""# The shapes model

A diffusers `FluxTransformer2DModel` and a word-level text encoder, trained by this project on the
shapes world (`conceptattention.shapes.world`) so that ConceptAttention runs offline on the same
code path as on FLUX.1. Weights: `model.safetensors` ({size_mb:.1f} MB, bfloat16), config: `config.json`.

## Architecture
- transformer: {cfg['num_layers']} double-stream + {cfg['num_single_layers']} single-stream blocks, hidden
  {cfg['num_attention_heads'] * cfg['attention_head_dim']} = {cfg['num_attention_heads']} heads x {cfg['attention_head_dim']},
  RoPE axes {cfg['axes_dims_rope']}, no guidance embedding;
- image "latents": pixels in [-1, 1], {cfg['patch']}x{cfg['patch']} patches -> {(64 // cfg['patch']) ** 2} tokens of {3 * cfg['patch'] ** 2} values;
- text encoder: vocabulary of {len(cfg['vocab']) - 1} words + padding, {cfg['text_layers']} transformer layers of width
  {cfg['text_dim']}, at most {cfg['max_tokens']} words; pooled vector = mean over real words;
- maps read from double-stream blocks {cfg.get('map_layers')} by default (chosen on the validation seed).

## Data and training
- fresh batches from the shapes world every step (1-3 objects; 3 shapes x 4 colours; gray / grass / sky);
  {100 * train.get('single_word_rate', 0):.0f}% of captions are a single true word (so concepts encoded alone are in
  distribution), {100 * train.get('caption_dropout', 0):.0f}% are empty (classifier-free guidance);
- rectified flow as in Flux (`x_t = t noise + (1 - t) x_0`, target `noise - x_0`), logit-normal t
  (mean {train.get('t_mean')}, std {train.get('t_std')}); AdamW lr {train.get('lr')} (warm-up {train.get('warmup')},
  cosine to 10%), batch {train.get('batch')}, EMA {train.get('ema')}, bf16 autocast, seed {train.get('seed')};
- {meta.get('steps')} steps on {hardware}, {training_minutes(log):.0f} minutes of training
  (`conceptattention train-shapes --out DIR` reproduces it from these defaults; it resumes from
  `DIR/checkpoint.pt`). {history}

| step | loss | minutes |
|---|---|---|
{rows}

![loss curve](loss_curve.png)

## Held-out quality (seed {report['maps']['seed']}, never trained on)

{markdown_table(report['maps'], report.get('samples'))}

Validation (seed {validation.get('seed')}) used to choose settings: {json.dumps({k: v for k, v in validation.items() if k != 'seed'})}

Reproduce: `conceptattention shapes-benchmark --out runs/bench`.
"""
    path = weights / "MODEL_CARD.md"
    path.write_text(text)
    return path
