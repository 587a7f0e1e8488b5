"""Shared helpers for the sllm-store test suite (imported by conftest.py and the test modules)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import pytest
import torch

INDEX_NAME = "sllm_index.json"

# Non-weight files put into every tiny model directory (convert must copy them verbatim).
EXTRA_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 64}),
    "special_tokens_map.json": json.dumps({"bos_token": "<s>"}),
    "README.md": "# tiny llama for tests\n",
}

# Every dtype the format is meant to carry. Only the ones the installed torch knows are used.
ALL_DTYPE_NAMES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "complex32",
    "complex64",
    "complex128",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
]


def _usable(dtype: torch.dtype) -> bool:
    """True when torch can create a tensor of ``dtype`` from raw bytes and copy it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dtype is torch.bool:
                t = torch.zeros(4, dtype=torch.bool)
            else:
                t = torch.zeros(4 * dtype.itemsize, dtype=torch.uint8).view(dtype).reshape(2, 2)
            t.t().contiguous().clone()
    except Exception:
        return False
    return True


DTYPES: list[torch.dtype] = [
    getattr(torch, name) for name in ALL_DTYPE_NAMES if hasattr(torch, name) and _usable(getattr(torch, name))
]

# Plain floating dtypes (what ``dtype=`` conversion is meant to act on in a normal checkpoint).
PLAIN_FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_DTYPES = [
    d
    for d in (
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        getattr(torch, "uint16", None),
        getattr(torch, "uint32", None),
        getattr(torch, "uint64", None),
    )
    if d is not None and d in DTYPES
]


class StateDict(OrderedDict):
    """An OrderedDict whose repr lists names, dtypes and shapes only (printing float4 / float8
    tensors fails in some torch versions, and the values are noise anyway)."""

    def __repr__(self) -> str:
        items = ", ".join(
            f"{k}: {dtype_name(v.dtype)}{list(v.shape)}" if isinstance(v, torch.Tensor) else k
            for k, v in self.items()
        )
        return f"StateDict({items})"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def random_tensor(
    dtype: torch.dtype, shape: Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """A tensor of ``dtype``/``shape`` filled with random bytes (NaNs and odd bit patterns allowed).

    bool gets random 0/1 values (other bytes are not valid bools).
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, (numel,), generator=generator, dtype=torch.uint8).bool().reshape(shape)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), generator=generator, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return raw.view(dtype).reshape(shape)


def to_bytes(t: torch.Tensor) -> torch.Tensor:
    """The C-contiguous bytes of ``t`` as a flat uint8 CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return t.contiguous().reshape(-1).view(torch.uint8)


def assert_tensor_identical(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Same dtype, same shape, bit-identical contents (NaN payloads included)."""
    assert isinstance(actual, torch.Tensor), f"{name}: not a tensor: {type(actual)!r}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = to_bytes(actual), to_bytes(expected)
    if not torch.equal(a, e):
        diff = (a != e).nonzero()
        raise AssertionError(
            f"{name}: contents differ at {diff.numel()} byte(s), first byte index {int(diff[0])}"
        )


def assert_state_dict_identical(
    loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, check_order: bool = True
) -> None:
    assert isinstance(loaded, dict), type(loaded)
    if check_order:
        assert list(loaded) == list(expected)
    else:
        assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert_tensor_identical(loaded[name], tensor, name)


def read_index_json(path: os.PathLike | str) -> dict[str, Any]:
    with open(Path(path) / INDEX_NAME, encoding="utf-8") as f:
        return json.load(f)


def write_index_json(path: os.PathLike | str, index: Any) -> None:
    with open(Path(path) / INDEX_NAME, "w", encoding="utf-8") as f:
        json.dump(index, f)


def stored_tensors(index: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The non-alias entries of an index's tensor mapping."""
    return {k: v for k, v in index["tensors"].items() if "alias_of" not in v}


def file_digests(paths: Iterable[Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        out[str(p)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` keyed by relative path."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def sllm_store_root() -> str:
    """The directory from which this pytest process imports ``sllm_store``."""
    import sllm_store

    return str(Path(sllm_store.__file__).resolve().parent.parent)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    root = sllm_store_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONWARNINGS"] = "ignore"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(*args: str, timeout: float = 180, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``python -m sllm_store ARGS`` and capture its output (text)."""
    return subprocess.run(
        [sys.executable, "-m", "sllm_store", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
        **kwargs,
    )


def check_index_invariants(path) -> dict:
    """Checks the on-disk format against the contract; returns the index."""
    path = Path(path)
    index = read_index_json(path)
    assert index["format"] == "sllm-store"
    assert index["version"] == 1
    assert isinstance(index["created_by"], str) and index["created_by"].startswith("sllm-store")
    assert index["checksum"] == "xxh3_64"
    alignment, tensor_alignment = index["alignment"], index["tensor_alignment"]
    assert alignment == 4096
    assert tensor_alignment == 256
    chunk_size = index["chunk_size"]
    assert isinstance(chunk_size, int) and chunk_size > 0 and chunk_size % alignment == 0

    files = index["files"]
    assert len(files) >= 1
    for i, f in enumerate(files):
        assert f["name"] == f"data-{i:05d}.bin"
        data = (path / f["name"]).read_bytes()
        assert len(data) == f["size"]
        assert f["size"] % alignment == 0
        n_chunks = math.ceil(f["size"] / chunk_size)
        assert len(f["checksums"]) == n_chunks
        for c in f["checksums"]:
            assert isinstance(c, str) and len(c) == 16 and c == c.lower()
            int(c, 16)

    stored = stored_tensors(index)
    assert index["total_bytes"] == sum(e["nbytes"] for e in stored.values())
    per_file: dict[int, list] = {}
    for name, e in stored.items():
        dtype = getattr(torch, e["dtype"])
        assert isinstance(dtype, torch.dtype), name
        numel = math.prod(e["shape"])
        assert e["nbytes"] == numel * dtype.itemsize, name
        assert e["offset"] % tensor_alignment == 0, name
        assert 0 <= e["file"] < len(files)
        assert e["offset"] + e["nbytes"] <= files[e["file"]]["size"], name
        per_file.setdefault(e["file"], []).append((e["offset"], e["nbytes"], name))
    for name, e in index["tensors"].items():
        if "alias_of" in e:
            assert e["alias_of"] in stored, name
    # Stored tensors do not overlap, and the bytes between them (padding) are zero.
    for fi, entries in per_file.items():
        data = (path / files[fi]["name"]).read_bytes()
        entries.sort()
        pos = 0
        for off, nbytes, name in entries:
            assert off >= pos, f"{name} overlaps the previous tensor"
            assert data[pos:off].count(0) == off - pos, f"non-zero padding before {name}"
            pos = off + nbytes
        assert data[pos:].count(0) == len(data) - pos, "non-zero padding at end of file"
    return index


def check_checksums(path) -> None:
    xxhash = pytest.importorskip("xxhash")
    index = read_index_json(path)
    cs = index["chunk_size"]
    for f in index["files"]:
        data = (Path(path) / f["name"]).read_bytes()
        expect = [
            format(xxhash.xxh3_64_intdigest(data[i : i + cs], seed=0), "016x")
            for i in range(0, len(data), cs)
        ]
        assert f["checksums"] == expect, f["name"]


# Runs ``sllm-store serve ARGS`` with every copy window of the server delayed by DELAY seconds
# (argv: DELAY ARGS...), so that a test can kill a client or the server mid-load.
_SLOW_SERVE = """
import sys
from sllm_store.cli import main
from sllm_store.server.models import PooledModels

delay = float(sys.argv.pop(1))
copy = PooledModels._copy

def slow_copy(self, parts, dests, cancelled=None):
    if parts:
        self._closing.wait(delay)
    return copy(self, parts, dests, cancelled)

PooledModels._copy = slow_copy
sys.exit(main(["serve", *sys.argv[1:]]))
"""


def serve_command(*args: str, copy_delay: float = 0.0) -> list[str]:
    """The command that runs ``sllm-store serve ARGS`` in a fresh Python, its copies slowed by
    ``copy_delay`` seconds each when given."""
    if copy_delay:
        return [sys.executable, "-c", _SLOW_SERVE, str(copy_delay), *map(str, args)]
    return [sys.executable, "-m", "sllm_store", "serve", *map(str, args)]
