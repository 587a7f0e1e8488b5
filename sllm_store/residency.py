"""Where a model is, through a store server, and how long loading it would take from there.

:func:`residency` says, for a model the store server serves, which tiers hold it: the server's
GPU pools (per GPU, bytes held and how many of them shared with other models), its pinned host
pool, and its disk. :func:`estimate_load_time` answers from the tier a load to a device would
use, with the bandwidths the server measured on its own latest transfers (never constants): a
model held on that GPU is attached (no bytes move); one in the pinned pool is copied at the
server's measured copy rate; one on disk only is read into the pool at the measured disk rate,
then copied.

Example::

    sllm_store.estimate_load_time("llama-8b", "cuda:0", store="unix:///run/sllm.sock")
    # LoadEstimate(tier='dram', seconds=1.9, bytes=16060522496, basis='...')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from sllm_store.errors import InvalidArgumentError
from sllm_store.index import PathLike


@dataclass
class Residency:
    """Where one model is: through a store server, its GPU pools and pinned pool (``gpu``,
    ``dram``) and its disk; without one, the local files (``page_cached``: the fraction of their
    pages in the page cache) or, for a URL, the object store (``remote``) and whether the local
    cache holds a copy (``cached``)."""

    name: str
    bytes: Optional[int]  # the model's data (None: a URL not cached here, not fetched to say)
    gpu: list[dict[str, Any]] = field(default_factory=list)  # device, pci_bus_id, bytes, shared_bytes...
    dram: bool = False  # in the store server's pinned host pool
    disk: bool = True  # local files, or under the server's storage path
    page_cached: Optional[float] = None
    remote: Optional[str] = None
    cached: Optional[bool] = None


@dataclass
class LoadEstimate:
    """How long a load would take: from ``tier`` (``gpu``, ``dram`` or ``disk``), ``bytes`` at
    the rates ``basis`` names; ``seconds`` is None when a rate has not been measured yet."""

    tier: str
    seconds: Optional[float]
    bytes: int
    basis: str


def _client(store: Optional[str]) -> Any:
    from sllm_store.config import store_address
    from sllm_store.server.client import StoreClient

    address = store_address(store)
    if not address:
        raise InvalidArgumentError("where a model is and how fast it loads is known to a store server: "
                                   "pass store= or set SLLM_STORE_ADDRESS")
    return StoreClient.get(address)


def residency(path: PathLike, store: Optional[str] = None) -> Residency:
    """Where ``path`` is: held by the store server at ``store`` (or ``SLLM_STORE_ADDRESS``),
    else on this machine's disk or in an object store."""
    from sllm_store.config import store_address
    from sllm_store.index import check_path

    check_path(path)
    if not store_address(store):
        return _local_residency(path)
    return _server_residency(path, store)[0]


def _server_residency(path: PathLike, store: Optional[str]) -> tuple[Residency, Any]:
    """The residency of ``path`` on the store server, and the server's status it was read from."""
    from sllm_store.server.client import index_of

    client = _client(store)
    name = client.model_name(path)
    reply = client.describe(name)
    index = index_of(reply, name)
    status = client.status()
    pooled = next((m for m in status.models if m.name == name and m.tier == "dram"), None)
    gpu = [{"device": r.device, "pci_bus_id": r.pci_bus_id, "bytes": r.bytes, "shared_bytes": r.shared_bytes,
            "attached": r.attached, "pinned": r.pinned} for r in reply.gpu]
    return Residency(name, index.total_bytes, gpu=gpu, dram=pooled is not None), status


def estimate_load_time(path: PathLike, device: str = "cuda:0", store: Optional[str] = None) -> LoadEstimate:
    """How long loading ``path`` to ``device`` through the store server would take now."""
    import torch

    from sllm_store.plan import as_device

    where, status = _server_residency(path, store)
    dev = as_device(device)
    if dev.type == "cuda" and where.gpu:
        from sllm_store.server.gpu import bus_key
        from sllm_store.tiers.gpu_attach import pci_bus_id

        bus = bus_key(pci_bus_id(dev)) if torch.cuda.is_available() else None
        held = next((g for g in where.gpu if bus is not None and bus_key(g["pci_bus_id"]) == bus), None)
        if held is not None:
            return LoadEstimate("gpu", 0.0, 0, "held in the server's GPU memory on this GPU: attached, "
                                "no bytes move (the mapping takes milliseconds)")
    copy = status.copy_gbps
    if where.dram:
        seconds = where.bytes / (copy * 1e9) if copy else None
        return LoadEstimate("dram", seconds, where.bytes,
                            f"copy from the pinned pool at {copy:.2f} GB/s" if copy else
                            "in the pinned pool; the copy rate is not measured yet")
    disk = status.disk_gbps
    seconds = where.bytes / (disk * 1e9) + where.bytes / (copy * 1e9) if disk and copy else None
    basis = (f"read into the pool at {disk:.2f} GB/s, then copied at {copy:.2f} GB/s" if seconds is not None
             else "on disk; the server has not measured its disk and copy rates yet")
    return LoadEstimate("disk", seconds, where.bytes, basis)


def _local_residency(path: PathLike) -> Residency:
    from sllm_store.index import is_remote

    if is_remote(path):
        from sllm_store.remote import entries

        entry = next((e for e in entries() if e.url.rstrip("/") == str(path).rstrip("/")), None)
        return Residency(str(path), entry.size if entry else None, disk=entry is not None, remote=str(path),
                         cached=entry is not None)
    from sllm_store.formats import open_index
    from sllm_store.utils import page_cache_fraction

    index = open_index(path)
    files = [index.file_path(i) for i in range(len(index.files))]
    return Residency(str(path), index.total_bytes, page_cached=page_cache_fraction(files))
