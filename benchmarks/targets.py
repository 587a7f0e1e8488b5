"""The speed targets, each read from the results JSON that measures it: the docs' table of targets
(``render_tables.py``, section ``targets``).

A target is met when the median of its interleaved rounds meets the bar; the best is shown beside
it. A target whose JSON does not measure it says so instead of a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from common import fresh_ratios, local_limits
from suite_tables import _pair, _table, commit_of

Data = Dict[str, Any]
Pair = Tuple[float, float]  # (best, median)


def ratio(key: str) -> Callable[[Data], Optional[Pair]]:
    """A ratio of the result under ``key``: as the suite recorded it, or for a local-suite result
    one of its fresh-process ratios (:func:`common.fresh_ratios`)."""
    def get(data: Data) -> Optional[Pair]:
        r = {**fresh_ratios(data["results"]), **data["results"].get("ratios", {})}.get(key)
        return None if r is None else (r["best"], r["median"])
    return get


def fresh_over_limit(state: str, name: str = "sllm") -> Callable[[Data], Optional[Pair]]:
    """A fresh-process load of the local suite over the limit of its state, as its tables show it
    (:func:`common.local_limits`)."""
    def get(data: Data) -> Optional[Pair]:
        r = data["results"]
        load = r.get(f"fresh_{state}", {}).get(name, {}).get("load")
        limit = dict(zip(("cold", "warm"), local_limits(r)))[state]
        if load is None or not limit:
            return None
        return load["best_gbps"] / limit, load["median_gbps"] / limit
    return get


@dataclass(frozen=True)
class Target:
    what: str
    op: str  # ">=" or "<="
    bar: float
    source: str  # the render_tables constant naming the JSON
    measure: Callable[[Data], Optional[Pair]]

    def met(self, median: float) -> bool:
        return median >= self.bar if self.op == ">=" else median <= self.bar


TARGETS: List[Target] = [
    Target("cold disk → GPU, a warm process, / best raw cold read of the sweep", ">=", 0.95, "LOCAL_GPU",
           ratio("sllm-cold / best raw cold read")),
    Target("cold disk → GPU, a fresh process's first load, / best raw cold read", ">=", 0.95,
           "LOCAL_GPU_FRESH_PROCESSES", fresh_over_limit("cold")),
    Target("page cache → GPU, a warm process, speed / `safetensors`'", ">=", 4.0, "LOCAL_GPU_FRESH",
           ratio("sllm-warm / safetensors-warm")),
    Target("page cache → GPU, fresh processes, speed / `safetensors`'", ">=", 4.0,
           "LOCAL_GPU_FRESH_PROCESSES", ratio("sllm-fresh-warm / safetensors-fresh-warm")),
    Target("`load_model` time / `load_state_dict` time, cold, a warm process", "<=", 1.10, "LOCAL_GPU",
           ratio("load_model-cold time / sllm-cold time")),
    Target("`load_model` time / `load_state_dict` time, cold, fresh processes", "<=", 1.10, "LOCAL_GPU_FRESH",
           ratio("load_model-fresh-cold time / sllm-fresh-cold time")),
    Target("`load_model` time / `load_state_dict` time, page cache, a warm process", "<=", 1.10,
           "LOCAL_GPU", ratio("load_model-warm time / sllm-warm time")),
    Target("store server → GPU, a fresh process, / pinned host-to-GPU copy", ">=", 0.9, "STORE",
           ratio("store-fresh / pinned H2D")),
    Target("zstd, cold disk → GPU, 8B-shaped, / best raw cold read", ">=", 1.3, "COMPRESS",
           ratio("sllm-zstd / best raw cold read")),
    Target("remote → GPU, object server on cores of its own, / best raw GET of the sweep", ">=", 0.9,
           "REMOTE_SPLIT", ratio("remote / best raw GET")),
    Target("remote → GPU / `runai-model-streamer`, equal concurrency", ">=", 1.8, "REMOTE_SPLIT",
           ratio("remote / runai")),
    Target("remote, cached reload / best raw cold read of the cache entry", ">=", 0.95, "REMOTE_SPLIT",
           ratio("cached / best raw read of the entry")),
    Target("CPU, page cache, usable tensors (load and one pass), speed / `safetensors`'", ">=", 1.0,
           "CPU_2CORE", ratio("sllm-warm / safetensors-warm")),
]


def render(load: Callable[[str], Tuple[str, Data]]) -> str:
    """The table of targets; ``load(constant)`` gives the JSON file name and its data."""
    rows = []
    met = 0
    for t in TARGETS:
        name, data = load(t.source)
        value = t.measure(data)
        commit = commit_of(data) or "no commit"
        link = f"[{name[:10]}, `{commit[:7]}`](../benchmarks/results/{name})"
        if value is None:
            rows.append([t.what, f"{t.op} {t.bar:g}", "not measured by this run", "–", link])
            continue
        met += t.met(value[1])
        rows.append([t.what, f"{t.op} {t.bar:g}", _pair(*value, "{:.3f}"),
                     "met" if t.met(value[1]) else "**not met**", link])
    return (f"{met} of {len(TARGETS)} targets met (on the median of the interleaved rounds).\n\n"
            + _table(["target", "required", "best (median)", "status", "source"], rows))
