"""The local cache of remote checkpoints: download once, load from disk afterwards.

An entry is a complete checkpoint directory named after the URL and the content of its index
(``<url hash>-<index hash>``), so a changed remote checkpoint is a new entry. A download goes into
``.partial/<entry>``: data files are preallocated, written with O_DIRECT (else mapped, where the
file system can reserve their blocks) and filled by parallel ranged GETs (one per chunk, stored
chunks for compressed files, which are decoded: the cache holds plain version-1 checkpoints that
load at disk speed), each chunk checked against its checksum before it is written and recorded as
done in ``<file>.done``. A load hands its writes to write-behind threads
(``SLLM_STORE_WRITE_BEHIND`` bytes may wait) and returns before the entry is synced and promoted,
which a background thread does (:func:`wait_for_cache`). An interrupted download resumes from those
records; a chunk that fails its checksum is never recorded, and the entry is renamed into place
only when every chunk is present and verified. Entries are evicted least recently used first when
the cache grows past its size limit.

Processes share the cache: a download holds an exclusive ``flock`` on ``.partial/<entry>.lock``
until its entry is promoted (or it stops), and a second process that wants the same entry waits
for it and then loads the promoted entry from disk, instead of downloading the same bytes again. A
process that dies releases its lock; the next one resumes its partial download.

Settings: ``SLLM_STORE_CACHE_DIR`` (default ``~/.cache/sllm-store``), ``SLLM_STORE_CACHE_SIZE``
(e.g. ``200GiB``; default: no limit), ``SLLM_STORE_WRITE_BEHIND`` (default: an eighth of the RAM,
at most 8 GiB), ``SLLM_STORE_CACHE_IO`` (``direct``, the default, or ``buffered``),
``SLLM_STORE_REUSE_GET_BUFFERS`` (default off: :func:`reuse_get_buffers`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from sllm_store._units import format_size
from sllm_store.config import env_bool, env_size
from sllm_store.errors import CacheError, ChecksumError, RemoteError, RemoteUnavailableError, SllmStoreError
from sllm_store.index import INDEX_FILE, DataFile, Index, parse_index, write_index
from sllm_store.remote.objects import RemoteOptions, open_store, remote_error
from sllm_store.utils import parallel_map

logger = logging.getLogger(__name__)

PARTIAL = ".partial"
SMALL_FILE_LIMIT = 64 << 20  # non-weight files (config, tokenizer) fetched with the checkpoint


_BLOCK = 4096  # O_DIRECT alignment of cache writes (memory and file offsets)
# Plain chunks of checkpoints with chunks at least this long are fetched so that they arrive
# block-aligned (Download._lead): the few KiB fetched twice are then under 0.4 % of a GET.
_ALIGNED_GET_MIN = 1 << 20
ALIGNED_GETS = True  # bench_remote turns it off for an A/B
# A chunk fetched into a load's staging blocks (fetch_chunk(fill=...)) comes as ranged GETs of
# this many bytes each (0: one GET). None: SLLM_STORE_GET_PIECE, by default 16 MiB (see
# get_piece()). bench_remote patches it.
GET_PIECE: Optional[int] = None


def _mark() -> tuple[float, float]:
    """Now, as wall-clock and this thread's CPU time (for :meth:`Download.add_seconds`)."""
    return time.perf_counter(), time.thread_time()


def _address(buf: Any) -> int:
    """Address of the first byte of a buffer (bytes, memoryview, obstore's Bytes)."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(memoryview(buf)) else 0


def cache_dir(path: Optional[str | os.PathLike[str]] = None) -> Path:
    d = Path(path or os.environ.get("SLLM_STORE_CACHE_DIR") or Path.home() / ".cache" / "sllm-store")
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_limit() -> Optional[int]:
    return env_size("SLLM_STORE_CACHE_SIZE")


@dataclass
class CacheEntry:
    name: str
    url: str
    size: int
    last_used: float
    path: Path


def _entry_name(url: str, index_bytes: bytes) -> str:
    from sllm_store import _C

    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{_C.xxh3_64(index_bytes):016x}"


class Download:
    """One checkpoint being brought into the cache, chunk by chunk (thread-safe per chunk).

    ``open()`` fetches the index and finds the entry; if it is complete, ``cached`` is its path.
    Otherwise ``chunk(f, c)`` returns chunk ``c`` of data file ``f`` as decoded (raw) bytes:
    read from the partial download when an earlier attempt has it, else downloaded with one ranged
    GET, verified, written through to the partial file and recorded. ``finish()`` promotes the
    entry once every chunk is there.

    At most ``max_gets`` GETs run at once, however many threads call ``chunk()``: callers use
    about twice as many threads, so that while some threads verify, write and copy the chunks
    they have, ``max_gets`` requests stay in flight. With ``cache_errors="warn"`` (loads), a
    failed cache write stops the caching but not the download.
    """

    def __init__(self, url: str, options: Optional[RemoteOptions] = None, directory: Any = None,
                 max_gets: int = 16, write_behind: Optional[int] = None,
                 cache_errors: str = "raise") -> None:
        self.url = url.rstrip("/")
        self._get_slots = threading.BoundedSemaphore(max(1, max_gets))
        self._failed: Optional[BaseException] = None  # the first failed GET: no new GETs start
        self.root = cache_dir(directory)
        self.store = open_store(url, options)
        self.cached: Optional[Path] = None
        self.bytes_downloaded = 0
        self._lock = threading.Lock()
        self._scratch = threading.local()  # per-thread buffer for decoded chunks
        self._finisher: Optional[threading.Thread] = None  # owns the files and lock once started
        self._write_behind = write_behind_limit() if write_behind is None else int(write_behind)
        self._writer: Optional[_WriteBehind] = None
        self._queued: set[tuple[int, int]] = set()  # handed to the write-behind threads
        # "raise": a failed cache write is a CacheError (fetch). "warn": the first one is kept in
        # cache_error, nothing more is written, and the load goes on; finish_later() warns.
        self._cache_errors = cache_errors
        self.cache_error: Optional[CacheError] = None
        self._cache_io = cache_io_mode()
        # Where in its page the body of the next plain chunk's GET will start (see _lead); None
        # until open() guesses it from malloc. Direct cache writes from an aligned body, or
        # copied through an aligned buffer first ("bounced"), for the load report.
        self._body_offset: Optional[int] = None
        self.direct_writes = {"aligned": 0, "bounced": 0}
        # Chunks written to the cache from what the load put on the device (store_read_back), and
        # those of them fetched again because it no longer matched their checksum.
        self.read_backs = {"written": 0, "refetched": 0}
        self.pieced_chunks = 0  # chunks fetched in pieces into staging blocks (fetch_chunk(fill=...))
        self.in_place_chunks = 0  # or read into them in place (SLLM_STORE_GET_CLIENT=http)
        self._options = options
        self._signed: Any = False  # the SignedGets, None without, False until asked
        self._heap_released = False  # reuse_get_buffers: the free heap handed back at close
        # Thread-seconds spent per stage of fetch_chunk() and the cache writes, of wall-clock time
        # and of CPU time: where a download's time goes (load reports).
        stages = ("get", "decode", "copy", "verify", "fault", "write", "read_back")
        self.stage_seconds = dict.fromkeys(stages, 0.0)
        self.stage_cpu_seconds = dict.fromkeys(stages, 0.0)
        # perf_counter() when the first GET of a chunk started and the last one ended (None
        # before): with the load's own marks, its timeline (load reports).
        self.gets_span: list[Optional[float]] = [None, None]

    def open(self) -> Download:
        if self.lookup() is not None:
            return self
        final = self.root / self.name
        self.partial = self.root / PARTIAL / self.name
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        if not self._lock_entry(final):
            return self  # another process has just promoted it
        try:
            self._open_partial()
        except BaseException:
            self.close()
            raise
        return self

    def lookup(self) -> Optional[Path]:
        """Fetch the index and find the complete cache entry (``cached``; None if there is none
        yet). Takes no lock and opens no files: ``open()`` does, for a download."""
        import obstore

        try:
            self.index_bytes = bytes(obstore.get(self.store, INDEX_FILE).bytes())
        except Exception as e:
            err = remote_error(e, f"{self.url}/{INDEX_FILE}", "fetching")
            cached = [c for c in entries(self.root) if c.url == self.url] \
                if isinstance(err, RemoteUnavailableError) else []
            if not cached:
                raise err from None
            # The store is unreachable, but a complete copy is here: a cold start should not
            # fail on a network blip. (Not when the object is gone or access is denied.)
            logger.warning("%s; loading the copy cached %s ago instead (%s)", err,
                           _age(cached[0].last_used), cached[0].path)
            _touch_entry(cached[0].path)
            self.cached = cached[0].path
            return self.cached
        self.name = _entry_name(self.url, self.index_bytes)
        if _touch_entry(self.root / self.name):
            self.cached = self.root / self.name
        return self.cached

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open_partial(self) -> None:
        self.partial.mkdir(exist_ok=True)
        try:
            self.index = parse_index(json.loads(self.index_bytes), self.partial)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RemoteError(f"'{self.url}/{INDEX_FILE}' is not valid JSON: {e}") from None
        (self.partial / "source.json").write_text(json.dumps({"url": self.url,
                                                              "chunk_size": self.index.chunk_size}))
        self.done: dict[int, set[int]] = {}
        self._fds: dict[int, int] = {}
        self._direct: dict[int, int] = {}  # O_DIRECT descriptors of the files written that way
        self._refused: list[int] = []  # O_DIRECT descriptors given up on (closed at the end)
        self._maps: dict[int, tuple[mmap.mmap, Any]] = {}
        self._marks: dict[int, Any] = {}
        for f_i, f in enumerate(self.index.files):
            p = self.partial / f.name
            marks = self.partial / (f.name + ".done")
            n_chunks = -(-f.size // self.index.chunk_size)
            recorded = marks.read_text(errors="replace").split() if marks.exists() else []
            self.done[f_i] = {int(x) for x in recorded if x.isdigit() and int(x) < n_chunks}
            try:
                self._fds[f_i] = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                self._prepare_file(f_i, f.size)
            except OSError as e:
                raise CacheError(f"cannot prepare '{p}' ({format_size(f.size)}) for the download of "
                                 f"{self.url}: {e.strerror or e}") from None
            self._marks[f_i] = open(marks, "a")
        self._check_earlier_chunks()
        reuse_get_buffers(self.index.chunk_size)
        if self._direct and ALIGNED_GETS:
            from sllm_store import _C

            self._body_offset = _C.malloc_offset(self.index.chunk_size + _BLOCK)

    def _lead(self, f_i: int, off: int) -> int:
        """Bytes to GET before a plain chunk at ``off`` so that the chunk itself starts on a
        4 KiB boundary in the GET's buffer; 0 if that cannot help.

        An O_DIRECT write wants block-aligned memory. obstore's GET bodies come from malloc: a
        body of a whole chunk (32 MiB by default) gets a mapping of its own and starts 16 bytes
        past a page boundary (glibc), so the direct write would first copy every chunk into an
        aligned buffer, a memcpy of the whole download on the cores that the GETs and the
        server need. GETting ``4096 - 16`` bytes of the previous chunk too puts this chunk's
        first byte on a page boundary, and it is written from where it arrived. Where a body
        will start is learned from the last GET of a whole chunk (guessed from malloc before
        the first); a wrong guess costs the copy, never correctness.
        """
        guess = self._body_offset
        if guess is None or f_i not in self._direct or self.index.chunk_size < _ALIGNED_GET_MIN:
            return 0
        lead = -guess % _BLOCK
        return lead if lead <= off else 0

    def _prepare_file(self, f_i: int, size: int) -> None:
        """Size a partial data file (the cache holds decoded bytes: a plain v1-layout file) and
        open it for O_DIRECT writes (``SLLM_STORE_CACHE_IO=direct``, the default) or, where the
        file system refuses them and can reserve the blocks up front, map it for parallel
        writes."""
        from sllm_store import _C

        fd = self._fds[f_i]
        err = _C.preallocate(fd, size)  # blocks reserved: direct writes into them run in parallel
        if err not in (0, errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))  # e.g. ENOSPC: found before downloading anything
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        if self._cache_io == "direct" and self.index.chunk_size % 4096 == 0 and size > 0:
            try:
                self._direct[f_i] = os.open(self.partial / self.index.files[f_i].name,
                                            os.O_WRONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0))
                return
            except OSError as e:  # EINVAL: the file system (tmpfs, say) has no direct I/O
                logger.debug("%s: no O_DIRECT cache writes in '%s' (%s)", self.url, self.partial, e)
                self._cache_io = "buffered"
        if err == 0 and size > 0:
            # The blocks are reserved, so a store into the mapping does not meet a full disk (on
            # copy-on-write file systems, btrfs or ZFS, that shows at the fsync: a CacheError).
            mm = mmap.mmap(fd, size)
            view = np.frombuffer(mm, dtype=np.uint8)
            if _C.populate_write(view.ctypes.data, 1) == errno.EINVAL:
                # Linux < 5.14: a fault error in a store would be SIGBUS, not an error. pwrite.
                del view
                mm.close()
                return
            self._maps[f_i] = (mm, view)

    def _check_earlier_chunks(self) -> None:
        """Re-verify the chunks an earlier attempt recorded (its writes were not synced before
        their records): a chunk that fails its checksum is downloaded again."""
        from sllm_store import _C

        earlier = [(f_i, c) for f_i in self.done for c in sorted(self.done[f_i])]
        if not earlier:
            return

        def ok(fc: tuple[int, int]) -> bool:
            f_i, c = fc
            data = os.pread(self._fds[f_i], self.chunk_length(f_i, c), c * self.index.chunk_size)
            return _C.xxh3_64(data) == self.index.files[f_i].checksums[c]

        bad = [fc for fc, good in zip(earlier, parallel_map(ok, earlier, 8, "sllm-check")) if not good]
        for f_i, c in bad:
            self.done[f_i].discard(c)
        if bad:
            logger.warning("%s: %d of %d chunks of the interrupted download failed their checksum; "
                           "downloading them again", self.url, len(bad), len(earlier))

    def _lock_entry(self, final: Path) -> bool:
        """Hold the entry's download lock (waiting for another process that holds it). False if
        that process promoted the entry meanwhile (``cached`` is then set)."""
        lock = self.root / PARTIAL / (self.name + ".lock")
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.info("%s: another process is downloading it; waiting for it to finish", self.url)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(lock).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)  # the holder promoted the entry and removed this lock file: look again
        self._lock_fd: Optional[int] = fd
        _held_locks.add(fd)
        if _touch_entry(final):
            self.cached = final
            self._unlock()
            return False
        return True

    def _unlock(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            _held_locks.discard(fd)
            os.close(fd)  # releases the flock

    def chunks(self) -> list[tuple[int, int]]:
        cs = self.index.chunk_size
        return [(f_i, c) for f_i, f in enumerate(self.index.files) for c in range(-(-f.size // cs))]

    def missing(self) -> list[tuple[int, int]]:
        return [(f, c) for f, c in self.chunks() if c not in self.done[f]]

    def add_seconds(self, marks: list[tuple[float, float]], *stages: str) -> None:
        """Add the time between consecutive ``marks`` (from :func:`_mark`, on one thread) to
        ``stages``: wall-clock to ``stage_seconds``, CPU to ``stage_cpu_seconds``
        (thread-safe)."""
        with self._lock:
            for k, (w0, c0), (w1, c1) in zip(stages, marks, marks[1:]):
                self.stage_seconds[k] += w1 - w0
                self.stage_cpu_seconds[k] += c1 - c0

    def _where(self, f_i: int, c: int) -> str:
        return f"'{self.url}/{self.index.files[f_i].name}' chunk at offset {c * self.index.chunk_size}"

    def chunk_length(self, f_i: int, c: int) -> int:
        """Decoded length of chunk ``c`` of file ``f_i``."""
        cs = self.index.chunk_size
        return min(cs, self.index.files[f_i].size - c * cs)

    def chunk(self, f_i: int, c: int) -> Any:
        """Decoded bytes of chunk ``c`` of file ``f_i`` (a buffer), written to the cache before
        this returns: :meth:`fetch_chunk` then :meth:`store_chunk`.

        A decoded compressed chunk may live in a buffer of the calling thread that its next call
        reuses: use (or copy) the result before asking the same thread for another chunk.
        """
        data, stored = self.fetch_chunk(f_i, c)
        if not stored:
            self.store_chunk(f_i, c, data)
        return data

    def fetch_chunk(self, f_i: int, c: int,
                    deliver: Optional[Callable[[Any], Optional[int]]] = None,
                    fill: Optional[Callable[[int], Any]] = None) -> tuple[Any, bool]:
        """Chunk ``c`` of file ``f_i``, decoded and verified: ``(data, stored)``. ``stored`` says
        whether it is in the cache already (an earlier attempt's chunk; a decoded chunk is decoded
        straight into the cache file); if not, hand ``data`` to :meth:`store_chunk` or
        :meth:`store_later`. At most ``max_gets`` GETs run at once; after one fails, no new one
        starts, and the others raise its error too.

        ``deliver(data)``, if given, is called with the decoded chunk before it is verified and
        may return its XXH3-64 (``_C.StagedCopier.copy`` copies it to its destinations and
        checksums it in one pass), which is then checked instead of computing it again. Until
        this returns, the delivered bytes are not verified: a ChecksumError means they are wrong.

        ``fill(n)``, if given, returns a ``_C.StagedFill`` for a chunk of ``n`` bytes: a plain
        (not encoded) chunk is then fetched as ranged GETs of :func:`get_piece` bytes, each body
        added to it and freed (with ``SLLM_STORE_GET_CLIENT=http``, one GET of a presigned URL
        read into it in place), no buffer holds the whole chunk, and ``data`` is None; the
        caller caches it some other way (a read-back function). Other chunks go to ``deliver``.
        """
        from sllm_store import _C

        f = self.index.files[f_i]
        cs = self.index.chunk_size
        raw_len = self.chunk_length(f_i, c)
        if c in self.done[f_i]:  # verified when this download was opened
            data = os.pread(self._fds[f_i], raw_len, c * cs)
            if deliver is not None:
                deliver(data)
            return data, True
        if f.chunks is not None:
            sc = f.chunks[c]
            off, length = sc.offset, sc.length
        else:
            off, length = c * cs, raw_len
        where = self._where(f_i, c)
        decoded = f.chunks is not None and (f.chunks[c].codec != "none" or f.chunks[c].group > 1)
        if fill is not None and not decoded and length:
            signed = self._signed_gets()
            if signed is not None:
                return self._fetch_in_place(f_i, c, off, length, fill(length), signed), False
            piece = get_piece()
            if piece:
                return self._fetch_in_pieces(f_i, c, off, length, fill(length), piece), False
        lead = 0 if decoded else self._lead(f_i, off)
        with self._get_slot():
            m0 = _mark()
            data: Any = self._get(f.name, off - lead, length + lead) if length else b""
            m1 = _mark()
        if len(data) != length + lead:
            raise RemoteError(f"{where}: the object is shorter than its index says")
        if self._body_offset is not None and not decoded and length == cs and f_i in self._direct:
            self._body_offset = _address(data) % _BLOCK  # where the next whole chunk's body starts
        if lead:
            data = memoryview(data)[lead:]
        in_place = False  # decoded straight into the mapped cache file
        fresh = f_i in self._direct  # decoded into a new buffer, written later like a plain chunk
        if decoded:
            _off, _len, codec, group = f.chunks[c].encoding
            mapped = self._maps.get(f_i)
            if mapped is not None and self.cache_error is None:
                try:
                    self._populate(f_i, c)
                    in_place = True
                except CacheError as e:
                    self._cache_failed(e)
            out: Any = None
            if in_place:
                out = memoryview(mapped[0])[c * cs:c * cs + raw_len]
            elif not fresh:
                out = getattr(self._scratch, "buf", None)
                if out is None or len(out) < raw_len:
                    out = self._scratch.buf = bytearray(raw_len)
            try:
                if out is None:
                    data = _C.decode_chunk(data, codec, raw_len, group)
                else:
                    _C.decode_chunk(data, codec, raw_len, group, out=out)
                    data = memoryview(out)[:raw_len]
            except ChecksumError as e:
                raise ChecksumError(f"{where}: the remote object is corrupted ({e}); nothing was cached") \
                    from None
        m2 = _mark()
        digest = deliver(data) if deliver is not None else None
        m3 = _mark()
        if f.checksums and (_C.xxh3_64(data) if digest is None else digest) != f.checksums[c]:
            raise ChecksumError(f"checksum mismatch in {where}: the remote object is corrupted; "
                                "nothing was cached")
        with self._lock:
            self.bytes_downloaded += length + lead
        self.add_seconds([m0, m1, m2, m3, _mark()], "get", "decode", "copy", "verify")
        if in_place:
            self._record(f_i, c)
            return data, True
        if decoded and not fresh:  # in this thread's scratch buffer, reused by its next call
            self._store_or_fail(f_i, c, data)
            return data, True
        return data, False

    @contextlib.contextmanager
    def _get_slot(self) -> Iterator[None]:
        """One of the ``max_gets`` GET slots, for one GET; after a GET has failed, its error
        instead (no new GET starts)."""
        with self._get_slots:
            if self._failed is not None:
                raise _same_error(self._failed)
            if self.gets_span[0] is None:
                with self._lock:
                    if self.gets_span[0] is None:
                        self.gets_span[0] = time.perf_counter()
            try:
                yield
            finally:
                self.gets_span[1] = time.perf_counter()  # a float store: atomic

    def _get(self, name: str, start: int, length: int) -> Any:
        """A ranged GET of object ``name`` of the checkpoint, in a GET slot. A failure is kept,
        so that no new GET starts and the others raise it too."""
        import obstore

        try:
            return obstore.get_range(self.store, name, start=start, length=length)
        except Exception as e:
            self._failed = remote_error(e, f"{self.url}/{name}", "downloading")
            raise self._failed from None

    def _fetch_in_pieces(self, f_i: int, c: int, off: int, length: int, sink: Any, piece: int) -> None:
        """:meth:`fetch_chunk` of plain chunk ``c`` of file ``f_i`` (``length`` bytes at ``off`` in
        the object) into ``sink`` (a ``_C.StagedFill``): ranged GETs of ``piece`` bytes, one
        after the other, each body added and freed; then its checksum is checked. Each GET holds
        a GET slot while it runs, not while its body is added: so ``max_gets`` GETs stay in
        flight while bodies are copied."""
        f = self.index.files[f_i]
        where = self._where(f_i, c)
        get = (0.0, 0.0)
        with sink:
            m0 = _mark()
            for start in range(off, off + length, piece):
                n = min(piece, off + length - start)
                with self._get_slot():
                    g0 = _mark()
                    body = self._get(f.name, start, n)
                    g1 = _mark()
                get = (get[0] + g1[0] - g0[0], get[1] + g1[1] - g0[1])
                if len(body) != n:
                    raise RemoteError(f"{where}: the object is shorter than its index says")
                sink.add(body)
                del body  # before the next GET: its memory is the next body's
            digest = sink.finish()
            m1 = _mark()
        self._filled(f_i, c, digest, length, in_place=False)
        # The GETs and the copies took turns: "copy" is the rest of the time (with the waits for
        # a GET slot).
        self.add_seconds([m0, (m0[0] + get[0], m0[1] + get[1]), m1], "get", "copy")

    def _signed_gets(self) -> Any:
        """The store's :class:`~sllm_store.remote.signed_gets.SignedGets` with
        ``SLLM_STORE_GET_CLIENT=http`` where it can sign URLs, else None (made once)."""
        from sllm_store.remote import signed_gets

        with self._lock:
            if self._signed is False:
                self._signed = None
                if signed_gets.get_client() == "http":
                    self._signed = signed_gets.SignedGets.for_store(self.store, self.url, self._options)
            return self._signed

    def _fetch_in_place(self, f_i: int, c: int, off: int, length: int, sink: Any, signed: Any) -> None:
        """:meth:`fetch_chunk` of plain chunk ``c`` of file ``f_i`` into ``sink`` (a
        ``_C.StagedFill``) with one ranged GET of a presigned URL, its body read straight into
        the staging blocks (:mod:`sllm_store.remote.signed_gets`); then its checksum is checked."""
        f = self.index.files[f_i]
        with sink:
            with self._get_slot():
                m0 = _mark()
                try:
                    signed.get_into(f.name, off, length, sink)
                except RemoteError as e:
                    self._failed = e
                    raise
                m1 = _mark()
            digest = sink.finish()
            m2 = _mark()
        self._filled(f_i, c, digest, length, in_place=True)
        # "get" holds the reads into the blocks, with their checksum and device copies.
        self.add_seconds([m0, m1, m2], "get", "copy")

    def _filled(self, f_i: int, c: int, digest: int, length: int, in_place: bool) -> None:
        """The end of chunk ``c`` of file ``f_i`` fetched into a fill: ``digest`` checked against
        its checksum, then the chunk counted (read in place, or in pieces)."""
        f = self.index.files[f_i]
        if f.checksums and digest != f.checksums[c]:
            raise ChecksumError(f"checksum mismatch in {self._where(f_i, c)}: the remote object is "
                                "corrupted; nothing was cached")
        with self._lock:
            self.bytes_downloaded += length
            if in_place:
                self.in_place_chunks += 1
            else:
                self.pieced_chunks += 1

    def _cache_failed(self, e: CacheError) -> None:
        """A cache write failed: raise it (``cache_errors="raise"``), or keep the first and stop
        caching."""
        if self._cache_errors != "warn":
            raise e
        with self._lock:
            if self.cache_error is None:
                self.cache_error = e
                logger.info("%s: not caching any more: %s", self.url, e)

    def _store_or_fail(self, f_i: int, c: int, data: Any) -> None:
        if self.cache_error is not None:
            return
        try:
            self._store(f_i, c, data)
        except CacheError as e:
            self._cache_failed(e)

    def _store(self, f_i: int, c: int, data: Any) -> None:
        """:meth:`store_chunk` of a buffer, or :meth:`_store_read_back` of a read-back function."""
        if callable(data):
            self._store_read_back(f_i, c, data)
        else:
            self.store_chunk(f_i, c, data)

    @property
    def can_read_back(self) -> bool:
        """Whether chunks may be handed to :meth:`store_later` as read-back functions: the cache
        is being written behind the download, and every chunk has a checksum to check what is
        read back against."""
        return self._write_behind > 0 and self.cache_error is None and \
            all(f.checksums for f in self.index.files)

    def _store_read_back(self, f_i: int, c: int, read: Callable[[Callable[[Any, int], bool]], bool]) -> None:
        """Write chunk ``c`` of file ``f_i`` from a copy read back from where the load put it:
        ``read(use)`` calls ``use(buffer, xxh3_64)`` with the chunk (``_C.StagedCopier.read_back``).
        The chunk is written only if it still matches the index's checksum; if not (the caller
        changed the loaded tensors before the write) or if it cannot be read back, it is fetched
        again. So the GET's own buffer need not wait for the disk."""
        want = self.index.files[f_i].checksums[c]

        marks = [_mark()]

        def use(buf: Any, digest: int) -> bool:
            marks.append(_mark())  # copied back and checksummed
            self.add_seconds(marks, "read_back")
            if digest != want:
                return False
            self.store_chunk(f_i, c, buf)
            return True

        try:
            written = read(use)
            if not written:
                logger.debug("%s: %s changed on the device before it was cached; fetching it again",
                             self.url, self._where(f_i, c))
        except CacheError:
            raise
        except SllmStoreError as e:  # the copy back failed (a device error)
            logger.info("%s: cannot read %s back from the device (%s); fetching it again", self.url,
                        self._where(f_i, c), e)
            written = False
        with self._lock:
            self.read_backs["written" if written else "refetched"] += 1
        if not written:
            data, stored = self.fetch_chunk(f_i, c)
            if not stored:
                self.store_chunk(f_i, c, data)

    def _populate(self, f_i: int, c: int) -> None:
        """Fault a chunk's pages of a mapped file in: an I/O error is a CacheError, not SIGBUS."""
        from sllm_store import _C

        cs = self.index.chunk_size
        err = _C.populate_write(self._maps[f_i][1].ctypes.data + c * cs, self.chunk_length(f_i, c))
        if err:
            raise self._write_error(f_i, c, os.strerror(err))

    def _write_error(self, f_i: int, c: int, why: str) -> CacheError:
        return CacheError(f"cannot write the download of {self._where(f_i, c)} to the cache in "
                          f"'{self.partial}': {why}")

    def store_chunk(self, f_i: int, c: int, data: Any) -> None:
        """Write a fetched chunk into the partial file and record it as done.

        By default with O_DIRECT (``_C.write_direct``: no page-cache pages to allocate and fault
        in, which cost the download's GETs more CPU than the write itself). Where the file system
        refuses direct I/O but could reserve the file's blocks, the file is mapped and the chunk
        is one memcpy in C++ (threads do not queue on the file's inode lock, as ``pwrite``
        makes them); else ``pwrite``.
        """
        from sllm_store import _C

        m0 = _mark()
        cs = self.index.chunk_size
        raw_len = self.chunk_length(f_i, c)
        mapped = self._maps.get(f_i)
        direct = self._direct.get(f_i)
        if direct is not None:
            m1 = m0
            aligned = raw_len < _BLOCK or _address(data) % _BLOCK == 0
            err = _C.write_direct(direct, self._fds[f_i], data, c * cs)
            if err == errno.EINVAL:  # refused after all (an odd alignment rule): write buffered
                logger.info("%s: O_DIRECT cache writes refused in '%s'; writing buffered", self.url,
                            self.partial)
                with self._lock:
                    if self._direct.pop(f_i, None) is not None:  # closed with the other files
                        self._refused.append(direct)
                self.store_chunk(f_i, c, data)
                return
            if err:
                raise self._write_error(f_i, c, os.strerror(err))
            with self._lock:
                self.direct_writes["aligned" if aligned else "bounced"] += 1
        elif mapped is not None:
            self._populate(f_i, c)
            m1 = _mark()
            _C.run_copies([(_address(data), 0, c * cs, raw_len)],
                          [("cpu", mapped[1].ctypes.data, mapped[1].nbytes)], num_threads=1)
        else:
            m1 = _mark()
            mv = memoryview(data)
            pos = 0
            try:
                while pos < raw_len:
                    pos += os.pwrite(self._fds[f_i], mv[pos:], c * cs + pos)
            except OSError as e:
                raise self._write_error(f_i, c, e.strerror or str(e)) from None
        self._record(f_i, c)
        self.add_seconds([m0, m1, _mark()], "fault", "write")

    def _record(self, f_i: int, c: int) -> None:
        with self._lock:
            self.done[f_i].add(c)
            self._marks[f_i].write(f"{c}\n")
            self._marks[f_i].flush()

    def store_later(self, f_i: int, c: int, data: Any) -> None:
        """:meth:`store_chunk` on the write-behind threads, so that the load's critical path
        (GETs, device copies) does not wait for the page cache. At most ``write_behind`` bytes
        wait for their write; beyond that this blocks, and the download slows to the write
        speed. ``write_behind=0`` writes here and now. After a failed write, chunks are no
        longer written (see ``cache_errors``).

        ``data`` may also be a read-back function (see :meth:`_store_read_back`; only when
        :attr:`can_read_back`): it holds no memory while it waits."""
        if self._write_behind <= 0 or self.cache_error is not None:
            self._store_or_fail(f_i, c, data)
            return
        with self._lock:
            if self._writer is None:
                self._writer = _WriteBehind(self, self._write_behind)
            self._queued.add((f_i, c))
        self._writer.submit(f_i, c, data)

    def close(self) -> None:
        """Close the partial files and release the download lock (idempotent). After
        ``finish_later()`` they belong to the finishing thread, and only it closes them."""
        if self._finisher is not None and threading.current_thread() is not self._finisher:
            return
        if self._writer is not None:
            self._writer.close(cancel=True)  # no store may run into an unmapped file
        if self._signed:
            self._signed.close()
        self._close_files()
        self._unlock()
        if self.bytes_downloaded and _reusing_get_buffers and not self._heap_released:
            from sllm_store import _C

            self._heap_released = True
            _C.release_free_heap()  # the freed GET bodies the heap kept during the download

    def _unmap(self) -> None:
        """Unmap the partial files (their stores stay in the page cache, dirty until synced)."""
        maps, self._maps = getattr(self, "_maps", {}), {}
        while maps:
            _f, (mm, view) = maps.popitem()
            del view
            try:
                mm.close()
            except BufferError:  # a chunk view is still referenced: unmapped when it goes
                logger.debug("%s: a partial file stays mapped until its last view is dropped", self.url)

    def _close_files(self) -> None:
        """Close everything, each exactly once (a failing close does not stop the others, and
        is not retried on a number another thread may have reused); raises the first error."""
        self._unmap()
        errors: list[OSError] = []
        fds, marks = getattr(self, "_fds", {}), getattr(self, "_marks", {})
        direct, refused = getattr(self, "_direct", {}), getattr(self, "_refused", [])
        self._fds, self._marks, self._direct, self._refused = {}, {}, {}, []
        closers = [lambda fd=fd: os.close(fd) for fd in [*fds.values(), *direct.values(), *refused]] + \
            [fh.close for fh in marks.values()]
        for close in closers:
            try:
                close()
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def finish(self) -> Optional[Path]:
        """Promote the entry if every chunk is there (returns its path), else keep the partial
        download for later (returns None)."""
        if self.cached is not None:
            return self.cached
        if self.missing():
            self.close()
            return None
        try:
            self._unmap()
            try:
                for fd in self._fds.values():
                    os.fsync(fd)
            except OSError as e:
                raise CacheError(f"cannot sync the download in '{self.partial}': {e.strerror or e}") from None
            self._close_files()
            return self._promote()
        finally:
            self.close()

    def finish_later(self) -> Optional[Path]:
        """Once the load's chunks are fetched: wait for the write-behind, then ``finish()``, on a
        background thread, so that neither the page-cache writes nor the sync of the data to disk
        delay the caller. Returns the path the entry will have, or None if chunks are missing
        (a partial load; a later load fetches the rest).

        The thread holds the download lock until it is done, so another load of the URL (in any
        process) waits for it and then loads the entry from disk. The interpreter waits for the
        thread at exit; :func:`wait_for_cache` waits for it sooner. A failure there is a warning:
        the tensors are loaded; only the cache entry is not.
        """
        if self.cached is not None:
            return self.cached
        complete = self.cache_error is None and all(
            c in self.done[f] or (f, c) in self._queued for f, c in self.chunks())
        writer = self._writer

        def run() -> None:
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
                self._unlock()  # whatever failed above, another load must not wait forever
                with _finishing_lock:
                    _finishing.discard(threading.current_thread())

        t = threading.Thread(target=run, name="sllm-cache-finish", daemon=False)
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
            run()
        return self.root / self.name if complete else None

    def _promote(self) -> Path:
        _fetch_small_files(self.store, self.url, self.index, self.partial)
        # The cache holds decoded data files: its index is the uncompressed (version 1) form.
        index = parse_index(json.loads(self.index_bytes), self.partial)
        index.files = [DataFile(f.name, f.size, f.checksums) for f in index.files]
        index.version, index.compression = 1, None
        write_index(index, self.partial)
        final = self.root / self.name
        try:
            os.replace(self.partial, final)
        except OSError as e:
            raise CacheError(f"cannot move the download '{self.partial}' into place: {e.strerror or e}") \
                from None
        for f in index.files:  # the records of the download, not needed any more
            (final / (f.name + ".done")).unlink(missing_ok=True)
        (self.root / PARTIAL / (self.name + ".lock")).unlink(missing_ok=True)  # waiters check identity
        self.cached = final
        limit = cache_limit()
        if limit is not None:
            prune(limit, directory=self.root, keep=self.name)
        return final


CACHE_IO_MODES = ("direct", "buffered")


def cache_io_mode() -> str:
    """How downloads are written into the cache: ``SLLM_STORE_CACHE_IO``. ``direct`` (the
    default) writes with O_DIRECT where the file system allows it: the CPU that page-cache
    writes cost is left to the GETs that share it (the next load reads the entry from the disk).
    ``buffered`` writes through the page cache (the next load may find the entry in memory)."""
    mode = os.environ.get("SLLM_STORE_CACHE_IO", "direct").strip().lower() or "direct"
    if mode not in CACHE_IO_MODES:
        raise ValueError(f"SLLM_STORE_CACHE_IO must be one of {', '.join(CACHE_IO_MODES)}, got {mode!r}")
    return mode


_reusing_get_buffers = False  # keep_large_blocks() applied in this process


def reuse_get_buffers(chunk_size: int) -> bool:
    """With ``SLLM_STORE_REUSE_GET_BUFFERS=1`` (off by default): keep the bodies of GETs of
    ``chunk_size``-byte chunks (with an aligned GET's lead) in the heap once freed
    (``_C.keep_large_blocks``), so that later GETs reuse their pages
    instead of faulting in a fresh mapping each. Process-wide and for the rest of the process
    (glibc only); each download hands the heap's free pages back when it closes. True if in
    effect.

    For raw GETs the faults are 60 % of the client's CPU (docs/benchmarks.md, run X). A
    streamed load that kept its bodies until the write-behind had written them gained nothing
    on the GPU machine (runs Y2, Y6). A load to a GPU now writes its cache from the device and
    frees each body at once (``Download._store_read_back``). With this setting, that load ran
    10-20 % faster on the GPU machine, with 40 % less client CPU (runs Z3, Z4: 4.8-5.2 GB/s). It
    stays off by default: it is process-wide, and the raw GETs it speeds up gain more (7.2-7.6
    GB/s).
    """
    global _reusing_get_buffers
    if not _reusing_get_buffers and env_bool("SLLM_STORE_REUSE_GET_BUFFERS"):
        from sllm_store import _C

        _reusing_get_buffers = _C.keep_large_blocks(chunk_size + _BLOCK)
        if _reusing_get_buffers:
            logger.debug("GET bodies of %s chunks are reused from the heap", format_size(chunk_size))
    return _reusing_get_buffers


def get_piece() -> int:
    """The size of the ranged GETs that fetch a chunk into a load's staging blocks, 0 for one GET
    per chunk: ``SLLM_STORE_GET_PIECE`` (e.g. ``8MiB``), by default 16 MiB.

    glibc serves a block of up to 32 MiB from the heap once one that size has been freed (its
    mmap threshold rises to it), but a 32 MiB chunk's body is a little more: every whole-chunk
    GET is a fresh mapping, faulted in page by page (244 k faults per GB, 60 % of the raw GETs'
    CPU; docs/benchmarks.md, run X). Two 16 MiB GETs per chunk, each body added to the staging
    blocks and freed before the next GET, reuse freed heap memory with glibc's defaults: on the
    2-core machine raw GETs so ran 35-45 % faster, with half the CPU and almost no faults. It is
    what ``SLLM_STORE_REUSE_GET_BUFFERS=1`` does, without changing malloc for the process (on
    the GPU machine that made the load 10-20 % faster, with 40 % less client CPU: runs Z3, Z4).
    """
    if GET_PIECE is not None:
        return GET_PIECE
    value = env_size("SLLM_STORE_GET_PIECE")
    return 16 << 20 if value is None else value


def write_behind_limit() -> int:
    """Bytes of downloaded chunks that may wait for their cache write: ``SLLM_STORE_WRITE_BEHIND``
    (e.g. ``4GiB``; ``0``: each chunk is written before the next is fetched), by default an eighth
    of the memory, at most 8 GiB."""
    value = env_size("SLLM_STORE_WRITE_BEHIND")
    if value is not None:
        return value
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        ram = 16 << 30
    return max(256 << 20, min(8 << 30, ram // 8))


class _WriteBehind:
    """Cache writes of fetched chunks on their own threads, at most ``limit`` bytes waiting."""

    THREADS = 8

    def __init__(self, download: Download, limit: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._d = download
        self._limit = limit
        self._waiting = 0
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="sllm-cache-write")
        self.error: Optional[BaseException] = None

    def submit(self, f_i: int, c: int, data: Any) -> None:
        n = 0 if callable(data) else len(memoryview(data))  # a read-back function holds no memory
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
            if self.error is None and self._d.cache_error is None:
                self._d._store(f_i, c, data)
        except BaseException as e:
            if isinstance(e, CacheError):
                with contextlib.suppress(CacheError):
                    self._d._cache_failed(e)  # the load's own writes stop too
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


def _same_error(e: BaseException) -> BaseException:
    """A new exception like ``e`` (same class and message), to raise in another thread."""
    try:
        return type(e)(*e.args)
    except Exception:
        return RemoteError(str(e))


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

_finishing: set[threading.Thread] = set()  # cache entries being synced and promoted
_finishing_lock = threading.Lock()


def wait_for_cache(timeout: Optional[float] = None) -> bool:
    """Wait until the cache entries of this process's remote loads are synced and promoted.

    A streamed remote load returns when its tensors are loaded; its cache entry is finished by a
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


def fetch(url: str, *, options: Optional[RemoteOptions] = None, directory: Any = None,
          num_threads: int = 16, quiet: Optional[bool] = None) -> Path:
    """The local cache entry of the checkpoint at ``url``, downloading what is missing.

    Example::

        path = fetch("s3://models/llama-8b.sllm")     # then load_state_dict(path)
    """
    from tqdm.auto import tqdm

    from sllm_store.writer import default_quiet

    with Download(url, options, directory, max_gets=num_threads).open() as d:
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
            for n in parallel_map(lambda fc: len(memoryview(d.chunk(*fc))), todo, 2 * num_threads,
                                  "sllm-fetch"):
                bar.update(n)
        final = d.finish()
    assert final is not None
    dt = time.perf_counter() - t0
    logger.info("%s: downloaded %s in %.2f s (%.2f GB/s) into %s", url, format_size(d.bytes_downloaded),
                dt, d.bytes_downloaded / dt / 1e9 if dt > 0 else 0, final)
    return final


def model_files(url: str, dest: Path, options: Optional[RemoteOptions] = None) -> tuple[Path, Index, bool]:
    """What ``load_model`` needs before the weights: ``(root, index, cached)``. ``root`` holds the
    model's config files: the complete cache entry (``cached`` True), else ``dest``, into which
    they are downloaded (with the remote index), so that the weights can stream from ``url``
    while the model is built."""
    d = Download(url, options)
    cached = d.lookup()
    if cached is not None:
        from sllm_store.index import read_index

        return cached, read_index(cached), True
    dest.mkdir(parents=True, exist_ok=True)
    try:
        index = parse_index(json.loads(d.index_bytes), dest)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RemoteError(f"'{d.url}/{INDEX_FILE}' is not valid JSON: {e}") from None
    _fetch_small_files(d.store, d.url, index, dest)
    return dest, index, False


def _fetch_small_files(store: Any, url: str, index: Index, dest: Path) -> None:
    """Copy the model's other top-level files (config.json, tokenizer...) next to the data."""
    import obstore

    weights = {f.name for f in index.files} | {INDEX_FILE}
    try:
        listing = obstore.list_with_delimiter(store)
    except Exception:  # e.g. plain HTTP servers cannot list: weights only
        logger.debug("%s: cannot list; fetching weights only", url)
        return
    for obj in listing.get("objects", []):
        key = obj["path"].rsplit("/", 1)[-1]
        if key in weights or obj["size"] > SMALL_FILE_LIMIT or key.startswith("."):
            continue
        try:
            content = bytes(obstore.get(store, key).bytes())
        except Exception as e:
            raise remote_error(e, f"{url}/{key}", "downloading") from None
        try:
            (dest / key).write_bytes(content)
        except OSError as e:
            raise CacheError(f"cannot write '{dest / key}': {e.strerror or e}") from None


def entries(directory: Any = None) -> list[CacheEntry]:
    """Complete cache entries, most recently used first."""
    root = cache_dir(directory)
    out = []
    for p in root.iterdir():
        if p.name.startswith(".") or not (p / INDEX_FILE).is_file():
            continue
        try:
            url = json.loads((p / "source.json").read_text())["url"]
        except (OSError, ValueError, KeyError):
            url = "?"
        size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        out.append(CacheEntry(p.name, url, size, p.stat().st_mtime, p))
    return sorted(out, key=lambda e: -e.last_used)


@dataclass
class PartialDownload:
    name: str
    url: str
    written: int  # bytes on disk so far (the files are sparse until filled)
    size: int  # bytes when complete
    active: bool  # a process is downloading it now (else it resumes on the next load)
    path: Path


def partials(directory: Any = None) -> list[PartialDownload]:
    """Unfinished downloads: in progress, or interrupted (the next load resumes them)."""
    root = cache_dir(directory) / PARTIAL
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if not p.is_dir():
            continue
        try:
            source = json.loads((p / "source.json").read_text())
            url, cs = source["url"], int(source.get("chunk_size", 0))
        except (OSError, ValueError, KeyError, TypeError):
            url, cs = "?", 0
        data = [f for f in p.iterdir() if f.is_file() and f.suffix not in (".done", ".json")]
        size = sum(f.stat().st_size for f in data)
        written = sum(_recorded_bytes(f, cs) for f in data)
        out.append(PartialDownload(p.name, url, written, size, _downloading(p), p))
    return out


def _recorded_bytes(data_file: Path, chunk_size: int) -> int:
    """Bytes of a partial data file recorded as downloaded (its ``.done`` chunk numbers); without
    a known chunk size, the blocks it occupies (files are preallocated, so this may say more)."""
    size = data_file.stat().st_size
    if chunk_size <= 0:
        return min(data_file.stat().st_blocks * 512, size)
    try:
        marks = data_file.with_name(data_file.name + ".done").read_text(errors="replace").split()
    except FileNotFoundError:
        return 0
    chunks = {int(x) for x in marks if x.isdigit() and int(x) * chunk_size < size}
    return sum(min(chunk_size, size - c * chunk_size) for c in chunks)


def remove(name_or_url: str, directory: Any = None) -> list[str]:
    """Remove the entries with this name or URL (and unfinished downloads of it)."""
    removed = []
    for e in entries(directory):
        if name_or_url in (e.name, e.url, e.url.rstrip("/")):
            shutil.rmtree(e.path)
            removed.append(e.name)
    partial = cache_dir(directory) / PARTIAL
    if partial.is_dir():
        for p in partial.iterdir():
            try:
                url = json.loads((p / "source.json").read_text())["url"]
            except (OSError, ValueError, KeyError):
                url = ""
            if name_or_url in (p.name, url) and p.is_dir():
                with _download_lock(p) as free:
                    if not free:
                        logger.warning("cache: %s is being downloaded by another process; left in place",
                                       p.name)
                        continue
                    shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name + " (partial)")
    return removed


@contextlib.contextmanager
def _download_lock(partial: Path) -> Iterator[bool]:
    """Try the download lock of a partial entry without waiting: yields whether it is held now
    (False: a process is downloading it), and keeps it for the ``with`` block."""
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


def _downloading(partial: Path) -> bool:
    """Whether a process holds the download lock of this partial entry."""
    with _download_lock(partial) as free:
        return not free


def _age(t: float) -> str:
    s = max(0.0, time.time() - t)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _touch_entry(final: Path) -> bool:
    """Mark a complete entry as just used (for LRU); False if there is none (or it was just
    evicted by another process)."""
    if not (final / INDEX_FILE).is_file():
        return False
    try:
        os.utime(final)
    except FileNotFoundError:
        return False
    return True


def prune(limit: int, directory: Any = None, keep: str = "") -> list[str]:
    """Evict least recently used entries until the cache is at most ``limit`` bytes."""
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


def upload(local: str | os.PathLike[str], url: str, *, options: Optional[RemoteOptions] = None,
           quiet: Optional[bool] = None, max_concurrency: int = 16) -> int:
    """Upload a converted checkpoint directory to ``url`` (multipart, parallel); the index goes
    last, so a reader never sees a partial checkpoint. Returns the bytes uploaded.

    Example::

        upload("llama-8b.sllm", "s3://models/llama-8b.sllm")
    """
    from tqdm.auto import tqdm

    from sllm_store.index import read_index
    from sllm_store.writer import default_quiet

    src = Path(local)
    read_index(src)  # a valid checkpoint only
    store = open_store(url, options)
    import obstore
    files = sorted((p for p in src.rglob("*") if p.is_file() and p.name != INDEX_FILE), key=lambda p: str(p))
    files.append(src / INDEX_FILE)
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="uploading",
              disable=default_quiet() if quiet is None else quiet, dynamic_ncols=True) as bar:
        for p in files:
            key = p.relative_to(src).as_posix()
            try:
                obstore.put(store, key, p, chunk_size=32 << 20, max_concurrency=max_concurrency)
            except Exception as e:
                raise remote_error(e, f"{url.rstrip('/')}/{key}", "uploading") from None
            bar.update(p.stat().st_size)
    return total
