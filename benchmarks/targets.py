"""The speed targets, each read from every results JSON that measures it: the docs' table of
targets (``render_tables.py``, section ``targets``).

A run meets a target when the median of its interleaved rounds meets the bar; the best is shown
beside it. A target is met when every run that measures it meets it, and the table says how many
do when only some do: a target is never judged on a chosen run. A JSON that does not measure its
target says so instead of a number.
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
    sources: Tuple[str, ...]  # the render_tables constants naming the JSON of every run measuring it
    measure: Callable[[Data], Optional[Pair]]

    def met(self, median: float) -> bool:
        return median >= self.bar if self.op == ">=" else median <= self.bar


TARGETS: List[Target] = [
    Target("cold disk → GPU, a warm process, / best raw cold read of the sweep", ">=", 0.95,
           ("LOCAL_GPU", "LOCAL_GPU_87D84BF", "LOCAL_GPU_002B5E0", "LOCAL_GPU_PEERS", "LOCAL_GPU_1937CD0"),
           ratio("sllm-cold / best raw cold read")),
    Target("cold disk → GPU, a fresh process's first load, / best raw cold read", ">=", 0.95,
           ("LOCAL_GPU_FRESH_PROCESSES", "LOCAL_GPU_FRESH"), fresh_over_limit("cold")),
    Target("page cache → GPU, a warm process, speed / `safetensors`'", ">=", 4.0,
           ("LOCAL_GPU_87D84BF", "LOCAL_GPU_002B5E0", "LOCAL_GPU_FRESH", "LOCAL_GPU_PEERS_BUFFERED"),
           ratio("sllm-warm / safetensors-warm")),
    Target("page cache → GPU, fresh processes, speed / `safetensors`'", ">=", 4.0,
           ("LOCAL_GPU_FRESH_PROCESSES",), ratio("sllm-fresh-warm / safetensors-fresh-warm")),
    Target("`load_model` time / `load_state_dict` time, cold, a warm process", "<=", 1.10,
           ("LOCAL_GPU", "LOCAL_GPU_87D84BF", "LOCAL_GPU_002B5E0", "LOCAL_GPU_1937CD0"),
           ratio("load_model-cold time / sllm-cold time")),
    Target("`load_model` time / `load_state_dict` time, cold, fresh processes", "<=", 1.10,
           ("LOCAL_GPU_FRESH",), ratio("load_model-fresh-cold time / sllm-fresh-cold time")),
    Target("`load_model` time / `load_state_dict` time, page cache, a warm process", "<=", 1.10,
           ("LOCAL_GPU", "LOCAL_GPU_87D84BF", "LOCAL_GPU_002B5E0", "LOCAL_GPU_FRESH", "LOCAL_GPU_1937CD0"),
           ratio("load_model-warm time / sllm-warm time")),
    Target("store server → GPU, a fresh process, / pinned host-to-GPU copy", ">=", 0.9,
           ("STORE", "STORE_87D84BF", "STORE_2395B38", "STORE_AF57749"), ratio("store-fresh / pinned H2D")),
    Target("zstd, cold disk → GPU, 8B-shaped, / best raw cold read", ">=", 1.3,
           ("COMPRESS", "COMPRESS_87D84BF", "COMPRESS_9BA44B7"), ratio("sllm-zstd / best raw cold read")),
    Target("remote → GPU, object server on cores of its own, / best raw GET of the sweep", ">=", 0.9,
           ("REMOTE_SPLIT", "REMOTE_SPLIT_9BA44B7"), ratio("remote / best raw GET")),
    Target("remote → GPU / `runai-model-streamer`, equal concurrency", ">=", 1.8,
           ("REMOTE_SPLIT", "REMOTE_SPLIT_9BA44B7"), ratio("remote / runai")),
    Target("remote, cached reload / best raw cold read of the cache entry", ">=", 0.95,
           ("REMOTE_SPLIT", "REMOTE_SPLIT_9BA44B7"), ratio("cached / best raw read of the entry")),
    Target("CPU, page cache, usable tensors (load and one pass), speed / `safetensors`'", ">=", 1.0,
           ("CPU_2CORE", "CPU_PEERS", "CPU"), ratio("sllm-warm / safetensors-warm")),
]


def render(load: Callable[[str], Tuple[str, Data]]) -> str:
    """The table of targets; ``load(constant)`` gives the JSON file name and its data."""
    rows = []
    met = 0
    for t in TARGETS:
        values, links, passed, measured = [], [], 0, 0
        for source in t.sources:
            name, data = load(source)
            value = t.measure(data)
            commit = commit_of(data) or "no commit"
            links.append(f"[{name[:10]}, `{commit[:7]}`](../benchmarks/results/{name})")
            if value is None:
                values.append("not measured by this run")
                continue
            values.append(_pair(*value, "{:.3f}"))
            measured += 1
            passed += t.met(value[1])
        if not measured:
            status = "–"
        elif passed == measured:
            status, met = "met", met + 1
        elif not passed:
            status = "**not met**"
        else:
            status = f"**met in {passed} of {measured} runs**"
        rows.append([t.what, f"{t.op} {t.bar:g}", "; ".join(values), status, "; ".join(links)])
    return (f"{met} of {len(TARGETS)} targets met in every run that measures them (on the median of "
            "each run's interleaved rounds).\n\n"
            + _table(["target", "required", "best (median), each run", "status", "runs"], rows))
