"""The GPU tier of the store server: models kept in the server's own GPU memory.

With ``sllm-store serve --gpu-pool cuda:0=60GiB``, the server keeps models in GPU memory on top
of its pinned host pool. A model becomes resident on a device by ``prefetch --to cuda:N`` or by a
client's load to that GPU; it is copied once from the pinned pool (reading it from disk first on a
miss) into device memory made with CUDA's virtual memory management (``_C.VmmAllocation``), which
can be exported as a file descriptor. Clients in other processes attach to it (see
:mod:`sllm_store.server.attach`): they map that memory read-only instead of copying it.

Memory is held in *blobs*, one per model made resident, holding the tensors that were not already
on the device. Tensors are identified by a hash of their bytes, computed by the server from the
bytes it holds, once per version of a model (a checkpoint's recorded ``content_hash`` is checked
against it, never trusted): a
model whose tensors are partly resident (a fine-tune sharing its embeddings or frozen layers with
another model) references the blobs that hold them and copies only the rest over PCIe. Within one
model, identical tensors keep separate copies, so that no two of its tensors share storage.

A resident model stays until its device's budget needs the room: models no client is attached to
and not pinned are evicted least recently used first; a blob is freed once no resident model
references it. Thread-safe: the lock guards the tables; hashing and copies run outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from sllm_store._units import format_size
from sllm_store.errors import (
    ChecksumError,
    DeviceError,
    InvalidArgumentError,
    ModelChangedError,
    ModelTooLargeError,
    PoolExhaustedError,
)
from sllm_store.index import Index
from sllm_store.native import _C
from sllm_store.server.models import PooledModels

logger = logging.getLogger(__name__)

GPU_ALIGNMENT = 512  # tensors start on 512-byte boundaries in a blob, as PyTorch's allocator aligns
_HASH_PIECE = 1 << 62  # one ChunkHasher chunk: the whole tensor
HASH_CACHE_MODELS = 256  # models whose tensor hashes are kept (per version, a few KiB each)


@dataclass
class _Blob:
    id: int
    device: str
    alloc: Any  # _C.VmmAllocation
    size: int
    users: int = 0  # resident models that place tensors in it
    hashes: list[tuple[tuple[str, int], int]] = field(default_factory=list)  # ((hash, nbytes), offset)


@dataclass
class Resident:
    """One model held on one device."""

    name: str
    fingerprint: str
    device: str
    placement: dict[str, tuple[int, int]] = field(default_factory=dict)  # stored tensor -> (blob, offset)
    blobs: list[int] = field(default_factory=list)  # every blob it uses, its own (if any) first
    own_bytes: int = 0  # bytes it copied into its own blob
    shared_bytes: int = 0  # bytes it uses from blobs made for other models
    attached: int = 0
    pinned: bool = False
    state: str = "loading"  # loading -> ready | failed
    ready: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None
    last_used: float = field(default_factory=time.time)

    @property
    def bytes(self) -> int:
        return self.own_bytes + self.shared_bytes


@dataclass
class _Device:
    name: str
    budget: int
    pci_bus_id: str
    used: int = 0  # bytes of live blobs and reservations
    h2d_gbps: float = 0.0  # the latest copy into the pool
    # (hash, nbytes) -> where copies of those bytes are: [(blob, offset), ...]
    by_hash: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)


def parse_gpu_pools(values: list[str]) -> dict[str, int]:
    """``["cuda:0=60GiB", ...]`` (``--gpu-pool``) as {device: bytes}."""
    from sllm_store._units import parse_size

    out: dict[str, int] = {}
    for v in values:
        dev, sep, size = v.partition("=")
        dev = dev.strip()
        if not sep or not dev.startswith("cuda:") or not dev[5:].isdigit():
            raise InvalidArgumentError(f"--gpu-pool {v!r}: expected cuda:N=SIZE, e.g. cuda:0=40GiB")
        try:
            out[dev] = parse_size(size.strip())
        except ValueError as e:
            raise InvalidArgumentError(f"--gpu-pool {v!r}: {e}") from None
        if out[dev] <= 0:
            raise InvalidArgumentError(f"--gpu-pool {v!r}: the size must be positive")
    return out


def check_gpu_pools(budgets: Mapping[str, int]) -> None:
    """DeviceError unless every device of ``budgets`` can share memory by file descriptor."""
    for dev in budgets:
        why = _C.vmm_unsupported(dev)
        if why:
            raise DeviceError(f"--gpu-pool {dev}: GPU memory cannot be shared from this device ({why})")


def bus_key(pci_bus_id: str) -> Optional[tuple[int, ...]]:
    """A PCI bus id as numbers (domain, bus, device, function): ``0000:17:00.0`` and
    ``00000000:17:00.0`` (the forms drivers and tools write) name the same GPU."""
    try:
        return tuple(int(x, 16) for x in pci_bus_id.replace(".", ":").split(":"))
    except ValueError:
        return None


def _aligned(n: int) -> int:
    return (n + GPU_ALIGNMENT - 1) // GPU_ALIGNMENT * GPU_ALIGNMENT


class GpuPools:
    """The server's GPU pools, one per device, and the models resident in them.

    Example::

        gpus = GpuPools(models, {"cuda:0": 40 << 30})
        gpus.make_resident("llama-8b", "cuda:0")
        lease = gpus.lease("llama-8b", fingerprint, "0000:17:00.0")   # for an attaching client
        gpus.release(lease)
    """

    def __init__(self, models: PooledModels, budgets: Mapping[str, int], *, copy_threads: int = 4,
                 hash_threads: int = 8) -> None:
        self.models = models
        self.copy_threads = copy_threads
        self.hash_threads = hash_threads
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {}
        self._blobs: dict[int, _Blob] = {}
        self._residents: dict[tuple[str, str], Resident] = {}  # (model, device) -> resident
        self._next_blob = 0
        self._hashes_of: dict[tuple[str, str], dict[str, tuple[str, int]]] = {}  # (model, fingerprint)
        self.evictions = 0
        check_gpu_pools(budgets)
        for dev, budget in budgets.items():
            with _C.VmmAllocation(dev, 1) as probe:  # the device works, and its bus id
                bus_id = probe.pci_bus_id
            self._devices[dev] = _Device(dev, budget, bus_id)
            logger.info("GPU pool on %s (%s): %s", dev, bus_id, format_size(budget))

    @property
    def devices(self) -> list[str]:
        return list(self._devices)

    def device_of(self, pci_bus_id: str) -> Optional[str]:
        """The server's name of the GPU a client names by bus id (None: no pool there)."""
        want = bus_key(pci_bus_id)
        return next((d.name for d in self._devices.values() if bus_key(d.pci_bus_id) == want), None)

    def _device(self, device: str) -> _Device:
        d = self._devices.get(device)
        if d is None:
            pools = ", ".join(self._devices) or "none"
            raise InvalidArgumentError(f"the server has no GPU pool on {device} (GPU pools: {pools})")
        return d

    # -- making a model resident ------------------------------------------------------------

    def make_resident(self, name: str, device: str, *, pin: bool = False) -> dict[str, Any]:
        """Hold ``name`` on ``device``; returns {"hit", "bytes", "copied", "shared", "seconds"}.
        Its bytes come from the pinned pool with every chunk's checksum checked: clients that
        attach share one copy, so it is always a checked one."""
        dev = self._device(device)
        key, index, fp = self.models.open_model(name)
        t0 = time.perf_counter()
        while True:
            with self._lock:
                r = self._residents.get((key, device))
                if r is not None and r.fingerprint != fp and r.state != "loading":
                    if r.attached:  # the new version cannot be held beside it: load it another way
                        raise PoolExhaustedError(f"{key!r} changed on disk while clients are attached to "
                                                 f"its older copy on {device}")
                    self._drop(r)
                    r = None
                if r is None:
                    r = Resident(key, fp, device, pinned=pin)
                    self._residents[key, device] = r
                    break
            r.ready.wait()
            with self._lock:
                if r.state == "ready" and r.fingerprint == fp:
                    r.last_used = time.time()
                    r.pinned = r.pinned or pin
                    return {"hit": True, "bytes": r.bytes, "copied": 0, "shared": r.shared_bytes,
                            "seconds": time.perf_counter() - t0}
                if r.state == "failed" and self._residents.get((key, device)) is r:
                    del self._residents[key, device]
            if r.state == "failed" and r.error is not None:
                raise r.error
        try:
            copied = self._fill(r, dev, index)
        except BaseException as e:
            with self._lock:
                r.state, r.error = "failed", e
                if self._residents.get((key, device)) is r:
                    del self._residents[key, device]
                    self._unuse(r)
            r.ready.set()
            raise
        with self._lock:
            r.state = "ready"
        r.ready.set()
        seconds = time.perf_counter() - t0
        logger.info("%s resident on %s: %s copied, %s shared with resident models, in %.2f s", key, device,
                    format_size(copied), format_size(r.shared_bytes), seconds)
        return {"hit": False, "bytes": r.bytes, "copied": copied, "shared": r.shared_bytes,
                "seconds": seconds}

    def _fill(self, r: Resident, dev: _Device, index: Index) -> int:
        """Place the model's tensors (reusing resident copies of the same bytes) and copy the
        missing ones into a blob of their own. Returns the bytes copied.

        Placement needs every tensor's hash. The server's own, once computed, are kept per
        version; before that, a checkpoint that records a hash for every tensor is placed on
        those, and the bytes are hashed while the copy runs: a recorded hash that disagrees with
        the bytes fails the residency before any client sees it. Otherwise the bytes are hashed
        first."""
        stored = [t for t in index.tensors.values() if t.alias_of is None]
        with self.models.held(r.name, verify=True) as held:
            if held.fingerprint != r.fingerprint:
                raise ModelChangedError(f"{r.name!r} changed on disk while it was made resident; retry")
            known = self._hashes_of.get((r.name, r.fingerprint))
            recorded = {t.name: (t.content_hash, t.nbytes) for t in stored}
            if known is None and not all(h for h, _ in recorded.values()):
                known = self._hashes(held, stored)
            missing, need = self._place(r, dev, stored, known or recorded)
            with ThreadPoolExecutor(1, thread_name_prefix="sllm-gpu-hash") as checker:
                checking = checker.submit(self._hashes, held, stored) if known is None else None
                blob = self._copy_missing(r, dev, held, missing, need)
                hashes = checking.result() if checking is not None else known
            with self._lock:
                self._hashes_of[r.name, r.fingerprint] = hashes
                while len(self._hashes_of) > HASH_CACHE_MODELS:
                    self._hashes_of.pop(next(iter(self._hashes_of)))
                if blob is not None:
                    for t, off in missing:
                        r.placement[t.name] = (blob.id, off)
                        blob.hashes.append((hashes[t.name], off))
                        dev.by_hash.setdefault(hashes[t.name], []).append((blob.id, off))
            return r.own_bytes

    def _place(self, r: Resident, dev: _Device, stored: list[Any], hashes: Mapping[str, tuple[str, int]]
               ) -> tuple[list[tuple[Any, int]], int]:
        """Point ``r``'s tensors at resident copies of their bytes where there are some; the
        others, as (tensor, offset in a new blob), and the blob's size, reserved in the budget."""
        missing: list[tuple[Any, int]] = []
        with self._lock:
            taken: set[tuple[int, int]] = set()  # resident locations this model uses already
            size = 0
            for t in stored:
                where = next((w for w in dev.by_hash.get(hashes[t.name], ()) if w not in taken), None)
                if where is not None:
                    taken.add(where)
                    r.placement[t.name] = where
                    r.shared_bytes += t.nbytes
                else:
                    size = _aligned(size)
                    missing.append((t, size))
                    size += t.nbytes
            r.blobs = sorted({b for b, _ in r.placement.values()})
            for b in r.blobs:
                self._blobs[b].users += 1
            need = _aligned(size)
            if need:
                self._make_room(dev, need, r)
                dev.used += need
        return missing, need

    def _copy_missing(self, r: Resident, dev: _Device, held: Any, missing: list[tuple[Any, int]],
                      need: int) -> Optional[_Blob]:
        """A blob of ``need`` bytes (reserved) holding the ``missing`` tensors, copied from the pool."""
        if not need:
            return None
        try:
            alloc = _C.VmmAllocation(dev.name, need)
        except BaseException:
            with self._lock:
                dev.used -= need
            raise
        with self._lock:
            blob = _Blob(self._next_blob, dev.name, alloc, alloc.size, users=1)
            self._next_blob += 1
            self._blobs[blob.id] = blob
            dev.used += alloc.size - need  # rounded up to the device's granularity
            r.blobs.insert(0, blob.id)
            r.own_bytes = sum(t.nbytes for t, _ in missing)
        parts = [(addr, 0, off + pos, n) for t, off in missing
                 for addr, pos, n in held.parts(t.file, t.offset, t.nbytes)]
        t0 = time.perf_counter()
        stats = _C.run_copies(parts, [(dev.name, alloc.address, alloc.size)], num_threads=self.copy_threads)
        seconds = float(stats.get("seconds", time.perf_counter() - t0))
        if seconds > 0:
            dev.h2d_gbps = r.own_bytes / seconds / 1e9
        return blob

    def _hashes(self, held: Any, stored: list[Any]) -> dict[str, tuple[str, int]]:
        """(XXH3-64 of its bytes in the pool, nbytes) of every stored tensor; a recorded
        ``content_hash`` that disagrees is a ChecksumError."""
        def one(t: Any) -> tuple[str, tuple[str, int]]:
            h = _C.ChunkHasher(_HASH_PIECE)
            for addr, _pos, n in held.parts(t.file, t.offset, t.nbytes):
                h.update(memoryview(held.buffer(addr, n)))
            digest = h.finish()
            value = f"xxh3-64:{(digest[0] if digest else _C.xxh3_64(b'')):016x}"
            recorded = getattr(t, "content_hash", None)
            if recorded is not None and recorded != value:
                raise ChecksumError(f"{held.key!r}: tensor {t.name!r} hashes to {value}, its index records "
                                    f"{recorded}: the checkpoint is corrupt")
            return t.name, (value, t.nbytes)

        with ThreadPoolExecutor(max(1, min(self.hash_threads, len(stored)))) as ex:
            return dict(ex.map(one, stored))

    def _make_room(self, dev: _Device, need: int, for_model: Resident) -> None:
        """Evict idle, unpinned models of ``dev`` (least recently used first) until ``need``
        bytes fit its budget. Called with the lock held."""
        if need > dev.budget:
            raise ModelTooLargeError(f"{for_model.name!r} needs {format_size(need)} on {dev.name}, more "
                                     f"than its whole GPU pool ({format_size(dev.budget)})")
        idle = sorted((r for r in self._residents.values() if r.device == dev.name and r is not for_model
                       and r.state == "ready" and not r.attached and not r.pinned), key=lambda r: r.last_used)
        for r in idle:
            if dev.used + need <= dev.budget:
                break
            self._drop(r)
            self.evictions += 1
            logger.info("evicted %s from %s to make room", r.name, dev.name)
        if dev.used + need > dev.budget:
            raise PoolExhaustedError(
                f"no room for {for_model.name!r} ({format_size(need)}) in the GPU pool of {dev.name}: "
                f"{format_size(dev.used)} of {format_size(dev.budget)} is held by attached or pinned models")

    def _drop(self, r: Resident) -> None:
        """Forget a resident model (lock held); free the blobs no other model uses."""
        if self._residents.get((r.name, r.device)) is r:
            del self._residents[r.name, r.device]
        self._unuse(r)

    def _unuse(self, r: Resident) -> None:
        for b in r.blobs:
            blob = self._blobs.get(b)
            if blob is None:
                continue
            blob.users -= 1
            if blob.users == 0:
                self._free(blob)
        r.blobs = []

    def _free(self, blob: _Blob) -> None:
        dev = self._devices[blob.device]
        for h, off in blob.hashes:
            places = dev.by_hash.get(h, [])
            if (blob.id, off) in places:
                places.remove((blob.id, off))
            if not places:
                dev.by_hash.pop(h, None)
        del self._blobs[blob.id]
        dev.used -= blob.size
        blob.alloc.close()  # clients that still map it keep the memory alive until they unmap

    # -- clients ------------------------------------------------------------------------------

    def lease(self, name: str, fingerprint: str, device: str) -> tuple[Resident, list[tuple[int, Any]]]:
        """Attach a client to ``name`` on ``device`` (made resident if it is not): the resident
        model with its attach count raised, and its blobs as (size, allocation)."""
        key, _index, fp = self.models.open_model(name)
        while True:
            if fingerprint and fingerprint != fp:
                raise ModelChangedError(f"{key!r} changed on disk since it was described; describe it again")
            self.make_resident(key, device)
            with self._lock:
                r = self._residents.get((key, device))
                if r is None or r.state != "ready" or r.fingerprint != fp:  # evicted or replaced meanwhile
                    fp = self.models.open_model(key)[2]
                    continue
                r.attached += 1
                r.last_used = time.time()
                return r, [(self._blobs[b].size, self._blobs[b].alloc) for b in r.blobs]

    def release(self, r: Resident) -> None:
        with self._lock:
            r.attached -= 1
            r.last_used = time.time()

    def resident_on(self, name: str, fingerprint: str) -> list[Resident]:
        with self._lock:
            return [r for (n, _), r in self._residents.items()
                    if n == name and r.fingerprint == fingerprint and r.state == "ready"]

    def pci_bus_id(self, device: str) -> str:
        return self._device(device).pci_bus_id

    # -- management ---------------------------------------------------------------------------

    def evict(self, name: str = "", device: str = "") -> list[str]:
        """Drop ``name`` (or every model) from ``device`` (or every GPU pool); models clients are
        attached to stay (an attached model named explicitly is an error)."""
        with self._lock:
            victims = [r for (n, d), r in self._residents.items() if (not name or n == name)
                       and (not device or d == device) and r.state == "ready"]
            busy = [r for r in victims if r.attached]
            if name and busy:
                raise PoolExhaustedError(f"{name!r} has {busy[0].attached} client(s) attached on "
                                         f"{busy[0].device}; not evicted")
            out = []
            for r in victims:
                if not r.attached:
                    self._drop(r)
                    self.evictions += 1
                    out.append(f"{r.name}@{r.device}")
            return out

    def status(self) -> dict[str, Any]:
        with self._lock:
            pools = [{"device": d.name, "pci_bus_id": d.pci_bus_id, "budget": d.budget, "used": d.used,
                      "h2d_gbps": d.h2d_gbps} for d in self._devices.values()]
            models: dict[str, list[dict[str, Any]]] = {}
            for r in self._residents.values():
                models.setdefault(r.name, []).append(self.residency(r))
            return {"pools": pools, "models": models, "evictions": self.evictions}

    def residency(self, r: Resident) -> dict[str, Any]:
        return {"device": r.device, "pci_bus_id": self._devices[r.device].pci_bus_id, "bytes": r.bytes,
                "shared_bytes": r.shared_bytes, "attached": r.attached, "pinned": r.pinned, "state": r.state}

    def close(self) -> None:
        """Free every blob (at shutdown). Clients still attached keep their mappings valid."""
        with self._lock:
            for r in list(self._residents.values()):
                self._drop(r)
            for blob in list(self._blobs.values()):
                self._free(blob)
