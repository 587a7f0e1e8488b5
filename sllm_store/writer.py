"""Writing checkpoints in the sllm-store format.

:func:`save_state_dict` writes an in-memory state dict; :mod:`sllm_store.converter` feeds other
checkpoint formats through the same :class:`CheckpointWriter`, one tensor at a time, so memory use
stays bounded by the largest tensor. Everything is written into a temporary directory beside the
destination and renamed into place at the end (:func:`atomic_directory`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sllm_store import __version__
from sllm_store._units import SizeLike, parse_size
from sllm_store.dtypes import dtype_name
from sllm_store.errors import (
    ConvertError,
    DestinationExistsError,
    InvalidArgumentError,
    MissingDependencyError,
    SllmStoreError,
    WriteError,
)
from sllm_store.index import (
    COMPRESSED_VERSION,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TENSOR_ALIGNMENT,
    FILE_ALIGNMENT,
    DataFile,
    Index,
    PathLike,
    TensorEntry,
    content_hash_string,
    write_index,
)

logger = logging.getLogger(__name__)

TMP_PREFIX = ".sllm-tmp-"
# Casting with dtype= applies to these (not to float8 / float4 or integer tensors).
CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Tensors of at least this many bytes are hashed (content_hash) on a helper thread while they are
# written and checksummed; smaller ones inline, where handing them over would cost more.
HASH_BESIDE_WRITE = 1 << 20


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass
class TensorSpec:
    """One tensor to write: metadata known up front, bytes fetched on demand by ``load``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    alias_of: Optional[str] = None

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def default_quiet() -> bool:
    return not sys.stderr.isatty()


@contextlib.contextmanager
def atomic_directory(dst: PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``dst``; on success rename it to ``dst``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and ``dst``
    is left as it was. An existing ``dst`` is replaced only with ``overwrite=True``.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise DestinationExistsError(
            f"destination '{dst}' already exists (pass overwrite=True / --overwrite to replace it)"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst.parent)
    tmp = dst.parent / f"{TMP_PREFIX}{dst.name}-{uuid.uuid4().hex[:8]}"
    lock = _hold_lock(tmp)  # while it is held, no other writer takes tmp for a dead one's
    tmp.mkdir()
    trash: Optional[Path] = None
    try:
        yield tmp
        if dst.exists() or dst.is_symlink():
            trash = tmp.with_name(tmp.name + "-old")
            os.replace(dst, trash)
        os.replace(tmp, dst)
    except BaseException:
        # Whenever it stopped (an error, Ctrl-C between the two renames): the old checkpoint back
        # in place, the new one's files gone.
        if trash is not None and not dst.exists() and (trash.exists() or trash.is_symlink()):
            os.replace(trash, dst)
        shutil.rmtree(tmp, ignore_errors=True)
        _release_lock(tmp, lock)
        error = sys.exc_info()[1]
        if isinstance(error, OSError) and not isinstance(error, SllmStoreError):
            raise WriteError(f"cannot write '{dst}': {error.strerror or error}") from error
        raise
    _fsync_dir(dst.parent)
    if trash is not None:  # the new checkpoint is in place: removing the old one is best effort
        try:
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink()
        except OSError as e:
            logger.warning("could not remove the replaced checkpoint '%s': %s", trash, e)
    _release_lock(tmp, lock)


def _hold_lock(tmp: Path) -> int:
    """An exclusive flock on ``<tmp>.lock``, held while ``tmp`` is being written (a dead writer's
    lock is free: :func:`remove_stale_temporaries` then cleans its temporaries up)."""
    import fcntl

    fd = os.open(tmp.with_name(tmp.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _release_lock(tmp: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        tmp.with_name(tmp.name + ".lock").unlink()
    os.close(fd)


def remove_stale_temporaries(parent: Path) -> list[str]:
    """Remove the temporary directories that writers killed in ``parent`` left behind (their
    locks are free), putting back a checkpoint that a killed overwrite had moved aside; returns
    the names removed. A writer that is alive holds its lock, and its files stay."""
    import fcntl

    removed = []
    for lock in parent.glob(f"{TMP_PREFIX}*.lock"):
        tmp = lock.with_name(lock.name[: -len(".lock")])
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            trash = tmp.with_name(tmp.name + "-old")
            dst = parent / tmp.name[len(TMP_PREFIX):-9]  # "<name>-<8 hex>"
            if (trash.exists() or trash.is_symlink()) and not (dst.exists() or dst.is_symlink()):
                os.replace(trash, dst)  # killed between the two renames of an overwrite
            for p in (tmp, trash):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
            with contextlib.suppress(OSError):
                lock.unlink()
            removed.append(tmp.name)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d temporary director%s left by killed writers in '%s'", len(removed),
                    "y" if len(removed) == 1 else "ies", parent)
    return removed


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tensor_bytes(t: torch.Tensor) -> Any:
    """The C-contiguous bytes of ``t`` as a numpy uint8 array (no copy if already contiguous)."""
    # Conjugate and negative views are lazy: their bytes are those of the base tensor.
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.numel() == 0:
        return flat.new_empty(0, dtype=torch.uint8).numpy()
    return flat.view(torch.uint8).numpy()


def parse_compression(spec: Optional[str]) -> Optional[tuple[str, int]]:
    """``"zstd"`` / ``"zstd:LEVEL"`` -> ("zstd", level); None / "none" -> None."""
    if spec is None or spec in ("", "none"):
        return None
    codec, _, level = str(spec).partition(":")
    if codec != "zstd":
        raise InvalidArgumentError(f"unknown compression {spec!r} (supported: zstd, zstd:LEVEL)")
    try:
        lvl = int(level) if level else 1
    except ValueError:
        raise InvalidArgumentError(f"invalid zstd level in {spec!r}") from None
    if not 1 <= lvl <= 22:
        raise InvalidArgumentError(f"zstd level must be 1..22, got {lvl}")
    return codec, lvl


class _CompressingFile:
    """Writes the logical byte stream of one data file as independently compressed chunks.

    Each full chunk is byte-grouped by the element size of the floating-point dtype that fills
    most of it (if any), compressed as one zstd frame with its content checksum, and stored at the
    next 4096-aligned offset; a chunk that does not shrink is stored raw. Chunks are compressed on
    a thread pool (zstandard releases the GIL), written in order, with a bounded number in flight.
    """

    def __init__(self, f: Any, chunk_size: int, level: int, hasher: Any) -> None:
        import concurrent.futures
        import threading

        try:
            import zstandard
        except ImportError:
            raise MissingDependencyError("compression", "zstandard", "compress") from None
        self._zstd = zstandard
        self.f = f
        self.chunk_size = chunk_size
        self.level = level
        self.hasher = hasher
        self.buf = bytearray()
        self.kinds: dict[int, int] = {}  # floating element size -> bytes in the current chunk
        self.pos = 0  # stored bytes written
        self.chunks: list[Any] = []
        workers = max(1, min(16, os.cpu_count() or 1))
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sllm-zstd")
        self.pending: list[Any] = []
        self.max_pending = 2 * workers
        self.local = threading.local()

    def write(self, data: Any, itemsize: int = 1, floating: bool = False) -> None:
        mv = memoryview(data).cast("B")
        self.hasher.update(mv)
        while len(mv):
            take = min(len(mv), self.chunk_size - len(self.buf))
            self.buf += mv[:take]
            if floating and itemsize > 1:
                self.kinds[itemsize] = self.kinds.get(itemsize, 0) + take
            mv = mv[take:]
            if len(self.buf) == self.chunk_size:
                self._flush_chunk()

    def _flush_chunk(self) -> None:
        data, self.buf = bytes(self.buf), bytearray()
        group = 1
        if self.kinds:
            size, nbytes = max(self.kinds.items(), key=lambda kv: kv[1])
            if nbytes * 2 >= len(data):
                group = size
        self.kinds = {}
        self.pending.append(self.pool.submit(self._encode, data, group))
        while len(self.pending) >= self.max_pending:
            self._write_next()

    def _encode(self, data: bytes, group: int) -> tuple[bytes, str, int]:
        from sllm_store.native import _C

        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = self._zstd.ZstdCompressor(level=self.level, write_checksum=True)
        grouped = _C.group_bytes(data, group) if group > 1 else data
        out = c.compress(grouped)
        if len(out) >= len(data):
            return data, "none", 1
        return out, "zstd", group

    def _write_next(self) -> None:
        from sllm_store.index import StoredChunk

        payload, codec, group = self.pending.pop(0).result()
        pad = _align(self.pos, FILE_ALIGNMENT) - self.pos
        if pad:
            self.f.write(bytes(pad))
            self.pos += pad
        self.f.write(payload)
        self.chunks.append(StoredChunk(self.pos, len(payload), codec, group))
        self.pos += len(payload)

    def finish(self) -> tuple[int, tuple[Any, ...]]:
        """Flush everything; returns (stored size, stored chunks)."""
        try:
            if self.buf:
                self._flush_chunk()
            while self.pending:
                self._write_next()
            pad = _align(self.pos, FILE_ALIGNMENT) - self.pos
            if pad:
                self.f.write(bytes(pad))
                self.pos += pad
            return self.pos, tuple(self.chunks)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


class CheckpointWriter:
    """Lays out and writes a list of :class:`TensorSpec` into data files plus an index."""

    def __init__(
        self,
        directory: Path,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        num_files: int = 1,
        tensor_alignment: int = DEFAULT_TENSOR_ALIGNMENT,
        quiet: Optional[bool] = None,
        compress: Optional[str] = None,
    ) -> None:
        if sys.byteorder != "little":  # tensors are written as their in-memory bytes
            raise ConvertError("sllm-store checkpoints are little-endian; this host is big-endian")
        if chunk_size <= 0 or chunk_size % FILE_ALIGNMENT:
            raise InvalidArgumentError(
                f"chunk_size must be a positive multiple of {FILE_ALIGNMENT}, got {chunk_size}")
        if num_files < 1:
            raise InvalidArgumentError(f"num_files must be >= 1, got {num_files}")
        self.directory = directory
        self.chunk_size = chunk_size
        self.num_files = num_files
        self.tensor_alignment = tensor_alignment
        self.quiet = default_quiet() if quiet is None else quiet
        self.compression = parse_compression(compress)

    def _layout(self, specs: list[TensorSpec], order: Optional[list[str]]) -> list[list[TensorSpec]]:
        """Split stored tensors, in ``order`` (names; default: as given), into ``num_files`` runs
        of about equal size."""
        stored = [s for s in specs if s.alias_of is None]
        if order is not None:
            rank = {name: i for i, name in enumerate(order)}
            stored.sort(key=lambda s: rank.get(s.name, len(rank)))
        total = sum(_align(s.nbytes, self.tensor_alignment) for s in stored)
        target = total / self.num_files if total else 0
        files: list[list[TensorSpec]] = [[] for _ in range(self.num_files)]
        done = 0
        k = 0
        for s in stored:
            size = _align(s.nbytes, self.tensor_alignment)
            # Move on to the next file (once this one is not empty) when more than half of this
            # tensor would lie past this file's share: two equal tensors make two files.
            while k < self.num_files - 1 and files[k] and done + size / 2 > target * (k + 1):
                k += 1
            files[k].append(s)
            done += size
        return files

    def write(self, specs: list[TensorSpec], *, source: dict[str, Any],
              access_order: Optional[list[str]] = None) -> Index:
        """Write the tensors of ``specs``; ``access_order`` (stored tensor names, as
        :func:`sllm_store.order.resolve_order` gives them): the data is laid out in that order
        and the order recorded in the index. The index lists the tensors in the order given."""
        from tqdm.auto import tqdm

        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SllmStoreError("duplicate tensor names in the input")
        layout = self._layout(specs, access_order)
        total = sum(s.nbytes for run in layout for s in run)
        width = max(5, len(str(self.num_files - 1)))
        entries: dict[str, TensorEntry] = {}
        files: list[DataFile] = []
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
            disable=self.quiet, dynamic_ncols=True,
        ) as bar:
            for k, run in enumerate(layout):
                files.append(self._write_file(k, f"data-{k:0{width}d}.bin", run, entries, bar))

        # Index order = the caller's order, aliases included where they appeared.
        ordered: dict[str, TensorEntry] = {}
        for s in specs:
            if s.alias_of is not None:
                ordered[s.name] = TensorEntry(s.name, "", (), -1, 0, 0, alias_of=s.alias_of)
            else:
                ordered[s.name] = entries[s.name]
        index = Index(
            path=self.directory,
            version=COMPRESSED_VERSION if self.compression else 1,
            chunk_size=self.chunk_size,
            alignment=FILE_ALIGNMENT,
            tensor_alignment=self.tensor_alignment,
            files=files,
            tensors=ordered,
            source=source,
            created_by=f"sllm-store {__version__}",
            compression={"codec": self.compression[0], "level": self.compression[1]}
            if self.compression else None,
            access_order=access_order,
        )
        write_index(index, self.directory)
        return index

    def _write_file(self, k: int, fname: str, run: list[TensorSpec], entries: dict[str, TensorEntry],
                    bar: Any) -> DataFile:
        """Write data file ``k``: the tensors of ``run``, padded and checksummed (compressed if
        asked), synced; their entries go into ``entries``, each with the content hash of its
        bytes as written (before compression)."""
        import concurrent.futures

        from sllm_store.native import _C

        hasher = _C.ChunkHasher(self.chunk_size)
        pos = 0
        with open(self.directory / fname, "wb") as f, concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="sllm-hash") as hashing:
            sink: Any = None
            if self.compression:
                sink = _CompressingFile(f, self.chunk_size, self.compression[1], hasher)

            def emit(data: Any, itemsize: int = 1, floating: bool = False) -> None:
                if sink is not None:
                    sink.write(data, itemsize, floating)
                else:
                    f.write(data)
                    hasher.update(data)

            try:
                for spec in run:
                    pad = _align(pos, self.tensor_alignment) - pos
                    if pad:
                        emit(bytes(pad))
                        pos += pad
                    tensor = spec.load()
                    self._check(spec, tensor)
                    data = _tensor_bytes(tensor)
                    # xxh3_64 releases the GIL: a large tensor is hashed while it is written.
                    beside = hashing.submit(_C.xxh3_64, data) if data.nbytes >= HASH_BESIDE_WRITE else None
                    emit(data, spec.dtype.itemsize, spec.dtype.is_floating_point)
                    digest = beside.result() if beside is not None else _C.xxh3_64(data)
                    entries[spec.name] = TensorEntry(
                        spec.name, dtype_name(spec.dtype), spec.shape, k, pos, spec.nbytes,
                        content_hash=content_hash_string(digest),
                    )
                    pos += spec.nbytes
                    bar.update(spec.nbytes)
                    del tensor, data
                pad = _align(pos, FILE_ALIGNMENT) - pos
                if pad:
                    emit(bytes(pad))
                    pos += pad
                stored = sink.finish() if sink is not None else None
            except BaseException:
                if sink is not None:  # stop compressing the queued chunks
                    sink.pool.shutdown(wait=False, cancel_futures=True)
                raise
            f.flush()
            os.fsync(f.fileno())
        checksums = tuple(hasher.finish())
        if stored is not None:
            return DataFile(fname, pos, checksums, stored[0], stored[1])
        return DataFile(fname, pos, checksums)

    @staticmethod
    def _check(spec: TensorSpec, tensor: torch.Tensor) -> None:
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise SllmStoreError(
                f"tensor {spec.name!r} changed while converting: expected {spec.dtype} "
                f"{list(spec.shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )


def cast_spec(spec: TensorSpec, dtype: Optional[torch.dtype]) -> TensorSpec:
    """``spec`` with floating-point data (fp16/bf16/fp32/fp64) cast to ``dtype``."""
    if dtype is None or spec.dtype not in CASTABLE or spec.dtype == dtype:
        return spec
    load = spec.load
    return TensorSpec(spec.name, dtype, spec.shape, lambda: load().to(dtype), spec.alias_of)


def specs_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """TensorSpecs for an in-memory state dict; tensors that are the same view of the same
    storage (tied weights) become aliases of the first name that holds them."""
    specs: list[TensorSpec] = []
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise InvalidArgumentError(f"state dict keys are names (str), got {name!r} "
                                       f"({type(name).__name__})")
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"state_dict[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        if t.is_sparse or t.layout != torch.strided:
            raise InvalidArgumentError(f"state_dict[{name!r}]: only strided (dense) tensors are supported")
        if t.is_meta:
            raise InvalidArgumentError(f"state_dict[{name!r}] is on the meta device: it has no data to save")
        key = None
        if t.numel() > 0:
            key = (
                t.device, t.untyped_storage().data_ptr(), t.storage_offset(),
                tuple(t.shape), t.stride(), t.dtype, t.is_conj(), t.is_neg(),
            )
        if key is not None and key in seen:
            specs.append(TensorSpec(name, t.dtype, tuple(t.shape), lambda t=t: t, alias_of=seen[key]))
            continue
        if key is not None:
            seen[key] = name
        specs.append(TensorSpec(name, t.dtype, tuple(t.shape), lambda t=t: t.cpu()))
    return specs


def resolve_dtype(dtype: Any) -> Optional[torch.dtype]:
    """Accept a torch.dtype, a name ("bfloat16", "torch.float16", "fp16") or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
               "float": "float32"}
    name = str(dtype).removeprefix("torch.") if hasattr(str, "removeprefix") else str(dtype)
    name = aliases.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or value not in CASTABLE:
        raise InvalidArgumentError(
            f"unsupported target dtype {dtype!r} (choose float16, bfloat16, float32 or float64)"
        )
    return value


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    chunk_size: SizeLike = DEFAULT_CHUNK_SIZE,
    num_files: int = 1,
    dtype: Any = None,
    overwrite: bool = False,
    quiet: Optional[bool] = None,
    metadata: Optional[Mapping[str, str]] = None,
    compress: Optional[str] = None,
    access_order: Any = "none",
) -> Path:
    """Save ``state_dict`` as an sllm-store checkpoint directory at ``path``.

    Tensors on any device are accepted (copied to the CPU one at a time). Tied tensors (the same
    view of one storage under several names) are stored once. ``dtype`` casts floating-point
    tensors (fp16/bf16/fp32/fp64) while saving. ``compress="zstd"`` (or ``"zstd:LEVEL"``)
    compresses every chunk losslessly (needs the ``zstandard`` package; see docs/format.md).
    ``access_order``: the tensor names in the order a forward pass first uses them (data laid
    out and recorded so; see :func:`sllm_store.convert`); by default (``"none"``) the data keeps
    the dict's order and no order is recorded.

    Example::

        import torch, sllm_store
        sllm_store.save_state_dict({"w": torch.randn(4, 4)}, "/tmp/ckpt")
        sd = sllm_store.load_state_dict("/tmp/ckpt")

    Raises:
        DestinationExistsError: ``path`` exists and ``overwrite`` is false.
    """
    target = resolve_dtype(dtype)
    specs = [cast_spec(s, target) for s in specs_from_state_dict(state_dict)]
    writer = CheckpointWriter(
        Path(path), chunk_size=parse_size(chunk_size), num_files=num_files, quiet=quiet,
        compress=compress,
    )
    source = {"format": "state_dict", "name": "", "metadata": dict(metadata or {})}
    from sllm_store.order import resolve_order

    order = resolve_order(access_order, specs)
    with atomic_directory(path, overwrite) as tmp:
        writer.directory = tmp
        writer.write(specs, source=source, access_order=order)
    return Path(path)
