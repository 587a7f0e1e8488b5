"""Loading converted checkpoints: plan in Python, stream in C++.

The plan maps the index onto destination memory: one allocation per target device, every tensor a
view into it. Files whose tensors all go to one device are mapped whole (so host destinations are
filled by reads straight into them); files split over devices are mapped tensor by tensor through
staging buffers. The C++ pipeline (``sllm_store._C.run_load``) executes the plan on worker threads.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from sllm_store import _C
from sllm_store._units import SizeLike, format_size
from sllm_store.config import LoadConfig
from sllm_store.dtypes import dtype_from_name
from sllm_store.errors import DeviceError, SllmStoreError
from sllm_store.index import Index, PathLike, check_data_files, read_index
from sllm_store.sources import open_checkpoint

logger = logging.getLogger(__name__)

DeviceLike = Union[str, int, torch.device]
DeviceMap = Union[DeviceLike, Mapping[str, DeviceLike]]

_REGION_ALIGNMENT = 4096  # destination regions start on O_DIRECT-friendly boundaries


@dataclass
class LoadReport:
    """What a load did: sizes, time, and how the pipeline ran."""

    path: str
    bytes: int
    seconds: float
    devices: dict[str, int] = field(default_factory=dict)  # device -> bytes allocated
    stats: dict[str, Any] = field(default_factory=dict)  # from the C++ pipeline

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def _as_device(d: DeviceLike) -> torch.device:
    try:
        dev = torch.device(d)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"invalid device {d!r}: {e}") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


def _device_spec(dev: torch.device) -> str:
    # Host memory is one device, whatever index torch gives it ("cpu:0").
    return dev.type if dev.index is None or dev.type == "cpu" else f"{dev.type}:{dev.index}"


def _assign_devices(index: Index, device: DeviceMap) -> dict[str, torch.device]:
    """Device of every tensor name to load (aliases included). A mapping may leave tensors out:
    they are not loaded."""
    if isinstance(device, Mapping):
        unknown = set(device) - set(index.tensors)
        if unknown:
            raise KeyError(f"device map names tensors not in the checkpoint: {sorted(unknown)[:5]}")
        cache: dict[Any, torch.device] = {}
        return {n: cache.setdefault(d, _as_device(d)) for n, d in device.items()}
    dev = _as_device(device)
    return dict.fromkeys(index.tensors, dev)


def _read_units(index: Index, config: LoadConfig) -> list[tuple[int, int, int, Optional[int]]]:
    """(file, offset, length, checksum) of each read; the checkpoint's chunks unless a different
    read size was asked for (then without checksums, so not with verify)."""
    unit = config.chunk_size or index.chunk_size
    if config.verify and unit != index.chunk_size:
        raise ValueError(
            f"verify=True reads whole checksum chunks ({index.chunk_size} bytes); "
            f"do not set a different chunk_size ({unit})"
        )
    units = []
    for f_i, f in enumerate(index.files):
        u = index.chunk_size if f.compressed else unit  # compressed chunks are read whole
        for c in range(math.ceil(f.size / u)):
            off = c * u
            length = min(u, f.size - off)
            checksum = f.checksums[c] if u == index.chunk_size and f.checksums else None
            units.append((f_i, off, length, checksum))
    # Interleave files so that a multi-file checkpoint keeps every file busy from the start.
    units.sort(key=lambda u: (u[1], u[0]))
    return units


def _encodings(index: Index, units: list[tuple[int, int, int, Optional[int]]]) -> list[Any]:
    """Per read unit: None (stored raw at its offset) or (stored offset, stored length, codec id,
    group) for chunks of compressed files; [] when nothing is compressed (for _C.run_load)."""
    if not index.compressed:
        return []
    out: list[Any] = []
    for f_i, off, _length, _ in units:
        f = index.files[f_i]
        if f.chunks is None:
            out.append(None)
            continue
        if off % index.chunk_size:
            raise ValueError("compressed chunks must be read whole")
        out.append(f.chunks[off // index.chunk_size].encoding)
    return out


@dataclass
class _Plan:
    units: list[tuple[int, int, int, Optional[int]]]
    segments: list[tuple[int, int, int, int, int]]
    devices: list[torch.device]
    sizes: list[int]
    placement: dict[str, tuple[int, int]]  # stored tensor -> (device slot, byte offset)


def _make_plan(index: Index, assign: Mapping[str, torch.device], config: LoadConfig) -> _Plan:
    units = _read_units(index, config)
    devices: list[torch.device] = []
    sizes: list[int] = []

    def slot(dev: torch.device) -> int:
        if dev not in devices:
            devices.append(dev)
            sizes.append(0)
        return devices.index(dev)

    def reserve(s: int, nbytes: int, align: int) -> int:
        off = (sizes[s] + align - 1) // align * align
        sizes[s] = off + nbytes
        return off

    # Device of each stored tensor to load: its own assignment, else that of an alias of it.
    target: dict[str, torch.device] = {}
    for n, dev in assign.items():
        target.setdefault(index.resolve(n).name, assign.get(index.resolve(n).name, dev))
    by_file: dict[int, list] = {i: [] for i in range(len(index.files))}
    for t in index.tensors.values():
        if t.alias_of is None:
            by_file[t.file].append(t)
    placement: dict[str, tuple[int, int]] = {}
    file_region: dict[int, tuple[int, int]] = {}  # file -> (slot, offset) when mapped whole
    for f_i, tensors in by_file.items():
        devs = {target.get(t.name) for t in tensors}
        # Map the file whole when one device takes all of it and every tensor sits at an offset
        # its dtype can be viewed at (always so in our format; not always in safetensors).
        aligned = all(t.offset % dtype_from_name(t.dtype).itemsize == 0 for t in tensors)
        if len(devs) == 1 and None not in devs and aligned:
            s = slot(devs.pop())
            base = reserve(s, index.files[f_i].size, _REGION_ALIGNMENT)
            file_region[f_i] = (s, base)
            for t in tensors:
                placement[t.name] = (s, base + t.offset)
        else:
            by_file[f_i] = tensors = [t for t in tensors if t.name in target]
            for t in tensors:
                s = slot(target[t.name])
                # At least 256-aligned: a plain safetensors file (tensor_alignment 1) may hold a
                # tensor at an offset its dtype cannot be viewed at; its copy must be viewable.
                placement[t.name] = (s, reserve(s, t.nbytes, max(index.tensor_alignment, 256)))

    segments: list[tuple[int, int, int, int, int]] = []
    per_file_tensors = {f: sorted(ts, key=lambda t: t.offset) for f, ts in by_file.items()}
    for u_i, (f_i, off, length, _) in enumerate(units):
        if f_i in file_region:
            s, base = file_region[f_i]
            segments.append((u_i, 0, s, base + off, length))
            continue
        for t in per_file_tensors[f_i]:
            lo, hi = max(off, t.offset), min(off + length, t.offset + t.nbytes)
            if lo < hi:
                s, dst = placement[t.name]
                segments.append((u_i, lo - off, s, dst + (lo - t.offset), hi - lo))
    if not config.verify:  # a partial load skips the chunks that hold none of its tensors
        used = sorted({seg[0] for seg in segments})
        renumber = {old: new for new, old in enumerate(used)}
        units = [units[i] for i in used]
        segments = [(renumber[u], *rest) for u, *rest in segments]
    return _Plan(units, segments, devices, sizes, placement)


def _payload_bytes(index: Index, assign: dict[str, Any]) -> int:
    """Tensor bytes a load delivers: the stored tensors it assigns (an alias counts once)."""
    return sum(index.tensors[n].nbytes for n in {index.resolve(name).name for name in assign})


def _bytes_per_device(plan: _Plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for dev, size in zip(plan.devices, plan.sizes):
        out[str(dev)] = out.get(str(dev), 0) + size
    return out


def _mapped_plan(index: Index, config: LoadConfig) -> tuple[_Plan, list[tuple[torch.Tensor, int]]]:
    """Plan for io_mode='mmap': every data file is a private (copy-on-write) memory mapping and
    its tensors are views into it; the pipeline faults the pages in on its worker threads."""
    import mmap

    units = _read_units(index, config)
    buffers: list[tuple[torch.Tensor, int]] = []
    for i, f in enumerate(index.files):
        if f.size == 0:
            buffers.append((torch.empty(0, dtype=torch.uint8), 0))
            continue
        with open(index.file_path(i), "rb") as fh:
            mapping = mmap.mmap(fh.fileno(), f.size, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        buffers.append((torch.frombuffer(mapping, dtype=torch.uint8), 0))
    segments = [(u_i, 0, f_i, off, length) for u_i, (f_i, off, length, _) in enumerate(units)]
    placement = {t.name: (t.file, t.offset) for t in index.tensors.values() if t.alias_of is None}
    for t in index.tensors.values():
        if t.alias_of is None and t.offset % dtype_from_name(t.dtype).itemsize:
            raise ValueError(f"io_mode='mmap' cannot view tensor {t.name!r} ({t.dtype}) at byte offset "
                             f"{t.offset} of its file, which is not a multiple of its element size; "
                             "load it with the default io_mode (it is copied into aligned memory)")
    cpu = torch.device("cpu")
    plan = _Plan(units, segments, [cpu] * len(index.files), [f.size for f in index.files], placement)
    return plan, buffers


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _allocate(dev: torch.device, size: int) -> tuple[torch.Tensor, int]:
    """One uint8 allocation of ``size`` bytes on ``dev``; returns (tensor, aligned byte offset)."""
    pad = _REGION_ALIGNMENT if dev.type == "cpu" else 0
    try:
        buf = torch.empty(size + pad, dtype=torch.uint8, device=dev)
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - needs a GPU
        from sllm_store.errors import OutOfMemoryError

        raise OutOfMemoryError(f"cannot allocate {format_size(size)} on {dev}: {e}") from None
    except RuntimeError as e:
        from sllm_store.errors import OutOfMemoryError

        if "alloc" in str(e).lower() or "memory" in str(e).lower():
            raise OutOfMemoryError(f"cannot allocate {format_size(size)} on {dev}: {e}") from None
        raise DeviceError(f"cannot allocate memory on {dev}: {e}") from None
    shift = (-buf.data_ptr()) % _REGION_ALIGNMENT if pad else 0
    return buf, shift


def _views(index: Index, assign: Mapping[str, torch.device], plan: _Plan,
           buffers: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """The loaded tensors: views into the per-device buffers (tied names share storage)."""
    out: dict[str, torch.Tensor] = {}
    for name in assign:
        entry = index.tensors[name]
        stored = index.resolve(name)
        s, off = plan.placement[stored.name]
        buf, shift = buffers[s]
        dtype = dtype_from_name(stored.dtype)
        t = torch.empty(0, dtype=dtype, device=buf.device)
        strides = _contiguous_strides(stored.shape)
        t.set_(buf.untyped_storage(), (shift + off) // dtype.itemsize, stored.shape, strides)
        if entry.alias_of is not None and assign[name] != buf.device:
            t = t.to(assign[name])  # an alias placed on another device than its target
        out[name] = t
    return out


def _load(
    path: PathLike, device: DeviceMap, config: LoadConfig, described: Any = None
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    if config.store:
        from sllm_store.server.client import load_through_store

        return load_through_store(path, device, config, described)
    from sllm_store.remote.objects import is_remote

    if is_remote(path):
        from sllm_store.remote.stream import load_remote

        return load_remote(str(path), device, config)
    t0 = time.perf_counter()
    if sys.byteorder != "little":  # tensors are views of the stored (little-endian) bytes
        raise DeviceError("sllm-store checkpoints are little-endian; this host is big-endian")
    index = open_checkpoint(path)
    check_data_files(index)
    if config.verify and not any(f.checksums for f in index.files) and index.files:
        logger.warning("'%s' has no checksums (not an sllm-store checkpoint): not verified", path)
    assign = _assign_devices(index, device)
    if config.io_mode == "mmap" and {d.type for d in assign.values()} - {"cpu"}:
        raise ValueError("io_mode='mmap' loads into host memory only (device='cpu')")
    if config.io_mode == "mmap" and index.compressed:
        raise ValueError("io_mode='mmap' cannot read a compressed checkpoint (its chunks must be decoded)")
    for dev in set(assign.values()):
        _C.check_device(_device_spec(dev))
    files = [str(index.file_path(i)) for i in range(len(index.files))]
    io_mode = config.io_mode_for(files, compressed=index.compressed)
    if io_mode == "mmap":
        plan, buffers = _mapped_plan(index, config)
    else:
        plan = _make_plan(index, assign, config)
        buffers = [_allocate(dev, size) for dev, size in zip(plan.devices, plan.sizes)]
    dests = [
        (_device_spec(dev), buf.data_ptr() + shift, size)
        for dev, size, (buf, shift) in zip(plan.devices, plan.sizes, buffers)
    ]
    stats = _C.run_load(
        files, plan.units, plan.segments, dests,
        num_threads=config.num_threads, io_mode=io_mode, verify=config.verify,
        buffers_per_thread=config.staging_buffers, encodings=_encodings(index, plan.units),
    )
    stats["io_mode"] = io_mode

    out = _views(index, assign, plan, buffers)
    seconds = time.perf_counter() - t0
    report = LoadReport(
        path=str(path),
        bytes=_payload_bytes(index, assign),
        seconds=seconds,
        devices=_bytes_per_device(plan),
        stats=dict(stats),
    )
    logger.info(
        "loaded %s (%s) in %.3f s, %.2f GB/s", path, format_size(report.bytes), seconds,
        report.gb_per_s,
    )
    return out, report


def load_state_dict(
    path: PathLike,
    device: DeviceMap = "cpu",
    *,
    num_threads: Optional[int] = None,
    chunk_size: Optional[SizeLike] = None,
    verify: Optional[bool] = None,
    io_mode: Optional[str] = None,
    store: Optional[str] = None,
    remote: Any = None,
) -> dict[str, torch.Tensor]:
    """Load a converted checkpoint as a ``dict[str, torch.Tensor]``.

    Args:
        path: directory written by :func:`sllm_store.convert` / :func:`sllm_store.save_state_dict`;
            plain safetensors (a file, or a model directory) load too, through the same pipeline.
            An ``s3://bucket/prefix`` or ``http(s)://`` URL of a converted checkpoint streams from
            the object store (parallel ranged GETs, copied into place as they arrive) and is
            written through to the local cache (``SLLM_STORE_CACHE_DIR``); later loads of the URL
            load the cache entry.
        device: target device (``"cpu"``), or a mapping of every tensor name to a device.
        num_threads: reader threads (default: env ``SLLM_STORE_NUM_THREADS`` or the CPU count,
            clamped to 4..16); for a URL, the GETs in flight (default 24).
        chunk_size: read unit in bytes or as ``"16MiB"`` (default: the checkpoint's chunk size).
        verify: check every chunk's checksum while loading (env ``SLLM_STORE_VERIFY=1``).
        io_mode: ``"auto"`` (O_DIRECT when the files are not in the page cache, else buffered;
            env ``SLLM_STORE_IO_MODE``), ``"buffered"``, ``"direct"`` (O_DIRECT, falling back to
            buffered where the filesystem refuses it) or ``"mmap"`` (CPU only: tensors are views
            of private copy-on-write mappings of the data files, faulted in by the worker threads;
            no copy, shares the page cache; the files must not be truncated while in use).
        store: address of a store server (``sllm-store serve``), e.g. ``"unix:///run/sllm.sock"``
            (env ``SLLM_STORE_ADDRESS``). The server copies the model from its pinned-memory cache
            into this process's memory; ``path`` is then a model name relative to the server's
            storage path (a local path inside it works too). Without a store, the load runs in
            this process.
        remote: :class:`sllm_store.remote.RemoteOptions` (endpoint, region, anonymous access,
            credentials) for URLs; by default from the standard AWS environment variables.

    All tensors of one device are views into a single allocation; tied tensors share storage.

    Example::

        sd = sllm_store.load_state_dict("llama.sllm", verify=True)
        model.load_state_dict(sd)

    Raises:
        MissingFileError, TruncatedFileError, FormatError, UnsupportedVersionError: bad checkpoint.
        ChecksumError: ``verify=True`` and a chunk is corrupted.
        DeviceError: the device is unknown or unavailable.
        StoreError: with a store, what the server reported (e.g. ``ModelNotFoundError``), or
            ``StoreUnavailableError`` when it cannot be reached or does not answer in time.
    """
    config = LoadConfig.resolve(
        num_threads=num_threads, io_mode=io_mode, chunk_size=chunk_size, verify=verify, store=store,
        remote=remote,
    )
    tensors, _ = _load(path, device, config)
    return tensors


def load_state_dict_with_report(
    path: PathLike, device: DeviceMap = "cpu", **kwargs: Any
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Like :func:`load_state_dict`, also returning a :class:`LoadReport` (time, GB/s, placement)."""
    return _load(path, device, LoadConfig.resolve(**kwargs))


def verify(path: PathLike, *, num_threads: Optional[int] = None) -> None:
    """Check a converted checkpoint completely: index, every data file, every chunk checksum.

    Returns None if all is well; raises the specific :class:`SllmStoreError` otherwise.

    Example::

        sllm_store.verify("llama.sllm")
    """
    index = read_index(path)
    config = LoadConfig.resolve(num_threads=num_threads, verify=True, chunk_size=index.chunk_size)
    check_data_files(index)
    units = _read_units(index, config)
    files = [str(index.file_path(i)) for i in range(len(index.files))]
    stats = _C.run_load(
        files, units, [], [], num_threads=config.num_threads,
        io_mode="buffered" if config.io_mode == "mmap" else config.io_mode_for(files, index.compressed),
        verify=True,
        encodings=_encodings(index, units),
    )
    if stats["chunks_verified"] != len(units):  # pragma: no cover - defensive
        raise SllmStoreError(f"verified {stats['chunks_verified']} of {len(units)} chunks")
