#!/usr/bin/env python3
"""Time checkpoint loading: disk limit, safetensors and sllm-store, in one run, on the same bytes.

One command, one process: every contender is timed in the same run, on the same machine, on the
same checkpoint, cold (files evicted from the page cache) and warm (files read once before).

Contenders (``--list`` shows them all; ``--only``/``--extra``/``--skip`` choose):

* ``raw-direct`` / ``raw-buffered``: parallel ``os.preadv`` of the converted data files (the very
  bytes our loader reads) into preallocated page-aligned buffers, with and without ``O_DIRECT``.
  The best cold one is "raw disk", the limit.
* ``safetensors``: ``safetensors.torch.load_file(shard, device=DEVICE)`` over all source shards.
* ``sllm``: ``sllm_store.load_state_dict(converted, device=DEVICE)``; ``sllm-buffered``,
  ``sllm-direct`` and ``sllm-verify`` are opt-in variants.

On ``--device cpu`` every loader's result is touched (one byte per 4 KiB page) inside the timed
region: ``load_file`` on CPU returns lazily mmap-backed tensors that read nothing until used, so
without this it would be timed doing no I/O at all (``--no-touch`` disables it).
On CUDA every timing ends with ``torch.cuda.synchronize()``.

GB/s uses decimal GB (1e9 bytes): tensor payload bytes for loaders, file bytes for raw reads.
"vs raw disk" = GB/s / best cold raw-disk GB/s; "vs safetensors" = GB/s / safetensors GB/s in the
same mode (cold vs cold, warm vs warm).

To add a contender, write a function ``run(ctx) -> loaded object`` and register it in
``CONTENDERS`` with :func:`register` (see the bottom of the contender section).

Example::

    python benchmarks/make_checkpoint.py --preset 8B --num-layers 16 --out /data/llama8b16
    python benchmarks/bench_load.py --src /data/llama8b16 --device cuda:0 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import logging
import mmap
import os
import platform
import socket
import struct
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("bench_load")

GB = 1e9
MiB = 2**20
PAGE = mmap.PAGESIZE
DIRECT_ALIGN = 4096
SLLM_INDEX = "sllm_index.json"
HF_INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------------------------
# sllm_store import (optional: the raw and safetensors contenders run without it)
# --------------------------------------------------------------------------------------------


def import_sllm() -> Tuple[Any, Optional[str]]:
    """Import sllm_store; fall back to the repository checkout next to this script."""
    try:
        import sllm_store

        return sllm_store, None
    except ImportError as e:
        first_error = e
    repo = Path(__file__).resolve().parent.parent
    if (repo / "sllm_store" / "__init__.py").is_file():
        sys.path.insert(0, str(repo))
        try:
            import sllm_store

            log.info("using sllm_store from the checkout %s", repo)
            return sllm_store, None
        except ImportError as e:
            sys.path.remove(str(repo))
            first_error = e
    return None, f"sllm_store not importable: {first_error}"


# --------------------------------------------------------------------------------------------
# Page cache control
# --------------------------------------------------------------------------------------------


def fadvise_evict(path: Path) -> None:
    """Drop one file's clean pages from the page cache (dirty ones are flushed first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fdatasync(fd)
        except OSError:
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Evictor:
    """Evicts files with ``sllm_store.utils.evict_page_cache`` if available, else with fadvise;
    plus ``echo 3 > /proc/sys/vm/drop_caches`` when root (failures ignored, reported once)."""

    def __init__(self, sllm: Any) -> None:
        self.lib_evict: Optional[Callable[[Any], Any]] = None
        self.method = "posix_fadvise (own helper)"
        if sllm is not None:
            try:
                from sllm_store.utils import evict_page_cache

                self.lib_evict = evict_page_cache
                self.method = "sllm_store.utils.evict_page_cache"
            except Exception as e:  # any failure means: use our own helper
                log.info("sllm_store.utils.evict_page_cache unavailable (%s): using fadvise", e)
        self.drop_caches: Optional[str] = None  # "ok" / why not, after first use

    def evict(self, files: Sequence[Path]) -> None:
        os.sync()
        for f in files:
            if self.lib_evict is not None:
                try:
                    self.lib_evict(f)
                    continue
                except Exception as e:
                    log.warning("evict_page_cache(%s) failed (%s); using own helper", f, e)
                    self.lib_evict = None
                    self.method = "posix_fadvise (own helper; library helper failed)"
            fadvise_evict(f)
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            try:
                with open("/proc/sys/vm/drop_caches", "w") as fh:
                    fh.write("3\n")
                self.drop_caches = "ok"
            except OSError as e:
                if self.drop_caches is None:
                    log.info("drop_caches not possible here (%s); fadvise only", e)
                self.drop_caches = f"failed: {e}"
        elif self.drop_caches is None:
            self.drop_caches = "not root"


def resident_fraction(files: Sequence[Path]) -> Optional[float]:
    """Fraction of the files' pages in the page cache (sllm_store's mincore helper), or None."""
    try:
        from sllm_store.utils import page_cache_fraction

        return page_cache_fraction(files)
    except Exception as e:  # informative only
        log.debug("page-cache residency unknown: %s", e)
        return None


# --------------------------------------------------------------------------------------------
# Raw parallel reads
# --------------------------------------------------------------------------------------------


class RawReader:
    """Parallel ``os.preadv`` of whole files in fixed blocks into reused page-aligned buffers."""

    def __init__(self, threads: int, block: int) -> None:
        self.threads = threads
        self.block = (block + DIRECT_ALIGN - 1) // DIRECT_ALIGN * DIRECT_ALIGN
        # mmap(-1, n) is page aligned (O_DIRECT needs 512 B or 4 KiB alignment); touched once here
        # so that page faults on the buffers are not timed.
        self.buffers = [mmap.mmap(-1, self.block) for _ in range(threads)]
        for b in self.buffers:
            b.write(b"\0" * self.block)
            b.seek(0)

    def close(self) -> None:
        for b in self.buffers:
            b.close()
        self.buffers = []

    def read(self, files: Sequence[Path], direct: bool) -> int:
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
        fds: List[int] = []
        try:
            work: List[Tuple[int, int, int]] = []
            for f in files:
                fd = os.open(f, flags)
                fds.append(fd)
                size = os.fstat(fd).st_size
                work += [(fd, off, min(self.block, size - off))
                         for off in range(0, size, self.block)]
            counter = itertools.count()  # next() on it is atomic under the GIL

            def worker(buf: mmap.mmap) -> int:
                mv = memoryview(buf)
                done_total = 0
                try:
                    while True:
                        i = next(counter)
                        if i >= len(work):
                            return done_total
                        fd, off, n = work[i]
                        # O_DIRECT lengths must be aligned; a read past EOF just returns short
                        want = -(-n // DIRECT_ALIGN) * DIRECT_ALIGN if direct else n
                        done = 0
                        while done < n:
                            got = os.preadv(fd, [mv[done:want]], off + done)
                            if got <= 0:
                                raise OSError(f"short read at offset {off + done}")
                            done += got
                        done_total += n
                finally:
                    mv.release()

            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                return sum(pool.map(worker, self.buffers))
        finally:
            for fd in fds:
                os.close(fd)

    def check_direct(self, files: Sequence[Path]) -> Optional[str]:
        """None if O_DIRECT reads work on these files, else why not."""
        if not hasattr(os, "O_DIRECT"):
            return "os.O_DIRECT does not exist on this platform"
        f = next((f for f in files if f.stat().st_size > 0), None)
        if f is None:
            return "no non-empty file to read"
        try:
            fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            return f"filesystem refuses O_DIRECT on {f} ({e})"
        try:
            mv = memoryview(self.buffers[0])
            try:
                os.preadv(fd, [mv[:DIRECT_ALIGN]], 0)
            finally:
                mv.release()
        except OSError as e:
            return f"O_DIRECT read fails on {f} ({e})"
        finally:
            os.close(fd)
        return None


# --------------------------------------------------------------------------------------------
# Checkpoint description
# --------------------------------------------------------------------------------------------


def safetensors_payload_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0]
               for k, v in header.items() if k != "__metadata__")


def source_files(src: Path) -> List[Path]:
    if src.is_file():
        return [src]
    index = src / HF_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / n for n in names]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no safetensors files in {src}")
    return files


def converted_data_files(converted: Path) -> Tuple[List[Path], int]:
    """Data files listed in the sllm index, and its total_bytes."""
    index = json.loads((converted / SLLM_INDEX).read_text())
    return [converted / f["name"] for f in index["files"]], int(index.get("total_bytes", 0))


@dataclass
class Context:
    args: argparse.Namespace
    src: Path
    converted: Optional[Path]
    device: str
    threads: Optional[int]
    sllm: Any
    src_files: List[Path]
    data_files: List[Path]
    tensor_bytes: int
    raw: RawReader
    touch: bool
    notes: List[str] = field(default_factory=list)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def all_files(self) -> List[Path]:
        files = list(self.src_files) + list(self.data_files)
        for extra in ((self.src / HF_INDEX) if self.src.is_dir() else None,
                      (self.converted / SLLM_INDEX) if self.converted else None):
            if extra is not None and extra.is_file():
                files.append(extra)
        return files


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One way of loading. ``run(ctx)`` loads and returns what it loaded (kept alive until the
    clock stops, then dropped); ``files(ctx)`` are the files it reads (warmed before warm runs);
    ``nbytes(ctx)`` the bytes its GB/s counts; ``unavailable(ctx)`` says why it cannot run here,
    or None; ``note(ctx, mode)`` an optional remark for the table."""

    name: str
    run: Callable[[Context], Any]
    files: Callable[[Context], List[Path]]
    nbytes: Callable[[Context], int]
    kind: str = "loader"  # "raw" (reads bytes; a limit) or "loader" (returns tensors)
    modes: Tuple[str, ...] = ("cold", "warm")
    unavailable: Callable[[Context], Optional[str]] = lambda ctx: None
    default: bool = True
    description: str = ""
    note: Callable[[Context, str], Optional[str]] = lambda ctx, mode: None  # table remark
    # Called once, untimed, before the first run: one-off costs such as Python imports.
    prepare: Callable[[Context], None] = lambda ctx: None


CONTENDERS: Dict[str, Contender] = {}


def register(c: Contender) -> Contender:
    CONTENDERS[c.name] = c
    return c


def _tensor_bytes(ctx: Context) -> int:
    return ctx.tensor_bytes


def _file_bytes(files: Callable[[Context], List[Path]]) -> Callable[[Context], int]:
    return lambda ctx: sum(f.stat().st_size for f in files(ctx))


def _data_files(ctx: Context) -> List[Path]:
    return ctx.data_files if ctx.data_files else ctx.src_files


def _need_converted(ctx: Context) -> Optional[str]:
    if ctx.sllm is None or ctx.converted is None:
        return "no converted checkpoint (see the notes)"
    return None


def _raw(direct: bool, files: Callable[[Context], List[Path]]) -> Callable[[Context], Any]:
    def run(ctx: Context) -> Any:
        n = ctx.raw.read(files(ctx), direct=direct)
        expected = sum(f.stat().st_size for f in files(ctx))
        if n != expected:
            raise RuntimeError(f"raw read got {n} bytes, expected {expected}")
        return n

    return run


def _direct_unavailable(
    files: Callable[[Context], List[Path]],
) -> Callable[[Context], Optional[str]]:
    return lambda ctx: ctx.raw.check_direct(files(ctx))


register(Contender(
    "raw-direct", _raw(True, _data_files), _data_files, _file_bytes(_data_files), kind="raw",
    modes=("cold",), unavailable=_direct_unavailable(_data_files),
    description="parallel preadv, O_DIRECT, of the converted data files (source shards if none)",
))
register(Contender(
    "raw-buffered", _raw(False, _data_files), _data_files, _file_bytes(_data_files), kind="raw",
    description="parallel preadv, buffered, of the converted data files (source shards if none)",
))


def _src_files(ctx: Context) -> List[Path]:
    return ctx.src_files


register(Contender(
    "raw-src-direct", _raw(True, _src_files), _src_files, _file_bytes(_src_files), kind="raw",
    modes=("cold",), unavailable=_direct_unavailable(_src_files), default=False,
    description="parallel preadv, O_DIRECT, of the source safetensors shards",
))
register(Contender(
    "raw-src-buffered", _raw(False, _src_files), _src_files, _file_bytes(_src_files), kind="raw",
    default=False, description="parallel preadv, buffered, of the source safetensors shards",
))


def _safetensors(backend: Optional[str]) -> Callable[[Context], Any]:
    def run(ctx: Context) -> Any:
        from safetensors.torch import load_file

        kwargs = {"backend": backend} if backend else {}
        out: Dict[str, Any] = {}
        for f in ctx.src_files:
            out.update(load_file(str(f), device=ctx.device, **kwargs))
        return out

    return run


def _safetensors_pread_unavailable(ctx: Context) -> Optional[str]:
    import inspect

    from safetensors.torch import load_file

    if "backend" not in inspect.signature(load_file).parameters:
        return "this safetensors has no load_file(backend=...)"
    return None


def _mmap_note(ctx: Context, mode: str) -> Optional[str]:
    if ctx.is_cuda:
        return None
    return "lazy mmap, pages touched" + (": maps the page cache, no copy" if mode == "warm" else "")


def _direct_note(ctx: Context, mode: str) -> Optional[str]:
    return "O_DIRECT bypasses the page cache: warm ~ cold" if mode == "warm" else None


register(Contender(
    "safetensors", _safetensors(None), _src_files, _tensor_bytes, note=_mmap_note,
    description="safetensors.torch.load_file(shard, device=DEVICE) over all shards",
))
register(Contender(
    "safetensors-pread", _safetensors("pread"), _src_files, _tensor_bytes,
    unavailable=_safetensors_pread_unavailable, default=False,
    description="safetensors.torch.load_file(..., backend='pread')",
))


def _sllm_files(ctx: Context) -> List[Path]:
    assert ctx.converted is not None
    return [ctx.converted / SLLM_INDEX] + list(ctx.data_files)


def _sllm(**kwargs: Any) -> Callable[[Context], Any]:
    def run(ctx: Context) -> Any:
        return ctx.sllm.load_state_dict(ctx.converted, device=ctx.device,
                                        num_threads=ctx.threads, **kwargs)

    return run


register(Contender(
    "sllm", _sllm(), _sllm_files, _tensor_bytes, unavailable=_need_converted,
    description="sllm_store.load_state_dict(converted, device=DEVICE)",
))
for _mode in ("buffered", "direct"):
    register(Contender(
        f"sllm-{_mode}", _sllm(io_mode=_mode), _sllm_files, _tensor_bytes,
        unavailable=_need_converted, default=False,
        note=_direct_note if _mode == "direct" else (lambda ctx, mode: None),
        description=f"sllm_store.load_state_dict(..., io_mode={_mode!r})",
    ))
register(Contender(
    "sllm-verify", _sllm(verify=True), _sllm_files, _tensor_bytes, unavailable=_need_converted,
    default=False, description="sllm_store.load_state_dict(..., verify=True) (checksums)",
))


def _sllm_mmap_unavailable(ctx: Context) -> Optional[str]:
    return "io_mode='mmap' loads into host memory only" if ctx.is_cuda else _need_converted(ctx)


register(Contender(
    "sllm-mmap", _sllm(io_mode="mmap"), _sllm_files, _tensor_bytes, unavailable=_sllm_mmap_unavailable,
    default=False, description="sllm_store.load_state_dict(..., io_mode='mmap') (CPU: copy-on-write views)",
))


def _bf16() -> Any:
    import torch

    return torch.bfloat16


def _no_transformers(ctx: Context) -> Optional[str]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed"
    return None


def _import_transformers_model(ctx: Context) -> None:
    """Import transformers and the model's classes (seconds of Python imports) before timing,
    by building the model from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ctx.src if ctx.src.is_dir() else ctx.src.parent)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)


def _from_pretrained(ctx: Context) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ctx.src, dtype=_bf16(), device_map=ctx.device)


def _model_params(model: Any) -> Dict[str, Any]:
    return dict(model.state_dict())


register(Contender(
    "from_pretrained", lambda ctx: _model_params(_from_pretrained(ctx)), _src_files, _tensor_bytes,
    unavailable=_no_transformers, prepare=lambda ctx: _import_transformers_model(ctx),
    description="transformers AutoModelForCausalLM.from_pretrained(src, dtype=bf16, device_map=DEVICE)",
))


def _sllm_model_unavailable(ctx: Context) -> Optional[str]:
    return _no_transformers(ctx) or _need_converted(ctx)


register(Contender(
    "sllm-load_model",
    lambda ctx: _model_params(ctx.sllm.load_model(ctx.converted, device_map=ctx.device,
                                                  torch_dtype=_bf16(), num_threads=ctx.threads)),
    _sllm_files, _tensor_bytes, unavailable=_sllm_model_unavailable,
    prepare=lambda ctx: _import_transformers_model(ctx),
    description="sllm_store.load_model(converted, device_map=DEVICE, torch_dtype=bf16)",
))


def _runai_unavailable(ctx: Context) -> Optional[str]:
    try:
        import runai_model_streamer  # noqa: F401
    except ImportError:
        return "runai-model-streamer is not installed"
    return None


def _runai(ctx: Context) -> Any:
    from runai_model_streamer import SafetensorsStreamer

    out: Dict[str, Any] = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([str(f) for f in ctx.src_files])
        for name, tensor in streamer.get_tensors():
            # The streamer reuses its buffers: every tensor is copied out (to the device).
            out[name] = tensor.to(ctx.device) if ctx.is_cuda else tensor.clone()
    return out


register(Contender(
    "runai", _runai, _src_files, _tensor_bytes, unavailable=_runai_unavailable,
    default=False, description="runai-model-streamer SafetensorsStreamer -> DEVICE",
))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def touch_pages(obj: Any) -> None:
    """Read one byte per page of every CPU tensor in a dict or a module's state_dict
    (materialises lazily mmap-backed tensors)."""
    import torch

    if callable(getattr(obj, "state_dict", None)):  # a torch.nn.Module (from_pretrained)
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        return
    seen = set()
    acc = 0
    for t in obj.values():
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        flat = t.detach()
        if not flat.is_contiguous():
            flat = flat.contiguous()
        flat = flat.reshape(-1)
        if flat.element_size() != 1 or flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        acc += int(flat[::PAGE].sum()) + int(flat[-1])
    del acc


def _sync(ctx: Context) -> None:
    if ctx.is_cuda:
        import torch

        torch.cuda.synchronize(ctx.device)


def _release(ctx: Context) -> None:
    gc.collect()
    if ctx.is_cuda:
        import torch

        torch.cuda.empty_cache()


class RssSampler:
    """Peak resident set size of this process while a run goes, sampled from /proc/self/statm
    by a background thread (opt-in: the sampling thread takes the GIL now and then)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> RssSampler:
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss())


def time_once(ctx: Context, c: Contender) -> Tuple[float, Optional[int]]:
    """Seconds for one run, and the peak RSS growth during it (with --rss)."""
    sampler = RssSampler() if ctx.args.rss else None
    _sync(ctx)
    if sampler is not None:
        sampler.__enter__()
    t0 = time.perf_counter()
    out = c.run(ctx)
    if c.kind == "loader" and ctx.touch and not ctx.is_cuda:
        touch_pages(out)
    _sync(ctx)
    elapsed = time.perf_counter() - t0
    rss_growth = None
    if sampler is not None:
        sampler.__exit__()
        rss_growth = sampler.peak - sampler.base
    del out
    _release(ctx)
    return elapsed, rss_growth


def measure(ctx: Context, c: Contender, mode: str, reps: int, evictor: Evictor) -> Dict[str, Any]:
    files = c.files(ctx)
    nbytes = c.nbytes(ctx)
    rec: Dict[str, Any] = {"contender": c.name, "mode": mode, "kind": c.kind, "bytes": nbytes,
                           "description": c.description, "times": [], "notes": []}
    remark = c.note(ctx, mode)
    if remark:
        rec["notes"].append(remark)
    try:
        if mode == "warm":
            ctx.raw.read(files, direct=False)  # bring the files into the page cache
            frac = resident_fraction(files)
            rec["resident_before"] = frac
            if frac is not None and frac < 0.95:
                rec["notes"].append(f"only {frac:.0%} of the files stayed cached (RAM too small?)")
        for _ in range(reps):
            if mode == "cold":
                evictor.evict(ctx.all_files())
                frac = resident_fraction(files)
                rec.setdefault("resident_before", frac)
                if frac is not None and frac > 0.05:
                    note = f"{frac:.0%} of the files still cached after eviction: not fully cold"
                    if note not in rec["notes"]:
                        log.warning("%s %s: %s", c.name, mode, note)
                        rec["notes"].append(note)
            t, rss_growth = time_once(ctx, c)
            rec["times"].append(t)
            if rss_growth is not None:
                rec["peak_rss_growth_bytes"] = max(rss_growth, rec.get("peak_rss_growth_bytes", 0))
            log.info("  %-18s %-4s %8.3f s  %7.2f GB/s", c.name, mode, t, nbytes / GB / t)
    except Exception as e:  # one failing contender must not end the benchmark
        log.error("%s %s failed: %s", c.name, mode, e)
        log.debug("%s", traceback.format_exc())
        rec["status"] = "error"
        rec["error"] = f"{type(e).__name__}: {e}"
        _release(ctx)
        return rec
    rec["status"] = "ok"
    rec["seconds"] = min(rec["times"])
    rec["gbps"] = nbytes / GB / rec["seconds"]
    return rec


def h2d_bandwidth(device: str, gib: float) -> Dict[str, Any]:
    """Pinned and pageable host -> device copy bandwidth with torch (best of 3)."""
    import torch

    n = int(gib * 2**30)
    res: Dict[str, Any] = {"bytes": n}
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    for name, pinned in (("pinned", True), ("pageable", False)):
        t0 = time.perf_counter()
        src = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        src.fill_(1)
        res[f"{name}_alloc_s"] = time.perf_counter() - t0
        best = float("inf")
        for _ in range(4):  # the first one warms up
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pinned)
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        res[f"{name}_gbps"] = n / GB / best
        del src
    del dst
    gc.collect()
    torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def _fs_type(path: Path) -> Optional[str]:
    try:
        best, fstype = "", None
        p = str(path.resolve())
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (p == parts[1] or p.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best):
                        best, fstype = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
        return fstype
    except OSError:
        return None


def environment(ctx: Context) -> Dict[str, Any]:
    import safetensors
    import torch

    env: Dict[str, Any] = {
        "hostname": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "is_root": hasattr(os, "geteuid") and os.geteuid() == 0,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "safetensors": safetensors.__version__,
        "sllm_store": getattr(ctx.sllm, "__version__", None),
        "sllm_store_path": getattr(ctx.sllm, "__file__", None),
        "fs_src": _fs_type(ctx.src),
        "fs_converted": _fs_type(ctx.converted) if ctx.converted else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f
                                     if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            mem = {ln.split(":")[0]: ln.split(":")[1].strip() for ln in f}
        env["mem_total"] = mem.get("MemTotal")
    except OSError:
        pass
    if torch.cuda.is_available():
        dev = torch.device(ctx.device if ctx.is_cuda else "cuda:0")
        props = torch.cuda.get_device_properties(dev)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_count"] = torch.cuda.device_count()
    else:
        env["gpu"] = None
    return env


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    """Write a benchmark's results (the JSON files in benchmarks/results/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    log.info("wrote %s", path)


def run_rounds(contenders: Sequence[Tuple[str, Callable[[], Any], Any]], reps: int,
               before: Callable[[str], None], sync: Callable[[], None]) -> Dict[str, Dict[str, Any]]:
    """Time ``(name, fn, bytes)`` contenders in ``reps`` rounds, each round every contender once in
    the same order, so that a disk or server whose speed drifts affects them all alike.

    ``before(name)`` runs untimed before each timing (evict, free memory); the timing is ``fn()``
    then ``sync()``; ``fn``'s result is dropped after it. ``bytes`` is an int, or a function called
    after the runs. Returns per contender ``seconds`` / ``gbps`` (best), ``median_s`` /
    ``median_gbps``, ``all_s`` (in round order), or ``error`` for a contender that raised (it is
    not run again).
    """
    import statistics

    times: Dict[str, List[float]] = {name: [] for name, _, _ in contenders}
    errors: Dict[str, str] = {}
    for r in range(reps):
        for name, fn, _count in contenders:
            if name in errors:
                continue
            before(name)
            t0 = time.perf_counter()
            try:
                out = fn()
                sync()
                times[name].append(time.perf_counter() - t0)
                del out
                log.info("round %d %-18s %.2f s", r + 1, name, times[name][-1])
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"[:300]
                log.warning("%s: %s", name, errors[name])
            gc.collect()
    results: Dict[str, Dict[str, Any]] = {}
    for name, _fn, count in contenders:
        if name in errors:
            results[name] = {"error": errors[name]}
            continue
        best, median = min(times[name]), statistics.median(times[name])
        count = count() if callable(count) else count
        results[name] = {"seconds": best, "gbps": count / GB / best, "median_s": median,
                         "median_gbps": count / GB / median, "all_s": times[name]}
    return results


def _csv(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def select_contenders(args: argparse.Namespace) -> List[Contender]:
    names = _csv(args.only) if args.only else [n for n, c in CONTENDERS.items() if c.default]
    names += [n for n in _csv(args.extra or "") if n not in names]
    names = [n for n in names if n not in set(_csv(args.skip or ""))]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; known: {list(CONTENDERS)}")
    return [CONTENDERS[n] for n in names]


def prepare_converted(args: argparse.Namespace, sllm: Any, src: Path,
                      notes: List[str]) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    converted: Path = args.converted or src.with_name(src.name + ".sllm")
    if (converted / SLLM_INDEX).is_file() and not args.reconvert:
        log.info("using converted checkpoint %s", converted)
        return converted, None
    if sllm is None:
        notes.append("no converted checkpoint and sllm_store is not importable: raw reads use the"
                     " source shards and the sllm contenders are skipped")
        return None, None
    if converted.exists() and not args.reconvert:
        raise SystemExit(f"{converted} exists but has no {SLLM_INDEX}; remove it or --reconvert")
    log.info("converting %s -> %s", src, converted)
    t0 = time.perf_counter()
    try:
        sllm.convert(src, converted, overwrite=bool(args.reconvert))
    except Exception as e:  # the benchmark still measures the others
        log.error("convert failed: %s", e)
        log.debug("%s", traceback.format_exc())
        notes.append(f"convert failed ({type(e).__name__}: {e}): raw reads use the source shards"
                     " and the sllm contenders are skipped")
        return None, {"error": f"{type(e).__name__}: {e}"}
    t_convert = time.perf_counter() - t0
    os.sync()
    t_sync = time.perf_counter() - t0
    log.info("converted in %.2f s (%.2f s with sync)", t_convert, t_sync)
    return converted, {"seconds": t_convert, "seconds_with_sync": t_sync}


def fmt_ratio(x: Optional[float]) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def print_table(results: List[Dict[str, Any]], sizes: Dict[str, Any],
                raw_best: Optional[Dict[str, Any]]) -> None:
    print()
    print(f"checkpoint: {sizes['tensor_bytes'] / GB:.3f} GB of tensors; "
          f"{sizes['src_file_bytes'] / GB:.3f} GB in {sizes['src_files']} safetensors file(s); "
          f"{sizes.get('converted_file_bytes', 0) / GB:.3f} GB in "
          f"{sizes.get('converted_files', 0)} converted data file(s)")
    if raw_best:
        print(f"raw disk (best cold raw read): {raw_best['contender']} "
              f"{raw_best['gbps']:.2f} GB/s")
    header = (f"{'contender':<20} {'mode':<5} {'seconds':>9} {'GB/s':>8} "
              f"{'vs raw disk':>12} {'vs safetensors':>15}  notes")
    print(header)
    print("-" * len(header))
    for r in results:
        if r.get("status") != "ok":
            why = r.get("error") or r.get("reason") or r.get("status")
            print(f"{r['contender']:<20} {r['mode']:<5} {'-':>9} {'-':>8} {'-':>12} {'-':>15}  "
                  f"{r.get('status')}: {why}")
            continue
        notes = list(r.get("notes", []))
        if "peak_rss_growth_bytes" in r:
            notes.insert(0, f"peak RSS +{r['peak_rss_growth_bytes'] / GB:.2f} GB")
        print(f"{r['contender']:<20} {r['mode']:<5} {r['seconds']:>9.3f} {r['gbps']:>8.2f} "
              f"{fmt_ratio(r.get('vs_raw_disk')):>12} {fmt_ratio(r.get('vs_safetensors')):>15}  "
              f"{'; '.join(notes)}")
    print()


def check_equal(ctx: Context) -> Dict[str, Any]:
    """Compare sllm's result with safetensors' tensor by tensor (untimed)."""
    import torch

    ref = _safetensors(None)(ctx)
    got = ctx.sllm.load_state_dict(ctx.converted, device=ctx.device)
    res: Dict[str, Any] = {"tensors": len(ref), "missing": sorted(set(ref) - set(got))[:20],
                           "unexpected": sorted(set(got) - set(ref))[:20], "mismatches": []}
    for name in list(ref):
        a = ref.pop(name)
        b = got.pop(name, None)
        if b is None:
            continue
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            res["mismatches"].append(
                f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
    del ref, got
    _release(ctx)
    res["ok"] = not (res["missing"] or res["unexpected"] or res["mismatches"])
    res["mismatches"] = res["mismatches"][:20]
    return res


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, help="HF model dir (from make_checkpoint.py) or a "
                   ".safetensors file")
    p.add_argument("--converted", type=Path,
                   help="sllm-store dir (default SRC.sllm); converted from --src if missing")
    p.add_argument("--reconvert", action="store_true", help="convert again even if it exists")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, help="threads for the raw reads (default 16) and for "
                   "sllm (default: the library's)")
    p.add_argument("--block-mib", type=int, default=32,
                   help="raw read block size in MiB (default 32, the format's chunk size)")
    p.add_argument("--cold-reps", type=int, default=1, help="cold repetitions (best is kept)")
    p.add_argument("--warm-reps", type=int, default=2, help="warm repetitions (best is kept)")
    p.add_argument("--modes", default="cold,warm", help="which of cold,warm to run")
    p.add_argument("--only", help="comma list of contenders to run instead of the default set")
    p.add_argument("--extra", help="comma list of contenders to add to the default set")
    p.add_argument("--skip", help="comma list of contenders to skip")
    p.add_argument("--list", action="store_true", help="list the contenders and exit")
    p.add_argument("--no-touch", dest="touch", action="store_false",
                   help="on cpu, do not touch the loaded tensors' pages inside the timing")
    p.add_argument("--rss", action="store_true",
                   help="also record each contender's peak RSS growth (sampled every 5 ms)")
    p.add_argument("--check", action="store_true",
                   help="also compare sllm's tensors with safetensors' (untimed)")
    p.add_argument("--h2d-gib", type=float, default=2.0,
                   help="size of the host->device copy test on cuda (0: skip)")
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:  # keep the library's per-load messages out of the way
        logging.getLogger("sllm_store").setLevel(logging.WARNING)

    if args.list:
        for c in CONTENDERS.values():
            print(f"{c.name:<20} {'default' if c.default else 'opt-in ':<8} {c.description}")
        return 0
    if args.src is None:
        p.error("--src is required")
    modes = [m for m in _csv(args.modes) if m in ("cold", "warm")]
    contenders = select_contenders(args)

    import torch

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available")
        torch.cuda.init()
        torch.empty(1, device=args.device)  # create the context outside any timing
    notes: List[str] = []
    sllm, why = import_sllm()
    if why:
        log.warning("%s", why)
        notes.append(why)

    src = args.src.resolve()
    src_files = source_files(src)
    converted, convert_rec = prepare_converted(args, sllm, src, notes)
    data_files, converted_total = converted_data_files(converted) if converted else ([], 0)
    tensor_bytes = sum(safetensors_payload_bytes(f) for f in src_files)
    sizes: Dict[str, Any] = {
        "tensor_bytes": tensor_bytes,
        "src_files": len(src_files),
        "src_file_bytes": sum(f.stat().st_size for f in src_files),
    }
    if converted:
        sizes.update(converted_files=len(data_files),
                     converted_file_bytes=sum(f.stat().st_size for f in data_files),
                     converted_total_bytes=converted_total)
        if converted_total and converted_total != tensor_bytes:
            notes.append(f"converted total_bytes {converted_total} != safetensors tensor bytes "
                         f"{tensor_bytes} (tied tensors stored once?)")
    if convert_rec and "seconds" in convert_rec:
        convert_rec["gbps"] = tensor_bytes / GB / convert_rec["seconds"]

    raw_threads = args.threads or 16
    ctx = Context(args=args, src=src, converted=converted, device=args.device,
                  threads=args.threads, sllm=sllm, src_files=src_files, data_files=data_files,
                  tensor_bytes=tensor_bytes, raw=RawReader(raw_threads, args.block_mib * MiB),
                  touch=args.touch, notes=notes)
    evictor = Evictor(sllm)
    env = environment(ctx)
    log.info("host %s, %s CPUs, gpu %s, torch %s; %.3f GB of tensors in %d file(s)",
             env["hostname"], env["cpu_count"], env.get("gpu"), env["torch"],
             tensor_bytes / GB, len(src_files))

    h2d = None
    if ctx.is_cuda and args.h2d_gib > 0:
        log.info("host -> %s copy test, %.1f GiB", args.device, args.h2d_gib)
        h2d = h2d_bandwidth(args.device, args.h2d_gib)
        log.info("  pinned %.1f GB/s, pageable %.1f GB/s", h2d["pinned_gbps"],
                 h2d["pageable_gbps"])

    results: List[Dict[str, Any]] = []
    prepared: set = set()
    for c in contenders:
        reason = c.unavailable(ctx)
        for mode in modes:
            if mode not in c.modes:
                continue
            if reason:
                log.warning("skipping %s %s: %s", c.name, mode, reason)
                results.append({"contender": c.name, "mode": mode, "kind": c.kind,
                                "status": "skipped", "reason": reason})
                continue
            if c.name not in prepared:
                prepared.add(c.name)
                t0 = time.perf_counter()
                try:
                    c.prepare(ctx)
                except Exception as e:  # the timed runs will report the real failure
                    log.warning("%s: preparation failed: %s", c.name, e)
                log.debug("%s prepared in %.2f s", c.name, time.perf_counter() - t0)
            reps = args.cold_reps if mode == "cold" else args.warm_reps
            log.info("%s (%s, %d rep%s)", c.name, mode, reps, "s" if reps > 1 else "")
            results.append(measure(ctx, c, mode, max(1, reps), evictor))
    ctx.raw.close()

    ok = [r for r in results if r.get("status") == "ok"]
    raw_cold = [r for r in ok if r["kind"] == "raw" and r["mode"] == "cold"]
    raw_best = max(raw_cold, key=lambda r: r["gbps"]) if raw_cold else None
    st = {r["mode"]: r for r in ok if r["contender"] == "safetensors"}
    for r in ok:
        r["vs_raw_disk"] = r["gbps"] / raw_best["gbps"] if raw_best else None
        r["vs_safetensors"] = r["gbps"] / st[r["mode"]]["gbps"] if r["mode"] in st else None

    check = None
    if args.check:
        if ctx.sllm is None or ctx.converted is None:
            check = {"ok": None, "reason": "sllm_store unavailable"}
        else:
            log.info("checking sllm against safetensors, tensor by tensor")
            check = check_equal(ctx)
            log.info("check: %s", "ok" if check["ok"] else check)

    print_table(results, sizes, raw_best)
    if convert_rec and "seconds" in convert_rec:
        print(f"convert: {convert_rec['seconds']:.2f} s ({convert_rec['gbps']:.2f} GB/s), "
              f"{convert_rec['seconds_with_sync']:.2f} s with sync")
    if h2d:
        print(f"host->device copy: pinned {h2d['pinned_gbps']:.1f} GB/s, "
              f"pageable {h2d['pageable_gbps']:.1f} GB/s")
    if check is not None:
        if check.get("ok") is None:
            print(f"check: not run ({check.get('reason')})")
        elif check.get("ok"):
            print(f"check: ok, sllm == safetensors for all {check['tensors']} tensors")
        else:
            print(f"check: FAILED: {check}")
    for n in notes:
        print(f"note: {n}")

    if args.json:
        out = {
            "schema": 1,
            "environment": env,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "src": str(src),
            "converted": str(converted) if converted else None,
            "device": args.device,
            "raw_threads": raw_threads,
            "raw_block_bytes": ctx.raw.block,
            "touch": ctx.touch and not ctx.is_cuda,
            "eviction": {"method": evictor.method, "drop_caches": evictor.drop_caches},
            "sizes": sizes,
            "convert": convert_rec,
            "h2d_copy": h2d,
            "raw_disk_best": ({"contender": raw_best["contender"], "gbps": raw_best["gbps"]}
                              if raw_best else None),
            "results": results,
            "check": check,
            "notes": notes,
        }
        write_json(args.json, out)
    failed = [r for r in results if r.get("status") == "error"]
    if check is not None and check.get("ok") is False:
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
