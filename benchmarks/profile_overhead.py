"""Where ConceptAttention's extra time goes: torch.profiler over one plain forward and one with concepts.

Same model and inputs as ``overhead.py``. Prints JSON: per side, the host time of the forward, the
summed GPU kernel time, the number of kernels launched, and the operators that differ most; then the
top operators of the side with concepts as a table.

    python benchmarks/profile_overhead.py --config flux-schnell --device cuda --dtype bfloat16
    python benchmarks/profile_overhead.py          # CPU, mid size (no GPU kernel numbers)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import ALIASES, CONFIGS, NotSupported, build_model, concept_embeds, make_inputs, open_session, sync  # noqa: E402


def profiled(fn, device: str) -> tuple[dict, object]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ops = {
        e.key: [e.count, e.self_device_time_total if kernels else e.self_cpu_time_total]  # calls, self us
        for e in prof.key_averages()
    }
    summary = {
        "wall_seconds": wall,
        "kernels": len(kernels),
        "kernel_seconds": sum(e.device_time for e in kernels) / 1e6 if kernels else None,
    }
    return {"summary": summary, "ops": ops}, prof


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, *ALIASES], default="flux-mid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--concepts", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    name = ALIASES.get(a.config, a.config)
    cfg = CONFIGS[name]
    model = build_model(cfg, a.device, dtype)
    inputs = make_inputs(cfg, a.device, dtype)
    try:
        session = open_session(model, concept_embeds(cfg, a.concepts, a.device, dtype), name, cfg, layers=cfg.layers)
    except NotSupported as error:
        sys.exit(f"profile_overhead.py: error: {error}")

    def ours():
        with session:
            model(**inputs)
        session.reset()

    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernels chosen, caches filled
            model(**inputs)
            ours()
        plain, _ = profiled(lambda: model(**inputs), a.device)
        hooked, prof = profiled(ours, a.device)
    diff = {
        name: [
            hooked["ops"][name][0] - plain["ops"].get(name, [0, 0.0])[0],
            (hooked["ops"][name][1] - plain["ops"].get(name, [0, 0.0])[1]) / 1e3,
        ]
        for name in hooked["ops"]
    }
    biggest = sorted(diff.items(), key=lambda kv: -abs(kv[1][1]))[: a.top]
    print(
        json.dumps(
            {
                "config": a.config,
                "device": a.device,
                "dtype": a.dtype,
                "layers": list(session.layers),
                "plain": plain["summary"],
                "with_concepts": hooked["summary"],
                "extra_ops_ms": {k: {"calls": c, "ms": round(ms, 3)} for k, (c, ms) in biggest},
            },
            indent=2,
        )
    )
    sort = "self_cuda_time_total" if a.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=a.top))


if __name__ == "__main__":
    main()
