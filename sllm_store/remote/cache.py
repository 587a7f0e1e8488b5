"""The local cache of remote checkpoints: download once, load from disk afterwards.

An entry is a complete checkpoint directory named after the URL and the content of its index
(``<url hash>-<index hash>``), so a changed remote checkpoint is a new entry. A download goes
into ``.partial/<entry>``: data files are preallocated and filled by parallel ranged GETs (one per
chunk, stored chunks for compressed files), each chunk checked against its checksum before it is
recorded as done in ``<file>.done``. An interrupted download resumes from those records; a chunk
that fails its checksum is never recorded, and the entry is renamed into place only when every
chunk is present and verified. Entries are evicted least recently used first when the cache grows
past its size limit.

Settings: ``SLLM_STORE_CACHE_DIR`` (default ``~/.cache/sllm-store``), ``SLLM_STORE_CACHE_SIZE``
(e.g. ``200GiB``; default: no limit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sllm_store._units import format_size, parse_size
from sllm_store.errors import ChecksumError, RemoteError
from sllm_store.index import INDEX_FILE, Index, parse_index
from sllm_store.remote.objects import RemoteOptions, open_store, remote_error

logger = logging.getLogger(__name__)

PARTIAL = ".partial"
SMALL_FILE_LIMIT = 64 << 20  # non-weight files (config, tokenizer) fetched with the checkpoint


def cache_dir(path: Optional[str | os.PathLike[str]] = None) -> Path:
    d = Path(path or os.environ.get("SLLM_STORE_CACHE_DIR") or Path.home() / ".cache" / "sllm-store")
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_limit() -> Optional[int]:
    v = os.environ.get("SLLM_STORE_CACHE_SIZE")
    return parse_size(v) if v else None


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


def _units(index: Index) -> list[tuple[int, int, int, int, Optional[int]]]:
    """(file, chunk, stored offset, stored length, checksum of the stored bytes | None) per chunk."""
    out = []
    cs = index.chunk_size
    for f_i, f in enumerate(index.files):
        n = len(f.checksums) if f.checksums else -(-f.size // cs)
        for c in range(n):
            if f.chunks is not None:
                sc = f.chunks[c]
                out.append((f_i, c, sc.offset, sc.length, None))  # checked after decoding, below
            else:
                length = min(cs, f.size - c * cs)
                out.append((f_i, c, c * cs, length, f.checksums[c] if f.checksums else None))
    return out


def fetch(url: str, *, options: Optional[RemoteOptions] = None, directory: Any = None,
          num_threads: int = 16, quiet: Optional[bool] = None) -> Path:
    """The local cache entry of the checkpoint at ``url``, downloading what is missing.

    Example::

        path = fetch("s3://models/llama-8b.sllm")     # then load_state_dict(path)
    """
    from tqdm.auto import tqdm

    from sllm_store import _C
    from sllm_store.writer import default_quiet

    root = cache_dir(directory)
    store = open_store(url, options)
    import obstore
    try:
        index_bytes = bytes(obstore.get(store, INDEX_FILE).bytes())
    except Exception as e:
        raise remote_error(e, url.rstrip("/") + "/" + INDEX_FILE, "fetching") from None
    name = _entry_name(url, index_bytes)
    final = root / name
    if (final / INDEX_FILE).is_file():
        os.utime(final)  # last use, for LRU
        logger.info("%s: cached in %s", url, final)
        return final
    partial = root / PARTIAL / name
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "source.json").write_text(json.dumps({"url": url}))
    try:
        index = parse_index(json.loads(index_bytes), partial)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RemoteError(f"'{url}/{INDEX_FILE}' is not valid JSON: {e}") from None

    # Preallocate the data files; find what an earlier attempt already has.
    done: dict[int, set[int]] = {}
    for f_i, f in enumerate(index.files):
        p = partial / f.name
        with open(p, "ab") as fh:
            if fh.tell() < f.disk_size:
                fh.truncate(f.disk_size)
        marks = partial / (f.name + ".done")
        done[f_i] = {int(x) for x in marks.read_text().split()} if marks.exists() else set()
    todo = [u for u in _units(index) if u[1] not in done[u[0]]]
    total = sum(u[3] for u in todo)
    if len(todo) < len(_units(index)):
        logger.info("%s: resuming, %d chunks (%s) left", url, len(todo), format_size(total))
    lock = threading.Lock()
    fds = {f_i: os.open(partial / f.name, os.O_WRONLY) for f_i, f in enumerate(index.files)}
    marks_fh = {f_i: open(partial / (f.name + ".done"), "a") for f_i, f in enumerate(index.files)}
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="downloading",
               disable=default_quiet() if quiet is None else quiet, dynamic_ncols=True)

    def get(unit: tuple[int, int, int, int, Optional[int]]) -> None:
        f_i, c, off, length, checksum = unit
        fname = index.files[f_i].name
        if length == 0:
            return
        try:
            data = obstore.get_range(store, fname, start=off, length=length)
        except Exception as e:
            raise remote_error(e, f"{url}/{fname}", "downloading") from None
        if len(data) != length:
            raise RemoteError(f"'{url}/{fname}' is shorter than its index says (chunk at {off})")
        if checksum is not None and _C.xxh3_64(data) != checksum:
            raise ChecksumError(f"checksum mismatch in '{url}/{fname}' chunk at offset {off}: "
                                "the remote object is corrupted; nothing was cached")
        mv = memoryview(data)
        pos = 0
        while pos < length:
            pos += os.pwrite(fds[f_i], mv[pos:], off + pos)
        with lock:
            marks_fh[f_i].write(f"{c}\n")
            marks_fh[f_i].flush()
            bar.update(length)

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="sllm-fetch") as ex:
            for _ in ex.map(get, todo):
                pass
        for fd in fds.values():
            os.fsync(fd)
    finally:
        bar.close()
        for fd in fds.values():
            os.close(fd)
        for fh in marks_fh.values():
            fh.close()
    _fetch_small_files(store, url, index, partial)
    (partial / INDEX_FILE).write_bytes(index_bytes)
    if any(f.compressed for f in index.files):
        from sllm_store.loader import verify

        try:
            verify(partial)  # compressed chunks are checked after decoding
        except ChecksumError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise ChecksumError(f"'{url}' is corrupted; nothing was cached ({e})") from None
    for f in index.files:
        (partial / (f.name + ".done")).unlink(missing_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    dt = time.perf_counter() - t0
    logger.info("%s: downloaded %s in %.2f s (%.2f GB/s) into %s", url, format_size(total), dt,
                total / dt / 1e9 if dt > 0 else 0, final)
    limit = cache_limit()
    if limit is not None:
        prune(limit, directory=root, keep=name)
    return final


def _fetch_small_files(store: Any, url: str, index: Index, dest: Path) -> None:
    """Copy the model's other top-level files (config.json, tokenizer...) next to the data."""
    import obstore

    data = {f.name for f in index.files} | {INDEX_FILE}
    try:
        listing = obstore.list_with_delimiter(store)
    except Exception:  # e.g. plain HTTP servers cannot list: weights only
        logger.debug("%s: cannot list; fetching weights only", url)
        return
    for obj in listing.get("objects", []):
        key = obj["path"].rsplit("/", 1)[-1]
        if key in data or obj["size"] > SMALL_FILE_LIMIT or key.startswith("."):
            continue
        try:
            (dest / key).write_bytes(bytes(obstore.get(store, key).bytes()))
        except Exception as e:
            raise remote_error(e, f"{url}/{key}", "downloading") from None


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
            if name_or_url in (p.name, url):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name + " (partial)")
    return removed


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
