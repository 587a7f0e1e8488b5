"""Small operating-system and threading helpers shared by the library, CLI, tests and benchmarks."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar, Union

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


def evict_page_cache(path: Union[str, os.PathLike[str]]) -> int:
    """Drop the page-cache pages of a file, or of every file under a directory.

    Uses ``posix_fadvise(POSIX_FADV_DONTNEED)``, which works without privileges on clean pages.
    Returns the number of bytes covered. Used to measure cold loads.
    """
    p = Path(path)
    files = [p] if p.is_file() else [f for f in sorted(p.rglob("*")) if f.is_file()]
    total = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(f, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def page_cache_fraction(paths: Sequence[Union[str, os.PathLike[str]]]) -> Optional[float]:
    """Fraction (0..1) of the files' pages that are in the page cache; None if unknown."""
    from sllm_store.native import _C

    value = _C.page_cache_fraction([os.fspath(p) for p in paths])
    return None if value < 0 else value


def parallel_map(fn: Callable[[T], R], items: Iterable[T], num_threads: int,
                 name: str = "sllm") -> Iterator[R]:
    """``fn`` over ``items`` on ``num_threads`` threads, results in order. Stops early: when ``fn``
    raises (or the caller stops iterating, or is interrupted), the items not started yet are
    cancelled, the running ones are waited for, and the first error is raised. (A plain
    ``ThreadPoolExecutor.map`` would run every remaining item first.)

    Example::

        for data in parallel_map(download, chunks, 16):
            bar.update(len(data))
    """
    ex = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix=name)
    try:
        futures = [ex.submit(fn, x) for x in items]
        for f in futures:
            yield f.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
