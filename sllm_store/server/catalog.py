"""The models under the store server's storage path: their names, indexes and versions.

A name is relative to the storage path; names that leave it (absolute, ``..``, symlinks out) and
data files linked out of it are refused (``PathEscapeError``). A model's *fingerprint* identifies
one version of its files, so that a client that described one version never gets another's bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from sllm_store.errors import ModelNotFoundError, PathEscapeError
from sllm_store.formats import (
    SERVERLESSLLM_INDEX,
    describing_files,
    is_serverlessllm,
    open_index,
    safetensors_shards,
)
from sllm_store.index import INDEX_FILE, Index, check_data_files, is_converted, read_index
from sllm_store.native import _C

logger = logging.getLogger(__name__)

SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".py", ".jinja", ".tiktoken")
SMALL_FILE_LIMIT = 32 << 20


def fingerprint(index: Index, index_json: Optional[str] = None) -> str:
    """Identifies one version of a checkpoint: its index and the identity of its data files."""
    h = (index_json or json.dumps(index.to_json())).encode()
    for i in range(len(index.files)):
        st = index.file_path(i).stat()
        # ctime too: an in-place rewrite that restores size and mtime (cp -p, touch -r) still
        # changes it.
        h += f"|{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}".encode()
    return f"{_C.xxh3_64(h):016x}"


class Catalog:
    """The models under one storage path; parsed indexes are reused while their files are unchanged."""

    def __init__(self, storage_path: str | Path) -> None:
        root = Path(storage_path)
        if not root.is_dir():
            raise ModelNotFoundError(f"storage path '{root}' is not a directory")
        self.storage = root.resolve()
        self._index_memo: dict[str, tuple[Any, Index, str]] = {}

    def resolve(self, name: str) -> tuple[str, Path]:
        """(normalized name, directory) of a model; refuses names that leave the storage path."""
        if not name or "\x00" in name:
            raise PathEscapeError(f"invalid model name {name!r}")
        p = PurePosixPath(name)
        if p.is_absolute():
            raise PathEscapeError(f"model name {name!r} is absolute; give it relative to the storage path")
        if ".." in p.parts:
            raise PathEscapeError(f"model name {name!r} leaves the storage path ('..')")
        real = (self.storage / p).resolve()
        if real != self.storage and self.storage not in real.parents:
            raise PathEscapeError(f"model name {name!r} resolves outside the storage path (symlink)")
        if not real.exists():
            raise ModelNotFoundError(f"no model {name!r} under the storage path '{self.storage}'")
        if not (is_converted(real) or is_serverlessllm(real) or (real.is_dir() and safetensors_shards(real))):
            raise ModelNotFoundError(
                f"{name!r} under '{self.storage}' is neither an sllm-store checkpoint, a safetensors "
                "model directory nor a ServerlessLLM checkpoint"
            )
        return str(p), real

    def open(self, name: str) -> tuple[str, Index, str]:
        """(name, index, fingerprint); the parsed index is reused while its file is unchanged."""
        key, index, _json, fp = self.open_json(name)
        return key, index, fp

    def open_json(self, name: str) -> tuple[str, Index, str, str]:
        """(name, index, the index as sent to clients, fingerprint), consistent with each other."""
        key, path = self.resolve(name)
        converted = is_converted(path)
        described = describing_files(path)
        sig = tuple((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    for st in (p.stat() for p in described))
        memo = self._index_memo.get(key)
        if memo is not None and memo[0] == sig:
            index, index_json = memo[1], memo[2]
        else:
            index = read_index(path) if converted else open_index(path)
            raw = index.to_json()
            if not converted:  # safetensors or ServerlessLLM: the client must not expect our
                raw["synthesized"] = index.source.get("format", "safetensors")  # alignment or checksums
            index_json = json.dumps(raw)
            self._index_memo[key] = (sig, index, index_json)
        check_data_files(index)
        for i in range(len(index.files)):  # a data file linked out of the storage path is not served
            if not index.file_path(i).resolve().is_relative_to(self.storage):
                raise PathEscapeError(f"{key!r}: data file '{index.files[i].name}' is a link out of the "
                                      "storage path; the server serves only files inside it")
        return key, index, index_json, fingerprint(index, index_json)

    def describe(self, name: str) -> tuple[str, str, dict[str, bytes]]:
        """The index as JSON, the fingerprint, and the small non-weight files (config, generation
        config...) that stay inside the storage path."""
        key, index, index_json, fp = self.open_json(name)
        data = {f.name for f in index.files} | {INDEX_FILE, SERVERLESSLLM_INDEX}
        small: dict[str, bytes] = {}
        for p in sorted(index.path.iterdir()):
            if (p.name not in data and p.suffix in SMALL_FILE_SUFFIXES and p.is_file()
                    and p.stat().st_size <= SMALL_FILE_LIMIT):
                if not p.resolve().is_relative_to(self.storage):
                    logger.warning("%s: not sending %s, a link out of the storage path", key, p.name)
                    continue
                small[p.name] = p.read_bytes()
        return index_json, fp, small
