"""Load settings: one dataclass, filled from arguments first, then environment, then defaults.

Environment variables (all optional):

``SLLM_STORE_NUM_THREADS``   worker threads (default: CPU count, between 4 and 16)
``SLLM_STORE_IO_MODE``       ``auto`` | ``buffered`` | ``direct`` | ``mmap`` (default ``auto``:
                             O_DIRECT when the files are not in the page cache, else buffered)
``SLLM_STORE_CHUNK_SIZE``    read unit, e.g. ``16MiB`` (default: the checkpoint's chunk size)
``SLLM_STORE_VERIFY``        ``1`` to verify checksums on every load
``SLLM_STORE_STAGING_BUFFERS`` staging buffers per thread for GPU loads (default 2: one filling
                             while one is copied to the device)
``SLLM_STORE_ADDRESS``       load through this store server (``unix:///path`` or ``host:port``);
                             unset: load in this process
``SLLM_STORE_TIMEOUT``       seconds a load through a store server may take (default 600)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from sllm_store._units import SizeLike, parse_size

IO_MODES = ("auto", "buffered", "direct", "mmap")


def default_num_threads() -> int:
    # Reads are I/O bound: more threads than cores still help to keep the device queue full.
    return max(4, min(16, os.cpu_count() or 4))


# GETs in flight for a remote load when num_threads is not given. On the H100 machine (16 cores,
# SeaweedFS on loopback, 3B checkpoint) 24 beat 16 in each of 7 paired rounds, by 2-11 %, and 32
# was in between (bench_remote, runs S and T in docs/benchmarks.md); real object stores, with
# more latency per request, want at least as many.
DEFAULT_REMOTE_GETS = 24


def _env_int(name: str) -> Optional[int]:
    """An integer environment variable (None if unset or empty), or a ValueError naming it."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def env_size(name: str) -> Optional[int]:
    """A size environment variable such as ``16MiB`` (None if unset or empty), or a ValueError
    naming it."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def env_bool(name: str, default: bool = False) -> bool:
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off (unset or empty: ``default``)."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {value!r}")


@dataclass(frozen=True)
class LoadConfig:
    """Settings of one load. Build it with :meth:`resolve`."""

    num_threads: int
    io_mode: str
    chunk_size: Optional[int]
    verify: bool
    staging_buffers: int = 2
    store: Optional[str] = None
    remote: Any = None  # sllm_store.remote.RemoteOptions for s3:// / https:// paths
    remote_gets: int = DEFAULT_REMOTE_GETS  # GETs in flight for URLs: num_threads if given

    @classmethod
    def resolve(
        cls,
        *,
        num_threads: Optional[int] = None,
        io_mode: Optional[str] = None,
        chunk_size: Optional[SizeLike] = None,
        verify: Optional[bool] = None,
        store: Optional[str] = None,
        remote: Any = None,
    ) -> LoadConfig:
        env = os.environ
        if num_threads is None:
            num_threads = _env_int("SLLM_STORE_NUM_THREADS")
        if io_mode is None:
            io_mode = (env.get("SLLM_STORE_IO_MODE") or "auto").strip().lower()
            if io_mode not in IO_MODES:
                raise ValueError(f"io_mode (env SLLM_STORE_IO_MODE) must be one of {IO_MODES}, "
                                 f"got {io_mode!r}")
        if chunk_size is None:
            chunk_size = env_size("SLLM_STORE_CHUNK_SIZE")
        if verify is None:
            verify = env_bool("SLLM_STORE_VERIFY")
        threads = default_num_threads() if num_threads is None else int(num_threads)
        if threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {threads}")
        if io_mode not in IO_MODES:
            raise ValueError(f"io_mode must be one of {IO_MODES}, got {io_mode!r}")
        size = None if chunk_size is None else parse_size(chunk_size)
        if size is not None and (size <= 0 or size % 4096):
            hint = " (K/M/G are powers of 1000: use KiB/MiB/GiB)" if size > 0 else ""
            raise ValueError(f"chunk_size must be a positive multiple of 4096, got {size}{hint}")
        staging = _env_int("SLLM_STORE_STAGING_BUFFERS") or 2
        if staging < 1:
            raise ValueError(f"SLLM_STORE_STAGING_BUFFERS must be >= 1, got {staging}")
        if store is None:
            store = env.get("SLLM_STORE_ADDRESS") or None
        return cls(num_threads=threads, io_mode=io_mode, chunk_size=size, verify=bool(verify),
                   staging_buffers=staging, store=store or None, remote=remote,
                   remote_gets=DEFAULT_REMOTE_GETS if num_threads is None else threads)

    def io_mode_for(self, files: list[str], compressed: bool = False) -> str:
        """The read mode to use for ``files``: ``auto`` picks by page-cache residency.

        Measured on the H100 machine (docs/benchmarks.md): from a cold disk O_DIRECT reads are
        as fast as or faster than buffered ones (GPU path 1.69 vs 1.48 GB/s), while from the page
        cache buffered reads run at tens of GB/s and O_DIRECT goes back to the disk. So: buffered
        when at least half of the files' pages are cached, O_DIRECT otherwise.

        Compressed checkpoints are always read buffered: their variable-length stored chunks
        loaded cold at 1.99 GB/s buffered against 1.47 GB/s with O_DIRECT (8B bf16, run K).
        """
        if self.io_mode != "auto":
            return self.io_mode
        if compressed:
            return "buffered"
        from sllm_store.utils import page_cache_fraction

        fraction = page_cache_fraction(files)
        return "buffered" if fraction is None or fraction >= 0.5 else "direct"
