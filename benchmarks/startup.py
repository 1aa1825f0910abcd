"""End-to-end time of the main job on the built-in shapes model, start-up included. Prints JSON.

Runs ``conceptattention generate ...`` as a fresh process (interpreter start, imports, weight
loading, 20 sampling steps with maps, writing every output) several times and reports the median,
next to the time of a bare ``python -c "import conceptattention"`` measured in the same run.

    python benchmarks/startup.py [--repeats 3]
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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = tempfile.mkdtemp()
    cli = [sys.executable, "-m", "conceptattention.cli", "generate", "a red circle and a blue square on grass",
           "--concepts", "circle", "square", "grass", "--out", out, "--quiet"]
    imports = [sys.executable, "-c", "import conceptattention.cli"]
    runs = {"generate": [], "import_only": []}
    for _ in range(args.repeats):
        runs["generate"].append(timed(cli))
        runs["import_only"].append(timed(imports))
    result = {
        "benchmark": "startup",
        "command": " ".join(cli[2:]),
        "cpu_count": os.cpu_count(),
        "median_seconds": {k: statistics.median(v) for k, v in runs.items()},
        "all_seconds": runs,
        "files_written": sorted(os.listdir(out)),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
