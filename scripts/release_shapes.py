"""Turn a train-shapes run into the shipped model.

1. choose the layers read by default, and the guidance scale, on the validation seed (never the
   held-out seed);
2. measure the held-out benchmark (sample quality + every readout);
3. write config.json (with map_layers), model.safetensors, MODEL_CARD.md and loss_curve.png into
   src/conceptattention/shapes/weights/.

    python scripts/release_shapes.py runs/shapes-train --hardware "2-core CPU" [--history "..."]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from conceptattention.pipelines.shapes import WEIGHTS_DIR, ShapesPipeline
from conceptattention.shapes import benchmark
from conceptattention.shapes.card import write_card

LAYER_CANDIDATES = ([0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [2, 3, 4, 5], [3, 4, 5], [2, 3, 4], [4], [5])
GUIDANCE_CANDIDATES = (2.0, 4.0, 6.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--hardware", default="2 CPU cores (Intel Xeon with AMX), bf16 autocast")
    p.add_argument("--history", default="")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--validation-images", type=int, default=200)
    a = p.parse_args()
    torch.set_num_threads(2)

    pipe = ShapesPipeline.from_pretrained(a.run / "weights")
    layers, layer_scores = benchmark.choose_layers(pipe, LAYER_CANDIDATES, n=a.validation_images)
    guidance_scores = {}
    for g in GUIDANCE_CANDIDATES:
        r = benchmark.sample_quality(pipe, a.validation_images, benchmark.VALIDATION_SEED, guidance=g)
        guidance_scores[g] = r["shape_accuracy"] + r["color_accuracy"]
    guidance = max(guidance_scores, key=guidance_scores.get)
    print("layers", layers, layer_scores, "guidance", guidance, guidance_scores, flush=True)

    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(a.run / "weights" / "model.safetensors", WEIGHTS_DIR / "model.safetensors")
    meta = json.loads((a.run / "weights" / "config.json").read_text())
    meta["config"]["map_layers"] = layers
    meta["config"]["default_guidance"] = guidance
    (WEIGHTS_DIR / "config.json").write_text(json.dumps(meta, indent=2))

    shipped = ShapesPipeline.from_pretrained()
    report = benchmark.run(shipped, a.run / "heldout", images=a.images, sample_images=a.images)
    validation = {"seed": benchmark.VALIDATION_SEED, "images": a.validation_images,
                  "concept_attention_miou_by_layers": layer_scores,
                  "colour_plus_shape_accuracy_by_guidance": guidance_scores}
    write_card(WEIGHTS_DIR, a.run, report, validation, a.hardware, a.history)
    print((a.run / "heldout" / "shapes_benchmark.md").read_text())


if __name__ == "__main__":
    main()
