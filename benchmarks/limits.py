"""The machine's limits, measured in the run that compares against them: raw disk reads swept over
O_DIRECT/buffered x threads x block sizes, and pinned and pageable host-to-GPU copies. A ratio is
taken against the best of a sweep, never against one configuration.
"""

from __future__ import annotations

import gc
import itertools
import logging
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from common import GB

log = logging.getLogger("benchmarks.limits")

ALIGN = 4096


class RawReader:
    """Parallel ``os.preadv`` of whole files in fixed blocks into reused page-aligned buffers (the
    bytes go nowhere: the read itself is the limit)."""

    def __init__(self, threads: int, block: int) -> None:
        self.threads = threads
        self.block = -(-block // ALIGN) * ALIGN
        self.buffers = [mmap.mmap(-1, self.block) for _ in range(threads)]
        for b in self.buffers:  # faulted in here, not while timed
            b.write(b"\0" * self.block)
            b.seek(0)

    def close(self) -> None:
        for b in self.buffers:
            b.close()
        self.buffers = []

    def read(self, files: Sequence[Path], direct: bool, limit: Optional[int] = None) -> int:
        """Read ``files`` (their first ``limit`` bytes in all, when given); returns bytes read."""
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
        fds: List[int] = []
        try:
            work: List[Tuple[int, int, int]] = []
            budget = limit if limit is not None else float("inf")
            for f in files:
                fd = os.open(f, flags)
                fds.append(fd)
                size = os.fstat(fd).st_size
                for off in range(0, size, self.block):
                    if budget <= 0:
                        break
                    n = min(self.block, size - off)
                    work.append((fd, off, n))
                    budget -= n
            counter = itertools.count()  # next() is atomic under the GIL

            def worker(buf: mmap.mmap) -> int:
                mv = memoryview(buf)
                total = 0
                try:
                    while (i := next(counter)) < len(work):
                        fd, off, n = work[i]
                        want = -(-n // ALIGN) * ALIGN if direct else n  # O_DIRECT: aligned lengths
                        done = 0
                        while done < n:
                            got = os.preadv(fd, [mv[done:want]], off + done)
                            if got <= 0:
                                raise OSError(f"short read at offset {off + done}")
                            done += got
                        total += n
                finally:
                    mv.release()
                return total

            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                return sum(pool.map(worker, self.buffers))
        finally:
            for fd in fds:
                os.close(fd)


def direct_unavailable(files: Sequence[Path]) -> Optional[str]:
    """None if O_DIRECT reads work on these files, else why not."""
    if not hasattr(os, "O_DIRECT"):
        return "no O_DIRECT on this platform"
    f = next((f for f in files if f.stat().st_size > 0), None)
    if f is None:
        return "no non-empty file"
    buf = mmap.mmap(-1, ALIGN)
    try:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [memoryview(buf)], 0)
        finally:
            os.close(fd)
    except OSError as e:
        return f"O_DIRECT refused on {f} ({e})"
    finally:
        buf.close()
    return None


def disk_sweep(files: Sequence[Path], evict: Callable[[], None], warm: Callable[[], None], *, cold: bool,
               threads: Sequence[int], blocks_mib: Sequence[int], limit: Optional[int]) -> Dict[str, Any]:
    """Raw reads of ``files`` for every O_DIRECT/buffered x threads x block size; cold (evicted
    before each read) or warm (page-cached: buffered only). Returns every point and the best."""
    modes = [False] if not cold else [True, False]
    why_not = direct_unavailable(files) if cold else None
    points = []
    for direct, t, b in itertools.product(modes, threads, blocks_mib):
        if direct and why_not:
            continue
        reader = RawReader(t, b << 20)
        try:
            evict() if cold else warm()
            t0 = time.perf_counter()
            n = reader.read(files, direct, limit)
            s = time.perf_counter() - t0
        finally:
            reader.close()
        points.append({"direct": direct, "threads": t, "block_mib": b, "bytes": n, "seconds": s,
                       "gbps": n / GB / s})
        log.info("raw %s %s  %2d threads x %2d MiB: %6.2f GB/s", "cold" if cold else "warm",
                 "O_DIRECT" if direct else "buffered", t, b, n / GB / s)
    best = max(points, key=lambda p: p["gbps"]) if points else None
    return {"points": points, "best": best, "direct_unavailable": why_not}


def _best_copy_seconds(device: str, dst: Any, src: Any, non_blocking: bool = False) -> float:
    """The fastest of 4 ``dst.copy_(src)`` (the first a warm-up), each synchronized."""
    import torch

    best = float("inf")
    for _ in range(4):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=non_blocking)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def h2d(device: str, gib: float = 2.0) -> Dict[str, Any]:
    """Pinned and pageable host-to-device copy bandwidth with torch (best of 3 after a warm-up)."""
    import torch

    n = int(gib * 2**30)
    res: Dict[str, Any] = {"bytes": n}
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    for name, pinned in (("pinned", True), ("pageable", False)):
        src = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        src.fill_(1)
        res[f"{name}_gbps"] = n / GB / _best_copy_seconds(device, dst, src, non_blocking=pinned)
        del src
    del dst
    gc.collect()
    torch.cuda.empty_cache()
    return res


def d2d(device: str, gib: float = 4.0) -> Dict[str, Any]:
    """Device-to-device copy bandwidth within one GPU with torch (bytes copied per second, best
    of 3 after a warm-up): what a private copy of GPU-resident weights can reach."""
    import torch

    n = int(gib * 2**30)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = _best_copy_seconds(device, dst, src)
    del src, dst
    gc.collect()
    torch.cuda.empty_cache()
    return {"bytes": n, "gbps": n / GB / best}
