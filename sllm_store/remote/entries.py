"""The cache directory: complete entries, partial downloads, and the locks between processes.

The local disk cache of remote checkpoints (``CacheSettings.directory``, by default
``~/.cache/sllm-store``) holds:

* ``<entry>/``: a complete checkpoint directory, named after the URL and the content of its index
  (``<url hash>-<index hash>``, :func:`entry_name`), so a changed remote checkpoint is a new
  entry. Its modification time is its last use (:func:`touch_entry`): :func:`prune` evicts least
  recently used entries first;
* ``.partial/<entry>/``: a download in progress or interrupted (:mod:`sllm_store.remote.partial`),
  with ``source.json`` (the URL) and a ``<file>.done`` record per data file;
* ``.partial/<entry>.lock``: the download lock (:class:`EntryLock`). A download holds an exclusive
  ``flock`` on it until its entry is promoted (or it stops); a second process that wants the same
  entry waits for it and then loads the promoted entry. A process that dies releases its lock;
  the next one resumes its partial download.

Example::

    for e in entries():
        print(e.name, e.url, e.size)
    prune(100 << 30)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from sllm_store._units import format_size
from sllm_store.config import CacheSettings
from sllm_store.index import INDEX_FILE

logger = logging.getLogger(__name__)

PARTIAL = ".partial"  # the directory of the downloads in progress, inside the cache directory
SOURCE_FILE = "source.json"  # a partial download's (and an entry's) URL and chunk size
DONE_SUFFIX = ".done"  # a partial data file's record of the chunks written and verified


def cache_dir(directory: Optional[str | os.PathLike[str]] = None) -> Path:
    """The cache directory (created if needed): ``directory``, else ``SLLM_STORE_CACHE_DIR``,
    else ``~/.cache/sllm-store``."""
    d = Path(directory).expanduser() if directory else CacheSettings.resolve().directory
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class CacheEntry:
    """A complete cache entry."""

    name: str
    url: str
    size: int  # bytes of its files
    last_used: float  # seconds since the epoch
    path: Path


@dataclass
class PartialDownload:
    """An unfinished download."""

    name: str
    url: str
    written: int  # bytes on disk so far (the files are sparse until filled)
    size: int  # bytes when complete
    active: bool  # a process is downloading it now (else it resumes on the next load)
    path: Path


def entry_name(url: str, index_bytes: bytes) -> str:
    """The name of the entry of the checkpoint at ``url`` whose index is ``index_bytes``."""
    from sllm_store.native import _C

    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{_C.xxh3_64(index_bytes):016x}"


def read_source(directory: Path) -> dict[str, Any]:
    """The ``source.json`` of an entry or partial download (``{}`` if unreadable)."""
    try:
        source = json.loads((directory / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return source if isinstance(source, dict) else {}


def entries(directory: Optional[str | os.PathLike[str]] = None) -> list[CacheEntry]:
    """Complete cache entries, most recently used first."""
    root = cache_dir(directory)
    out = []
    for p in root.iterdir():
        if p.name.startswith(".") or not (p / INDEX_FILE).is_file():
            continue
        try:
            size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
            out.append(CacheEntry(p.name, str(read_source(p).get("url", "?")), size, p.stat().st_mtime, p))
        except FileNotFoundError:  # evicted meanwhile by another process
            continue
    return sorted(out, key=lambda e: -e.last_used)


def partials(directory: Optional[str | os.PathLike[str]] = None) -> list[PartialDownload]:
    """Unfinished downloads: in progress, or interrupted (the next load resumes them)."""
    root = cache_dir(directory) / PARTIAL
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if not p.is_dir():
            continue
        source = read_source(p)
        url = str(source.get("url", "?"))
        try:
            chunk_size = int(source.get("chunk_size", 0))
        except (TypeError, ValueError):
            chunk_size = 0
        data = [f for f in p.iterdir() if f.is_file() and f.suffix not in (DONE_SUFFIX, ".json")]
        size = sum(f.stat().st_size for f in data)
        written = sum(recorded_bytes(f, chunk_size) for f in data)
        out.append(PartialDownload(p.name, url, written, size, is_downloading(p), p))
    return out


def recorded_bytes(data_file: Path, chunk_size: int) -> int:
    """Bytes of a partial data file recorded as downloaded (its ``.done`` chunk numbers); without
    a known chunk size, the blocks it occupies (files are preallocated, so this may say more)."""
    size = data_file.stat().st_size
    if chunk_size <= 0:
        return min(data_file.stat().st_blocks * 512, size)
    try:
        marks = data_file.with_name(data_file.name + DONE_SUFFIX).read_text(errors="replace").split()
    except FileNotFoundError:
        return 0
    chunks = {int(x) for x in marks if x.isdigit() and int(x) * chunk_size < size}
    return sum(min(chunk_size, size - c * chunk_size) for c in chunks)


def remove(name_or_url: str, directory: Optional[str | os.PathLike[str]] = None) -> list[str]:
    """Remove the entries with this name or URL, and unfinished downloads of it that no process
    is downloading now. Returns the names removed (partial downloads as ``NAME (partial)``)."""
    removed = []
    for e in entries(directory):
        if name_or_url in (e.name, e.url, e.url.rstrip("/")):
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(e.name)
    partial = cache_dir(directory) / PARTIAL
    for p in sorted(partial.iterdir()) if partial.is_dir() else []:
        if not p.is_dir() or name_or_url not in (p.name, read_source(p).get("url", "")):
            continue
        with try_download_lock(p) as free:
            if not free:
                logger.warning("cache: %s is being downloaded by another process; left in place", p.name)
                continue
            shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name + " (partial)")
    return removed


def prune(limit: int, directory: Optional[str | os.PathLike[str]] = None, keep: str = "") -> list[str]:
    """Evict least recently used entries (but ``keep``) until the cache holds at most ``limit``
    bytes. Returns the names evicted."""
    es = entries(directory)
    total = sum(e.size for e in es)
    removed = []
    for e in reversed(es):
        if total <= limit:
            break
        if e.name == keep:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        total -= e.size
        removed.append(e.name)
        logger.info("cache: evicted %s (%s, %s)", e.name, e.url, format_size(e.size))
    return removed


def touch_entry(final: Path) -> bool:
    """Mark a complete entry as just used (for LRU); False if there is none (or it was just
    evicted by another process)."""
    if not (final / INDEX_FILE).is_file():
        return False
    try:
        os.utime(final)
    except FileNotFoundError:
        return False
    return True


def age(t: float) -> str:
    """How long ago ``t`` (seconds since the epoch) was, for messages: ``42 s``, ``7 min``."""
    s = max(0.0, time.time() - t)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def lock_path(root: Path, name: str) -> Path:
    """The download lock file of entry ``name`` in cache directory ``root``."""
    return root / PARTIAL / (name + ".lock")


@contextlib.contextmanager
def try_download_lock(partial: Path) -> Iterator[bool]:
    """Try the download lock of a partial download without waiting: yields whether it is held
    now (False: a process is downloading it), and keeps it for the ``with`` block."""
    try:
        fd = os.open(partial.with_name(partial.name + ".lock"), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def is_downloading(partial: Path) -> bool:
    """Whether a process holds the download lock of this partial download."""
    with try_download_lock(partial) as free:
        return not free


# Download locks held by this process. A forked child (DataLoader workers, say) closes its copies,
# so that a lock is released when this process releases it, not when the child exits too.
_held_locks: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_held_locks):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class EntryLock:
    """The download lock of one entry, held by this process (``acquire``, waiting for another
    process that holds it) until ``release``."""

    def __init__(self, root: Path, name: str, url: str) -> None:
        self.path = lock_path(root, name)
        self.url = url
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Hold the lock, waiting while another process holds it. A holder that promoted its
        entry removed the lock file: then the lock is taken on the new file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.info("%s: another process is downloading it; waiting for it to finish", self.url)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)  # the holder promoted the entry and removed this lock file: look again
        self._fd = fd
        _held_locks.add(fd)

    def release(self, remove: bool = False) -> None:
        """Release the lock (idempotent); ``remove``: remove the lock file first (the entry is
        promoted: a waiter then looks again, and finds the entry)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        _held_locks.discard(fd)
        os.close(fd)  # releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None
