"""Turn a train-shapes run into the shipped model.

1. choose the layers read by default, and the guidance scale, on the validation seed (never the
   held-out seed);
2. measure the held-out benchmark (sample quality + every readout);
3. write config.json (with map_layers), model.safetensors, MODEL_CARD.md and loss_curve.png into
   src/conceptattention/shapes/weights/.

    python scripts/release_shapes.py RUN --command "conceptattention train-shapes --out RUN ..." \
        [--previous EARLIER_RUN --previous-command "..."] [--note "..."] [--previous-note "..."]

RUN is the last training stage; ``--previous`` names the stage it started from (``--init-from``), so
the model card lists every stage with its command.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from conceptattention.pipelines.shapes import WEIGHTS_DIR, ShapesPipeline
from conceptattention.shapes import benchmark
from conceptattention.shapes.card import stage_record, write_card

LAYER_CANDIDATES = ([0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [2, 3, 4, 5], [3, 4, 5], [2, 3, 4], [4], [5])
GUIDANCE_CANDIDATES = (2.0, 4.0, 6.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--hardware", default="2 CPU cores (Intel Xeon with AMX), bf16 autocast")
    p.add_argument("--command", required=True, help="the train-shapes command of RUN")
    p.add_argument("--note", default="", help="anything unusual about RUN (interruptions, ...)")
    p.add_argument("--previous", type=Path, default=None, help="the run RUN started from, if any")
    p.add_argument("--previous-command", default="conceptattention train-shapes --out DIR")
    p.add_argument("--previous-note", default="")
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
    stages = [stage_record(a.previous, a.previous_command, a.previous_note)] if a.previous else []
    stages.append(stage_record(a.run, a.command, a.note))
    meta["stages"] = [{k: v for k, v in st.items() if k != "log"} for st in stages]
    (WEIGHTS_DIR / "config.json").write_text(json.dumps(meta, indent=2))
    write_card(WEIGHTS_DIR, stages, report, validation, a.hardware)
    print((a.run / "heldout" / "shapes_benchmark.md").read_text())


if __name__ == "__main__":
    main()
