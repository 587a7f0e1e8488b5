"""The download of one remote checkpoint into the local cache: the coordinator.

A :class:`Download` fetches the checkpoint's index (:meth:`~Download.lookup`) and finds its cache
entry (:mod:`sllm_store.remote.entries`). If there is none yet, :meth:`~Download.open` takes the
entry's download lock (waiting for another process that downloads it, then finding its promoted
entry) and opens the partial download (:mod:`sllm_store.remote.partial`), resuming what an earlier
attempt wrote. Chunks are then fetched (:meth:`~Download.fetch_chunk`, through the one
:class:`~sllm_store.remote.fetcher.ChunkFetcher`) and written to the partial files, at once
(:meth:`~Download.write_chunk`) or on write-behind threads (:meth:`~Download.write_later`). Once
every chunk is there and verified, :meth:`~Download.finish` syncs the files and promotes the entry
(a rename); :meth:`~Download.finish_later` does that on a background thread, so that a load
returns before it (:func:`wait_for_cache`). A chunk that fails its checksum is never recorded, and
an entry is promoted only when every chunk is present and verified.

:func:`fetch` downloads a checkpoint into the cache without loading it.

Example::

    with Download("s3://models/llama-8b.sllm").open() as d:
        if d.cached is None:
            for f_i, c in d.missing():
                d.chunk(f_i, c)
            d.finish()
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from sllm_store._units import format_size
from sllm_store.config import CacheSettings, RemoteOptions
from sllm_store.errors import CacheError, RemoteError, RemoteUnavailableError, SllmStoreError
from sllm_store.index import INDEX_FILE, DataFile, Index, parse_index, strict_json, write_index
from sllm_store.remote.entries import (
    DONE_SUFFIX,
    PARTIAL,
    EntryLock,
    age,
    cache_dir,
    entries,
    entry_name,
    prune,
    touch_entry,
)
from sllm_store.remote.fetcher import PIECE, ChunkFetcher, Stages, is_encoded, mark
from sllm_store.remote.objects import fetch_small_files, obstore_module, open_bucket, remote_error
from sllm_store.remote.partial import PartialFiles, WriteBehind
from sllm_store.utils import parallel_map

logger = logging.getLogger(__name__)

# read_back(use): calls use(buffer, xxh3_64) with a chunk copied back from where a load put it
ReadBack = Callable[[Callable[[Any, int], bool]], bool]


class Download:
    """One checkpoint being brought into the cache, chunk by chunk (thread-safe per chunk).

    ``cache_errors="raise"``: a failed cache write is a CacheError (:func:`fetch`). ``"warn"``
    (loads): the first one is kept in ``cache_error``, nothing more is written, and the load goes
    on; :meth:`finish_later` warns.
    """

    def __init__(self, url: str, options: Optional[RemoteOptions] = None,
                 settings: Optional[CacheSettings] = None, cache_errors: str = "raise") -> None:
        self.url = url.rstrip("/")
        self.options = (options or RemoteOptions()).resolved()
        self.settings = settings or CacheSettings.resolve()
        self.root = cache_dir(self.settings.directory)
        self.bucket = open_bucket(self.url, self.options)
        self.cached: Optional[Path] = None  # the complete entry, once found or promoted
        self.index_bytes: Optional[bytes] = None
        self.name = ""
        self.index: Optional[Index] = None  # the remote index, once opened for a download
        self.files: Optional[PartialFiles] = None
        self.fetcher: Optional[ChunkFetcher] = None
        self.stages = Stages()
        self.entry_lock: Optional[EntryLock] = None
        self._finisher: Optional[threading.Thread] = None  # owns the files and lock once started
        self._writer: Optional[WriteBehind] = None
        self._queued: set[tuple[int, int]] = set()  # handed to the write-behind threads
        self._cache_errors = cache_errors
        self.cache_error: Optional[CacheError] = None
        self._lock = threading.Lock()
        # Chunks written to the cache from what a load put on the device (write_read_back), and
        # those of them fetched again because they no longer matched their checksum
        self.read_backs = {"written": 0, "refetched": 0}

    # -- finding the entry ---------------------------------------------------------------------

    def lookup(self) -> Optional[Path]:
        """Fetch the index and find the complete cache entry (``cached``; None if there is none
        yet). Takes no lock and opens no files: :meth:`open` does, for a download."""
        try:
            self.index_bytes = bytes(obstore_module().get(self.bucket, INDEX_FILE).bytes())
        except Exception as e:
            err = remote_error(e, f"{self.url}/{INDEX_FILE}", "fetching")
            cached = [c for c in entries(self.root) if c.url == self.url] \
                if isinstance(err, RemoteUnavailableError) else []
            if not cached:
                raise err from None
            # The object store is unreachable, but a complete copy is here: a cold start should
            # not fail on a network blip. (Not when the object is gone or access is denied.)
            logger.warning("%s; loading the copy cached %s ago instead (%s)", err, age(cached[0].last_used),
                           cached[0].path)
            touch_entry(cached[0].path)
            self.cached = cached[0].path
            return self.cached
        self.name = entry_name(self.url, self.index_bytes)
        if touch_entry(self.root / self.name):
            self.cached = self.root / self.name
        return self.cached

    @property
    def can_download(self) -> bool:
        """Whether the index was fetched (not when the object store was unreachable and a cached
        copy was found instead)."""
        return self.index_bytes is not None

    def open(self) -> Download:
        """Find the complete entry (``cached``), or hold the entry's download lock and open its
        partial download. The index is fetched once: a second ``open`` (after the entry found
        was evicted, say) looks for the entry again without fetching it."""
        if self.index_bytes is None and self.lookup() is not None:
            return self
        if self.index_bytes is None:
            raise RemoteError(f"{self.url}: the index could not be fetched")
        self.cached = None
        self.entry_lock = EntryLock(self.root, self.name, self.url)
        self.entry_lock.acquire()
        if touch_entry(self.root / self.name):  # another process has just promoted it
            self.cached = self.root / self.name
            self.entry_lock.release()
            return self
        try:
            self._open_partial()
        except BaseException:
            self.close()
            raise
        return self

    def parse_index(self, root: Path) -> Index:
        """The fetched index, its data files under ``root``."""
        raw = strict_json(self.index_bytes or b"", f"'{self.url}/{INDEX_FILE}'", RemoteError)
        return parse_index(raw, root)

    def _open_partial(self) -> None:
        partial = self.root / PARTIAL / self.name
        self.index = self.parse_index(partial)
        self.files = PartialFiles(partial, self.url, self.index)
        self.files.open()
        self.files.recheck()
        self.fetcher = ChunkFetcher(self.bucket, self.url, self.index, self.options.gets, self.stages)

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- chunks ----------------------------------------------------------------------------------

    def chunks(self) -> list[tuple[int, int]]:
        assert self.files is not None, "open() the download first"
        return self.files.chunks()

    def missing(self) -> list[tuple[int, int]]:
        assert self.files is not None, "open() the download first"
        return self.files.missing()

    def chunk_length(self, f_i: int, c: int) -> int:
        assert self.files is not None, "open() the download first"
        return self.files.chunk_length(f_i, c)

    def chunk(self, f_i: int, c: int) -> Any:
        """Decoded bytes of chunk ``c`` of data file ``f_i`` (a buffer), written to the cache
        before this returns."""
        data, written = self.fetch_chunk(f_i, c)
        if not written:
            self.write_chunk(f_i, c, data)
        return data

    def fetch_chunk(self, f_i: int, c: int, deliver: Optional[Callable[[Any], Optional[int]]] = None,
                    fill: Optional[Callable[[int], Any]] = None, piece: int = PIECE) -> tuple[Any, bool]:
        """Chunk ``c`` of data file ``f_i``, decoded and verified: ``(data, written)``.
        ``written`` says whether it is in the cache already (an earlier attempt's chunk, read
        back from its file); if not, hand ``data`` to :meth:`write_chunk` or :meth:`write_later`.

        ``deliver(data)``: see :meth:`ChunkFetcher.fetch`. ``fill(n)``, if given, returns a
        ``_C.StagedFill`` for a chunk of ``n`` bytes: a plain chunk is then fetched in GETs of
        ``piece`` bytes into it (:meth:`ChunkFetcher.fetch_into`), no buffer holds the whole
        chunk, and ``data`` is None: the caller caches it from where the fill put it (a
        read-back function). Other chunks go to ``deliver``.
        """
        assert self.files is not None and self.fetcher is not None, "open() the download first"
        if self.files.has(f_i, c):  # verified when this download was opened
            data = self.files.read(f_i, c)
            if deliver is not None:
                deliver(data)
            return data, True
        n = self.chunk_length(f_i, c)
        if fill is not None and n and not is_encoded(self.index, f_i, c):
            self.fetcher.fetch_into(f_i, c, fill(n), piece)
            return None, False
        return self.fetcher.fetch(f_i, c, deliver, aligned=self.files.is_direct(f_i)), False

    # -- cache writes ----------------------------------------------------------------------------

    @property
    def can_read_back(self) -> bool:
        """Whether chunks may be handed to :meth:`write_later` as read-back functions: the cache
        is written behind the download, and every chunk has a checksum to check what is read
        back against."""
        return self.settings.write_behind > 0 and self.cache_error is None and \
            self.index is not None and all(f.checksums for f in self.index.files)

    def write_chunk(self, f_i: int, c: int, data: Any) -> None:
        """Write a fetched chunk into the partial file and record it as done; raises CacheError."""
        assert self.files is not None
        m0 = mark()
        self.files.write(f_i, c, data)
        self.stages.add([m0, mark()], "write")

    def write_later(self, f_i: int, c: int, data: Any) -> None:
        """:meth:`write_chunk` on the write-behind threads, so that a load's GETs and device
        copies do not wait for the disk. At most ``write_behind`` bytes wait for their write;
        beyond that this blocks, and the download slows to the write speed. ``write_behind=0``
        writes here and now. After a failed write, chunks are no longer written (see
        ``cache_errors``).

        ``data`` may also be a read-back function (see :meth:`write_read_back`; only when
        :attr:`can_read_back`): it holds no memory while it waits."""
        if self.settings.write_behind <= 0 or self.cache_error is not None:
            self._write_or_fail(f_i, c, data)
            return
        with self._lock:
            if self._writer is None:
                self._writer = WriteBehind(self._write_any, self._cache_failed, self.settings.write_behind)
            self._queued.add((f_i, c))
        self._writer.submit(f_i, c, data)

    def _write_any(self, f_i: int, c: int, data: Any) -> None:
        if self.cache_error is not None:
            return
        if callable(data):
            self.write_read_back(f_i, c, data)
        else:
            self.write_chunk(f_i, c, data)

    def _write_or_fail(self, f_i: int, c: int, data: Any) -> None:
        try:
            self._write_any(f_i, c, data)
        except CacheError as e:
            self._cache_failed(e)

    def write_read_back(self, f_i: int, c: int, read: ReadBack) -> None:
        """Write chunk ``c`` of data file ``f_i`` from a copy read back from where the load put
        it (``_C.StagedCopier.read_back``). The chunk is written only if it still matches its
        checksum; if not (the caller changed the loaded tensors before the write) or if it cannot
        be read back, it is fetched again. So no host copy of the chunk waits for the disk."""
        assert self.index is not None and self.fetcher is not None and self.files is not None
        want = self.index.files[f_i].checksums[c]
        marks = [mark()]

        def use(buf: Any, digest: int) -> bool:
            marks.append(mark())  # copied back and checksummed
            self.stages.add(marks, "read_back")
            if digest != want:
                return False
            self.write_chunk(f_i, c, buf)
            return True

        try:
            written = bool(read(use))
            if not written:
                logger.debug("%s: %s changed on the device before it was cached; fetching it again",
                             self.url, self.fetcher.where(f_i, c))
        except CacheError:
            raise
        except SllmStoreError as e:  # the copy back failed (a device error)
            logger.info("%s: cannot read %s back from the device (%s); fetching it again", self.url,
                        self.fetcher.where(f_i, c), e)
            written = False
        with self._lock:
            self.read_backs["written" if written else "refetched"] += 1
        if not written:
            self.write_chunk(f_i, c, self.fetcher.fetch(f_i, c, aligned=self.files.is_direct(f_i)))

    def _cache_failed(self, e: BaseException) -> None:
        """A cache write failed: raise it (``cache_errors="raise"``), or keep the first and stop
        caching."""
        if self._cache_errors != "warn" or not isinstance(e, CacheError):
            raise e
        with self._lock:
            if self.cache_error is None:
                self.cache_error = e
                logger.info("%s: not caching any more: %s", self.url, e)

    # -- figures ---------------------------------------------------------------------------------

    @property
    def bytes_downloaded(self) -> int:
        return self.fetcher.bytes_downloaded if self.fetcher is not None else 0

    @property
    def pieced_chunks(self) -> int:
        return self.fetcher.pieced_chunks if self.fetcher is not None else 0

    @property
    def gets_span(self) -> list[Optional[float]]:
        return self.fetcher.gets_span if self.fetcher is not None else [None, None]

    @property
    def direct_writes(self) -> dict[str, int]:
        return self.files.direct_writes if self.files is not None else {"aligned": 0, "bounced": 0}

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the partial files and release the download lock (idempotent). After
        :meth:`finish_later` they belong to the finishing thread, and only it closes them."""
        if self._finisher is not None and threading.current_thread() is not self._finisher:
            return
        try:
            if self._writer is not None:
                self._writer.close(cancel=True)  # no write may run into a closed file
            if self.files is not None:
                self.files.close()
        finally:
            if self.entry_lock is not None:
                self.entry_lock.release()

    def finish(self) -> Optional[Path]:
        """Promote the entry if every chunk is there (returns its path), else keep the partial
        download for later (returns None)."""
        if self.cached is not None:
            return self.cached
        assert self.files is not None
        if self.files.missing():
            self.close()
            return None
        try:
            self.files.sync()
            self.files.close()
            return self._promote()
        finally:
            self.close()

    def _promote(self) -> Path:
        assert self.files is not None and self.index is not None and self.entry_lock is not None
        partial = self.files.directory
        fetch_small_files(self.bucket, self.url, {f.name for f in self.index.files} | {INDEX_FILE}, partial)
        # The cache holds decoded data files: its index is the uncompressed (version 1) form.
        index = self.parse_index(partial)
        index.files = [DataFile(f.name, f.size, f.checksums) for f in index.files]
        index.version, index.compression = 1, None
        write_index(index, partial)
        final = self.root / self.name
        try:
            os.replace(partial, final)
        except OSError as e:
            raise CacheError(f"cannot move the download '{partial}' into place: {e.strerror or e}") from None
        for f in index.files:  # the records of the download, not needed any more
            (final / (f.name + DONE_SUFFIX)).unlink(missing_ok=True)
        self.entry_lock.release(remove=True)  # a waiter sees the file gone and finds the entry
        self.cached = final
        if self.settings.size_limit is not None:
            prune(self.settings.size_limit, directory=self.root, keep=self.name)
        return final

    def finish_later(self) -> Optional[Path]:
        """Once a load's chunks are fetched: wait for the write-behind, then :meth:`finish`, on a
        background thread, so that neither the cache writes nor the sync of the data to disk
        delay the caller. Returns the path the entry will have, or None if chunks are missing (a
        partial load; a later load fetches the rest).

        The thread holds the download lock until it is done, so another load of the URL (in any
        process) waits for it and then loads the entry from disk. The interpreter waits for the
        thread at exit; :func:`wait_for_cache` waits for it sooner. A failure there is a warning:
        the tensors are loaded; only the cache entry is not.
        """
        if self.cached is not None:
            return self.cached
        assert self.files is not None
        complete = self.cache_error is None and all(
            self.files.has(f, c) or (f, c) in self._queued for f, c in self.files.chunks())
        t = threading.Thread(target=self._finish_in_background, name="sllm-cache-finish", daemon=False)
        self._finisher = t
        with _finishing_lock:
            _finishing.add(t)
        try:
            t.start()
        except RuntimeError as e:  # no thread to be had (a limit, or the interpreter is exiting)
            with _finishing_lock:
                _finishing.discard(t)
            self._finisher = None
            logger.debug("%s: finishing the cache entry in this thread (%s)", self.url, e)
            self._finish_in_background()
        return self.root / self.name if complete else None

    def _finish_in_background(self) -> None:
        writer = self._writer
        try:
            try:
                if writer is not None:
                    writer.close(cancel=False)
                    if writer.error is not None:
                        raise writer.error
                if self.cache_error is not None:
                    raise self.cache_error
                self.finish()
            except (RemoteError, OSError) as e:
                logger.warning("%s: loaded, but the download could not be cached: %s", self.url, e)
            except BaseException:
                logger.exception("%s: finishing the cache entry failed", self.url)
            try:
                self.close()
            except OSError as e:
                logger.warning("%s: closing the partial download failed: %s", self.url, e)
        finally:
            if self.entry_lock is not None:  # whatever failed above, another load must not wait
                self.entry_lock.release()
            with _finishing_lock:
                _finishing.discard(threading.current_thread())


_finishing: set[threading.Thread] = set()  # cache entries being synced and promoted
_finishing_lock = threading.Lock()


def wait_for_cache(timeout: Optional[float] = None) -> bool:
    """Wait until the cache entries of this process's remote loads are synced and promoted.

    A load while downloading returns when its tensors are loaded; its cache entry is finished by a
    background thread (the interpreter also waits for it at exit). Returns False if ``timeout``
    (seconds) passed first.

    Example::

        sd = sllm_store.load_state_dict("s3://models/llama-8b.sllm", "cuda:0")
        wait_for_cache()       # the next load of that URL is a disk load, in any process
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _finishing_lock:
            pending = list(_finishing)
        if not pending:
            return True
        t = pending[0]
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        if t.ident is None:  # registered, not started yet
            time.sleep(0.001)
            continue
        t.join(remaining)
        if t.is_alive():
            return False
        with _finishing_lock:
            _finishing.discard(t)  # (it discards itself; this is for one that could not)


def fetch(url: str, *, options: Optional[RemoteOptions] = None,
          directory: Optional[str | os.PathLike[str]] = None, max_gets: Optional[int] = None,
          quiet: Optional[bool] = None) -> Path:
    """The local cache entry of the checkpoint at ``url``, downloading what is missing (with
    ``max_gets`` GETs in flight, by default ``options``'s).

    Example::

        path = fetch("s3://models/llama-8b.sllm")     # then load_state_dict(path)
    """
    from tqdm.auto import tqdm

    from sllm_store.writer import default_quiet

    options = (options or RemoteOptions()).resolved()
    if max_gets is not None:
        options = replace(options, max_gets=max_gets).resolved()
    with Download(url, options, CacheSettings.resolve(directory=directory)).open() as d:
        if d.cached is not None:
            logger.info("%s: cached in %s", url, d.cached)
            return d.cached
        todo = d.missing()
        if len(todo) < len(d.chunks()):
            logger.info("%s: resuming, %d of %d chunks left", url, len(todo), len(d.chunks()))
        t0 = time.perf_counter()
        with tqdm(total=sum(d.chunk_length(*fc) for fc in todo), unit="B", unit_scale=True,
                  unit_divisor=1024, desc="downloading", dynamic_ncols=True,
                  disable=default_quiet() if quiet is None else quiet) as bar:
            # (lengths, not the chunks: the futures' results live until the loop ends)
            for n in parallel_map(lambda fc: len(memoryview(d.chunk(*fc))), todo, 2 * options.gets,
                                  "sllm-fetch"):
                bar.update(n)
        final = d.finish()
    assert final is not None
    dt = time.perf_counter() - t0
    logger.info("%s: downloaded %s in %.2f s (%.2f GB/s) into %s", url, format_size(d.bytes_downloaded),
                dt, d.bytes_downloaded / dt / 1e9 if dt > 0 else 0, final)
    return final
