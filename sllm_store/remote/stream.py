"""Loading a remote checkpoint while it downloads.

For an ``s3://`` / ``http(s)://`` checkpoint that is not cached yet, the load is planned exactly
like a local one (one allocation per device, tensors as views). Worker threads (twice as many as
GETs in flight: ``num_threads`` if given, else ``config.DEFAULT_REMOTE_GETS``) each take one chunk
at a time:

1. a ranged GET (``obstore``, GIL released; compressed chunks are then decoded, in C++);
2. the copy of the chunk's pieces into their destinations and its checksum, in one pass
   (``_C.StagedCopier``: for a GPU a memcpy into reused 4 MiB page-locked staging blocks,
   checksummed as it goes, each block DMAed on as soon as it is full). For a GPU, a plain
   chunk whose every tensor byte the load holds is fetched as two 16 MiB GETs
   (``cache.get_piece``, ``SLLM_STORE_GET_PIECE``), each body added to the staging blocks and
   freed before the next GET (``Download.fetch_chunk(fill=...)``): glibc then reuses the
   freed bodies from its heap, where a whole 32 MiB chunk's body is a fresh mapping, faulted
   in page by page. With ``SLLM_STORE_GET_CLIENT=http`` such a chunk is one GET of a presigned
   URL whose body is read straight into the staging blocks instead (``remote/signed_gets.py``:
   no body buffer, no copy);
3. the write-through into the cache's partial download, on write-behind threads that write
   with O_DIRECT (``SLLM_STORE_CACHE_IO``), so that neither the disk nor the page cache holds up
   the GETs. For a GPU the chunk is written from the device: a write-behind thread copies it back
   into one of 4 page-locked buffers of the copier (a DMA), checks it against its checksum and
   writes it from there (``Download._store_read_back``). So no host copy of the chunk waits
   for the disk: when the disk is slower than the network, the chunks waiting for it take no
   memory. A chunk changed on the device before it was written is fetched again. Other chunks
   (host memory, checkpoints without checksums) wait for their write in the GET's buffer
   (``SLLM_STORE_WRITE_BEHIND`` bytes may wait); each such GET starts a few KiB early, so that
   its chunk arrives 4 KiB-aligned and is written from where it arrived (``Download._lead``).

The load returns when every tensor is in place. The cache writes left, the sync of the data to
disk and the promotion of the entry finish on a background thread (``wait_for_cache``); the next
load of the URL, in any process, is then a disk (or page-cache) load.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from sllm_store import _C
from sllm_store._units import format_size
from sllm_store.config import LoadConfig
from sllm_store.errors import MissingFileError
from sllm_store.utils import parallel_map

logger = logging.getLogger(__name__)

STAGING_BLOCK = 4 << 20  # the page-locked staging blocks of a streamed load to a GPU: their size,
STAGING_BLOCKS = 0  # and number (and streams; 0: two per GET in flight, and 8 more)
READ_BACK_BUFFERS = 4  # page-locked buffers (and streams) that cache writes read chunks back into


def load_remote(url: str, device: Any, config: LoadConfig,
                _retry: bool = True) -> tuple[dict[str, torch.Tensor], Any]:
    """``load_state_dict`` of a URL: from the cache if complete, else streamed while downloading."""
    from sllm_store.loader import _load
    from sllm_store.remote.cache import Download

    t0 = time.perf_counter()
    # The download lock and files are released whatever happens.
    with Download(url, config.remote, max_gets=config.remote_gets, cache_errors="warn").open() as d:
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

    marks = {"opened": time.perf_counter()}  # the load's timeline (with t0 and d.gets_span)
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

    # Copies each chunk's pieces into place (for a GPU through reused page-locked staging blocks,
    # a memcpy fused with the chunk's checksum, then a DMA per block), returning the checksum.
    # A chunk holds at most two blocks at a time; they are made up front, while the first GETs
    # are in flight, and no more than the load's bytes fill.
    blocks = STAGING_BLOCKS or 2 * config.remote_gets + 8
    blocks = max(1, min(blocks, -(-sum(u[2] for u in plan.units) // STAGING_BLOCK)))
    to_device = any(dev.type != "cpu" for dev in plan.devices)
    # The cache is written from the device (see the module's docstring) where it can be: only
    # then are chunks fetched in pieces into the staging blocks.
    readers = READ_BACK_BUFFERS if to_device and d.can_read_back else 0
    copier = _C.StagedCopier(dests, STAGING_BLOCK, blocks, readers, index.chunk_size)
    covered = _covered_units(index, plan, by_unit) if readers else set()
    marks["planned"] = time.perf_counter()  # the device memory and the copier made

    def read_back(pieces: list[tuple[int, int, int, int]], n: int) -> Any:
        # Holds the copier and the device memory until the chunk is written.
        return lambda use, _keep=buffers: copier.read_back(pieces, n, use)

    def one(u: int) -> int:
        f_i, off, length, _ = plan.units[u]
        c = off // index.chunk_size
        pieces = [(coff, slot, doff, n) for _u, coff, slot, doff, n in by_unit.get(u, [])]
        data, stored = d.fetch_chunk(f_i, c, deliver=(lambda b: copier.copy(b, pieces)) if pieces else None,
                                     fill=(lambda n: copier.fill(n, pieces)) if u in covered else None)
        if not stored:
            # The cache write, off this thread: of what is on the device now, or of the GET's
            # buffer (held until then, as memory allows).
            d.store_later(f_i, c, read_back(pieces, d.chunk_length(f_i, c)) if u in covered else data)
        del data
        return length

    with tqdm(total=sum(u[2] for u in plan.units), unit="B", unit_scale=True, unit_divisor=1024,
              desc="loading", dynamic_ncols=True, disable=default_quiet()) as bar:
        # remote_gets GETs in flight; twice as many threads, so that copying the chunks that
        # have arrived does not leave the connection idle.
        for n in parallel_map(one, range(len(plan.units)), 2 * config.remote_gets, "sllm-remote"):
            bar.update(n)
    marks["fetched"] = time.perf_counter()
    marks["first_get"], marks["last_get_end"] = d.gets_span  # by then (a cache write's refetch too)
    if not copier.staged:
        logger.warning("%s: no page-locked staging memory (%s); the chunks were copied to the GPU from "
                       "pageable memory, more slowly", url, copier.pin_error)
    # None after a partial load (the rest is fetched by a later load). A complete download is
    # synced and promoted on a background thread, whose failures are warnings: the tensors are
    # loaded; only the cache entry is not.
    cached = d.finish_later()
    tensors = _views(index, assign, plan, buffers)
    seconds = time.perf_counter() - t0
    report = LoadReport(path=url, bytes=_payload_bytes(index, assign), seconds=seconds,
                        devices=_bytes_per_device(plan),
                        stats={"io_mode": "remote", "threads": config.remote_gets,
                               "bytes_downloaded": d.bytes_downloaded,
                               # thread-seconds per stage: where the time went
                               "stage_seconds": dict(d.stage_seconds),
                               # and their CPU thread-seconds (the rest of the process's CPU time
                               # is the object store client's own threads and the interpreter)
                               "stage_cpu_seconds": dict(d.stage_cpu_seconds),
                               "staging_buffers": copier.buffers,
                               # thread-seconds making them, and waiting for a free one
                               "staging_alloc_s": copier.alloc_seconds,
                               "staging_wait_s": copier.wait_seconds,
                               # O_DIRECT cache writes straight from the GET's buffer or through
                               # an aligned copy; the same dict, counted until the write-behind
                               # is done (wait_for_cache)
                               "direct_writes": d.direct_writes,
                               # chunks cached from the device (and fetched again): the same
                               # dict, counted until the write-behind is done
                               "read_backs": d.read_backs,
                               # chunks fetched in pieces (get_piece) into the staging blocks
                               "pieced_chunks": d.pieced_chunks,
                               # or read into them in place (SLLM_STORE_GET_CLIENT=http)
                               "in_place_chunks": d.in_place_chunks,
                               # seconds from the call: the index fetched and the cache entry
                               # opened, the memory made, the first GET started, the last one
                               # ended, every chunk in place (then the load returns at "seconds")
                               "timeline_s": {k: round(v - t0, 4) for k, v in marks.items()
                                              if v is not None},
                               "cached": str(cached) if cached else None})
    logger.info("loaded %s while downloading %s in %.2f s (%.2f GB/s)", url, format_size(d.bytes_downloaded),
                seconds, report.gb_per_s)
    return tensors, report


def _covered_units(index: Any, plan: Any,
                   by_unit: dict[int, list[tuple[int, int, int, int, int]]]) -> set[int]:
    """The read units whose pieces hold every tensor byte of their chunk once, so that the chunk
    can be read back from the destinations (the bytes between tensors are zeros)."""
    spans: dict[int, list[tuple[int, int]]] = {}  # per file: (start, end) of its tensors, sorted
    for t in index.tensors.values():
        if t.alias_of is None:
            spans.setdefault(t.file, []).append((t.offset, t.offset + t.nbytes))
    for v in spans.values():
        v.sort()
    starts = {f: [lo for lo, _ in v] for f, v in spans.items()}
    out = set()
    for u, segs in by_unit.items():
        f_i, off, length, _ = plan.units[u]
        got = sum(seg[4] for seg in segs)
        if got == length:  # the whole chunk (a file loaded whole)
            out.add(u)
            continue
        # Tensors are laid out one after another: the ones overlapping [off, off + length) start
        # before its end, from the last one that starts at or before off.
        v, s = spans.get(f_i, []), starts.get(f_i, [])
        first, end = max(0, bisect.bisect_right(s, off) - 1), bisect.bisect_left(s, off + length)
        want = sum(max(0, min(off + length, hi) - max(off, lo)) for lo, hi in v[first:end])
        if got == want:
            out.add(u)
    return out
