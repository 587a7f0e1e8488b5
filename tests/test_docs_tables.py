"""The results tables of the docs match the benchmark JSON they are generated from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_tables_are_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "render_tables.py"), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, (
        "docs out of date with benchmarks/results/: run python benchmarks/render_tables.py\n"
        + proc.stdout + proc.stderr
    )
