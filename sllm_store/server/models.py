"""Models held in the server's memory pool.

A model is held whole: every data file laid out over whole pool blocks, read from disk by the
C++ pipeline (``_C.run_load``) straight into the pinned blocks. Models are evicted least recently
used first, never while a load uses them. A model too large for the pool (or one that does not fit
because the pool is held by models in use) passes through the free blocks instead: read a window,
copy it to the client, reuse the blocks.

Thread-safe: gRPC calls arrive on many threads. The lock guards the table and the pool; disk
reads and copies run outside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from sllm_store._units import format_size
from sllm_store.config import LoadConfig
from sllm_store.errors import (
    ChecksumError,
    FormatError,
    ModelChangedError,
    ModelTooLargeError,
    PoolExhaustedError,
    SllmStoreError,
    StoreError,
    StoreUnavailableError,
)
from sllm_store.index import Index
from sllm_store.native import _C
from sllm_store.plan import choose_io_mode
from sllm_store.server.catalog import Catalog
from sllm_store.server.pool import BlockPool

logger = logging.getLogger(__name__)

# (file, offset, dest, dest_offset, length), as in the protocol's Copy message
CopyReq = tuple[int, int, int, int, int]
# (device spec, address, size), as _C.run_copies takes them
Dest = tuple[str, int, int]

MEASURED_MIN_BYTES = 64 << 20  # transfers smaller than this do not update the measured rates


@dataclass
class _Entry:
    name: str
    fingerprint: str
    index: Index
    files: list[str]
    blocks: list[list[int]]  # per data file, in file order
    size: int
    state: str = "loading"  # loading -> ready | failed
    ready: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None
    in_use: int = 0
    hits: int = 0
    last_used: float = field(default_factory=time.time)
    verified: bool = False

    @property
    def num_blocks(self) -> int:
        return sum(len(b) for b in self.blocks)


def _check_cancelled(cancelled: Optional[Callable[[], bool]]) -> None:
    if cancelled is not None and cancelled():
        raise StoreError("load cancelled: the client went away (deadline, cancellation or exit)")


def _buffer_at(address: int, n: int) -> Any:
    return (ctypes.c_char * n).from_address(address)


@dataclass
class HeldModel:
    """A model held in the pool (:meth:`PooledModels.held`): where each of its bytes is."""

    key: str
    fingerprint: str
    index: Index
    blocks: list[list[int]]  # per data file
    pool: BlockPool
    hit: bool  # it was in the pool already
    size: int  # bytes of its data files

    def parts(self, file: int, offset: int, n: int) -> list[tuple[int, int, int]]:
        """(pool address, position from ``offset``, length) of the ``n`` bytes at ``offset`` of
        data file ``file``, cut where they cross a block."""
        B, out, pos = self.pool.block_size, [], 0
        while pos < n:
            at = offset + pos
            m = min(n - pos, B - at % B)
            out.append((self.pool.address(self.blocks[file][at // B]) + at % B, pos, m))
            pos += m
        return out

    @staticmethod
    def buffer(address: int, n: int) -> Any:
        return _buffer_at(address, n)


class PooledModels:
    """The table of models held in a :class:`BlockPool`.

    Example::

        models = PooledModels("/models", BlockPool(32 << 30, 32 << 20), num_threads=16)
        models.prefetch("llama-8b")
        models.load("llama-8b", fp, copies, dests)   # copies into client memory
    """

    def __init__(self, storage_path: str | Path, pool: BlockPool, *, num_threads: int,
                 io_mode: str = "auto", copy_threads: int = 4) -> None:
        self.catalog = Catalog(storage_path)
        self.storage = self.catalog.storage
        self.pool = pool
        self.num_threads = num_threads
        self.io_mode = io_mode
        self.copy_threads = copy_threads
        self._lock = threading.Lock()
        self._window_freed = threading.Condition(self._lock)  # notified when a pass-through load ends
        self._entries: dict[str, _Entry] = {}
        self._window_blocks = 0
        self.hits = self.misses = self.evictions = self.bytes_served = 0
        self.disk_gbps = self.copy_gbps = 0.0  # measured: the latest read into the pool, copy out of it
        self.loads_in_progress = 0
        # How long a load waits for pool blocks held by other loads before PoolExhaustedError.
        self.pool_wait_s = 60.0
        self._closing = threading.Event()  # set by close(): in-flight calls stop at the next window

    # -- names (sllm_store.server.catalog) ----------------------------------------------------

    def resolve(self, name: str) -> tuple[str, Path]:
        """(normalized name, directory) of a model; refuses names that leave the storage path."""
        return self.catalog.resolve(name)

    def _open(self, name: str) -> tuple[str, Index, str]:
        return self.catalog.open(name)

    def open_model(self, name: str) -> tuple[str, Index, str]:
        """(normalized name, index, fingerprint) of a model under the storage path."""
        return self.catalog.open(name)

    def describe(self, name: str) -> tuple[str, str, dict[str, bytes]]:
        """The index as JSON, the fingerprint, and the small files (config.json...)."""
        return self.catalog.describe(name)

    # -- the table ---------------------------------------------------------------------------

    def _reserve(self, need: int) -> Optional[list[int]]:
        """``need`` blocks, evicting idle models least recently used first; None if impossible.
        Called with the lock held."""
        if need > self.pool.free_blocks:
            idle = sorted((e for e in self._entries.values() if e.in_use == 0 and e.state == "ready"),
                          key=lambda e: e.last_used)
            if self.pool.free_blocks + sum(e.num_blocks for e in idle) < need:
                return None
            for e in idle:
                if self.pool.free_blocks >= need:
                    break
                self._drop(e)
                self.evictions += 1
                logger.info("evicted %s (%s) to make room", e.name, format_size(e.size))
        return self.pool.take(need)

    def _drop(self, e: _Entry) -> None:
        del self._entries[e.name]
        for b in e.blocks:
            self.pool.give(b)

    def _acquire(self, key: str, index: Index, fp: str, verify: bool, *, pass_through_ok: bool
                 ) -> tuple[Optional[_Entry], bool]:
        """The ready entry of ``key`` with its use count raised (loading it on a miss), and
        whether it was a hit. (None, False) when the model must pass through the pool instead."""
        fill = False
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.fingerprint != fp:
                if e.in_use == 0:
                    logger.info("%s changed on disk: dropping the copy in the pool", key)
                    self._drop(e)
                    e = None
                elif pass_through_ok:
                    return None, False
                else:
                    raise ModelChangedError(
                        f"{key!r} changed on disk while a load uses the old version; retry"
                    )
            if e is not None:
                e.in_use += 1
            else:
                need = sum(self.pool.blocks_for(f.size) for f in index.files)
                if need > self.pool.num_blocks:
                    if pass_through_ok:
                        return None, False
                    raise ModelTooLargeError(
                        f"{key!r} ({format_size(need * self.pool.block_size)}) is larger than the whole "
                        f"memory pool ({format_size(self.pool.size)}); it can only pass through it"
                    )
                blocks = self._reserve(need)
                if blocks is None:
                    if pass_through_ok:
                        return None, False
                    raise PoolExhaustedError(
                        f"no room for {key!r} ({format_size(need * self.pool.block_size)}): the memory "
                        f"pool ({format_size(self.pool.size)}) is held by models in use"
                    )
                per_file, pos = [], 0
                for f in index.files:
                    n = self.pool.blocks_for(f.size)
                    per_file.append(blocks[pos:pos + n])
                    pos += n
                files = [str(index.file_path(i)) for i in range(len(index.files))]
                e = _Entry(key, fp, index, files, per_file, sum(f.size for f in index.files), in_use=1)
                self._entries[key] = e
                self.misses += 1
                fill = True
        if fill:
            t0 = time.perf_counter()
            try:
                self._read(e.index, e.files, [(f, 0, e.index.files[f].size, e.blocks[f])
                                              for f in range(len(e.files))], verify)
            except BaseException as ex:
                with self._lock:
                    e.state, e.error = "failed", ex
                    e.in_use -= 1
                    if self._entries.get(key) is e:
                        self._drop(e)
                e.ready.set()
                raise
            e.verified = verify
            e.state = "ready"
            e.ready.set()
            dt = time.perf_counter() - t0
            logger.info("read %s into the pool: %s in %.2f s (%.2f GB/s)", key, format_size(e.size), dt,
                        e.size / dt / 1e9 if dt > 0 else 0)
            if dt > 0 and e.size >= MEASURED_MIN_BYTES:
                self.disk_gbps = e.size / dt / 1e9
            return e, False
        e.ready.wait()
        if e.state == "failed":
            with self._lock:
                e.in_use -= 1
            err = e.error
            raise type(err)(str(err)) if err is not None else FormatError(f"loading {key!r} failed")
        with self._lock:
            self.hits += 1
            e.hits += 1
        return e, True

    def _release(self, e: _Entry) -> None:
        with self._lock:
            e.in_use -= 1
            e.last_used = time.time()
            self._window_freed.notify_all()  # a waiting pass-through load may now evict it

    # -- data movement -----------------------------------------------------------------------

    def _read(self, index: Index, files: list[str],
              regions: Sequence[tuple[int, int, int, list[int]]], verify: bool) -> None:
        """Read byte ranges of data files into pool blocks with the C++ pipeline.

        regions: (file, start, end, blocks): [start, end) of the file goes to consecutive blocks.
        Reads are the checkpoint's chunks (checksummed when whole and ``verify``), cut where a
        chunk crosses a block boundary into several segments.
        """
        B, cs = self.pool.block_size, index.chunk_size
        units: list[tuple[int, int, int, Optional[int]]] = []
        segments: list[tuple[int, int, int, int, int]] = []
        dests: list[Dest] = []
        dest_of: dict[int, int] = {}
        encodings: list[Any] = []  # compressed chunks are decoded on the way: the pool holds raw bytes
        for f, start, end, blocks in regions:
            fsize = index.files[f].size
            checks = index.files[f].checksums
            pos = start
            while pos < end:
                nxt = min(end, (pos // cs + 1) * cs)
                whole = pos % cs == 0 and nxt == min((pos // cs + 1) * cs, fsize)
                checksum = checks[pos // cs] if verify and whole and checks else None
                stored = index.files[f].chunks
                if stored is not None:
                    if not whole:
                        raise PoolExhaustedError(
                            f"cannot pass '{files[f]}' through {len(blocks)} free block(s): a "
                            f"compressed chunk ({format_size(cs)}) must be decoded whole"
                        )
                    encodings.append(stored[pos // cs].encoding)
                else:
                    encodings.append(None)
                u = len(units)
                units.append((f, pos, nxt - pos, checksum))
                p = pos
                while p < nxt:
                    bi = (p - start) // B
                    m = min(nxt, start + (bi + 1) * B) - p
                    block = blocks[bi]
                    if block not in dest_of:
                        dest_of[block] = len(dests)
                        dests.append(("cpu", self.pool.address(block), B))
                    segments.append((u, p - pos, dest_of[block], (p - start) % B, m))
                    p += m
                pos = nxt
        config = LoadConfig.resolve(num_threads=self.num_threads, io_mode=self.io_mode)
        _C.run_load(files, units, segments, dests, num_threads=config.num_threads,
                    io_mode=choose_io_mode(config, files, index.compressed), verify=verify,
                    encodings=encodings if any(e is not None for e in encodings) else [])

    def _verify_held(self, e: _Entry) -> None:
        """Check the checksums of a model read into the pool without verification (once)."""
        B, cs = self.pool.block_size, e.index.chunk_size

        def check(f: int) -> None:
            df = e.index.files[f]
            if not df.checksums:
                return
            hasher = _C.ChunkHasher(cs)
            for bi, block in enumerate(e.blocks[f]):
                n = min(B, df.size - bi * B)
                hasher.update(_buffer_at(self.pool.address(block), n))
            for c, (got, want) in enumerate(zip(hasher.finish(), df.checksums)):
                if got != want:
                    raise ChecksumError(
                        f"checksum mismatch in the pool's copy of '{e.files[f]}' chunk at offset {c * cs}: "
                        f"expected {want:016x}, got {got:016x}"
                    )

        with ThreadPoolExecutor(max(1, min(len(e.files), self.num_threads))) as ex:
            list(ex.map(check, range(len(e.files))))
        e.verified = True

    def _resolve_copies(self, copies: Sequence[CopyReq], f: int, start: int, end: int,
                        blocks: list[int]) -> list[tuple[int, int, int, int]]:
        """The parts of ``copies`` that fall in [start, end) of file ``f`` (held by ``blocks``)
        as (source address, dest, dest_offset, length), contiguous runs merged."""
        B = self.pool.block_size
        out: list[tuple[int, int, int, int]] = []
        for cf, off, dest, doff, n in copies:
            if cf != f:
                continue
            lo, hi = max(off, start), min(off + n, end)
            pos = lo
            while pos < hi:
                bi = (pos - start) // B
                m = min(hi, start + (bi + 1) * B) - pos
                src = self.pool.address(blocks[bi]) + (pos - start) % B
                d_off = doff + (pos - off)
                if out and out[-1][1] == dest and out[-1][0] + out[-1][3] == src \
                        and out[-1][2] + out[-1][3] == d_off:
                    s, d, o, ln = out[-1]
                    out[-1] = (s, d, o, ln + m)
                else:
                    out.append((src, dest, d_off, m))
                pos += m
        return out

    def _copy(self, parts: list[tuple[int, int, int, int]], dests: Sequence[Dest],
              cancelled: Optional[Callable[[], bool]] = None) -> float:
        if not parts:
            return 0.0
        self._check_open()
        _check_cancelled(cancelled)
        try:
            stats = _C.run_copies(parts, list(dests), num_threads=self.copy_threads, cancelled=cancelled)
        except SllmStoreError:
            _check_cancelled(cancelled)  # the client went away: say so
            raise
        return float(stats["seconds"])

    # -- operations --------------------------------------------------------------------------

    @contextlib.contextmanager
    def held(self, name: str, *, verify: bool = False) -> Iterator[HeldModel]:
        """``name`` held in the pool for the block (read in first on a miss; never evicted
        meanwhile), as a :class:`HeldModel` that says where its bytes are."""
        key, index, fp = self._open(name)
        e, hit = self._acquire(key, index, fp, verify, pass_through_ok=False)
        assert e is not None
        try:
            if verify and not e.verified:
                self._verify_held(e)
            yield HeldModel(key, fp, index, e.blocks, self.pool, hit, e.size)
        finally:
            self._release(e)

    def prefetch(self, name: str, *, verify: bool = False) -> tuple[bool, int]:
        """Make ``name`` resident; returns (hit, bytes)."""
        with self.held(name, verify=verify) as held:
            return held.hit, held.size

    def load(self, name: str, fp: str, copies: Sequence[CopyReq], dests: Sequence[Dest], *,
             verify: bool = False, cancelled: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
        """Copy parts of ``name`` into ``dests`` from the pool (reading it in first, or passing it
        through free blocks when it cannot be held).

        ``cancelled()`` True means the client has gone away: nothing more is written into
        ``dests`` (a read into the pool in progress still completes, for the next client).
        """
        key, index, current = self._open(name)
        if fp and fp != current:
            raise ModelChangedError(f"{key!r} changed on disk since it was described; describe it again")
        for cf, off, dest, _doff, n in copies:
            if cf >= len(index.files) or off + n > index.files[cf].size:
                raise FormatError(f"copy of {n} bytes at {off} of file #{cf} is outside {key!r}")
            if dest >= len(dests):
                raise FormatError(f"copy refers to destination #{dest} of {len(dests)}")
        copies = sorted(copies, key=lambda c: (c[0], c[1]))
        with self._lock:
            self.loads_in_progress += 1
        try:
            e, hit = self._acquire(key, index, current, verify, pass_through_ok=True)
            if e is None:
                seconds = self._pass_through(key, index, copies, dests, verify, cancelled)
                out = {"hit": False, "copy_seconds": seconds, "streamed": True}
            else:
                try:
                    if verify and not e.verified:
                        self._verify_held(e)
                    parts = []
                    for f in range(len(e.files)):
                        parts += self._resolve_copies(copies, f, 0, e.index.files[f].size, e.blocks[f])
                    seconds = self._copy(parts, dests, cancelled)
                finally:
                    self._release(e)
                out = {"hit": hit, "copy_seconds": seconds, "streamed": False}
            nbytes = sum(c[4] for c in copies)
            with self._lock:
                self.bytes_served += nbytes
                if out["copy_seconds"] > 0 and nbytes >= MEASURED_MIN_BYTES and not out["streamed"]:
                    self.copy_gbps = nbytes / out["copy_seconds"] / 1e9
            out["bytes"] = nbytes
            return out
        finally:
            with self._lock:
                self.loads_in_progress -= 1

    def _pass_through(self, key: str, index: Index, copies: Sequence[CopyReq], dests: Sequence[Dest],
                verify: bool, cancelled: Optional[Callable[[], bool]] = None) -> float:
        B, cs = self.pool.block_size, index.chunk_size
        # A pass-through uses a bounded window (enough chunks for every reader thread), not every free
        # block: other loads keep room meanwhile.
        largest = min(max((self.pool.blocks_for(f.size) for f in index.files), default=0),
                      self.pool.blocks_for(cs * max(2, self.num_threads)))
        whole_chunks = verify or index.compressed
        one_chunk = self.pool.blocks_for(min(cs, max((f.size for f in index.files), default=0)))

        def too_few(k: int) -> bool:  # no block, or (when chunks must stay whole) less than a chunk
            return k == 0 or (whole_chunks and k < one_chunk)

        with self._lock:
            # Room from idle models (least recently used first) when the free blocks do
            # not hold one checksum chunk (windows of whole chunks are verified), else one block.
            for want in (min(largest, self.pool.blocks_for(cs)), min(largest, 1)):
                if self.pool.free_blocks >= want:
                    break
                room = self._reserve(want)
                if room is not None:
                    self.pool.give(room)
                    break
            k = min(self.pool.free_blocks, largest)
            # Every block is held by loads in progress (passing through, or using held models): wait,
            # boundedly, for one of them to end, then evict what became idle.
            deadline = time.monotonic() + self.pool_wait_s
            while too_few(k) and largest > 0 and (
                    self._window_blocks or any(e.in_use for e in self._entries.values())):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._window_freed.wait(min(left, 1.0))
                if too_few(self.pool.free_blocks):
                    room = self._reserve(one_chunk if whole_chunks else 1)
                    if room is not None:
                        self.pool.give(room)
                k = min(self.pool.free_blocks, largest)
            if k == 0 and largest > 0:
                streams = f", {self._window_blocks} block(s) by pass-through loads" \
                    if self._window_blocks else ""
                raise PoolExhaustedError(
                    f"cannot serve {key!r} within {self.pool_wait_s:.0f} s: every block of the memory pool "
                    f"({format_size(self.pool.size)}) is held by models in use{streams}"
                )
            if k * B < min(cs, max((f.size for f in index.files), default=0)) and (
                    verify or index.compressed):
                # Windows smaller than a chunk cut chunks: they can be neither verified nor decoded.
                raise PoolExhaustedError(
                    f"cannot pass {key!r} {'with verify=True ' if verify else '(compressed) '}through "
                    f"{k} free block(s) ({format_size(k * B)}): whole {format_size(cs)} chunks are needed"
                )
            blocks = self.pool.take(k) or []
            self._window_blocks += k
        logger.info("passing %s through %d free block(s) of the pool", key, k)
        files = [str(index.file_path(i)) for i in range(len(index.files))]
        window = k * B if k * B < cs else (k * B) // cs * cs
        seconds = 0.0
        try:
            for f, df in enumerate(index.files):
                wanted = [(off, off + n) for cf, off, _d, _o, n in copies if cf == f and n > 0]
                for start in range(0, df.size, window or 1):
                    end = min(df.size, start + window)
                    if not any(lo < end and hi > start for lo, hi in wanted):
                        continue  # a partial load skips windows it does not need
                    self._check_open()
                    _check_cancelled(cancelled)
                    self._read(index, files, [(f, start, end, blocks)], verify)
                    parts = self._resolve_copies(copies, f, start, end, blocks)
                    seconds += self._copy(parts, dests, cancelled)
        finally:
            with self._lock:
                self.pool.give(blocks)
                self._window_blocks -= k
                self._window_freed.notify_all()
        return seconds

    def evict(self, name: str = "") -> list[str]:
        """Drop ``name`` (or every model not in use) from the pool; returns what was dropped."""
        with self._lock:
            if name:
                key = str(PurePosixPath(name))
                e = self._entries.get(key)
                if e is None:
                    return []
                if e.in_use:
                    raise PoolExhaustedError(f"{key!r} is in use by {e.in_use} load(s); not evicted")
                victims = [e]
            else:
                victims = [e for e in self._entries.values() if e.in_use == 0 and e.state == "ready"]
            for e in victims:
                self._drop(e)
                self.evictions += 1
            return [e.name for e in victims]

    def status(self) -> dict[str, Any]:
        with self._lock:
            models = [
                {"name": e.name, "tier": "dram" if e.state == "ready" else e.state, "size": e.size,
                 "pool_bytes": e.num_blocks * self.pool.block_size, "in_use": e.in_use, "hits": e.hits,
                 "last_used": e.last_used}
                for e in sorted(self._entries.values(), key=lambda e: -e.last_used)
            ]
            return {
                "storage_path": str(self.storage), "pool_size": self.pool.size, "pool_used": self.pool.used,
                "block_size": self.pool.block_size, "pinned": self.pool.pinned, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "bytes_served": self.bytes_served,
                "models": models, "loads_in_progress": self.loads_in_progress,
                "disk_gbps": self.disk_gbps, "copy_gbps": self.copy_gbps,
            }

    def _check_open(self) -> None:
        if self._closing.is_set():
            raise StoreUnavailableError("the store server is shutting down")

    def close(self, timeout: float = 30.0) -> None:
        """Drop everything and free the pool (at shutdown, after the gRPC server has stopped).

        Calls still running past the server's grace period stop at their next copy window; the
        pool is freed only once none of them uses it. If one is still running after ``timeout``
        seconds (a long disk read), the pool is left to the process exit: freeing memory that a
        read or copy still uses would crash the server.
        """
        self._closing.set()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                busy = self.loads_in_progress + self._window_blocks + sum(
                    e.in_use for e in self._entries.values())
                if not busy:
                    for e in list(self._entries.values()):
                        self._drop(e)
                    self.pool.close()
                    return
            if time.monotonic() >= deadline:
                logger.warning("calls still use the memory pool at shutdown; not freeing it")
                return
            time.sleep(0.05)
