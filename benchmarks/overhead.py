"""Cost of ConceptAttention relative to the plain transformer, measured in one run. Prints JSON.

Two comparisons, each timed alternately (plain, ours, plain, ours, ...) on the same inputs so that
machine noise hits both sides alike; the reported ratio is median(ours) / median(plain):

- ``forward``: one full transformer forward with K concepts vs without;
- ``real_image_pass``: the pass a real image needs (stop after the last read double-stream block)
  with K concepts, vs the same plain blocks alone and vs a plain pass through all double blocks;
- ``encode_throughput``: images per second of that pass with 5 noise draws per image batched;
- on CUDA, peak memory with vs without maps for both passes.

    python benchmarks/overhead.py                      # CPU, mid-size random Flux (the CI-size check)
    python benchmarks/overhead.py --config flux-schnell --device cuda --dtype bfloat16   # GPU, full size
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel

from conceptattention import ConceptAttention

CONFIGS = {
    # hidden 768 = 12 heads x 64, 6 double + 6 single blocks, 32x32 = 1024 image tokens, 128 prompt tokens
    "mid": dict(
        model=dict(
            num_layers=6,
            num_single_layers=6,
            attention_head_dim=64,
            num_attention_heads=12,
            in_channels=64,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            axes_dims_rope=(8, 28, 28),
        ),
        grid=(32, 32),
        text_tokens=128,
    ),
    # FLUX.1-schnell's shapes: 19 double + 38 single blocks, hidden 3072 = 24 x 128; 1024x1024 px
    "flux-schnell": dict(
        model=dict(
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            in_channels=64,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
        ),
        grid=(64, 64),
        text_tokens=256,
    ),
}


class _Stop(Exception):
    pass


def build_model(cfg: dict, device: str, dtype: torch.dtype) -> FluxTransformer2DModel:
    """Random weights (seed 0), built directly on the target device in the target dtype (full size: 12B)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return FluxTransformer2DModel(**cfg["model"]).eval()
    finally:
        torch.set_default_dtype(previous)


def make_inputs(cfg: dict, device: str, dtype: torch.dtype, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = cfg["grid"]
    m = cfg["model"]
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(batch, h * w, m["in_channels"], generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, cfg["text_tokens"], m["joint_attention_dim"], generator=g).to(
            device, dtype
        ),
        pooled_projections=torch.randn(batch, m["pooled_projection_dim"], generator=g).to(device, dtype),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=ids.reshape(-1, 3).to(device),
        txt_ids=torch.zeros(cfg["text_tokens"], 3, device=device),
        return_dict=False,
    )


def plain_until(model: torch.nn.Module, last_block: int, inputs: dict) -> None:
    """The plain model, stopped after double-stream block ``last_block`` (no hooks of ours)."""

    def stop(*_):
        raise _Stop

    handle = model.transformer_blocks[last_block].register_forward_hook(stop)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(fns: dict, repeats: int, device: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def peak_memory(fn, device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--concepts", type=int, default=10, help="concepts for the full forward")
    parser.add_argument("--image-concepts", type=int, default=7, help="concepts for the real-image pass")
    parser.add_argument("--samples", type=int, default=5, help="noise draws per image for the encode throughput")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = CONFIGS[args.config]
    model = build_model(cfg, args.device, dtype)
    inputs = make_inputs(cfg, args.device, dtype)
    text_dim = cfg["model"]["joint_attention_dim"]
    n_blocks = cfg["model"]["num_layers"]
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(args.concepts, text_dim, generator=gen).to(args.device, dtype)
    image_embeds = torch.randn(args.image_concepts, text_dim, generator=gen).to(args.device, dtype)

    results: dict = {
        "benchmark": "overhead",
        "config": args.config,
        "model": cfg["model"],
        "image_tokens": cfg["grid"][0] * cfg["grid"][1],
        "text_tokens": cfg["text_tokens"],
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "repeats": args.repeats,
    }

    with torch.inference_mode():
        # Sessions are built once; attaching costs nothing per call.
        sessions = {
            "default_layers": ConceptAttention(model, embeds),
            "all_double_layers": ConceptAttention(model, embeds, layers=list(range(n_blocks))),
        }
        cases = {}
        for label, session in sessions.items():

            def run(session=session):
                with session:
                    model(**inputs)
                session.reset()

            cases[label] = run
        image_session = ConceptAttention(model, image_embeds)
        last_read = image_session.layers[-1]

        def ours_image():
            with image_session:
                image_session.forward_until_last_layer(**inputs)
            image_session.reset()

        # encode throughput: one image, 5 noise draws batched, the real-image pass with 7 concepts
        batch_inputs = make_inputs(cfg, args.device, dtype, batch=args.samples)

        def encode_batch():
            with image_session:
                image_session.forward_until_last_layer(**batch_inputs)
            image_session.reset()

        fns = {
            "plain_forward": lambda: model(**inputs),
            **{f"forward_{k}": fn for k, fn in cases.items()},
            "plain_image_pass": lambda: plain_until(model, last_read, inputs),
            "plain_all_double_blocks": lambda: plain_until(model, n_blocks - 1, inputs),
            "image_pass": ours_image,
            "encode_one_image": encode_batch,
        }
        alternate(fns, args.warmup, args.device)
        times = alternate(fns, args.repeats, args.device)
        med = {name: statistics.median(ts) for name, ts in times.items()}

        results["median_seconds"] = med
        results["forward"] = {
            "concepts": args.concepts,
            "layers_default": list(sessions["default_layers"].layers),
            "ratio_default_layers": med["forward_default_layers"] / med["plain_forward"],
            "ratio_all_double_layers": med["forward_all_double_layers"] / med["plain_forward"],
        }
        results["real_image_pass"] = {
            "concepts": args.image_concepts,
            "layers": list(image_session.layers),
            "ratio_vs_plain_same_blocks": med["image_pass"] / med["plain_image_pass"],
            "ratio_vs_plain_all_double_blocks": med["image_pass"] / med["plain_all_double_blocks"],
        }
        results["encode_throughput"] = {
            "noise_samples_per_image": args.samples,
            "images_per_second": 1.0 / med["encode_one_image"],
            "note": "transformer pass only (VAE encode and text encoding excluded)",
        }
        if args.device.startswith("cuda"):
            plain_peak = peak_memory(lambda: model(**inputs), args.device)
            ours_peak = peak_memory(cases["all_double_layers"], args.device)
            plain_image_peak = peak_memory(lambda: plain_until(model, last_read, inputs), args.device)
            ours_image_peak = peak_memory(ours_image, args.device)
            results["peak_memory_bytes"] = {
                "forward": {"plain": plain_peak, "with_maps": ours_peak, "ratio": ours_peak / plain_peak},
                "real_image_pass": {
                    "plain": plain_image_peak,
                    "with_maps": ours_image_peak,
                    "ratio": ours_image_peak / plain_image_peak,
                },
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
