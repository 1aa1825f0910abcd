"""Experiment: do image tokens read shape words once the caption's words are no longer mixed?

Hypothesis (README, "The maps do not yet follow shapes"): the text encoder mixes a caption's words,
so "red" in "a red circle" already says "circle"; with the pooled vector also carrying the whole
caption, image tokens never need the shape word itself. This fine-tunes a shapes model with both
routes cut — the text encoder's transformer layers bypassed (each prompt token is its word's
embedding plus its position, normalised) and the pooled vector zeroed — and measures whether the
ConceptAttention and DAAM-style shape picks rise above chance (50%) on the validation seed.

    python lab/experiments/text_routing.py runs/shapes-xpred/weights --seconds 3300 --out /tmp/routing.pt

Session 7 ran exactly this on 2 CPU cores from the stage-5 model (8x8 patches): 1,317 steps of 64.
"""

from __future__ import annotations

import argparse
import time

import torch

from conceptattention.eval import shapes_report
from conceptattention.pipelines.shapes import ShapesPipeline
from conceptattention.shapes import world
from conceptattention_lab import surgery
from conceptattention_lab.train import TrainConfig, batch_loss, init_model


def cut_routes(model) -> None:
    """Bypass the text encoder's word mixing and zero the pooled vector, in place."""
    surgery.drop_text_mixing(model)
    encode = model.encode_text

    def unpooled(texts):
        tokens, pooled = encode(texts)
        return tokens, torch.zeros_like(pooled)

    model.encode_text = unpooled


def report(model, tag: str, images: int) -> None:
    model.eval()
    r = shapes_report.map_quality(
        ShapesPipeline(model, name=tag),
        images,
        world.VALIDATION_SEED,
        readouts=["concept_attention", "daam", "cross_attention_softmax"],
        progress=False,
    )
    for name, x in r["readouts"].items():
        kinds = {k: round(100 * v["miou"]) for k, v in x["by_kind"].items()}
        print(
            f"{tag} {name}: mIoU {100 * x['miou']:.1f}, shape pick {100 * x['shape_pick']:.1f}%, "
            f"colour pick {100 * x['color_pick']:.1f}%, mIoU by kind {kinds}",
            flush=True,
        )
    model.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a shapes weights directory to start from")
    p.add_argument("--seconds", type=float, default=3300, help="training time budget")
    p.add_argument("--out", default="", help="where to save the fine-tuned state dict")
    p.add_argument("--images", type=int, default=100, help="validation images for the picks")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = init_model(a.weights)
    cut_routes(model)
    report(model, "before fine-tuning", a.images)
    cfg = TrainConfig(batch=64, object_weight=4, lr=3e-4, seed=71, t_uniform=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    model.train()
    began, step, running = time.time(), 0, 0.0
    while time.time() - began < a.seconds:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 50)
        loss = batch_loss(model, step, cfg, torch.device("cpu"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        running, step = running + float(loss.detach()), step + 1
        if step % 50 == 0:
            print(f"step {step} loss {running / 50:.5f} ({time.time() - began:.0f} s)", flush=True)
            running = 0.0
    if a.out:
        torch.save(model.state_dict(), a.out)
    report(model, f"after {step} steps", a.images)


if __name__ == "__main__":
    main()
