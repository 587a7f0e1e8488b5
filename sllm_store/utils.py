"""Small operating-system helpers shared by the CLI, tests and benchmarks."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

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


def drop_all_caches() -> bool:
    """``echo 3 > /proc/sys/vm/drop_caches`` when permitted (root); True if it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def page_cache_fraction(paths: Sequence[Union[str, os.PathLike[str]]]) -> Optional[float]:
    """Fraction (0..1) of the files' pages that are in the page cache; None if unknown."""
    from sllm_store import _C

    value = _C.page_cache_fraction([os.fspath(p) for p in paths])
    return None if value < 0 else value
