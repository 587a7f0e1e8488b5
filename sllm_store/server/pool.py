"""The server's memory pool: one up-front allocation (page-locked when CUDA is usable), cut into
fixed-size blocks. Models occupy whole blocks; the cache hands blocks out and takes them back.
Not thread-safe on its own: the cache calls it under its lock.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sllm_store._units import format_size
from sllm_store.errors import InvalidArgumentError, OutOfMemoryError
from sllm_store.native import _C

logger = logging.getLogger(__name__)

_SEGMENT = 1 << 30  # pinned in parallel, 1 GiB at a time
_PART = 4 << 30  # progress is logged after each part of this size


class BlockPool:
    """``size`` bytes in blocks of ``block_size``.

    Example::

        pool = BlockPool(8 << 30, 32 << 20)
        blocks = pool.take(3)          # three block numbers, or None
        addr = pool.address(blocks[0])
        pool.give(blocks)
    """

    def __init__(self, size: int, block_size: int, *, pin: bool = True, threads: int = 8) -> None:
        if block_size <= 0 or block_size % 4096:
            raise InvalidArgumentError(f"block size must be a positive multiple of 4096, got {block_size}")
        if size < block_size:
            raise InvalidArgumentError(f"pool size {size} is smaller than one block ({block_size})")
        num_blocks = size // block_size
        per_segment = max(1, min(_SEGMENT // block_size, num_blocks))
        t0 = time.perf_counter()
        # Made in parts of a few GiB, each pinned by `threads` threads, so that progress shows.
        per_part = max(1, _PART // (per_segment * block_size)) * per_segment
        self._arenas: list[Any] = []
        self._addresses: list[int] = []
        made = 0
        while made < num_blocks:
            n = min(per_part, num_blocks - made)
            try:
                arena = _C.PinnedArena(n * block_size, min(per_segment, n) * block_size, pin, threads)
            except MemoryError as e:
                self.close()
                raise OutOfMemoryError(f"cannot allocate a {format_size(size)} memory pool: {e}") from None
            self._arenas.append(arena)
            self._addresses += [base + k * block_size for base in arena.segments
                                for k in range(min(per_segment, n))][:n]
            made += n
            if made < num_blocks:
                logger.info("memory pool: %s of %s %s (%.1f s)", format_size(made * block_size),
                            format_size(num_blocks * block_size), "pinned" if arena.pinned else "allocated",
                            time.perf_counter() - t0)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.pinned = all(bool(a.pinned) for a in self._arenas)
        self._free = list(range(num_blocks - 1, -1, -1))
        logger.info("memory pool: %s in %d blocks of %s, %s, allocated in %.2f s",
                    format_size(self.size), num_blocks, format_size(block_size),
                    "pinned" if self.pinned else "pageable (no CUDA)", time.perf_counter() - t0)

    @property
    def size(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return (self.num_blocks - len(self._free)) * self.block_size

    def blocks_for(self, nbytes: int) -> int:
        return -(-nbytes // self.block_size)

    def take(self, n: int) -> list[int] | None:
        """``n`` free blocks, or None if there are fewer."""
        if n > len(self._free):
            return None
        taken = [self._free.pop() for _ in range(n)]
        return taken

    def give(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    def address(self, block: int) -> int:
        return self._addresses[block]

    def close(self) -> None:
        """Free the memory (every block must be back)."""
        for arena in self._arenas:
            arena.release()
        self._arenas = []
        self._addresses = []
        self._free = []
