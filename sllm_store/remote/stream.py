"""Loading a remote checkpoint while it downloads.

For an ``s3://`` / ``http(s)://`` checkpoint that is not cached yet, the load is planned exactly
like a local one (one allocation per device, tensors as views). Worker threads (twice
``num_threads``, with ``num_threads`` GETs in flight) each take one chunk at a time:

1. a ranged GET (``obstore``, GIL released), then verification (and decoding of compressed
   chunks, in C++);
2. the copy of the chunk's pieces into their destinations (``_C.run_copies``: a memcpy, or for a
   GPU a memcpy into a page-locked staging buffer and a DMA from it);
3. the write-through into the cache's partial download, handed to write-behind threads
   (``SLLM_STORE_WRITE_BEHIND`` bytes may wait), so that the page cache, which takes new pages
   more slowly than a fast network delivers them, does not hold up the GETs.

The load returns when every tensor is in place. The cache writes left, the sync of the data to
disk and the promotion of the entry finish on a background thread (``wait_for_cache``); the next
load of the URL, in any process, is then a disk (or page-cache) load.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from sllm_store import _C
from sllm_store._units import format_size
from sllm_store.config import LoadConfig
from sllm_store.errors import MissingFileError, SllmStoreError
from sllm_store.utils import parallel_map

logger = logging.getLogger(__name__)


class _PinnedStaging:
    """Page-locked buffers for the device copies of downloaded chunks: a memcpy into one, then a
    DMA from it. The driver's copy from pageable memory does that memcpy into its own staging
    buffers, more slowly: GETs copied to the H100 ran at 3.49 GB/s that way and at 4.10 GB/s
    through page-locked buffers (raw GETs 4.37 GB/s; ``bench_remote --stages``, run N). Made by
    the C++ core's CUDA staging allocator as needed, at most ``count``, freed with this object.
    Without page-locked memory (``take`` returns None), copies are made from pageable memory."""

    def __init__(self, device: str, size: int, count: int = 8) -> None:
        self._device = device
        self._size = size
        self._slots = threading.BoundedSemaphore(count)
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self._broken = False

    def take(self) -> Optional[Any]:
        if self._broken:
            return None
        self._slots.acquire()
        with self._lock:
            if self._free:
                return self._free.pop()
        try:
            return _C.StagingBuffer(self._device, self._size)
        except SllmStoreError as e:
            logger.info("no page-locked staging buffer (%s): copying from pageable memory", e)
            self._broken = True
            self._slots.release()
            return None

    def give(self, buf: Any) -> None:
        with self._lock:
            self._free.append(buf)
        self._slots.release()


def load_remote(url: str, device: Any, config: LoadConfig,
                _retry: bool = True) -> tuple[dict[str, torch.Tensor], Any]:
    """``load_state_dict`` of a URL: from the cache if complete, else streamed while downloading."""
    from sllm_store.loader import _load
    from sllm_store.remote.cache import Download

    t0 = time.perf_counter()
    # The download lock and files are released whatever happens.
    with Download(url, config.remote, max_gets=config.num_threads, cache_errors="warn").open() as d:
        if d.cached is None:
            return _stream(d, url, device, config, t0)
        try:
            return _load(d.cached, device, config)
        except MissingFileError:
            if not _retry or d.cached.exists():
                raise
    # Evicted (by another process's prune) between finding the entry and loading it.
    logger.info("%s: the cache entry was evicted meanwhile; loading from the object store", url)
    return load_remote(url, device, config, _retry=False)


def _stream(d: Any, url: str, device: Any, config: LoadConfig,
            t0: float) -> tuple[dict[str, torch.Tensor], Any]:
    """Load the opened, uncached download ``d`` while its chunks arrive."""
    from sllm_store.loader import (
        LoadReport,
        _allocate,
        _assign_devices,
        _bytes_per_device,
        _device_spec,
        _make_plan,
        _payload_bytes,
        _views,
    )
    from sllm_store.writer import default_quiet

    index = d.index
    assign = _assign_devices(index, device)
    for dev in set(assign.values()):
        _C.check_device(_device_spec(dev))
    # Read units are whole chunks (the download unit), whatever chunk_size says.
    plan = _make_plan(index, assign, LoadConfig(config.num_threads, "buffered", None, config.verify))
    buffers = [_allocate(dev, size) for dev, size in zip(plan.devices, plan.sizes)]
    dests = [(_device_spec(dev), buf.data_ptr() + shift, size)
             for dev, size, (buf, shift) in zip(plan.devices, plan.sizes, buffers)]
    by_unit: dict[int, list[tuple[int, int, int, int, int]]] = {}
    for seg in plan.segments:
        by_unit.setdefault(seg[0], []).append(seg)

    gpus = [spec for spec, _ptr, _size in dests if spec != "cpu"]
    staging = _PinnedStaging(gpus[0], index.chunk_size) if gpus else None

    def one(u: int) -> int:
        f_i, off, length, _ = plan.units[u]
        c = off // index.chunk_size
        data, stored = d.fetch_chunk(f_i, c)
        segs = by_unit.get(u, [])
        if segs:
            t = time.perf_counter()
            src = np.frombuffer(data, dtype=np.uint8)
            buf = staging.take() if staging is not None else None
            try:
                if buf is not None:  # a memcpy into page-locked memory, then a DMA
                    _C.run_copies([(src.ctypes.data, 0, 0, src.nbytes)],
                                  [("cpu", buf.address, len(buf))], num_threads=1)
                    base = buf.address
                else:
                    base = src.ctypes.data
                _C.run_copies([(base + coff, slot, doff, n) for _u, coff, slot, doff, n in segs], dests,
                              num_threads=1)
            finally:
                if buf is not None:
                    staging.give(buf)
            del src
            d.add_seconds(copy=time.perf_counter() - t)
        if not stored:
            d.store_later(f_i, c, data)  # the cache write, off this thread when memory allows
        del data
        return length

    with tqdm(total=sum(u[2] for u in plan.units), unit="B", unit_scale=True, unit_divisor=1024,
              desc="loading", dynamic_ncols=True, disable=default_quiet()) as bar:
        # num_threads GETs in flight; twice as many threads, so that verifying, writing and
        # copying the chunks that have arrived does not leave the connection idle.
        for n in parallel_map(one, range(len(plan.units)), 2 * config.num_threads, "sllm-remote"):
            bar.update(n)
    # None after a partial load (the rest is fetched by a later load). A complete download is
    # synced and promoted on a background thread, whose failures are warnings: the tensors are
    # loaded; only the cache entry is not.
    cached = d.finish_later()
    tensors = _views(index, assign, plan, buffers)
    seconds = time.perf_counter() - t0
    report = LoadReport(path=url, bytes=_payload_bytes(index, assign), seconds=seconds,
                        devices=_bytes_per_device(plan),
                        stats={"io_mode": "remote", "threads": config.num_threads,
                               "bytes_downloaded": d.bytes_downloaded,
                               # thread-seconds per stage: where the time went
                               "stage_seconds": dict(d.stage_seconds),
                               "cached": str(cached) if cached else None})
    logger.info("loaded %s while downloading %s in %.2f s (%.2f GB/s)", url, format_size(d.bytes_downloaded),
                seconds, report.gb_per_s)
    return tensors, report
