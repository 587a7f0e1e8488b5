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


def test_the_plot_reads_the_docs_local_tables(tmp_path):
    """benchmarks/plot.py draws each contender's cold and page-cached GB/s of the local suite's
    JSON against the run's own limits; with matplotlib installed it writes the PNG."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import plot
        import render_tables
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import json

    gpu = json.loads((ROOT / render_tables.RESULTS / render_tables.LOCAL_GPU).read_text())
    series = plot.bars(gpu)
    assert "raw" not in series and set(series["sllm"]) == {"cold", "warm"}
    assert series["sllm"]["warm"]["median"] == gpu["results"]["contenders"]["sllm-warm"]["median_gbps"]
    assert set(plot.limits(gpu)) == {"best raw cold read", "best page-cache read", "pinned host-to-GPU copy"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    out = tmp_path / "plot.png"
    plot.main([str(ROOT / render_tables.RESULTS / render_tables.CPU_2CORE), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
