"""The local tier: checkpoints on a local file system, read by the C++ pipeline.

Our format (a directory with ``sllm_index.json``) and plain safetensors (a ``.safetensors`` file,
or a model directory of them) open here; the C++ pipeline (``_C.run_load``) reads the data files
on worker threads into the plan's destinations, verifying checksums when asked. With
``io_mode="mmap"`` the destinations are private mappings of the data files themselves.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from sllm_store.config import LoadConfig
from sllm_store.errors import DeviceError, FormatError, InvalidArgumentError, SllmStoreError
from sllm_store.formats import open_index
from sllm_store.index import Index, PathLike, check_data_files, is_converted
from sllm_store.plan import (
    Buffer,
    Plan,
    choose_io_mode,
    destinations,
    encodings,
    map_files,
    mappable,
    mapped_plan,
    read_units,
)
from sllm_store.tiers.base import Checkpoint

logger = logging.getLogger(__name__)


class LocalCheckpoint(Checkpoint):
    """A checkpoint on a local file system (our format or safetensors)."""

    tier = "local"

    def __init__(self, path: PathLike, index: Index, config: LoadConfig) -> None:
        super().__init__(path, index, config)
        self.files = [str(index.file_path(i)) for i in range(len(index.files))]
        self.io_mode = config.io_mode  # decided by plan(), once the destinations are known
        self.may_map = True  # whether ``auto`` may map the files (a cache entry may not: it can vanish)

    def check_devices(self, devices: set[torch.device]) -> None:
        if self.config.io_mode == "mmap" and {d.type for d in devices} - {"cpu"}:
            raise InvalidArgumentError("io_mode='mmap' loads into host memory only (device='cpu')")
        super().check_devices(devices)

    def plan(self, assign: dict[str, torch.device], own_slots: bool = False) -> Plan:
        if own_slots and self.config.io_mode == "mmap":
            raise InvalidArgumentError("io_mode='mmap' makes tensors of the files; it cannot fill tensors "
                                       "that exist already")
        # Views of the files suit a whole checkpoint loaded into CPU memory.
        may_map = (self.may_map and not own_slots and all(d.type == "cpu" for d in assign.values())
                   and len(assign) == len(self.index.tensors)
                   and mappable(self.index) and _can_map(self.files))
        self.io_mode = choose_io_mode(self.config, self.files, compressed=self.index.compressed,
                                      may_map=may_map)
        if self.io_mode == "mmap":
            return mapped_plan(self.index, assign, self.config)
        return super().plan(assign, own_slots)

    def allocate(self, plan: Plan) -> list[Buffer]:
        if self.io_mode == "mmap":
            return map_files(self.index)
        return super().allocate(plan)

    def fill(self, plan: Plan, buffers: list[Buffer], progress: Any = None) -> dict[str, Any]:
        from sllm_store.native import _C

        stats = _C.run_load(
            self.files, plan.units, plan.segments, destinations(plan, buffers),
            num_threads=self.config.num_threads, io_mode=self.io_mode, verify=self.config.verify,
            buffers_per_thread=self.config.staging_buffers, encodings=encodings(self.index, plan.units),
            progress=progress,
        )
        return {**stats, "io_mode": self.io_mode, "threads": self.config.num_threads}


def _can_map(files: list[str]) -> bool:
    """Whether the file system lets these files be memory-mapped (some network and FUSE file
    systems do not); nothing is read."""
    import mmap

    from sllm_store.index import open_regular

    for f in files:
        try:
            fd = open_regular(Path(f))
        except SllmStoreError:
            return False  # the load itself reports it
        try:
            size = os.fstat(fd).st_size
            if size:
                mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ).close()
        except (OSError, ValueError):
            return False
        finally:
            os.close(fd)
    return True


class LocalTier:
    """Paths on a local file system: the tier that accepts whatever no other tier takes."""

    name = "local"

    def accepts(self, path: PathLike, config: LoadConfig) -> bool:
        return True

    def open(self, path: PathLike, config: LoadConfig) -> LocalCheckpoint:
        if sys.byteorder != "little":  # tensors are views of the stored (little-endian) bytes
            raise DeviceError("sllm-store checkpoints are little-endian; this host is big-endian")
        index = open_index(path)
        check_data_files(index)
        if is_converted(index.path) and not config.follow_links:
            _check_links(index)
        if config.verify and index.files and not any(f.checksums for f in index.files):
            logger.warning("'%s' has no checksums (not an sllm-store checkpoint): not verified", path)
        if config.io_mode == "mmap" and index.compressed:
            raise InvalidArgumentError("io_mode='mmap' cannot read a compressed checkpoint "
                             "(its chunks must be decoded)")
        return LocalCheckpoint(path, index, config)


def _check_links(index: Index) -> None:
    """A converted checkpoint's data files must be inside its directory: a link to a file
    elsewhere is refused (FormatError) unless SLLM_STORE_FOLLOW_LINKS allows it."""
    root = Path(index.path).resolve()
    for i in range(len(index.files)):
        if not index.file_path(i).resolve().is_relative_to(root):
            raise FormatError(f"data file '{index.file_path(i)}' is a link to a file outside the checkpoint "
                              f"directory ('{index.file_path(i).resolve()}'); set SLLM_STORE_FOLLOW_LINKS=1 "
                              "to load it anyway")


def verify_files(index: Index, config: LoadConfig) -> None:
    """Read every chunk of a converted checkpoint and check its checksum (no destinations)."""
    from sllm_store.native import _C

    check_data_files(index)
    units = read_units(index, index.chunk_size, verify=True)
    files = [str(index.file_path(i)) for i in range(len(index.files))]
    io_mode = "buffered" if config.io_mode == "mmap" else choose_io_mode(config, files, index.compressed)
    stats = _C.run_load(files, units, [], [], num_threads=config.num_threads, io_mode=io_mode, verify=True,
                        encodings=encodings(index, units))
    if stats["chunks_verified"] != len(units):  # pragma: no cover - defensive
        raise SllmStoreError(f"verified {stats['chunks_verified']} of {len(units)} chunks")
