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


def test_targets_are_judged_on_the_median():
    """A target is met when its median meets the bar; a JSON that does not measure it says so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import targets
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    at_least = targets.Target("x", ">=", 0.9, ("S",), targets.ratio("a / b"))
    at_most = targets.Target("y", "<=", 1.1, ("S",), targets.ratio("a / b"))
    assert at_least.met(0.9) and not at_least.met(0.899) and at_most.met(1.1) and not at_most.met(1.1001)
    data = {"results": {"ratios": {"a / b": {"best": 0.95, "median": 0.85}}}}
    assert at_least.measure(data) == (0.95, 0.85)
    fresh = {"results": {"disk_sweep": {"warm": {"best": {"gbps": 10.0}}}, "h2d": {"pinned_gbps": 5.0},
                         "fresh_warm": {"sllm": {"load": {"best_gbps": 5.0, "median_gbps": 4.0,
                                                          "best_s": 1.0, "median_s": 1.25}},
                                        "safetensors": {"load": {"best_s": 5.0, "median_s": 6.0}}}}}
    assert targets.fresh_over_limit("warm")(fresh) == (1.0, 0.8)  # the pinned copy bounds it
    assert targets.ratio("sllm-fresh-warm / safetensors-fresh-warm")(fresh) == (5.0, 4.8)
    assert targets.ratio("load_model-fresh-cold time / sllm-fresh-cold time")(fresh) is None
    table = targets.render(lambda constant: ("r.json", {"results": {"ratios": {}}}))
    assert f"0 of {len(targets.TARGETS)} targets met" in table and "not measured by this run" in table


def test_a_target_is_met_only_in_every_run_that_measures_it(monkeypatch):
    """A target measured by several runs is met when all of them meet it, not met when none
    does, and otherwise says how many do; a run that does not measure it is not counted."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import targets
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    runs = {c: {"results": {"ratios": {} if m is None else {"a / b": {"best": 1.0, "median": m}}}}
            for c, m in (("PASS", 0.95), ("FAIL", 0.85), ("NONE", None))}
    cases = {("PASS", "NONE"): "| met |", ("FAIL",): "| **not met** |",
             ("PASS", "FAIL", "NONE"): "| **met in 1 of 2 runs** |"}
    for sources, status in cases.items():
        target = targets.Target("x", ">=", 0.9, sources, targets.ratio("a / b"))
        monkeypatch.setattr(targets, "TARGETS", [target])
        table = targets.render(lambda constant: (f"{constant.lower()}.json", runs[constant]))
        assert status in table, table
        assert table.startswith(f"{int(status == '| met |')} of 1 targets met")


def test_rounds_not_in_their_page_cache_state_are_named():
    """A local-suite table names every round whose files were not in its state when it started
    (a warm round with its files on the disk, a cold one with them cached), from the resident
    fraction the suite records before each round."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import suite_tables
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def rec(resident):
        return {"bytes": 1e9, "all_s": [1.0] * len(resident), "best_s": 1.0, "median_s": 1.0,
                "best_gbps": 1.0, "median_gbps": 1.0, "resident_before": resident}

    r = {"contenders": {"sllm-cold": rec([0.0, 0.01, 0.0]), "safetensors-warm": rec([0.0, 1.0, 0.4]),
                        "sllm-warm": rec([1.0, 0.995, None])}}
    out = suite_tables._contenders(r)
    assert "`safetensors-warm` (round 1: 0%, round 3: 40% resident)" in out
    assert "sllm-warm`" not in out.split("Not in their page-cache state")[1]
    assert "sllm-cold` (" not in out
    r["contenders"]["sllm-cold"] = rec([0.0, 0.5, 0.0])
    assert "`sllm-cold` (round 2: 50% resident)" in suite_tables._contenders(r)
    r["contenders"] = {"sllm-warm": rec([1.0, 1.0, 1.0])}
    assert "Not in their page-cache state" not in suite_tables._contenders(r)
