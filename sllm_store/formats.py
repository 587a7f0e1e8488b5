"""Checkpoint formats: our format, or plain safetensors read through the same pipeline.

:func:`open_index` returns an :class:`~sllm_store.index.Index` either way. For safetensors
(a ``.safetensors`` file, or a model directory with ``model.safetensors`` or sharded safetensors)
the index is synthesized from the files' headers: no checksums, tensors at their native offsets.
The converted format stays the fast path (aligned tensors, O_DIRECT-sized files, checksums).
"""

from __future__ import annotations

import bisect
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sllm_store.dtypes import NAME_TO_DTYPE
from sllm_store.errors import ConvertError, FormatError, MissingFileError
from sllm_store.index import (
    DEFAULT_CHUNK_SIZE,
    DataFile,
    Index,
    PathLike,
    TensorEntry,
    is_converted,
    open_regular,
    read_index,
    read_regular,
    strict_json,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SERVERLESSLLM_INDEX = "tensor_index.json"
_PARTITION = re.compile(r"tensor\.data_(0|[1-9][0-9]*)")

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64", "C128": "complex128",
}


def safetensors_header(path: Path, error: type[Exception] = ConvertError) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset where the data section starts) of a safetensors file."""
    fd = open_regular(path, error, f"safetensors file '{path}'")
    try:
        head = os.pread(fd, 8, 0)
        if len(head) != 8:
            raise error(f"'{path}' is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise error(f"'{path}' is not a safetensors file (header length {n})")
        raw = os.pread(fd, n, 8)
    except OSError as e:
        raise error(f"cannot read safetensors header of '{path}': {e.strerror or e}") from None
    finally:
        os.close(fd)
    header = strict_json(raw, f"the safetensors header of '{path}'", error)
    if not isinstance(header, dict):
        raise error(f"'{path}' has a malformed safetensors header")
    return header, 8 + n


@dataclass(frozen=True)
class SafetensorsEntry:
    name: str
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int


def safetensors_entries(header: dict[str, Any], path: Path, data_size: int,
                        error: type[Exception] = ConvertError) -> list[SafetensorsEntry]:
    """The tensors of a safetensors header (without ``__metadata__``), checked and in file order:
    known dtype, a shape of non-negative ints, integer offsets with ``0 <= begin <= end <=
    data_size`` that match the shape, and no two tensors overlapping. Raises ``error`` naming the
    file and tensor otherwise."""
    out: list[SafetensorsEntry] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"'{path}': tensor {name!r}"
        if not isinstance(info, dict):
            raise error(f"{where}: its header entry is not an object")
        st_dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if st_dtype not in SAFETENSORS_DTYPES or not hasattr(torch, SAFETENSORS_DTYPES[st_dtype]):
            raise error(f"{where} has an unsupported dtype {st_dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise error(f"{where} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise error(f"{where} has invalid data_offsets {offsets!r} (data section: {data_size} bytes)")
        dtype = SAFETENSORS_DTYPES[st_dtype]
        if offsets[1] - offsets[0] != math.prod(shape) * getattr(torch, dtype).itemsize:
            raise error(f"{where}: data_offsets {offsets} do not hold shape {shape} of {st_dtype}")
        out.append(SafetensorsEntry(name, dtype, tuple(shape), offsets[0], offsets[1]))
    out.sort(key=lambda e: (e.begin, e.end))
    for a, b in zip(out, out[1:]):
        if b.begin < a.end:
            raise error(f"'{path}': tensors {a.name!r} and {b.name!r} overlap")
    return out


def shards_from_index(directory: Path, index_name: str) -> list[Path]:
    """The shard files named by a Hugging Face shard index (``*.index.json`` with a weight_map)."""
    ipath = directory / index_name
    try:
        weight_map = strict_json(ipath.read_bytes(), f"shard index '{ipath}'", ConvertError)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, KeyError, TypeError, AttributeError) as e:
        raise ConvertError(f"cannot read shard index '{ipath}': {e}") from None
    if not all(isinstance(n, str) and n and "/" not in n and "\x00" not in n for n in names):
        raise ConvertError(f"shard index '{ipath}' names files outside its directory")
    shards = [directory / n for n in names]
    odd = [str(p) for p in shards if p.exists() and not p.is_file()]
    if odd:
        raise FormatError(f"shards listed in '{ipath}' are not a regular file: {', '.join(odd)}")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise MissingFileError(f"shards listed in '{ipath}' are missing: {', '.join(missing)}")
    return shards


def safetensors_shards(directory: Path) -> list[Path]:
    """The safetensors weight files of a model directory (empty list if it has none)."""
    if (directory / SAFETENSORS_INDEX).is_file():
        return shards_from_index(directory, SAFETENSORS_INDEX)
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    return sorted(directory.glob("*.safetensors"))


def _safetensors_index(root: Path, shards: list[Path]) -> Index:
    files: list[DataFile] = []
    tensors: dict[str, TensorEntry] = {}
    for f_i, shard in enumerate(shards):
        header, start = safetensors_header(shard, FormatError)
        size = shard.stat().st_size
        for e in safetensors_entries(header, shard, size - start, FormatError):
            if e.name in tensors:
                raise FormatError(f"tensor {e.name!r} is in both '{shards[tensors[e.name].file]}' "
                                  f"and '{shard}'")
            tensors[e.name] = TensorEntry(e.name, e.dtype, e.shape, f_i, start + e.begin, e.end - e.begin)
        files.append(DataFile(shard.name, size, ()))
    return Index(
        path=root, version=1, chunk_size=DEFAULT_CHUNK_SIZE, alignment=1,
        tensor_alignment=1, files=files, tensors=tensors,
        source={"format": "safetensors", "name": root.name, "metadata": {}},
    )


def is_serverlessllm(path: PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory in ServerlessLLM's layout (``tensor_index.json``
    and ``tensor.data_N`` partitions; a ``rank_N`` directory of its vLLM saves is one too)."""
    p = Path(path)
    return p.is_dir() and (p / SERVERLESSLLM_INDEX).is_file() and not is_converted(p)


def serverlessllm_partitions(root: Path) -> list[Path]:
    """The data partitions ``tensor.data_0``, ``tensor.data_1``, ... in order (numbered from 0
    without gaps: a gap is a missing partition, FormatError)."""
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _PARTITION.fullmatch(p.name)))
    if [n for n, _ in found] != list(range(len(found))):
        raise MissingFileError(f"'{root}': ServerlessLLM data partitions are missing (found "
                               f"{', '.join(p.name for _, p in found) or 'none'})")
    return [p for _, p in found]


def describing_files(path: Path) -> list[Path]:
    """The files whose contents define a checkpoint's index (to tell when it changed)."""
    if is_converted(path):
        return [path / "sllm_index.json"]
    if is_serverlessllm(path):
        return [path / SERVERLESSLLM_INDEX, *serverlessllm_partitions(path)]
    return safetensors_shards(path)


def _serverlessllm_index(root: Path) -> Index:
    """The index of a ServerlessLLM checkpoint: ``tensor_index.json`` maps each name to
    ``[offset, size, shape, stride, dtype]``, ``offset`` into the concatenation of the data
    partitions and ``size`` the bytes of the tensor's whole storage; a tensor is the strided view
    ``(shape, stride)`` at its storage's start. Names that share a storage and its view become
    aliases; other views of a shared storage are tensors of their own over the same bytes."""
    ipath = root / SERVERLESSLLM_INDEX
    raw = strict_json(read_regular(ipath, FormatError), f"ServerlessLLM index '{ipath}'")
    if not isinstance(raw, dict):
        raise FormatError(f"'{ipath}' must hold a JSON object of tensor name -> [offset, size, shape, "
                          "stride, dtype]")
    parts = serverlessllm_partitions(root)
    sizes = [p.stat().st_size for p in parts]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    tensors: dict[str, TensorEntry] = {}
    views: dict[tuple[int, str, tuple[int, ...], tuple[int, ...]], str] = {}  # first name of each view
    for name, entry in raw.items():
        offset, size, shape, stride, dtype = _serverlessllm_entry(ipath, name, entry)
        extent = _extent(shape, stride, dtype.itemsize)
        if extent > size:
            raise FormatError(f"'{ipath}': tensor {name!r} (shape {list(shape)}, stride {list(stride)}) "
                              f"reaches past its storage of {size} bytes")
        f_i = max(bisect.bisect_right(starts, offset) - 1, 0)
        local = offset - starts[f_i] if parts else offset
        if not parts or local + extent > sizes[f_i]:
            raise FormatError(f"'{ipath}': tensor {name!r} at offset {offset} (+{extent} bytes) lies past "
                              f"the end of its data partition" + (f" '{parts[f_i].name}'" if parts else
                                                                   "s (there are none)"))
        key = (offset, str(dtype), shape, stride)
        if key in views:
            tensors[name] = TensorEntry(name, "", (), -1, 0, 0, alias_of=views[key])
            continue
        views[key] = name
        contiguous = extent == math.prod(shape) * dtype.itemsize and _is_contiguous(shape, stride)
        tensors[name] = TensorEntry(name, str(dtype).removeprefix("torch."), shape, f_i, local, extent,
                                    strides=None if contiguous else stride)
    files = [DataFile(p.name, size, ()) for p, size in zip(parts, sizes)]
    return Index(path=root, version=1, chunk_size=DEFAULT_CHUNK_SIZE, alignment=1, tensor_alignment=1,
                 files=files, tensors=tensors,
                 source={"format": "serverlessllm", "name": root.name, "metadata": {}})


def _serverlessllm_entry(ipath: Path, name: str, entry: Any) -> tuple[int, int, tuple[int, ...],
                                                                       tuple[int, ...], torch.dtype]:
    """One ``[offset, size, shape, stride, dtype]`` entry, checked."""
    where = f"'{ipath}': tensor {name!r}"
    if not isinstance(entry, list) or len(entry) != 5:
        raise FormatError(f"{where}: expected [offset, size, shape, stride, dtype], got {str(entry)[:80]}")
    offset, size, shape, stride, dtype_name = entry
    if type(offset) is not int or type(size) is not int or offset < 0 or size < 0:
        raise FormatError(f"{where}: offset and size must be non-negative integers, got {offset!r}, {size!r}")
    for what, dims in (("shape", shape), ("stride", stride)):
        if not isinstance(dims, list) or not all(type(d) is int and d >= 0 for d in dims):
            raise FormatError(f"{where}: invalid {what} {dims!r}")
    if len(stride) != len(shape):
        raise FormatError(f"{where}: stride {stride} does not match shape {shape}")
    known = isinstance(dtype_name, str) and dtype_name.startswith("torch.")
    dtype = NAME_TO_DTYPE.get(dtype_name.removeprefix("torch.")) if known else None
    if dtype is None:
        raise FormatError(f"{where}: unknown dtype {dtype_name!r}")
    return offset, size, tuple(shape), tuple(stride), dtype


def _extent(shape: tuple[int, ...], stride: tuple[int, ...], itemsize: int) -> int:
    """Bytes from the start of a strided view to past its last element (0 when it is empty)."""
    if any(d == 0 for d in shape):
        return 0
    return (sum((d - 1) * s for d, s in zip(shape, stride)) + 1) * itemsize


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    step = 1
    for d, s in zip(reversed(shape), reversed(stride)):
        if d != 1 and s != step:
            return False
        step *= d
    return True


def open_index(path: PathLike) -> Index:
    """The index of a converted checkpoint, or one synthesized for safetensors weights or a
    ServerlessLLM checkpoint.

    Raises MissingFileError when ``path`` does not exist or holds none of them.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return _safetensors_index(p.parent, [p])
    if p.is_dir() and not is_converted(p):
        if is_serverlessllm(p):
            return _serverlessllm_index(p)
        shards = safetensors_shards(p)
        if shards:
            return _safetensors_index(p, shards)
    return read_index(p)


def synthesized_index_from_json(raw: Any, root: Path) -> Index:
    """Rebuild an index that :func:`open_index` synthesized for safetensors weights or a
    ServerlessLLM checkpoint (sent as JSON by the store server): every offset and size checked
    again, no alignment or checksums expected."""
    def bad(msg: str) -> FormatError:
        return FormatError(f"{raw.get('synthesized', 'synthesized')} index from the store server: {msg}")

    try:
        files = [DataFile(str(f["name"]), int(f["size"]), ()) for f in raw["files"]]
        tensors: dict[str, TensorEntry] = {}
        for name, t in raw["tensors"].items():
            if "alias_of" in t:
                tensors[name] = TensorEntry(name, "", (), -1, 0, 0, alias_of=str(t["alias_of"]))
                continue
            dtype, shape = str(t["dtype"]), tuple(int(d) for d in t["shape"])
            file, offset, nbytes = int(t["file"]), int(t["offset"]), int(t["nbytes"])
            strides = tuple(int(d) for d in t["strides"]) if "strides" in t else None
            torch_dtype = getattr(torch, dtype, None)
            if not isinstance(torch_dtype, torch.dtype):
                raise bad(f"unknown dtype {dtype!r}")
            if strides is not None and (len(strides) != len(shape) or min(strides, default=0) < 0):
                raise bad(f"tensor {name!r} has invalid strides")
            span = (_extent(shape, strides, torch_dtype.itemsize) if strides is not None
                    else math.prod(shape) * torch_dtype.itemsize)
            if (not 0 <= file < len(files) or offset < 0 or offset + nbytes > files[file].size
                    or nbytes != span):
                raise bad(f"tensor {name!r} has inconsistent offsets")
            tensors[name] = TensorEntry(name, dtype, shape, file, offset, nbytes, strides=strides)
        for name, t in tensors.items():
            target = tensors.get(t.alias_of) if t.alias_of is not None else t
            if target is None or target.alias_of is not None:
                raise bad(f"tensor {name!r} aliases {t.alias_of!r}, which is not a stored tensor")
        chunk_size = int(raw["chunk_size"])
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
        raise bad(f"malformed ({e})") from None
    return Index(path=root, version=1, chunk_size=chunk_size, alignment=1, tensor_alignment=1,
                 files=files, tensors=tensors, source=raw.get("source") or {})
