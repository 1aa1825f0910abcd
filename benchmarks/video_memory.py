"""Extra peak memory of the concept stream on a video MM-DiT, as a ratio to the plain pass, in one run.

Each measurement runs in a fresh child process (so one pass's allocations never hide another's): it
builds a mid-size random-weight ``HunyuanVideoTransformer3DModel`` and the call inputs, notes the
resident memory, runs one real-video pass (stopping after the last read block) plain or with K concepts,
and reports how far the peak rose above that level. On CUDA the peak is ``max_memory_allocated``. The
ratio is (ours - plain) / plain of that rise, and of the whole peak. Prints JSON.

    python benchmarks/video_memory.py                    # CPU, 5 x 32 x 32 latents (1280 video tokens)
    python benchmarks/video_memory.py --device cuda --frames 13 --side 60

The maps stay small because the core accumulates each readout into one ``[B, K, N]`` sum on the
device, in place, for every read layer and call: never one copy per step or per layer.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys

import torch

HIDDEN_HEADS, HEAD_DIM, TEXT, POOLED = 12, 64, 1024, 768


def build(frames: int, side: int, device: str):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=HIDDEN_HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=6,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=TEXT,
        pooled_projection_dim=POOLED,
        rope_axes_dim=(16, 24, 24),
    ).eval()
    model.to(device)
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, frames, side, side, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 128, TEXT, generator=g),
        encoder_attention_mask=torch.ones(1, 128),
        pooled_projections=torch.randn(1, POOLED, generator=g),
        guidance=torch.tensor([6000.0]),
        return_dict=False,
    )
    return model, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(mode: str, frames: int, side: int, concepts: int, device: str) -> dict:
    from conceptattention import ConceptAttention
    from conceptattention.hooks import HookSession

    model, inputs = build(frames, side, device)
    embeds = torch.randn(concepts, TEXT, device=device)
    layers = [3, 4]
    cuda = device.startswith("cuda")
    with torch.no_grad():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss_bytes()
        if mode == "plain":  # the same blocks without maps: the bare hook session reads nothing, stops as early
            session = HookSession(model, None)
            session.layers = (layers[-1],)
        else:
            session = ConceptAttention(model, embeds, layers=layers)
        with session:
            session.forward_until_last_layer(**inputs)
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"base": base, "peak": peak, "rise": peak - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5, help="latent frames")
    parser.add_argument("--side", type=int, default=32, help="latent rows = columns (patch 2)")
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["plain", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.frames, args.side, args.concepts, args.device)))
        return
    runs = {}
    for mode in ("plain", "ours"):
        command = [sys.executable, __file__, "--child", mode] + [
            f"--{k}={getattr(args, k)}" for k in ("frames", "side", "concepts", "device")
        ]
        runs[mode] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    plain, ours = runs["plain"], runs["ours"]
    tokens = args.frames * (args.side // 2) ** 2
    print(
        json.dumps(
            {
                "benchmark": "video_memory",
                "model": "HunyuanVideoTransformer3DModel, random weights, hidden 768, 6 double + 2 single blocks",
                "video_tokens": tokens,
                "concepts": args.concepts,
                "device": args.device,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "measure": "CUDA max_memory_allocated" if args.device.startswith("cuda") else "process peak RSS",
                "plain": plain,
                "ours": ours,
                "extra_bytes": ours["rise"] - plain["rise"],
                "extra_over_plain_pass": round((ours["rise"] - plain["rise"]) / max(plain["rise"], 1), 4),
                "peak_ratio": round(ours["peak"] / plain["peak"], 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
