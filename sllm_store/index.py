"""The index of a converted checkpoint (``sllm_index.json``): reading, validating, writing.

The format is specified in ``docs/format.md``. Everything read from disk is validated here, so
the loader can trust offsets and sizes; each problem raises a specific :mod:`sllm_store.errors`
class naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from sllm_store.errors import FormatError, InvalidArgumentError, MissingFileError, UnsupportedVersionError

FORMAT_NAME = "sllm-store"
FORMAT_VERSION = 2  # newest version read; uncompressed checkpoints are still written as version 1
COMPRESSED_VERSION = 2  # first version with compressed data files
CODECS = {"none": 0, "zstd": 1}  # codec name -> id used by the C++ core
INDEX_FILE = "sllm_index.json"
STORED_ALIGNMENT = 4096  # stored (compressed) chunks start here, so they can be read with O_DIRECT
# Data file names that would collide with the index or the remote cache's bookkeeping files.
RESERVED_NAMES = (INDEX_FILE, "source.json")
RESERVED_SUFFIXES = (".done", ".lock")
CHECKSUM_ALGORITHM = "xxh3_64"
FILE_ALIGNMENT = 4096
DEFAULT_TENSOR_ALIGNMENT = 256
DEFAULT_CHUNK_SIZE = 32 * 1024 * 1024

PathLike = Union[str, "os.PathLike[str]"]
REMOTE_SCHEMES = ("s3://", "http://", "https://")
_HEX16 = re.compile(r"[0-9a-f]{16}")
CONTENT_HASH_PREFIX = "xxh3-64:"  # content_hash = prefix + XXH3-64 (seed 0) of the tensor's bytes
_CONTENT_HASH = re.compile(r"xxh3-64:[0-9a-f]{16}")


def content_hash_string(h: int) -> str:
    """The ``content_hash`` form of an XXH3-64 value: ``"xxh3-64:"`` + 16 lowercase hex digits."""
    return f"{CONTENT_HASH_PREFIX}{h:016x}"


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor lives. ``alias_of`` entries (tied weights) have no storage."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: int
    offset: int
    nbytes: int  # bytes from ``offset`` the tensor spans
    alias_of: str | None = None
    strides: tuple[int, ...] | None = None  # None: C-contiguous (always so in our format)
    # "xxh3-64:<16 hex>" of the ``nbytes`` bytes at ``offset``, if the index records it; a hint
    # for sharing identical tensors, never a guarantee (see docs/format.md)
    content_hash: str | None = None


@dataclass(frozen=True)
class StoredChunk:
    """Where chunk i of a compressed data file is stored: ``length`` bytes at ``offset`` (a
    multiple of the alignment), encoded with ``codec`` after byte grouping by ``group``."""

    offset: int
    length: int
    codec: str
    group: int = 1

    @property
    def encoding(self) -> tuple[int, int, int, int]:
        """(offset, length, codec id, group), as ``_C.run_load(encodings=...)`` takes it."""
        return (self.offset, self.length, CODECS[self.codec], self.group)


@dataclass(frozen=True)
class DataFile:
    name: str
    size: int  # bytes of the logical (decoded) byte stream that tensor offsets refer to
    checksums: tuple[int, ...]  # XXH3-64 of each decoded chunk
    stored_size: int | None = None  # bytes on disk, for compressed files
    chunks: tuple[StoredChunk, ...] | None = None  # for compressed files

    @property
    def compressed(self) -> bool:
        return self.chunks is not None

    @property
    def disk_size(self) -> int:
        return self.stored_size if self.stored_size is not None else self.size


@dataclass
class Index:
    """A validated index. ``tensors`` keeps storage order; aliases resolve through ``alias_of``."""

    path: Path  # directory of the converted checkpoint
    version: int
    chunk_size: int
    alignment: int
    tensor_alignment: int
    files: list[DataFile]
    tensors: dict[str, TensorEntry]
    source: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    compression: dict[str, Any] | None = None  # {"codec": "zstd", "level": 3}, if compressed
    access_order: list[str] | None = None  # stored tensors in the order a forward pass uses them

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values() if t.alias_of is None)

    @property
    def compressed(self) -> bool:
        """Whether any data file stores (possibly) compressed chunks."""
        return any(f.compressed for f in self.files)

    def file_path(self, i: int) -> Path:
        return self.path / self.files[i].name

    def resolve(self, name: str) -> TensorEntry:
        """The stored entry behind ``name`` (itself, or the tensor it aliases)."""
        entry = self.tensors[name]
        return self.tensors[entry.alias_of] if entry.alias_of is not None else entry

    def to_json(self) -> dict[str, Any]:
        tensors: dict[str, Any] = {}
        for name, t in self.tensors.items():
            if t.alias_of is not None:
                tensors[name] = {"alias_of": t.alias_of}
            else:
                tensors[name] = {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "file": t.file,
                    "offset": t.offset,
                    "nbytes": t.nbytes,
                    **({"strides": list(t.strides)} if t.strides is not None else {}),
                    **({"content_hash": t.content_hash} if t.content_hash is not None else {}),
                }
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "created_by": self.created_by,
            "checksum": CHECKSUM_ALGORITHM,
            "alignment": self.alignment,
            "tensor_alignment": self.tensor_alignment,
            "chunk_size": self.chunk_size,
            "total_bytes": self.total_bytes,
            "files": [_file_json(f) for f in self.files],
            "tensors": tensors,
            "source": self.source,
            **({"compression": self.compression} if self.compression else {}),
            **({"access_order": self.access_order} if self.access_order is not None else {}),
        }

    def ranks(self) -> dict[str, int]:
        """Each stored tensor's place in the access order (empty without one)."""
        return {name: i for i, name in enumerate(self.access_order or ())}

    def content_hashes(self) -> dict[str, str]:
        """Stored tensor name -> its ``content_hash``, for the stored tensors that have one (in
        index order; aliases have none, they resolve to their target)."""
        return {name: t.content_hash for name, t in self.tensors.items()
                if t.alias_of is None and t.content_hash is not None}


def shared_bytes(a: Index, b: Index) -> int:
    """Bytes of ``b``'s stored tensors whose (``content_hash``, ``nbytes``) also occurs in ``a``:
    what a holder of ``a``'s tensors need not copy to hold ``b``'s too, as far as the recorded
    hashes tell. Each such tensor of ``b`` counts, also when several have the same content;
    tensors without a hash count as not shared. The hashes are a hint: a holder that shares
    memory on their word must hash the bytes it actually holds (docs/format.md)."""
    have = {(t.content_hash, t.nbytes) for t in a.tensors.values()
            if t.alias_of is None and t.content_hash is not None}
    return sum(t.nbytes for t in b.tensors.values()
               if t.alias_of is None and t.content_hash is not None and (t.content_hash, t.nbytes) in have)


def _file_json(f: DataFile) -> dict[str, Any]:
    out: dict[str, Any] = {"name": f.name, "size": f.size, "checksums": [f"{c:016x}" for c in f.checksums]}
    if f.chunks is not None:
        out["stored_size"] = f.stored_size
        out["chunks"] = [{"offset": c.offset, "length": c.length, "codec": c.codec, "group": c.group}
                         for c in f.chunks]
    return out


def index_path(path: PathLike) -> Path:
    return Path(path) / INDEX_FILE


def check_path(path: Any) -> None:
    """InvalidArgumentError unless ``path`` can name a checkpoint: a str or an os.PathLike."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"a checkpoint is named by a path or URL (str or os.PathLike), "
                                   f"got {path!r}")


def is_remote(path: Any) -> bool:
    """Whether ``path`` is the URL of a remote checkpoint (``s3://``, ``http://``, ``https://``)."""
    return isinstance(path, str) and path.startswith(REMOTE_SCHEMES)


def is_converted(path: PathLike) -> bool:
    """True when ``path`` is a directory holding an sllm-store index."""
    return index_path(path).is_file()


def read_index(path: PathLike) -> Index:
    """Read and validate the index of the converted checkpoint in directory ``path``.

    >>> idx = read_index("model.sllm")          # doctest: +SKIP
    >>> idx.tensors["lm_head.weight"].dtype     # doctest: +SKIP
    'bfloat16'
    """
    root = Path(path)
    ipath = index_path(root)
    if not root.exists():
        raise MissingFileError(f"checkpoint directory '{root}' does not exist")
    if not ipath.is_file():
        raise MissingFileError(
            f"'{ipath}' not found: '{root}' is not an sllm-store checkpoint "
            f"(convert it with `sllm-store convert`)"
        )
    text = read_regular(ipath, FormatError)
    return parse_index(strict_json(text, f"'{ipath}'"), root)


def open_regular(path: Path, error: type[Exception] = FormatError, what: str = "") -> int:
    """A blocking read-only descriptor of ``path`` if it is a regular file, opened without
    blocking (a FIFO's open would wait for a writer); MissingFileError or ``error`` naming
    ``what`` (default: the path) otherwise. The caller closes it."""
    import stat

    what = what or f"'{path}'"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MissingFileError(f"{what} does not exist") from None
    except OSError as e:
        raise error(f"cannot open {what}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{what} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, error: type[Exception] = FormatError, limit: int = 1 << 30) -> bytes:
    """The bytes of ``path`` if it is a regular file (:func:`open_regular`), at most ``limit`` of
    them; ``error`` otherwise."""
    fd = open_regular(path, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"'{path}' is {size} bytes, more than an index or header may be")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read '{path}': {e.strerror or e}") from None
    finally:
        os.close(fd)


# Bytes per element of every dtype name the format knows (torch's names; parsing an index needs
# no torch: a dtype this torch build lacks is refused when the tensor is made).
ITEMSIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16, "complex64": 8,
    "complex32": 4, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4,
    "uint16": 2, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1,
    "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1, "bits8": 1, "bits16": 2,
    "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
}

MAX_INT = 2**63 - 1  # sizes, offsets and dimensions: what the core and torch can address


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def strict_json(text: Union[str, bytes], what: str, error: type[Exception] = FormatError) -> Any:
    """``json.loads`` of an index or header that refuses what Python's parser lets through: NaN and
    Infinity literals (and numbers too large for a float), a key given twice in one object (two
    tensors of one name), integers too long to convert, and nesting too deep to parse; ``error``
    naming ``what`` for each."""
    try:
        return json.loads(text, parse_constant=_no_constants, parse_float=_finite,
                          object_pairs_hook=_unique_keys)
    except RecursionError:
        raise error(f"{what} is nested too deeply to be an index") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, our hooks, long integers
        raise error(f"{what} is not valid JSON: {e}") from None


class _Checker:
    """Typed field access into a raw index, raising FormatError naming the index file."""

    def __init__(self, root: Path) -> None:
        self.where = f"'{index_path(root)}': "

    def bad(self, msg: str) -> FormatError:
        return FormatError(self.where + msg)

    def get(self, obj: dict[str, Any], key: str, kind: type | tuple[type, ...], ctx: str = "") -> Any:
        if key not in obj:
            raise self.bad(f"missing field {ctx}{key!r}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.bad(f"field {ctx}{key!r} has the wrong type ({type(value).__name__})")
        if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
            raise self.bad(f"field {ctx}{key!r} is out of range ({value})")
        return value


def parse_index(raw: Any, root: Path) -> Index:
    """The :class:`Index` of the JSON object ``raw`` (of the checkpoint at ``root``), checked
    field by field; FormatError (or UnsupportedVersionError) naming what is wrong otherwise."""
    ck = _Checker(root)
    if not isinstance(raw, dict):
        raise ck.bad("the index must be a JSON object")
    if raw.get("format") != FORMAT_NAME:
        raise ck.bad(f"not an sllm-store index (format={raw.get('format')!r})")
    version = ck.get(raw, "version", int)
    if version > FORMAT_VERSION or version < 1:
        raise UnsupportedVersionError(
            ck.where + f"format version {version} is not supported by this sllm-store "
            f"(supports version {FORMAT_VERSION}); upgrade sllm-store or re-convert"
        )
    algorithm = ck.get(raw, "checksum", str)
    if algorithm != CHECKSUM_ALGORITHM:
        raise ck.bad(f"unknown checksum algorithm {algorithm!r}")
    alignment = ck.get(raw, "alignment", int)
    tensor_alignment = ck.get(raw, "tensor_alignment", int)
    chunk_size = ck.get(raw, "chunk_size", int)
    if alignment <= 0 or alignment & (alignment - 1):
        raise ck.bad(f"alignment {alignment} is not a positive power of two")
    if tensor_alignment < 64 or tensor_alignment & (tensor_alignment - 1):
        raise ck.bad(f"tensor_alignment {tensor_alignment} is not a power of two >= 64")
    if chunk_size <= 0 or chunk_size % alignment:
        raise ck.bad(f"chunk_size {chunk_size} is not a positive multiple of {alignment}")
    files: list[DataFile] = []
    for i, f in enumerate(ck.get(raw, "files", list)):
        files.append(_parse_file(ck, i, f, files, version, alignment, chunk_size))
    raw_tensors = ck.get(raw, "tensors", dict)
    tensors = {name: _parse_tensor(ck, name, t, raw_tensors, files, tensor_alignment)
               for name, t in raw_tensors.items()}
    source = raw.get("source", {})
    compression = raw.get("compression")
    access_order = _parse_order(ck, raw, tensors)
    return Index(
        path=root,
        version=version,
        chunk_size=chunk_size,
        alignment=alignment,
        tensor_alignment=tensor_alignment,
        files=files,
        tensors=tensors,
        source=source if isinstance(source, dict) else {},
        created_by=str(raw.get("created_by", "")),
        compression=compression if isinstance(compression, dict) else None,
        access_order=access_order,
    )


def _parse_order(ck: _Checker, raw: dict[str, Any], tensors: dict[str, TensorEntry]) -> list[str] | None:
    """The optional ``access_order``: distinct names of stored tensors."""
    if "access_order" not in raw:
        return None
    order = ck.get(raw, "access_order", list)
    if not all(isinstance(n, str) for n in order) or len(set(order)) != len(order):
        raise ck.bad("access_order must list distinct tensor names")
    bad = [n for n in order if n not in tensors or tensors[n].alias_of is not None]
    if bad:
        raise ck.bad(f"access_order names {bad[0]!r}, which is not a stored tensor")
    return order


def _parse_file(ck: _Checker, i: int, f: Any, earlier: list[DataFile], version: int, alignment: int,
                chunk_size: int) -> DataFile:
    ctx = f"files[{i}]."
    if not isinstance(f, dict):
        raise ck.bad(f"files[{i}] must be an object")
    name = ck.get(f, "name", str, ctx)
    if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        raise ck.bad(f"data file name {name!r} must be a plain file name")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise ck.bad(f"data file name {name[:40]!r}... is longer than a file name may be (255 bytes)")
    if name in RESERVED_NAMES or name.endswith(RESERVED_SUFFIXES):
        raise ck.bad(f"data file name {name!r} is reserved")
    if any(name == other.name for other in earlier):
        raise ck.bad(f"data file name {name!r} is listed twice")
    size = ck.get(f, "size", int, ctx)
    if size < 0 or size % alignment:
        raise ck.bad(f"data file '{name}' size {size} is not a multiple of {alignment}")
    sums = ck.get(f, "checksums", list, ctx)
    if len(sums) != math.ceil(size / chunk_size):
        raise ck.bad(
            f"data file '{name}' has {len(sums)} checksums, expected "
            f"{math.ceil(size / chunk_size)} ({size} bytes / chunk_size {chunk_size})"
        )
    if not all(isinstance(c, str) and _HEX16.fullmatch(c) for c in sums):
        raise ck.bad(f"data file '{name}' has malformed checksums (want 16 lowercase hex digits each)")
    parsed = tuple(int(c, 16) for c in sums)
    stored: tuple[StoredChunk, ...] | None = None
    stored_size = None
    if "chunks" in f:
        if version < COMPRESSED_VERSION:
            raise ck.bad(f"data file '{name}' lists stored chunks, which version {version} does not have")
        stored_size = ck.get(f, "stored_size", int, ctx)
        if stored_size < 0 or stored_size % STORED_ALIGNMENT:
            raise ck.bad(f"data file '{name}' stored_size {stored_size} is not a multiple of "
                         f"{STORED_ALIGNMENT}")
        stored = _parse_chunks(ck.get(f, "chunks", list, ctx), name, size, stored_size, chunk_size, ck.bad)
    return DataFile(name, size, parsed, stored_size, stored)


def _parse_tensor(ck: _Checker, name: str, t: Any, raw_tensors: dict[str, Any], files: list[DataFile],
                  tensor_alignment: int) -> TensorEntry:
    ctx = f"tensors[{name!r}]."
    if not isinstance(t, dict):
        raise ck.bad(f"tensors[{name!r}] must be an object")
    if "alias_of" in t:
        target = ck.get(t, "alias_of", str, ctx)
        tt = raw_tensors.get(target)
        if not isinstance(tt, dict) or "alias_of" in tt:
            raise ck.bad(f"tensor {name!r} aliases {target!r}, which is not a stored tensor")
        return TensorEntry(name, "", (), -1, 0, 0, alias_of=target)
    dtype = ck.get(t, "dtype", str, ctx)
    if dtype not in ITEMSIZES:
        raise ck.bad(f"tensor {name!r} has unknown dtype {dtype!r}")
    shape = ck.get(t, "shape", list, ctx)
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_INT for d in shape):
        raise ck.bad(f"tensor {name!r} has an invalid shape {shape!r}")
    file = ck.get(t, "file", int, ctx)
    offset = ck.get(t, "offset", int, ctx)
    nbytes = ck.get(t, "nbytes", int, ctx)
    if not 0 <= file < len(files):
        raise ck.bad(f"tensor {name!r} refers to data file #{file}, index lists {len(files)}")
    itemsize = ITEMSIZES[dtype]
    numel = math.prod(shape)
    if nbytes != numel * itemsize:
        raise ck.bad(f"tensor {name!r}: nbytes {nbytes} != {numel} elements x {itemsize} bytes")
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_INT:  # its strides, even when empty
        raise ck.bad(f"tensor {name!r}: shape {shape} is too large to address")
    if offset < 0 or offset % tensor_alignment or offset + nbytes > files[file].size:
        raise ck.bad(
            f"tensor {name!r}: offset {offset} (+{nbytes} bytes) is misaligned or outside "
            f"data file '{files[file].name}' ({files[file].size} bytes)"
        )
    content_hash = None
    if "content_hash" in t:
        content_hash = t["content_hash"]
        if not isinstance(content_hash, str) or not _CONTENT_HASH.fullmatch(content_hash):
            raise ck.bad(f"tensor {name!r} has a malformed content_hash {repr(content_hash)[:60]} "
                         f"(want \"xxh3-64:\" and 16 lowercase hex digits)")
    return TensorEntry(name, dtype, tuple(shape), file, offset, nbytes, content_hash=content_hash)


def _parse_chunks(raw: list[Any], name: str, size: int, stored_size: int, chunk_size: int,
                  bad: Any) -> tuple[StoredChunk, ...]:
    expected = math.ceil(size / chunk_size)
    if len(raw) != expected:
        raise bad(f"data file '{name}' lists {len(raw)} stored chunks, expected {expected}")
    out: list[StoredChunk] = []
    end = 0
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise bad(f"data file '{name}' chunk {i} must be an object")
        off, length, codec, group = c.get("offset"), c.get("length"), c.get("codec"), c.get("group", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_INT
                   for v in (off, length, group)):
            raise bad(f"data file '{name}' chunk {i} has non-integer fields")
        if not isinstance(codec, str) or codec not in CODECS:
            raise bad(f"data file '{name}' chunk {i} has unknown codec {codec!r}")
        raw_len = min(chunk_size, size - i * chunk_size)
        if off % STORED_ALIGNMENT or off < end or length < 0 or off + length > stored_size:
            raise bad(f"data file '{name}' chunk {i} at {off} (+{length}) is misaligned, overlaps "
                      f"the previous one or ends past stored_size {stored_size}")
        if not 1 <= group <= 16 or (codec == "none" and (length != raw_len or group != 1)):
            raise bad(f"data file '{name}' chunk {i}: invalid group {group} or raw length {length}")
        out.append(StoredChunk(off, length, codec, group))
        end = off + length
    return tuple(out)


def check_data_files(index: Index) -> None:
    """Raise MissingFileError / TruncatedFileError unless every data file exists at full size,
    and FormatError for one that is not a regular file (a FIFO would block its reader)."""
    import stat

    from sllm_store.errors import TruncatedFileError

    for i, f in enumerate(index.files):
        p = index.file_path(i)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise MissingFileError(f"data file '{p}' listed in the index is missing") from None
        except OSError as e:
            raise FormatError(f"cannot stat data file '{p}': {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"data file '{p}' is not a regular file")
        size = st.st_size
        if size < f.disk_size:
            raise TruncatedFileError(
                f"data file '{p}' is truncated: {size} bytes, the index says {f.disk_size}"
            )


def write_index(index: Index, directory: Path) -> None:
    """Write ``index`` as ``directory/sllm_index.json`` (atomically, via a temporary file)."""
    target = directory / INDEX_FILE
    tmp = directory / (INDEX_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index.to_json(), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
