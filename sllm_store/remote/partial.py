"""Partial downloads: the files of a cache entry being downloaded, and the writes behind a load.

A :class:`PartialFiles` is the directory ``.partial/<entry>`` of one download: its data files,
preallocated at their full (decoded) size, so that a full disk shows before anything is
downloaded, written chunk by chunk, and one ``<file>.done`` record per data file listing the
chunks written and verified. The cache holds decoded chunks: a plain version-1 checkpoint that
loads at disk speed.

Writes go with O_DIRECT where the file system allows it (``_C.write_direct``: no page-cache pages
to allocate and fault in, which would cost the GETs that share the cores more CPU than the write
itself), else with ``pwrite``. An interrupted download's records are checked again when it is
opened (:meth:`PartialFiles.recheck`): its writes were not synced before their records, so a
recorded chunk that fails its checksum is downloaded again.

:class:`WriteBehind` runs cache writes on threads of their own, so that a load's GETs and device
copies do not wait for the disk; at most ``limit`` bytes of fetched chunks wait for their write.

Example::

    files = PartialFiles(partial_dir, url, index)
    files.open()
    files.write(0, 3, chunk)   # chunk 3 of data file 0, recorded as done
    files.sync()
    files.close()
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from sllm_store._units import format_size
from sllm_store.errors import CacheError
from sllm_store.index import Index
from sllm_store.remote.entries import DONE_SUFFIX, SOURCE_FILE
from sllm_store.utils import parallel_map

logger = logging.getLogger(__name__)

BLOCK = 4096  # O_DIRECT alignment of cache writes (memory and file offsets)
RECHECK_THREADS = 8  # threads that check an interrupted download's recorded chunks


def buffer_address(buf: Any) -> int:
    """Address of the first byte of a buffer (bytes, memoryview, obstore's Bytes); 0 if empty."""
    import numpy as np

    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(memoryview(buf)) else 0


class PartialFiles:
    """The data files and records of one partial download (thread-safe per chunk)."""

    def __init__(self, directory: Path, url: str, index: Index) -> None:
        self.directory = directory
        self.url = url
        self.index = index
        self.done: dict[int, set[int]] = {}  # per data file: chunks written and verified
        self._fds: dict[int, int] = {}
        self._direct: dict[int, int] = {}  # O_DIRECT descriptors of the files written that way
        self._refused: list[int] = []  # O_DIRECT descriptors given up on (closed at the end)
        self._records: dict[int, Any] = {}  # the open .done files
        self._lock = threading.Lock()
        # Direct writes straight from an aligned buffer, or copied through an aligned buffer
        # first ("bounced")
        self.direct_writes = {"aligned": 0, "bounced": 0}

    def open(self) -> None:
        """Create the directory and its files (resuming what an earlier attempt recorded); raises
        CacheError when a file cannot be made (a full disk, say)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / SOURCE_FILE).write_text(json.dumps({"url": self.url,
                                                              "chunk_size": self.index.chunk_size}))
        for f_i, f in enumerate(self.index.files):
            p = self.directory / f.name
            record = self.directory / (f.name + DONE_SUFFIX)
            n_chunks = -(-f.size // self.index.chunk_size)
            recorded = record.read_text(errors="replace").split() if record.exists() else []
            self.done[f_i] = {int(x) for x in recorded if x.isdigit() and int(x) < n_chunks}
            try:
                self._fds[f_i] = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                self._prepare(f_i, f.size)
            except OSError as e:
                raise CacheError(f"cannot prepare '{p}' ({format_size(f.size)}) for the download of "
                                 f"{self.url}: {e.strerror or e}") from None
            self._records[f_i] = open(record, "a")

    def _prepare(self, f_i: int, size: int) -> None:
        """Size a data file, its blocks reserved where the file system can (so that a full disk
        shows now), and open it for O_DIRECT writes where the file system allows them."""
        from sllm_store.native import _C

        fd = self._fds[f_i]
        err = _C.preallocate(fd, size)  # blocks reserved: direct writes into them run in parallel
        if err not in (0, errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))  # e.g. ENOSPC: found before downloading anything
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        if self.index.chunk_size % BLOCK or size == 0:
            return
        try:
            self._direct[f_i] = os.open(self.directory / self.index.files[f_i].name,
                                        os.O_WRONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
        except OSError as e:  # EINVAL: the file system (tmpfs, say) has no direct I/O
            logger.debug("%s: no O_DIRECT cache writes in '%s' (%s)", self.url, self.directory, e)

    def chunks(self) -> list[tuple[int, int]]:
        """(data file, chunk) of every chunk of the checkpoint."""
        cs = self.index.chunk_size
        return [(f_i, c) for f_i, f in enumerate(self.index.files) for c in range(-(-f.size // cs))]

    def missing(self) -> list[tuple[int, int]]:
        """The chunks not written yet."""
        return [(f, c) for f, c in self.chunks() if c not in self.done[f]]

    def has(self, f_i: int, c: int) -> bool:
        return c in self.done[f_i]

    def is_direct(self, f_i: int) -> bool:
        """Whether data file ``f_i`` is written with O_DIRECT (so its chunks want to arrive
        block-aligned)."""
        return f_i in self._direct

    def chunk_length(self, f_i: int, c: int) -> int:
        """Decoded length of chunk ``c`` of data file ``f_i``."""
        cs = self.index.chunk_size
        return min(cs, self.index.files[f_i].size - c * cs)

    def where(self, f_i: int, c: int) -> str:
        return f"'{self.url}/{self.index.files[f_i].name}' chunk at offset {c * self.index.chunk_size}"

    def read(self, f_i: int, c: int) -> bytes:
        """A written chunk, read back from its file."""
        return os.pread(self._fds[f_i], self.chunk_length(f_i, c), c * self.index.chunk_size)

    def recheck(self) -> None:
        """Check the chunks an earlier attempt recorded against their checksums (its writes were
        not synced before their records): a chunk that fails is downloaded again."""
        from sllm_store.native import _C

        earlier = [(f_i, c) for f_i in self.done for c in sorted(self.done[f_i])]
        if not earlier:
            return

        def ok(fc: tuple[int, int]) -> bool:
            f_i, c = fc
            checksums = self.index.files[f_i].checksums
            return not checksums or _C.xxh3_64(self.read(f_i, c)) == checksums[c]

        bad = [fc for fc, good in zip(earlier, parallel_map(ok, earlier, RECHECK_THREADS, "sllm-check"))
               if not good]
        for f_i, c in bad:
            self.done[f_i].discard(c)
        if bad:
            logger.warning("%s: %d of %d chunks of the interrupted download failed their checksum; "
                           "downloading them again", self.url, len(bad), len(earlier))

    def write(self, f_i: int, c: int, data: Any) -> None:
        """Write a fetched (decoded, verified) chunk into its file and record it as done: with
        O_DIRECT where the file system allows it, else ``pwrite``. Raises CacheError."""
        from sllm_store.native import _C

        offset = c * self.index.chunk_size
        direct = self._direct.get(f_i)
        if direct is not None:
            aligned = len(memoryview(data)) < BLOCK or buffer_address(data) % BLOCK == 0
            err = _C.write_direct(direct, self._fds[f_i], data, offset)
            if err == errno.EINVAL:  # refused after all (an odd alignment rule): write with pwrite
                logger.info("%s: O_DIRECT cache writes refused in '%s'; writing buffered", self.url,
                            self.directory)
                with self._lock:
                    if self._direct.pop(f_i, None) is not None:  # closed with the other files
                        self._refused.append(direct)
                self.write(f_i, c, data)
                return
            if err:
                raise self._error(f_i, c, os.strerror(err))
            with self._lock:
                self.direct_writes["aligned" if aligned else "bounced"] += 1
        else:
            self._pwrite(f_i, c, data)
        self._record(f_i, c)

    def _pwrite(self, f_i: int, c: int, data: Any) -> None:
        mv = memoryview(data).cast("B")
        pos, offset = 0, c * self.index.chunk_size
        try:
            while pos < len(mv):
                pos += os.pwrite(self._fds[f_i], mv[pos:], offset + pos)
        except OSError as e:
            raise self._error(f_i, c, e.strerror or str(e)) from None

    def _error(self, f_i: int, c: int, why: str) -> CacheError:
        return CacheError(f"cannot write the download of {self.where(f_i, c)} to the cache in "
                          f"'{self.directory}': {why}")

    def _record(self, f_i: int, c: int) -> None:
        with self._lock:
            self.done[f_i].add(c)
            self._records[f_i].write(f"{c}\n")
            self._records[f_i].flush()

    def sync(self) -> None:
        """Sync the data files to disk; raises CacheError."""
        try:
            for fd in self._fds.values():
                os.fsync(fd)
        except OSError as e:
            raise CacheError(f"cannot sync the download in '{self.directory}': {e.strerror or e}") from None

    def close(self) -> None:
        """Close everything, each exactly once (a failing close does not stop the others, and is
        not retried on a number another thread may have reused); raises the first error."""
        errors: list[OSError] = []
        fds, records, direct, refused = self._fds, self._records, self._direct, self._refused
        self._fds, self._records, self._direct, self._refused = {}, {}, {}, []
        closers = [lambda fd=fd: os.close(fd) for fd in [*fds.values(), *direct.values(), *refused]] + \
            [fh.close for fh in records.values()]
        for close in closers:
            try:
                close()
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]


class WriteBehind:
    """Cache writes of fetched chunks on threads of their own, at most ``limit`` bytes waiting.

    ``write(f_i, c, data)`` does one write. ``data`` is a buffer (its bytes wait in memory until
    written) or a function that reads the chunk back from where the load put it (it holds no
    memory while it waits). ``failed(error)`` is told of a CacheError of a write; after any
    failure no more writes are made.
    """

    THREADS = 8

    def __init__(self, write: Callable[[int, int, Any], None], failed: Callable[[BaseException], None],
                 limit: int) -> None:
        self._write_one = write
        self._failed = failed
        self._limit = limit
        self._waiting = 0
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="sllm-cache-write")
        self.error: Optional[BaseException] = None

    def submit(self, f_i: int, c: int, data: Any) -> None:
        """Queue a write; blocks while ``limit`` bytes wait already."""
        n = 0 if callable(data) else len(memoryview(data))
        with self._cond:
            while self._waiting and self._waiting + n > self._limit and self.error is None:
                self._cond.wait()
            if self.error is not None:
                return  # caching has failed: the load goes on without it
            self._waiting += n
        try:
            self._pool.submit(self._write, f_i, c, data, n)
        except RuntimeError:  # closed: the load is stopping
            with self._cond:
                self._waiting -= n
                self._cond.notify_all()

    def _write(self, f_i: int, c: int, data: Any, n: int) -> None:
        try:
            if self.error is None:
                self._write_one(f_i, c, data)
        except BaseException as e:
            if isinstance(e, CacheError):
                with contextlib.suppress(CacheError):
                    self._failed(e)  # the load's own writes stop too
            with self._cond:
                self.error = self.error or e
        finally:
            with self._cond:
                self._waiting -= n
                self._cond.notify_all()

    def close(self, cancel: bool) -> None:
        """Wait for the running writes (and, unless ``cancel``, the waiting ones)."""
        with self._cond:
            if cancel and self.error is None:
                self.error = CacheError("the download stopped before it was written to the cache")
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=cancel)
