"""Opening checkpoints for loading: our format, or plain safetensors read through the same pipeline.

:func:`open_checkpoint` returns an :class:`~sllm_store.index.Index` either way. For safetensors
(a ``.safetensors`` file, or a model directory with ``model.safetensors`` or sharded safetensors)
the index is synthesized from the files' headers: no checksums, tensors at their native offsets.
The converted format stays the fast path (aligned tensors, O_DIRECT-sized files, checksums).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from sllm_store.errors import ConvertError, FormatError, MissingFileError
from sllm_store.index import (
    DEFAULT_CHUNK_SIZE,
    DataFile,
    Index,
    PathLike,
    TensorEntry,
    is_converted,
    read_index,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64", "C128": "complex128", "F4": "float4_e2m1fn_x2",
}


def safetensors_header(path: Path, error: type[Exception] = ConvertError) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset where the data section starts) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise error(f"'{path}' is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20:
                raise error(f"'{path}' is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise MissingFileError(f"safetensors file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"cannot read safetensors header of '{path}': {e}") from None
    if not isinstance(header, dict):
        raise error(f"'{path}' has a malformed safetensors header")
    return header, 8 + n


def shards_from_index(directory: Path, index_name: str) -> list[Path]:
    """The shard files named by a Hugging Face shard index (``*.index.json`` with a weight_map)."""
    ipath = directory / index_name
    try:
        names = sorted(set(json.loads(ipath.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConvertError(f"cannot read shard index '{ipath}': {e}") from None
    shards = [directory / n for n in names]
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
        header.pop("__metadata__", None)
        size = shard.stat().st_size
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                shape = tuple(int(d) for d in info["shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"'{shard}': bad header entry for {name!r} ({e})") from None
            torch_dtype = getattr(torch, dtype, None)
            if torch_dtype is None:
                raise FormatError(f"'{shard}': dtype {dtype} is not supported by this torch")
            if end - begin != math.prod(shape) * torch_dtype.itemsize or start + end > size:
                raise FormatError(f"'{shard}': tensor {name!r} has inconsistent offsets")
            tensors[name] = TensorEntry(name, dtype, shape, f_i, start + begin, end - begin)
        files.append(DataFile(shard.name, size, ()))
    return Index(
        path=root, version=1, chunk_size=DEFAULT_CHUNK_SIZE, alignment=1,
        tensor_alignment=1, files=files, tensors=tensors,
        source={"format": "safetensors", "name": root.name, "metadata": {}},
    )


def open_checkpoint(path: PathLike) -> Index:
    """The index of a converted checkpoint, or one synthesized for safetensors weights.

    Raises MissingFileError when ``path`` does not exist or holds neither.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return _safetensors_index(p.parent, [p])
    if p.is_dir() and not is_converted(p):
        shards = safetensors_shards(p)
        if shards:
            return _safetensors_index(p, shards)
    return read_index(p)


def synthesized_index_from_json(raw: Any, root: Path) -> Index:
    """Rebuild an index that :func:`open_checkpoint` synthesized for safetensors weights (sent
    as JSON by the store server): the same checks as for safetensors headers, no alignment or
    checksums expected."""
    def bad(msg: str) -> FormatError:
        return FormatError(f"safetensors index from the store server: {msg}")

    try:
        files = [DataFile(str(f["name"]), int(f["size"]), ()) for f in raw["files"]]
        tensors: dict[str, TensorEntry] = {}
        for name, t in raw["tensors"].items():
            dtype, shape = str(t["dtype"]), tuple(int(d) for d in t["shape"])
            file, offset, nbytes = int(t["file"]), int(t["offset"]), int(t["nbytes"])
            torch_dtype = getattr(torch, dtype, None)
            if not isinstance(torch_dtype, torch.dtype):
                raise bad(f"unknown dtype {dtype!r}")
            if not 0 <= file < len(files) or offset < 0 or offset + nbytes > files[file].size \
                    or nbytes != math.prod(shape) * torch_dtype.itemsize:
                raise bad(f"tensor {name!r} has inconsistent offsets")
            tensors[name] = TensorEntry(name, dtype, shape, file, offset, nbytes)
        chunk_size = int(raw["chunk_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"malformed ({e})") from None
    return Index(path=root, version=1, chunk_size=chunk_size, alignment=1, tensor_alignment=1,
                 files=files, tensors=tensors, source=raw.get("source") or {})
