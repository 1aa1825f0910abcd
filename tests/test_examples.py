"""The scripts under examples/ run as documented (offline, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    "script, args, expect",
    [
        ("quickstart.py", ["--out", "{tmp}"], "maps"),
        ("shapes_maps.py", ["--out", "{tmp}"], "segmentation.png"),
        ("custom_method.py", ["--images", "6"], "| sharpened_concept_attention |"),
    ],
)
def test_example_runs(tmp_path, script, args, expect):
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *(a.format(tmp=tmp_path) for a in args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert expect in r.stdout
