"""Start-up times of the command line, each as a fresh process. Prints JSON.

- ``conceptattention --help``, ``--version`` and ``generate --help``: the answer a user waits for
  before anything runs (goal: under 1 s on 2 cores; nothing heavy is imported for them);
- ``conceptattention generate ...`` end to end on the built-in shapes model (interpreter start,
  imports, weight loading, 20 sampling steps with maps, writing every output);
- a bare ``import conceptattention.cli`` and ``import torch``, for scale.

Medians over ``--repeats`` runs, all measured in one run, alternating.

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-generate", action="store_true", help="time only the start-up commands")
    args = parser.parse_args()
    out = os.path.join(tempfile.mkdtemp(), "out")
    cli = [sys.executable, "-m", "conceptattention"]
    commands = {
        "help": cli + ["--help"],
        "version": cli + ["--version"],
        "generate_help": cli + ["generate", "--help"],
        "import_cli": [sys.executable, "-c", "import conceptattention.cli"],
        "import_torch": [sys.executable, "-c", "import torch"],
    }
    if not args.no_generate:
        commands["generate"] = cli + [
            "generate",
            "a red circle and a blue square on grass",
            "--concepts",
            "circle",
            "square",
            "grass",
            "--out",
            out,
            "--quiet",
        ]
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            runs[name].append(timed(cmd))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "benchmark": "startup",
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "median_seconds": medians,
        "help_under_1s": medians["help"] < 1.0,
        "help_vs_import_torch": medians["help"] / medians["import_torch"],
        "all_seconds": runs,
        "files_written": sorted(os.listdir(out)) if os.path.isdir(out) else [],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
