"""What every benchmark suite shares: the record of a run (git commit, settings, machine, library
versions), cold and warm page-cache states applied the same way to every contender, interleaved
rounds with best and median, and bit-for-bit output checks.

A suite gets a :class:`Run` from ``benchmarks/run.py`` and writes one JSON through it::

    run = Run("verify", args)
    rounds = Rounds(run.rounds)
    rounds.add("sllm-cold", lambda: load(...), nbytes, before=run.cold(files), check=check)
    run.results["contenders"] = rounds.run()
    run.write()
"""

from __future__ import annotations

import atexit
import datetime
import gc
import json
import logging
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger("benchmarks")

GB = 1e9
COLD_RESIDENT_MAX = 0.05  # the most of a cold round's files that may be resident before it
WARM_RESIDENT_MIN = 0.99  # the least of a warm round's files that must be
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# The record of a run
# ------------------------------------------------------------------------------------------------


def git_state() -> Dict[str, Any]:
    """The commit the run measured and whether the tree had uncommitted changes.

    ``BENCH_GIT_COMMIT`` (and ``BENCH_GIT_DIRTY=1``) name them for a copy of the tree without its
    git history, e.g. on a machine the tree was copied to.
    """
    if os.environ.get("BENCH_GIT_COMMIT"):
        return {"commit": os.environ["BENCH_GIT_COMMIT"], "dirty": os.environ.get("BENCH_GIT_DIRTY") == "1",
                "source": "BENCH_GIT_COMMIT"}
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
            "describe": git("log", "-1", "--format=%h %s")}


def settings() -> Dict[str, Any]:
    """Every ``SLLM_STORE_*`` variable set in the environment, and the resolved load settings."""
    from sllm_store.config import LoadConfig

    config = LoadConfig.resolve()
    return {"environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SLLM_STORE_")},
            "resolved": {"num_threads": config.num_threads, "io_mode": config.io_mode,
                         "chunk_size": config.chunk_size, "verify": config.verify,
                         "staging_buffers": config.staging_buffers}}


def _fs_type(path: Path) -> Optional[str]:
    best, fstype = "", None
    p = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (p == parts[1] or p.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best):
                        best, fstype = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    except OSError:
        return None
    return fstype


def _meminfo() -> Dict[str, str]:
    try:
        with open("/proc/meminfo") as f:
            return {ln.split(":")[0]: ln.split(":")[1].strip() for ln in f}
    except OSError:
        return {}


def machine(data_dir: Optional[Path] = None) -> Dict[str, Any]:
    """CPU, cores, RAM, GPU and driver, the disk and file system under ``data_dir``."""
    m: Dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total": _meminfo().get("MemTotal"),
        "is_root": hasattr(os, "geteuid") and os.geteuid() == 0,
    }
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                                  None)
    except OSError:
        pass
    if data_dir is not None:
        m["data_dir"] = str(data_dir)
        m["filesystem"] = _fs_type(data_dir)
        usage = shutil.disk_usage(data_dir)
        m["disk_free_bytes"] = usage.free
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            m["gpus"] = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return m


def versions() -> Dict[str, Any]:
    """Python and the libraries a suite may use (None where not installed)."""
    out: Dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "safetensors", "transformers", "sllm_store", "zstandard", "obstore",
                 "runai_model_streamer", "fastsafetensors"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "installed")
        except Exception:  # not installed, or broken: recorded as absent
            out[name] = None
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
    except Exception:
        pass
    return out


def output_name(suite: str, machine_info: Mapping[str, Any]) -> str:
    """``<date>-<gpu or cpu>-<suite>.json``."""
    gpus = machine_info.get("gpus") or []
    name = gpus[0].split(",")[0] if gpus else "cpu"
    model = re.search(r"\b[A-Z]{1,2}\d{2,4}[A-Z]?\b", name)  # "NVIDIA H100 80GB HBM3" -> h100
    kind = (model.group(0) if model else name.split()[-1]).lower()
    return f"{datetime.date.today().isoformat()}-{kind}-{suite}.json"


class Run:
    """One suite's run: its record (``git``, ``settings``, ``machine``, ``versions``, ``args``) and
    its ``results``, written as one JSON."""

    def __init__(self, suite: str, args: Any, data_dir: Optional[Path] = None) -> None:
        self.suite = suite
        self.args = args
        self.rounds: int = getattr(args, "rounds", 3)
        self.evictor = Evictor()
        self.record: Dict[str, Any] = {
            "suite": suite,
            "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(),
            "git": git_state(), "settings": settings(), "machine": machine(data_dir),
            "versions": versions(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k != "func"},
        }
        self.results: Dict[str, Any] = {}
        self.record["results"] = self.results
        self._scratch: Optional[str] = None

    def scratch(self) -> str:
        """A temporary directory for the run, removed when the results are written."""
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix=f"bench-{self.suite}-")
            atexit.register(shutil.rmtree, self._scratch, ignore_errors=True)  # a suite that fails too
        return self._scratch

    def finish(self, ratios: Dict[str, Dict[str, float]], failed: bool) -> int:
        """Record ``ratios``, write the JSON, print the ratios; the suite's exit status (1 when
        a contender ``failed``)."""
        self.results["ratios"] = ratios
        self.write()
        for key, r in ratios.items():
            print(f"{key:48} best {r['best']:.4g}  median {r['median']:.4g}")
        return 1 if failed else 0

    def write(self) -> Path:
        self.record["cold_method"] = self.evictor.method()
        out_dir = Path(getattr(self.args, "out", None) or ROOT / "benchmarks" / "results")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / output_name(self.suite, self.record["machine"])
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(tmp, path)
        log.info("wrote %s", path)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        return path


def local_limits(results: Dict[str, Any]) -> Tuple[float, Optional[float]]:
    """The limits a local-suite result is judged against, GB/s: cold, the best cold raw read (the
    sweep's best point or the rounds of its configuration); page-cached, the best page-cached read,
    on a GPU at most the pinned host-to-GPU copy (None without a page-cached sweep)."""
    sweep = results.get("disk_sweep", {})
    cold_best, warm_best = ((sweep.get(s) or {}).get("best") for s in ("cold", "warm"))
    cold = max(results.get("contenders", {}).get("raw-cold", {}).get("best_gbps", 0.0),
               cold_best["gbps"] if cold_best else 0.0)
    warm = warm_best["gbps"] if warm_best else None
    if warm is not None and "h2d" in results:
        warm = min(warm, results["h2d"]["pinned_gbps"])
    return cold, warm


def fresh_ratios(results: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """A local-suite result's fresh processes: ``load_model``'s load time over
    ``load_state_dict``'s, and page-cached, ``load_state_dict``'s speed over ``safetensors``'."""
    out = {}
    for state in ("cold", "warm"):
        fresh = results.get(f"fresh_{state}", {})
        sd, model, st = (fresh.get(n, {}).get("load", {}) for n in ("sllm", "load_model", "safetensors"))
        if "best_s" in sd and "best_s" in model:
            out[f"load_model-fresh-{state} time / sllm-fresh-{state} time"] = {
                "best": model["best_s"] / sd["best_s"], "median": model["median_s"] / sd["median_s"]}
        if state == "warm" and "best_s" in sd and "best_s" in st:
            out["sllm-fresh-warm / safetensors-fresh-warm"] = {
                "best": st["best_s"] / sd["best_s"], "median": st["median_s"] / sd["median_s"]}
    return out


# ------------------------------------------------------------------------------------------------
# Page-cache states
# ------------------------------------------------------------------------------------------------


class Evictor:
    """Cold: every file's pages dropped (``posix_fadvise``), plus ``drop_caches`` when root.
    Warm: every file read once through the page cache when not all of it is resident."""

    def __init__(self) -> None:
        self.drop_caches: Optional[str] = None

    def method(self) -> str:
        return "posix_fadvise(DONTNEED) per file" + (
            f"; drop_caches: {self.drop_caches}" if self.drop_caches else "")

    def evict(self, files: Sequence[Path], everything: bool = True) -> None:
        """``everything=False``: only ``files`` leave the page cache (no ``drop_caches``)."""
        from sllm_store.utils import evict_page_cache

        os.sync()
        for f in files:
            evict_page_cache(f)
        if everything and hasattr(os, "geteuid") and os.geteuid() == 0:
            try:
                with open("/proc/sys/vm/drop_caches", "w") as fh:
                    fh.write("3\n")
                self.drop_caches = "yes"
            except OSError as e:
                self.drop_caches = f"failed: {e}"

    @staticmethod
    def warm(files: Sequence[Path]) -> None:
        from sllm_store.utils import page_cache_fraction

        if (page_cache_fraction(files) or 0.0) >= 0.999:
            return
        buf = bytearray(64 << 20)
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


# ------------------------------------------------------------------------------------------------
# Interleaved rounds
# ------------------------------------------------------------------------------------------------


def run_child(script: str, args: Sequence[str], timeout: float = 900) -> Dict[str, Any]:
    """``python SCRIPT --child ARGS`` in a fresh process: the JSON it printed last, with
    ``process_s`` (the process's wall time). Raises on a failed process or a wrong output (its
    ``problem``)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-1500:])
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    if rec.get("problem"):
        raise AssertionError(f"wrong output: {rec['problem']}")
    rec["process_s"] = wall
    return rec


class FreshChild:
    """A load in a fresh process (``python SCRIPT --child ARGS``) as a :class:`Rounds` contender:
    the process times its load itself (``seconds_of=lambda r: r["load_s"]``); the figures of every
    round are kept in ``runs``."""

    def __init__(self, script: str, args: Sequence[str]) -> None:
        self.script, self.args = script, list(args)
        self.runs: List[Dict[str, Any]] = []

    def __call__(self) -> Dict[str, Any]:
        rec = run_child(self.script, self.args)
        self.runs.append(rec)
        return rec


def process_summary(runs: List[Dict[str, Any]], nbytes: int) -> Dict[str, Any]:
    """Best and median of each fresh-process figure (``import_s``, ``cuda_s``, ``setup_s``,
    ``load_s``, ``process_s``), and of each step its load's report timed (``steps``)."""
    keys = ("import_s", "cuda_s", "setup_s", "load_s", "process_s")
    out = {k: summary([r[k] for r in runs], nbytes) for k in keys if runs and all(k in r for r in runs)}
    steps = sorted({k for r in runs for k in r.get("steps", {})})
    if steps and all(set(r.get("steps", {})) == set(steps) for r in runs):
        out["steps"] = {k: summary([r["steps"][k] for r in runs], nbytes) for k in steps}
    return out


def tensor_digests(state_dict: Dict[str, Any]) -> Dict[str, int]:
    """XXH3-64 of every tensor's bytes (GPU tensors copied back). Names of one tensor (a model's
    tied weights) share its digest: its bytes are read once, as a model reads them."""
    import torch

    from sllm_store.native import _C

    out: Dict[str, int] = {}
    seen: Dict[Any, int] = {}
    for name, t in state_dict.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen or not t.numel():
            flat = t.detach().reshape(-1).contiguous().view(torch.uint8).cpu()
            seen[key] = _C.xxh3_64(flat.numpy()) if flat.numel() else 0
        out[name] = seen[key]
    return out


def usable(load: Callable[[], Dict[str, Any]], device: str) -> Callable[[], Any]:
    """On the CPU: the load and one pass over every byte (the digests, checked afterwards)."""
    if device != "cpu":
        return load
    return lambda: tensor_digests(load())


def checker(reference: Dict[str, int], subset: bool = False) -> Callable[[Any], Optional[str]]:
    """A check of a state dict against ``reference`` digests; ``subset``: extra names allowed (a
    model's state_dict names tied weights twice)."""
    def check(state_dict: Any) -> Optional[str]:
        got = tensor_digests({k: v for k, v in state_dict.items() if not subset or k in reference})
        if got.keys() != reference.keys():
            return f"tensor names differ ({len(got)} vs {len(reference)})"
        bad = [n for n in reference if got[n] != reference[n]]
        return f"{len(bad)} tensors differ, e.g. {bad[0]}" if bad else None
    return check


@dataclass
class Contender:
    name: str
    fn: Callable[[], Any]
    nbytes: int
    before: Optional[Callable[[], None]] = None  # untimed: evict, warm, free memory
    check: Optional[Callable[[Any], Optional[str]]] = None  # None when the output is right, else why
    seconds_of: Optional[Callable[[Any], float]] = None  # a time the contender reports itself
    # ("cold" or "warm", the files it reads): their resident fraction is recorded before each round
    cache: Optional[Tuple[str, Sequence[Path]]] = None


class Rounds:
    """Contenders timed in ``rounds`` rounds, each round every contender once; the order is
    reversed every other round so that drift (disk, server, thermal) falls on all alike. Every
    output is checked when the contender has a check; a contender that raises or fails its check
    is not run again and its error is recorded."""

    def __init__(self, rounds: int, sync: Callable[[], None] = lambda: None) -> None:
        self.rounds = rounds
        self.sync = sync
        self.contenders: List[Contender] = []

    def add(self, name: str, fn: Callable[[], Any], nbytes: int, **kw: Any) -> None:
        self.contenders.append(Contender(name, fn, nbytes, **kw))

    def run(self) -> Dict[str, Dict[str, Any]]:
        times: Dict[str, List[float]] = {c.name: [] for c in self.contenders}
        self.resident: Dict[str, List[Optional[float]]] = {c.name: [] for c in self.contenders if c.cache}
        errors: Dict[str, str] = {}
        for r in range(self.rounds):
            order = self.contenders if r % 2 == 0 else self.contenders[::-1]
            for c in order:
                if c.name in errors:
                    continue
                try:
                    times[c.name].append(self._time(c))
                    log.info("round %d  %-28s %8.3f s  %7.2f GB/s", r + 1, c.name, times[c.name][-1],
                             c.nbytes / GB / times[c.name][-1])
                except Exception as e:  # one failing contender must not end the run
                    errors[c.name] = f"{type(e).__name__}: {e}"[:500]
                    log.error("%s: %s", c.name, errors[c.name])
                gc.collect()
        out = {c.name: summary(times[c.name], c.nbytes, errors.get(c.name)) for c in self.contenders}
        for name, fractions in self.resident.items():
            out[name]["resident_before"] = fractions
        return out

    def _time(self, c: Contender) -> float:
        if c.before is not None:
            c.before()
        if c.cache is not None:
            self.resident[c.name].append(resident_fraction(c.name, *c.cache))
        t0 = time.perf_counter()
        out = c.fn()
        self.sync()
        elapsed = time.perf_counter() - t0
        if c.seconds_of is not None:
            elapsed = c.seconds_of(out)
        if c.check is not None:
            problem = c.check(out)
            if problem:
                raise AssertionError(f"wrong output: {problem}")
        del out
        return elapsed


def resident_fraction(label: str, state: str, files: Sequence[Path]) -> Optional[float]:
    """The fraction of ``files`` resident in the page cache just before a ``state`` ("cold" or
    "warm") round or process, with a warning when it is not that state (a cold round over 5%, a
    warm one under 99%); None when unknown."""
    from sllm_store.utils import page_cache_fraction

    fraction = page_cache_fraction(files)
    if fraction is not None and not cache_state_ok(state, fraction):
        log.warning("%s: %.0f%% of its files resident before a %s round", label, 100 * fraction, state)
    return fraction


def cache_state_ok(state: str, fraction: float) -> bool:
    """Whether ``fraction`` of a round's files resident before it matches the round's state."""
    return fraction <= COLD_RESIDENT_MAX if state == "cold" else fraction >= WARM_RESIDENT_MIN


def summary(times: Sequence[float], nbytes: int, error: Optional[str] = None) -> Dict[str, Any]:
    """Best and median seconds and GB/s of a contender's rounds (and its error, if any)."""
    out: Dict[str, Any] = {"bytes": nbytes, "all_s": list(times)}
    if times:
        best, median = min(times), statistics.median(times)
        out.update(best_s=best, median_s=median, best_gbps=nbytes / GB / best,
                   median_gbps=nbytes / GB / median)
    if error:
        out["error"] = error
    return out


class StoreServer:
    """``sllm-store serve`` on a private socket, for the store path."""

    def __init__(self, storage: Path, pool: str, args: Sequence[str] = ()) -> None:
        import sllm_store
        from sllm_store.server.client import StoreClient

        self.tmp = tempfile.mkdtemp(prefix="bench-verify-")
        self.address = f"unix://{os.path.join(self.tmp, 'store.sock')}"
        self.log = open(os.path.join(self.tmp, "server.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sllm_store", "serve", "--storage-path", str(storage),
             "--mem-pool-size", pool, "--listen", self.address, *args], stdout=self.log,
            stderr=subprocess.STDOUT)
        self.client = StoreClient(self.address)
        t0 = time.perf_counter()
        while True:
            try:
                self.client.health(timeout=1.0)
                return
            except sllm_store.SllmStoreError:
                if self.proc.poll() is not None or time.perf_counter() - t0 > 300:
                    raise RuntimeError(open(self.log.name).read()[-3000:]) from None
                time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
