"""Plot the local suite's results: GB/s per contender, cold and page-cached, against the limits
measured in the same run (the best raw cold read and page-cache read of the sweep, the pinned
host-to-GPU copy).

Usage: ``python benchmarks/plot.py [RESULT.json ...] [--out PNG]``: one panel per JSON of
``benchmarks/run.py local``; without arguments, the JSON files of the GPU and CPU tables of
docs/benchmarks.md (``render_tables.LOCAL_GPU`` and ``render_tables.CPU_2CORE``) into
``docs/img/local-loads.png``. Needs ``matplotlib`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import render_tables

log = logging.getLogger("plot")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "img" / "local-loads.png"
MODES = ("cold", "warm")
COLORS = {"cold": "#4477aa", "warm": "#ee6677"}


def bars(data: Dict[str, Any]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{contender: {mode: {"best": GB/s, "median": GB/s}}} of a local-suite JSON, in its order
    (contenders that failed are left out). ``raw-cold``, the sweep's best configuration reading
    every byte in the rounds, is a bar; the sweep's best points are limits, drawn as lines."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for key, rec in data["results"]["contenders"].items():
        name, _, mode = key.rpartition("-")
        if mode not in MODES or "median_gbps" not in rec:
            continue
        name = "raw read, all bytes" if name == "raw" else name
        out.setdefault(name, {})[mode] = {"best": rec["best_gbps"], "median": rec["median_gbps"]}
    return out


def limits(data: Dict[str, Any]) -> Dict[str, float]:
    """The limits of the run, by label: GB/s."""
    r = data["results"]
    sweep, out = r.get("disk_sweep", {}), {}
    if sweep.get("cold"):
        out["best raw cold read"] = sweep["cold"]["best"]["gbps"]
    if sweep.get("warm"):
        out["best page-cache read"] = sweep["warm"]["best"]["gbps"]
    if r.get("h2d"):
        out["pinned host-to-GPU copy"] = r["h2d"]["pinned_gbps"]
    return out


def _panel(ax: Any, data: Dict[str, Any]) -> None:
    series = bars(data)
    names = list(series)
    height = 0.38
    for m_i, mode in enumerate(MODES):
        label: Optional[str] = f"{mode} (median; tick: best)"  # on the mode's first bar
        for n_i, name in enumerate(names):
            rec = series[name].get(mode)
            if rec is None:
                continue
            y = n_i + (m_i - 0.5) * height
            ax.barh(y, rec["median"], height=height, color=COLORS[mode], label=label)
            label = None
            ax.plot([rec["best"]] * 2, [y - height / 2, y + height / 2], color="black", lw=1)
            ax.text(max(rec["best"], rec["median"]) * 1.05, y, f"{rec['median']:.2f}", va="center",
                    fontsize=7)
    from matplotlib.ticker import FuncFormatter

    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    values = [v for rec in series.values() for m in rec.values() for v in m.values()]
    every = values + list(limits(data).values())
    ax.set_xlim(min(every) / 2, max(every) * 1.4)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if f"{x:g}"[0] in "25" else ""))
    ax.set_xlabel("GB/s (log scale)")
    for (label, gbps), style in zip(limits(data).items(), ("--", "-.", ":")):
        ax.axvline(gbps, color="#228833", ls=style, lw=1, label=f"{label} {gbps:.1f} GB/s")
    m = data.get("machine", {})
    gpu = (m.get("gpus") or ["no GPU"])[0].split(",")[0]
    commit = (data.get("git", {}).get("commit") or "?")[:12]
    ax.set_title(f"{data['args'].get('device')}: {data['results']['bytes'] / 1e9:.2f} GB, {gpu}, "
                 f"{m.get('cpu_count')} cores; {str(data.get('date', ''))[:10]}, commit {commit}; "
                 f"{data['args'].get('rounds')} interleaved rounds", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot(paths: List[Path], out: Path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(11, 3.2 * len(datasets)), squeeze=False)
    for ax, data in zip(axes[:, 0], datasets):
        _panel(ax, data)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, metadata={"Software": None})
    log.info("wrote %s", out)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="*", type=Path,
                   help="run.py local JSON files (default: those of the docs' tables)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    results = ROOT / render_tables.RESULTS
    paths = args.json or [results / render_tables.LOCAL_GPU, results / render_tables.CPU_2CORE]
    plot(paths, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
