"""Plot bench_load.py results: GB/s per contender, cold and warm, against the measured limits.

Usage: ``python benchmarks/plot.py RESULT.json [RESULT.json ...] --out docs/img/load.png``
(one panel per JSON, e.g. one for ``--device cuda:0`` and one for ``--device cpu``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger("plot")


def _panel(ax: Any, data: Dict[str, Any]) -> None:
    ok = [r for r in data["results"] if r.get("status") == "ok"]
    names: List[str] = []
    for r in ok:
        if r["contender"] not in names:
            names.append(r["contender"])
    modes = ("cold", "warm")
    colors = {"cold": "#4477aa", "warm": "#ee6677"}
    height = 0.38
    for m_i, mode in enumerate(modes):
        ys, xs = [], []
        for n_i, name in enumerate(names):
            rec = next((r for r in ok if r["contender"] == name and r["mode"] == mode), None)
            if rec is not None:
                ys.append(n_i + (m_i - 0.5) * height)
                xs.append(rec["gbps"])
        bars = ax.barh(ys, xs, height=height, color=colors[mode], label=mode)
        for bar, x in zip(bars, xs):
            ax.text(x * 1.05, bar.get_y() + bar.get_height() / 2, f"{x:.2f}", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("GB/s (log scale)")
    raw = (data.get("raw_disk_best") or {}).get("gbps")
    if raw:
        ax.axvline(raw, color="#228833", ls="--", lw=1, label=f"raw disk read {raw:.2f} GB/s")
    h2d = (data.get("h2d_copy") or {}).get("pinned_gbps")
    if h2d:
        ax.axvline(h2d, color="#aa3377", ls=":", lw=1, label=f"pinned H2D copy {h2d:.1f} GB/s")
    env = data.get("environment", {})
    size = (data.get("sizes") or {}).get("tensor_bytes")
    title = f"device {data.get('device')}"
    if size:
        title += f", {size / 1e9:.2f} GB checkpoint"
    if env.get("gpu") and str(data.get("device", "")).startswith("cuda"):
        title += f", {env['gpu']}"
    if env.get("date"):
        title += f" ({env['date'][:10]})"
    ax.set_title(title, fontsize=9)
    ax.set_xlim(left=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot(paths: List[Path], out: Path, title: Optional[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(11, 3.6 * len(datasets)), squeeze=False)
    for ax, data in zip(axes[:, 0], datasets):
        _panel(ax, data)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    log.info("wrote %s", out)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", type=Path, help="bench_load.py --json outputs")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    plot(args.json, args.out, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
