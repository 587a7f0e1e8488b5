"""The chunk fetcher: ranged GETs of a checkpoint's chunks, decoded and verified.

A :class:`ChunkFetcher` fetches chunks of one remote checkpoint, in one of two ways:

* :meth:`~ChunkFetcher.fetch`: one ranged GET per chunk (``obstore``, the GIL released), decoded
  in C++ when the chunk is compressed (and hashed as it is decoded), handed to ``deliver`` (which
  copies it to its destinations and may return its checksum, computed in the same pass) and
  checked against its checksum. A
  plain chunk of a file written to the cache with O_DIRECT is fetched with a lead
  (:meth:`~ChunkFetcher.lead`), so that it arrives 4 KiB-aligned and is written from where it
  arrived.
* :meth:`~ChunkFetcher.fetch_into`: a plain chunk as ranged GETs of ``piece`` bytes (16 MiB by
  default), each body added to a ``_C.StagedFill`` (a load's page-locked staging blocks on their
  way to a GPU) and freed before the next GET, then checked against its checksum. A 32 MiB GET
  body is a fresh mapping, faulted in page by page; 16 MiB pieces reuse freed heap memory (glibc
  serves blocks up to 32 MiB from the heap once one that size has been freed).

At most ``max_gets`` GETs run at once, however many threads fetch: callers use about twice as many
threads, so that while some threads copy, verify and write the chunks they have, ``max_gets``
requests stay in flight. After a GET fails, no new one starts, and the others raise its error too.
:class:`Stages` adds up the thread-seconds (wall-clock and CPU) spent per stage.

Example::

    fetcher = ChunkFetcher(bucket, url, index, max_gets=24)
    data = fetcher.fetch(0, 0, deliver=lambda b: copier.copy(b, pieces))
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator, Optional

from sllm_store.errors import ChecksumError, RemoteError
from sllm_store.index import Index
from sllm_store.remote.objects import obstore_module, remote_error
from sllm_store.remote.partial import BLOCK, buffer_address

PIECE = 16 << 20  # bytes per GET of a chunk fetched into staging blocks
# Plain chunks of checkpoints with chunks at least this long are fetched so that they arrive
# block-aligned (ChunkFetcher.lead): the few KiB fetched twice are then under 0.4 % of a GET.
ALIGNED_GET_MIN = 1 << 20

Mark = tuple[float, float]


def mark() -> Mark:
    """Now, as wall-clock and this thread's CPU time (for :meth:`Stages.add`)."""
    return time.perf_counter(), time.thread_time()


class Stages:
    """Thread-seconds spent per stage of a download, of wall-clock and of CPU time: where its
    time goes (load reports). Thread-safe."""

    NAMES = ("get", "decode", "copy", "verify", "write", "read_back")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.NAMES, 0.0)
        self.cpu_seconds = dict.fromkeys(self.NAMES, 0.0)
        self._lock = threading.Lock()

    def add(self, marks: list[Mark], *stages: str) -> None:
        """Add the time between consecutive ``marks`` (from :func:`mark`, on one thread) to
        ``stages``."""
        with self._lock:
            for k, (w0, c0), (w1, c1) in zip(stages, marks, marks[1:]):
                self.seconds[k] += w1 - w0
                self.cpu_seconds[k] += c1 - c0


def is_encoded(index: Index, f_i: int, c: int) -> bool:
    """Whether chunk ``c`` of data file ``f_i`` is stored encoded (compressed or byte-grouped):
    it must be decoded."""
    chunks = index.files[f_i].chunks
    return chunks is not None and (chunks[c].codec != "none" or chunks[c].group > 1)


def same_error(e: BaseException) -> BaseException:
    """A new exception like ``e`` (same class and message), to raise in another thread."""
    try:
        return type(e)(*e.args)
    except Exception:
        return RemoteError(str(e))


class ChunkFetcher:
    """Fetches, decodes and verifies chunks of the checkpoint at ``url`` (``bucket``: its
    :func:`~sllm_store.remote.objects.open_bucket`), at most ``max_gets`` GETs at once."""

    def __init__(self, bucket: Any, url: str, index: Index, max_gets: int,
                 stages: Optional[Stages] = None) -> None:
        self.bucket = bucket
        self.url = url
        self.index = index
        self.stages = stages or Stages()
        self._slots = threading.BoundedSemaphore(max(1, max_gets))
        self._failed: Optional[BaseException] = None  # the first failed GET: no new GETs start
        self._lock = threading.Lock()
        # Where in its page the body of the next whole plain chunk's GET will start (see lead);
        # guessed from malloc at the first aligned GET, then learned from each.
        self._body_offset: Optional[int] = None
        self.bytes_downloaded = 0
        self.pieced_chunks = 0  # chunks fetched in pieces (fetch_into)
        # perf_counter() when the first GET started and the last one ended (None before): with
        # a load's own marks, its timeline
        self.gets_span: list[Optional[float]] = [None, None]

    def where(self, f_i: int, c: int) -> str:
        return f"'{self.url}/{self.index.files[f_i].name}' chunk at offset {c * self.index.chunk_size}"

    def chunk_length(self, f_i: int, c: int) -> int:
        """Decoded length of chunk ``c`` of data file ``f_i``."""
        cs = self.index.chunk_size
        return min(cs, self.index.files[f_i].size - c * cs)

    def stored_range(self, f_i: int, c: int) -> tuple[int, int]:
        """(offset, length) of the chunk as stored in its object."""
        chunks = self.index.files[f_i].chunks
        if chunks is not None:
            return chunks[c].offset, chunks[c].length
        return c * self.index.chunk_size, self.chunk_length(f_i, c)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """One of the ``max_gets`` GET slots, for one GET; after a GET has failed, its error
        instead (no new GET starts)."""
        with self._slots:
            if self._failed is not None:
                raise same_error(self._failed)
            if self.gets_span[0] is None:
                with self._lock:
                    if self.gets_span[0] is None:
                        self.gets_span[0] = time.perf_counter()
            try:
                yield
            finally:
                self.gets_span[1] = time.perf_counter()  # a float store: atomic

    def get(self, name: str, start: int, length: int) -> Any:
        """A ranged GET of object ``name`` of the checkpoint (call it in a :meth:`slot`). A
        failure is kept, so that no new GET starts and the others raise it too."""
        try:
            return obstore_module().get_range(self.bucket, name, start=start, length=length)
        except Exception as e:
            self._failed = remote_error(e, f"{self.url}/{name}", "downloading")
            raise self._failed from None

    def lead(self, offset: int) -> int:
        """Bytes to GET before a plain chunk at ``offset`` so that the chunk itself starts on a
        4 KiB boundary in the GET's buffer; 0 if that cannot help.

        An O_DIRECT write wants block-aligned memory. obstore's GET bodies come from malloc: a
        body of a whole chunk (32 MiB by default) gets a mapping of its own and starts 16 bytes
        past a page boundary (glibc), so the direct write would first copy every chunk into an
        aligned buffer, a memcpy of the whole download on the cores that the GETs and the server
        need. GETting ``4096 - 16`` bytes of the previous chunk too puts this chunk's first byte
        on a page boundary, and it is written from where it arrived. Where a body will start is
        learned from the last GET of a whole chunk (guessed from malloc before the first); a
        wrong guess costs the copy, never correctness.
        """
        if self.index.chunk_size < ALIGNED_GET_MIN:
            return 0
        if self._body_offset is None:
            from sllm_store.native import _C

            self._body_offset = _C.malloc_offset(self.index.chunk_size + BLOCK)
        lead = -self._body_offset % BLOCK
        return lead if lead <= offset else 0

    def fetch(self, f_i: int, c: int, deliver: Optional[Callable[[Any], Optional[int]]] = None,
              aligned: bool = False) -> Any:
        """Chunk ``c`` of data file ``f_i`` with one ranged GET, decoded and verified (a buffer).

        ``deliver(data)``, if given, is called with the decoded chunk before it is verified and
        may return its XXH3-64 (``_C.StagedCopier.copy`` copies it and checksums it in one pass),
        which is then checked instead of computing it again (a compressed chunk's is computed as
        it is decoded, and that one is checked). Until this returns, the delivered
        bytes are not verified: a ChecksumError means they are wrong. ``aligned``: the chunk is
        to be written with O_DIRECT, so a plain chunk is fetched with its :meth:`lead`.
        """
        from sllm_store.native import _C

        f, cs = self.index.files[f_i], self.index.chunk_size
        off, length = self.stored_range(f_i, c)
        decoded = is_encoded(self.index, f_i, c)
        lead = self.lead(off) if aligned and not decoded else 0
        with self.slot():
            m0 = mark()
            data: Any = self.get(f.name, off - lead, length + lead) if length else b""
            m1 = mark()
        if len(data) != length + lead:
            raise RemoteError(f"{self.where(f_i, c)}: the object is shorter than its index says")
        if aligned and not decoded and length == cs and self._body_offset is not None:
            self._body_offset = buffer_address(data) % BLOCK  # where the next whole chunk's body starts
        if lead:
            data = memoryview(data)[lead:]
        decoded_digest = None
        if decoded:
            data, decoded_digest = self.decode(f_i, c, data)
        m2 = mark()
        digest = deliver(data) if deliver is not None else None
        m3 = mark()
        if decoded_digest is not None:
            digest = decoded_digest
        self.check(f_i, c, _C.xxh3_64(data) if digest is None and f.checksums else digest)
        self.counted(length + lead)
        self.stages.add([m0, m1, m2, m3, mark()], "get", "decode", "copy", "verify")
        return data

    def decode(self, f_i: int, c: int, data: Any) -> tuple[Any, Optional[int]]:
        """Chunk ``c`` of data file ``f_i``, fetched encoded, decoded; with its XXH3-64 when the
        index has checksums (computed as it is decoded, instead of the zstd frame's own checksum:
        the chunk's checksum is checked in its place)."""
        from sllm_store.native import _C

        _off, _len, codec, group = self.index.files[f_i].chunks[c].encoding
        try:
            if self.index.files[f_i].checksums:
                return _C.decode_chunk(data, codec, self.chunk_length(f_i, c), group, checksum=True)
            return _C.decode_chunk(data, codec, self.chunk_length(f_i, c), group), None
        except ChecksumError as e:
            raise ChecksumError(f"{self.where(f_i, c)}: the remote object is corrupted ({e}); "
                                "nothing was cached") from None

    def fetch_into(self, f_i: int, c: int, sink: Any, piece: int = PIECE) -> None:
        """Plain chunk ``c`` of data file ``f_i`` into ``sink`` (a ``_C.StagedFill``): ranged
        GETs of ``piece`` bytes, one after the other, each body added and freed before the next;
        then its checksum is checked. Each GET holds a GET slot while it runs, not while its body
        is added: so ``max_gets`` GETs stay in flight while bodies are copied."""
        name = self.index.files[f_i].name
        off, length = self.stored_range(f_i, c)
        get = (0.0, 0.0)
        with sink:
            m0 = mark()
            for start in range(off, off + length, max(1, piece)):
                n = min(piece, off + length - start)
                with self.slot():
                    g0 = mark()
                    body = self.get(name, start, n)
                    g1 = mark()
                get = (get[0] + g1[0] - g0[0], get[1] + g1[1] - g0[1])
                if len(body) != n:
                    raise RemoteError(f"{self.where(f_i, c)}: the object is shorter than its index says")
                sink.add(body)
                del body  # before the next GET: its memory is the next body's
            digest = sink.finish()
            m1 = mark()
        self.check(f_i, c, digest)
        self.counted(length, pieced=True)
        # The GETs and the copies took turns: "copy" is the rest of the time (with the waits for
        # a GET slot).
        self.stages.add([m0, (m0[0] + get[0], m0[1] + get[1]), m1], "get", "copy")

    def check(self, f_i: int, c: int, digest: Optional[int]) -> None:
        """Raise ChecksumError unless ``digest`` is the chunk's checksum (None: no checksums)."""
        checksums = self.index.files[f_i].checksums
        if checksums and digest != checksums[c]:
            raise ChecksumError(f"checksum mismatch in {self.where(f_i, c)}: the remote object is "
                                "corrupted; nothing was cached")

    def counted(self, nbytes: int, pieced: bool = False) -> None:
        with self._lock:
            self.bytes_downloaded += nbytes
            self.pieced_chunks += int(pieced)
