"""The plan of a load: where every byte of a checkpoint goes, whatever tier it comes from.

A plan maps an index onto destination memory: one allocation per target device, every tensor a
view into it. Files whose tensors all go to one device are mapped whole (so host destinations are
filled by reads straight into them); files split over devices are mapped tensor by tensor. The
plan's read units are the checkpoint's chunks (with their checksums) unless another read size is
asked for; its segments say which bytes of which unit go where. A tier fills the destinations
(:mod:`sllm_store.tiers`); this module imports none.

Example::

    assign = assign_devices(index, "cuda:0")
    plan = make_plan(index, assign, config)
    buffers = [allocate(dev, size) for dev, size in zip(plan.devices, plan.sizes)]
    ...  # a tier fills destinations(plan, buffers)
    tensors = views(index, plan, buffers)
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from sllm_store._units import format_size
from sllm_store.config import LoadConfig
from sllm_store.dtypes import dtype_from_name
from sllm_store.errors import DeviceError, InvalidArgumentError, OutOfMemoryError, UnknownNameError
from sllm_store.index import Index

DeviceLike = Union[str, int, torch.device]
DeviceMap = Union[DeviceLike, Mapping[str, DeviceLike]]

REGION_ALIGNMENT = 4096  # destination regions start on O_DIRECT-friendly boundaries

# (file, offset, length, checksum or None): one read of the C++ pipeline
ReadUnit = tuple[int, int, int, Optional[int]]
# (unit, offset in the unit, destination slot, offset in the destination, length)
Segment = tuple[int, int, int, int, int]
# (file, offset, destination slot, offset in the destination, length): a copy out of a file
Copy = tuple[int, int, int, int, int]
# (device spec, address, size): a destination as the C++ pipeline takes it
Destination = tuple[str, int, int]
# (allocation, byte shift to its aligned start)
Buffer = tuple[torch.Tensor, int]


@dataclass
class LoadReport:
    """What a load did: sizes, time, and how it ran.

    ``stats`` has the same keys for every tier: ``tier`` (``local``, ``store``, ``remote``),
    ``io_mode``, ``threads`` and the load's timeline in seconds (``open_seconds``: opening the
    checkpoint; ``prepare_seconds``: planning and taking the memory; ``fill_seconds``: moving the
    bytes; ``finish_seconds``: making the tensors), then the tier's own figures (the C++
    pipeline's counters, the store server's timings, the download's).
    """

    path: str
    bytes: int
    seconds: float
    devices: dict[str, int] = field(default_factory=dict)  # device -> bytes allocated
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


@dataclass
class Plan:
    """Where every byte goes: read units, their segments, and one destination per device slot."""

    assign: dict[str, torch.device]  # tensor name (aliases too) -> device
    units: list[ReadUnit]
    segments: list[Segment]
    devices: list[torch.device]
    sizes: list[int]
    placement: dict[str, tuple[int, int]]  # stored tensor -> (device slot, byte offset)

    @property
    def bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dev, size in zip(self.devices, self.sizes):
            out[str(dev)] = out.get(str(dev), 0) + size
        return out

    def segments_by_unit(self) -> dict[int, list[Segment]]:
        out: dict[int, list[Segment]] = {}
        for seg in self.segments:
            out.setdefault(seg[0], []).append(seg)
        return out


def as_device(d: DeviceLike) -> torch.device:
    """A torch device (``cuda`` without an index is the current one), or DeviceError."""
    try:
        dev = torch.device(d)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"invalid device {d!r}: {e}") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


def device_spec(dev: torch.device) -> str:
    """The device as the C++ core names it: ``cpu`` or ``cuda:N``."""
    # Host memory is one device, whatever index torch gives it ("cpu:0").
    return dev.type if dev.index is None or dev.type == "cpu" else f"{dev.type}:{dev.index}"


def assign_devices(index: Index, device: DeviceMap) -> dict[str, torch.device]:
    """Device of every tensor name to load (aliases included). A mapping may leave tensors out:
    they are not loaded."""
    if isinstance(device, Mapping):
        unknown = set(device) - set(index.tensors)
        if unknown:
            raise UnknownNameError(f"device map names tensors not in the checkpoint: {sorted(unknown)[:5]}")
        cache: dict[Any, torch.device] = {}
        return {n: cache.setdefault(d, as_device(d)) for n, d in device.items()}
    dev = as_device(device)
    return dict.fromkeys(index.tensors, dev)


def read_units(index: Index, chunk_size: Optional[int], verify: bool) -> list[ReadUnit]:
    """(file, offset, length, checksum) of each read; the checkpoint's chunks unless a different
    read size is asked for (then without checksums, so not with verify)."""
    unit = chunk_size or index.chunk_size
    if verify and unit != index.chunk_size:
        raise InvalidArgumentError(
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


def in_access_order(index: Index, units: list[ReadUnit]) -> list[ReadUnit]:
    """``units`` sorted by the first place in the checkpoint's access order of the tensors they
    hold (as they are: without a recorded order), so that the pipeline, which takes units in
    turn, delivers the bytes a forward pass needs first, first."""
    ranks = index.ranks()
    if not ranks:
        return units
    per_file: dict[int, tuple[list[int], list[int], list[int]]] = {}  # file -> (starts, ends, ranks)
    stored = (t for t in index.tensors.values() if t.alias_of is None)
    for t in sorted(stored, key=lambda t: (t.file, t.offset)):
        starts, ends, rs = per_file.setdefault(t.file, ([], [], []))
        starts.append(t.offset)
        ends.append(t.offset + t.nbytes)
        rs.append(ranks.get(t.name, len(ranks)))

    def first_use(unit: ReadUnit) -> tuple[int, int, int]:
        f_i, off, length, _ = unit
        starts, ends, rs = per_file.get(f_i, ([], [], []))
        k = bisect.bisect_right(ends, off)
        best = len(ranks) + 1  # padding only: last
        while k < len(starts) and starts[k] < off + length:
            best = min(best, rs[k])
            k += 1
        return best, f_i, off

    return sorted(units, key=first_use)


def choose_io_mode(config: LoadConfig, files: list[str], compressed: bool = False, *,
                   may_map: bool = False) -> str:
    """The read mode for ``files``: ``config.io_mode``; ``auto`` picks ``mmap`` when ``may_map``
    (a whole checkpoint into CPU memory), else by page-cache residency.

    Tensors that are views of the files' pages need no memory of their own: from the page cache
    they are usable sooner than copies, and from a cold disk the first load of a fresh process
    runs faster than O_DIRECT reads into newly allocated memory, whose first touch it pays for
    (docs/benchmarks.md). For other destinations: O_DIRECT when under half of the files' pages
    are cached (from a cold disk as fast as or faster than buffered reads), else buffered (the
    page cache serves tens of GB/s; O_DIRECT would go back to the disk). Compressed checkpoints
    are always read buffered: their variable-length stored chunks load faster that way.
    """
    if config.io_mode != "auto":
        return config.io_mode
    if compressed:
        return "buffered"
    if may_map:
        return "mmap"
    from sllm_store.utils import page_cache_fraction

    fraction = page_cache_fraction(files)
    return "direct" if fraction is not None and fraction < 0.5 else "buffered"


def mappable(index: Index) -> bool:
    """Whether every tensor can be a view of its data file (offset a multiple of its item size)."""
    return all(t.alias_of is not None or t.offset % dtype_from_name(t.dtype).itemsize == 0
               for t in index.tensors.values())


def encodings(index: Index, units: list[ReadUnit]) -> list[Any]:
    """Per read unit: None (stored raw at its offset) or (stored offset, stored length, codec id,
    group) for chunks of compressed files; [] when nothing is compressed (as ``_C.run_load``
    takes them)."""
    if not index.compressed:
        return []
    out: list[Any] = []
    for f_i, off, _length, _ in units:
        f = index.files[f_i]
        if f.chunks is None:
            out.append(None)
            continue
        if off % index.chunk_size:
            raise InvalidArgumentError("compressed chunks must be read whole")
        out.append(f.chunks[off // index.chunk_size].encoding)
    return out


class _Slots:
    """Device slots of a plan and the bytes reserved in each."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        self.sizes: list[int] = []

    def slot(self, dev: torch.device) -> int:
        if dev not in self.devices:
            self.devices.append(dev)
            self.sizes.append(0)
        return self.devices.index(dev)

    def own(self, dev: torch.device, nbytes: int) -> int:
        """A slot of its own (memory the caller provides)."""
        self.devices.append(dev)
        self.sizes.append(nbytes)
        return len(self.devices) - 1

    def reserve(self, s: int, nbytes: int, align: int) -> int:
        off = (self.sizes[s] + align - 1) // align * align
        self.sizes[s] = off + nbytes
        return off


def make_plan(index: Index, assign: Mapping[str, torch.device], config: LoadConfig,
              whole_chunks: bool = False, own_slots: bool = False) -> Plan:
    """The plan of loading the ``assign``ed tensors of ``index``. ``whole_chunks``: read units are
    the checkpoint's chunks whatever ``config.chunk_size`` says (a download's unit).
    ``own_slots``: every stored tensor gets a destination slot of its own, at offset 0 (tensors
    the caller already has, e.g. an engine's parameters: see :func:`tensor_buffers`)."""
    units = read_units(index, None if whole_chunks else config.chunk_size, config.verify)
    units = in_access_order(index, units)
    slots = _Slots()
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
        if own_slots:
            by_file[f_i] = tensors = [t for t in tensors if t.name in target]
            for t in tensors:
                placement[t.name] = (slots.own(target[t.name], t.nbytes), 0)
        elif len(devs) == 1 and None not in devs and aligned:
            s = slots.slot(devs.pop())
            base = slots.reserve(s, index.files[f_i].size, REGION_ALIGNMENT)
            file_region[f_i] = (s, base)
            for t in tensors:
                placement[t.name] = (s, base + t.offset)
        else:
            by_file[f_i] = tensors = [t for t in tensors if t.name in target]
            for t in tensors:
                s = slots.slot(target[t.name])
                # At least 256-aligned: a plain safetensors file (tensor_alignment 1) may hold a
                # tensor at an offset its dtype cannot be viewed at; its copy must be viewable.
                placement[t.name] = (s, slots.reserve(s, t.nbytes, max(index.tensor_alignment, 256)))
    segments = _segments(units, by_file, file_region, placement)
    if not config.verify:  # a partial load skips the chunks that hold none of its tensors
        used = sorted({seg[0] for seg in segments})
        renumber = {old: new for new, old in enumerate(used)}
        units = [units[i] for i in used]
        segments = [(renumber[u], *rest) for u, *rest in segments]
    return Plan(dict(assign), units, segments, slots.devices, slots.sizes, placement)


def _segments(units: list[ReadUnit], by_file: dict[int, list], file_region: dict[int, tuple[int, int]],
              placement: dict[str, tuple[int, int]]) -> list[Segment]:
    """Each unit cut into the pieces that go to one place: the unit whole for a file mapped
    whole, else one piece per tensor it overlaps."""
    segments: list[Segment] = []
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
    return segments


def mapped_plan(index: Index, assign: Mapping[str, torch.device], config: LoadConfig) -> Plan:
    """The plan for ``io_mode='mmap'``: destination slot ``i`` is data file ``i`` itself (see
    :func:`map_files`), its tensors views into it; the pipeline faults its pages in."""
    for t in index.tensors.values():
        if t.alias_of is None and t.offset % dtype_from_name(t.dtype).itemsize:
            raise InvalidArgumentError(
                f"io_mode='mmap' cannot view tensor {t.name!r} ({t.dtype}) at byte offset {t.offset} of "
                "its file, which is not a multiple of its element size; load it with the default "
                "io_mode (it is copied into aligned memory)")
    units = read_units(index, config.chunk_size, config.verify)
    segments = [(u_i, 0, f_i, off, length) for u_i, (f_i, off, length, _) in enumerate(units)]
    placement = {t.name: (t.file, t.offset) for t in index.tensors.values() if t.alias_of is None}
    cpu = torch.device("cpu")
    return Plan(dict(assign), units, segments, [cpu] * len(index.files), [f.size for f in index.files],
                placement)


def map_files(index: Index) -> list[Buffer]:
    """Every data file as a private (copy-on-write) memory mapping: the buffers of a
    :func:`mapped_plan`."""
    import mmap

    buffers: list[Buffer] = []
    for i, f in enumerate(index.files):
        if f.size == 0:
            buffers.append((torch.empty(0, dtype=torch.uint8), 0))
            continue
        with open(index.file_path(i), "rb") as fh:
            mapping = mmap.mmap(fh.fileno(), f.size, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        buffers.append((torch.frombuffer(mapping, dtype=torch.uint8), 0))
    return buffers


def allocate(dev: torch.device, size: int) -> Buffer:
    """One uint8 allocation of ``size`` bytes on ``dev``; returns (tensor, aligned byte offset)."""
    pad = REGION_ALIGNMENT if dev.type == "cpu" else 0
    try:
        buf = torch.empty(size + pad, dtype=torch.uint8, device=dev)
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - needs a GPU
        raise OutOfMemoryError(f"cannot allocate {format_size(size)} on {dev}: {e}") from None
    except RuntimeError as e:
        if "alloc" in str(e).lower() or "memory" in str(e).lower():
            raise OutOfMemoryError(f"cannot allocate {format_size(size)} on {dev}: {e}") from None
        raise DeviceError(f"cannot allocate memory on {dev}: {e}") from None
    shift = (-buf.data_ptr()) % REGION_ALIGNMENT if pad else 0
    return buf, shift


def slot_names(plan: Plan) -> list[str]:
    """The stored tensor of each slot of a plan made with ``own_slots``."""
    names = [""] * len(plan.devices)
    for name, (s, _) in plan.placement.items():
        names[s] = name
    return names


def tensor_buffers(plan: Plan, targets: Mapping[str, torch.Tensor]) -> list[Buffer]:
    """The buffers of a plan made with ``own_slots``: the bytes of the caller's tensors."""
    return [(targets[name].detach().reshape(-1).view(torch.uint8), 0) for name in slot_names(plan)]


def destinations(plan: Plan, buffers: list[Buffer]) -> list[Destination]:
    """The plan's destination slots as the C++ pipeline takes them."""
    return [(device_spec(dev), buf.data_ptr() + shift, size)
            for dev, size, (buf, shift) in zip(plan.devices, plan.sizes, buffers)]


def merged_copies(plan: Plan) -> list[Copy]:
    """The plan's segments as copies out of files, (file, offset, slot, slot offset, length),
    sorted by destination, contiguous runs merged."""
    out: list[Copy] = []
    for u, coff, slot, doff, n in sorted(plan.segments, key=lambda s: (s[2], s[3])):
        f, off = plan.units[u][0], plan.units[u][1] + coff
        if out:
            pf, poff, pslot, pdoff, pn = out[-1]
            if pf == f and pslot == slot and poff + pn == off and pdoff + pn == doff:
                out[-1] = (pf, poff, pslot, pdoff, pn + n)
                continue
        out.append((f, off, slot, doff, n))
    return out


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def views(index: Index, plan: Plan, buffers: list[Buffer]) -> dict[str, torch.Tensor]:
    """The loaded tensors: views into the per-device buffers (tied names share storage)."""
    out: dict[str, torch.Tensor] = {}
    for name, want in plan.assign.items():
        entry = index.tensors[name]
        stored = index.resolve(name)
        s, off = plan.placement[stored.name]
        buf, shift = buffers[s]
        dtype = dtype_from_name(stored.dtype)
        t = torch.empty(0, dtype=dtype, device=buf.device)
        strides = stored.strides if stored.strides is not None else _contiguous_strides(stored.shape)
        t.set_(buf.untyped_storage(), (shift + off) // dtype.itemsize, stored.shape, strides)
        if entry.alias_of is not None and want != buf.device:
            t = t.to(want)  # an alias placed on another device than its target
        out[name] = t
    return out


def payload_bytes(index: Index, assign: Mapping[str, Any]) -> int:
    """Tensor bytes a load delivers: the stored tensors it assigns (an alias counts once)."""
    return sum(index.tensors[n].nbytes for n in {index.resolve(name).name for name in assign})


def make_report(path: str, index: Index, plan: Plan, t0: float, *, tier: str, io_mode: str,
                threads: int, detail: Optional[dict[str, Any]] = None) -> LoadReport:
    """The one :class:`LoadReport` layout of every tier; ``t0`` is when the load started."""
    stats = {**(detail or {}), "tier": tier, "io_mode": io_mode, "threads": threads}
    return LoadReport(path=path, bytes=payload_bytes(index, plan.assign), seconds=time.perf_counter() - t0,
                      devices=plan.bytes_per_device, stats=stats)
