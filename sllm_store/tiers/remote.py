"""The remote tier: ``s3://`` and ``http(s)://`` checkpoints, through the local disk cache.

:meth:`RemoteTier.open` fetches the checkpoint's index (once) and looks for its cache entry
(:mod:`sllm_store.remote`):

* a hit opens the entry as a local checkpoint (:class:`CachedCheckpoint`): a disk (or page-cache)
  load. An entry evicted by another process between finding it and loading it is downloaded
  instead, into the same memory;
* a miss holds the entry's download lock (another process loading the same URL waits for it, then
  finds the entry) and loads while downloading (:class:`DownloadingCheckpoint`).

A load while downloading is planned like a local one (one allocation per device, tensors as views),
its read units the checkpoint's chunks. Worker threads, twice as many as GETs in flight
(``RemoteOptions.max_gets``), each take one chunk at a time:

1. its GETs and its copy into place. A plain chunk to a GPU, whose every tensor byte the load
   holds, comes as GETs of 16 MiB pieces, each body added to page-locked staging blocks
   (``_C.StagedCopier.fill``: a memcpy fused with the chunk's checksum, each block copied to the
   device as soon as it is full) and freed before the next GET. Other chunks (host memory,
   compressed chunks, chunks the load holds only part of) come with one ranged GET each, decoded
   if compressed, and are copied into place and checksummed in one pass (``copier.copy``);
2. its write into the cache's partial download, on write-behind threads, so that neither the disk
   nor the page cache holds the GETs up. A chunk fetched in pieces is written from the device: a
   write-behind thread copies it back into one of the copier's page-locked buffers, checks it
   against its checksum and writes it from there (``copier.read_back``), so no host copy of the
   chunk waits for the disk; a chunk changed on the device before it was written is fetched
   again. Other chunks wait for their write in their GET's buffer (``CacheSettings.write_behind``
   bytes may wait).

The load returns when every tensor is in place; the cache writes left, the sync and the promotion
of the entry finish on a background thread (:func:`sllm_store.remote.wait_for_cache`).

Importing this module is cheap: the download machinery, the object-store client and numpy are imported
when a URL opens.
"""

from __future__ import annotations

import bisect
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from sllm_store.config import LoadConfig
from sllm_store.errors import InvalidArgumentError, LoadCancelledError, MissingFileError, SllmStoreError
from sllm_store.index import INDEX_FILE, Index, PathLike, is_remote
from sllm_store.plan import Buffer, Plan, Segment, destinations, make_plan
from sllm_store.tiers.base import Checkpoint
from sllm_store.tiers.local import LocalCheckpoint, LocalTier

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sllm_store.remote.download import Download

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Staging:
    """How a load while downloading stages chunks on their way to a GPU."""

    block: int = 4 << 20  # bytes per page-locked staging block
    blocks: int = 0  # staging blocks (and streams); 0: two per GET in flight, and 8 more
    read_back_buffers: int = 4  # page-locked buffers (and streams) that chunks are read back into
    piece: int = 0  # bytes per GET of a chunk fetched into the staging blocks; 0: the fetcher's

    def __post_init__(self) -> None:
        if self.block <= 0 or self.piece < 0 or self.blocks < 0 or self.read_back_buffers < 1:
            raise InvalidArgumentError(f"invalid staging settings: {self}")


class RemoteTier:
    """``s3://``, ``http://`` and ``https://`` URLs. ``staging``: see :class:`Staging`."""

    name = "remote"

    def __init__(self, staging: Staging = Staging()) -> None:
        self.staging = staging

    def accepts(self, path: PathLike, config: LoadConfig) -> bool:
        return is_remote(path)

    def open(self, path: PathLike, config: LoadConfig) -> Checkpoint:
        from sllm_store.remote.download import Download

        started = time.perf_counter()
        url = str(path)
        d = Download(url, config.remote, config.cache_settings(), cache_errors="warn").open()
        for attempt in (0, 1):
            if d.cached is None:
                return DownloadingCheckpoint(url, d, config, self.staging, started)
            try:
                return CachedCheckpoint(url, d, LocalTier().open(d.cached, config), self.staging, started)
            except MissingFileError:
                if attempt or d.cached.exists() or not d.can_download:
                    raise
            logger.info("%s: the cache entry was evicted meanwhile; loading from the object store", url)
            d.open()
        raise AssertionError("unreachable")  # pragma: no cover


class CachedCheckpoint(Checkpoint):
    """A URL whose cache entry is complete: the entry, loaded by the local tier. If the entry is
    evicted (by another process) before its files are read, :meth:`fill` downloads the chunks
    into the same memory instead: the placement of the tensors depends on the tensors alone."""

    tier = "local"

    def __init__(self, url: str, download: Download, local: LocalCheckpoint, staging: Staging,
                 started: float) -> None:
        super().__init__(url, local.index, local.config)
        self.local = local
        local.may_map = False  # evicted before the fill, the download fills the same (owned) memory
        self.entry = Path(local.path)
        self._download = download
        self._staging = staging
        self._started = started
        self._closers.callback(local.close)

    def model_dir(self) -> Path:
        return self.local.model_dir()

    def check_devices(self, devices: set[torch.device]) -> None:
        self.local.check_devices(devices)

    def plan(self, assign: dict[str, torch.device], own_slots: bool = False) -> Plan:
        return self.local.plan(assign, own_slots)

    def allocate(self, plan: Plan) -> list[Buffer]:
        return self.local.allocate(plan)

    def fill(self, plan: Plan, buffers: list[Buffer], progress: Any = None) -> dict[str, Any]:
        try:
            return self.local.fill(plan, buffers, progress)
        except MissingFileError:
            gone = not (self.entry / INDEX_FILE).is_file()
            if not gone or self.local.io_mode == "mmap" or not self._download.can_download:
                raise
        logger.info("%s: the cache entry was evicted meanwhile; loading from the object store", self.path)
        return self._download_instead(plan, buffers, progress)

    def _download_instead(self, plan: Plan, buffers: list[Buffer], progress: Any) -> dict[str, Any]:
        d = self._download.open()
        self._closers.callback(d.close)
        if d.cached is not None:  # downloaded again by another process meanwhile
            with LocalTier().open(d.cached, self.config) as local:
                return local.fill(plan, buffers, progress)
        assert d.index is not None
        whole = make_plan(d.index, plan.assign, self.config, whole_chunks=True)
        if (whole.devices, whole.sizes, whole.placement) != (plan.devices, plan.sizes, plan.placement):
            raise SllmStoreError(f"{self.path}: the download's plan places the tensors elsewhere than "
                                 "the cache entry's")  # pragma: no cover - placement is by tensor
        self.tier = "remote"
        return load_while_downloading(d, whole, buffers, self._staging, self._started, progress)


class DownloadingCheckpoint(Checkpoint):
    """A URL that is not cached (completely) yet: loaded while it downloads into the cache."""

    tier = "remote"

    def __init__(self, url: str, download: Download, config: LoadConfig, staging: Staging,
                 started: float) -> None:
        assert download.index is not None
        super().__init__(url, download.index, config)
        self._download = download
        self._staging = staging
        self._started = started
        self._model_dir: Optional[Path] = None
        self._closers.callback(download.close)

    def model_dir(self) -> Path:
        """A temporary directory (removed at :meth:`close`) with the checkpoint's small files
        (config.json, tokenizer...), fetched the first time it is asked for."""
        if self._model_dir is None:
            d = Path(tempfile.mkdtemp(prefix="sllm-model-"))
            self._closers.callback(shutil.rmtree, d, ignore_errors=True)
            from sllm_store.remote.objects import fetch_small_files

            weights = {f.name for f in self.index.files} | {INDEX_FILE}
            fetch_small_files(self._download.bucket, self._download.url, weights, d)
            self._model_dir = d
        return self._model_dir

    def plan(self, assign: dict[str, torch.device], own_slots: bool = False) -> Plan:
        # Chunks: the download's unit.
        return make_plan(self.index, assign, self.config, whole_chunks=True, own_slots=own_slots)

    def fill(self, plan: Plan, buffers: list[Buffer], progress: Any = None) -> dict[str, Any]:
        return load_while_downloading(self._download, plan, buffers, self._staging, self._started, progress)


def load_while_downloading(d: Download, plan: Plan, buffers: list[Buffer], staging: Staging,
                           started: float, progress: Any = None) -> dict[str, Any]:
    """Fill ``buffers`` with the chunks of the opened download ``d`` as they arrive, writing them
    through to the cache; ``plan`` reads whole chunks. Returns the load's figures; ``started``
    is when the URL began to open (the origin of the timeline). ``progress``: units are marked
    as they land (a unit's fetch returns once its bytes are checked and its copies, to host
    memory or a device, have completed)."""
    from tqdm.auto import tqdm

    from sllm_store.remote.fetcher import PIECE
    from sllm_store.utils import parallel_map
    from sllm_store.writer import default_quiet

    assert d.index is not None
    marks: dict[str, Optional[float]] = {"opened": time.perf_counter()}
    by_unit = plan.segments_by_unit()
    copier, covered = _copier(d, plan, buffers, by_unit, staging)
    marks["planned"] = time.perf_counter()  # the copier made (and the memory, before this call)
    chunk_size = d.index.chunk_size

    def read_back(pieces: list[tuple[int, int, int, int]], n: int) -> Any:
        # Holds the copier and the destinations until the chunk is written.
        return lambda use, _keep=buffers: copier.read_back(pieces, n, use)

    def one(u: int) -> int:
        if progress is not None and progress.cancelled:
            raise LoadCancelledError(f"the load of {d.url} was cancelled")
        f_i, off, length, _ = plan.units[u]
        c = off // chunk_size
        pieces = [(coff, slot, doff, n) for _u, coff, slot, doff, n in by_unit.get(u, [])]
        data, written = d.fetch_chunk(f_i, c, deliver=(lambda b: copier.copy(b, pieces)) if pieces else None,
                                      fill=(lambda n: copier.fill(n, pieces)) if u in covered else None,
                                      piece=staging.piece or PIECE)
        if not written:  # written off this thread: from the GET's buffer, or read back
            d.write_later(f_i, c, data if data is not None else read_back(pieces, d.chunk_length(f_i, c)))
        del data
        if progress is not None:
            progress.mark(u, length)
        return length

    with tqdm(total=sum(u[2] for u in plan.units), unit="B", unit_scale=True, unit_divisor=1024,
              desc="loading", dynamic_ncols=True, disable=default_quiet()) as bar:
        # Twice as many threads as GETs in flight, so that copying the chunks that have arrived
        # does not leave a connection idle.
        for n in parallel_map(one, range(len(plan.units)), 2 * d.options.gets, "sllm-remote"):
            bar.update(n)
    marks["fetched"] = time.perf_counter()
    marks["first_get"], marks["last_get_end"] = d.gets_span
    if not copier.staged:
        logger.warning("%s: no page-locked staging memory (%s); the chunks were copied to the GPU from "
                       "pageable memory, more slowly", d.url, copier.pin_error)
    # None after a partial load (a later load fetches the rest). A complete download is synced and
    # promoted on a background thread, whose failures are warnings: the tensors are loaded.
    cached = d.finish_later()
    return _figures(d, copier, marks, started, cached)


def _copier(d: Download, plan: Plan, buffers: list[Buffer], by_unit: dict[int, list[Segment]],
            staging: Staging) -> tuple[Any, set[int]]:
    """The copier of a load while downloading, and the read units to fetch in pieces into its
    staging blocks and cache from the device (plain chunks of a load to a GPU that holds every
    tensor byte of them, when the cache is written behind the download). A chunk holds at most
    two blocks at a time; the blocks are made as needed, no more than the load's bytes fill."""
    from sllm_store.native import _C
    from sllm_store.remote.fetcher import is_encoded

    assert d.index is not None
    index = d.index
    covered: set[int] = set()
    if any(dev.type != "cpu" for dev in plan.devices) and d.can_read_back:
        covered = {u for u in covered_units(index, plan, by_unit)
                   if not is_encoded(index, plan.units[u][0], plan.units[u][1] // index.chunk_size)}
    blocks = staging.blocks or 2 * d.options.gets + 8
    blocks = max(1, min(blocks, -(-sum(u[2] for u in plan.units) // staging.block)))
    readers = staging.read_back_buffers if covered else 0
    copier = _C.StagedCopier(destinations(plan, buffers), staging.block, blocks, readers, index.chunk_size)
    return copier, covered


def _figures(d: Download, copier: Any, marks: dict[str, Optional[float]], started: float,
             cached: Optional[Path]) -> dict[str, Any]:
    """The figures of a load while downloading (its report's ``stats``)."""
    logger.debug("%s: %d bytes downloaded while loading", d.url, d.bytes_downloaded)
    return {
        "io_mode": "remote",
        "threads": d.options.gets,  # GETs in flight
        "bytes_downloaded": d.bytes_downloaded,
        # thread-seconds per stage: where the time went; and their CPU thread-seconds (the rest of
        # the process's CPU time is the object-store client's own threads and the interpreter)
        "stage_seconds": dict(d.stages.seconds),
        "stage_cpu_seconds": dict(d.stages.cpu_seconds),
        "staging_buffers": copier.buffers,
        # thread-seconds making staging buffers, and waiting for a free one
        "staging_alloc_s": copier.alloc_seconds,
        "staging_wait_s": copier.wait_seconds,
        # O_DIRECT cache writes straight from the GET's buffer or through an aligned copy; the
        # same dict, counted until the write-behind is done (wait_for_cache)
        "direct_writes": d.direct_writes,
        # chunks cached from the device (and fetched again): likewise counted until then
        "read_backs": d.read_backs,
        "pieced_chunks": d.pieced_chunks,  # chunks fetched in pieces into the staging blocks
        # seconds from the start of the open: the index fetched and the entry opened, the copier
        # made, the first GET started, the last one ended, every chunk in place
        "timeline_s": {k: round(v - started, 4) for k, v in marks.items() if v is not None},
        "cached": str(cached) if cached else None,
    }


def covered_units(index: Index, plan: Plan, by_unit: Optional[dict[int, list[Segment]]] = None) -> set[int]:
    """The read units whose segments hold every tensor byte of their chunk once, so that the
    chunk can be read back from the destinations (the bytes between tensors are zeros)."""
    by_unit = plan.segments_by_unit() if by_unit is None else by_unit
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
