"""The client side of the store server: what ``load_state_dict(..., store=...)`` runs.

The client plans the load exactly like the in-process loader (one allocation per device, tensors
as views), allocates the memory itself (PyTorch for GPUs, a ``/dev/shm`` file for host memory),
and asks the server to fill it. Errors come back as the :mod:`sllm_store.errors` class the server
raised; an unreachable server, one that dies mid-call, or one that does not answer within the
timeout raises :class:`~sllm_store.errors.StoreUnavailableError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Optional

import grpc
import torch

from sllm_store import _C
from sllm_store._units import format_size
from sllm_store.config import LoadConfig
from sllm_store.errors import ModelChangedError, OutOfMemoryError, StoreBusyError, StoreUnavailableError
from sllm_store.index import Index, PathLike, parse_index
from sllm_store.server import rpc
from sllm_store.server import store_pb2 as pb

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds for quick calls (health, describe, status)


def default_timeout() -> float:
    """Seconds a load may take before the client gives up (env ``SLLM_STORE_TIMEOUT``, 600)."""
    return float(os.environ.get("SLLM_STORE_TIMEOUT") or 600)


class StoreClient:
    """A connection to a store server.

    Example::

        client = StoreClient("unix:///tmp/sllm-store.sock")
        client.prefetch("llama-8b")
        print(client.status().pool_used)
    """

    _cache: dict[tuple[int, str], StoreClient] = {}
    _cache_lock = threading.Lock()

    def __init__(self, address: Optional[str] = None) -> None:
        self.target = rpc.normalize_address(address or rpc.default_address())
        self._channel = grpc.insecure_channel(self.target, options=rpc.CHANNEL_OPTIONS)
        self._stubs = {
            name: self._channel.unary_unary(
                f"/{rpc.SERVICE}/{name}", request_serializer=req.SerializeToString,
                response_deserializer=rep.FromString,
            )
            for name, (req, rep) in rpc.METHODS.items()
        }
        self._storage_path: Optional[str] = None

    @classmethod
    def get(cls, address: Optional[str] = None) -> StoreClient:
        """A client shared by this process for ``address`` (channels are reusable)."""
        key = (os.getpid(), rpc.normalize_address(address or rpc.default_address()))
        with cls._cache_lock:
            client = cls._cache.get(key)
            if client is None:
                client = cls._cache[key] = cls(address)
            return client

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, request: Any, timeout: Optional[float] = None) -> Any:
        """One RPC. A server that is busy (``StoreBusyError``: its load limit reached) is asked
        again, with backoff, until ``timeout`` has passed."""
        timeout = timeout or CONNECT_TIMEOUT
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                return self._stubs[method](request, timeout=max(0.001, deadline - time.monotonic()))
            except grpc.RpcError as e:
                err = self._error(method, e, timeout)
            if not isinstance(err, StoreBusyError) or time.monotonic() + delay >= deadline:
                raise err
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _error(self, method: str, e: Any, timeout: float) -> Exception:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        trailing = dict(e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else {}
        name = trailing.get(rpc.ERROR_KEY)
        if name:
            return rpc.error_class(name)(details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return StoreUnavailableError(
                f"the store server at {self.target} did not answer {method} within {timeout:g} s"
            )
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
            return StoreUnavailableError(
                f"the store server at {self.target} is not reachable or went away during "
                f"{method}: {details}"
            )
        return StoreUnavailableError(
            f"{method} on the store server at {self.target} failed: {code}: {details}"
        )

    # -- simple calls ------------------------------------------------------------------------

    def health(self, timeout: Optional[float] = None) -> pb.HealthReply:
        return self.call("Health", pb.HealthRequest(), timeout)

    def status(self) -> pb.StatusReply:
        return self.call("Status", pb.StatusRequest())

    def describe(self, model: str) -> pb.DescribeReply:
        return self.call("Describe", pb.DescribeRequest(model=model), default_timeout())

    def prefetch(self, model: str, *, verify: bool = False) -> pb.PrefetchReply:
        return self.call("Prefetch", pb.PrefetchRequest(model=model, verify=verify), default_timeout())

    def evict(self, model: str = "") -> list[str]:
        return list(self.call("Evict", pb.EvictRequest(model=model)).evicted)

    def model_name(self, path: PathLike) -> str:
        """The name the server knows ``path`` by: a local path inside the server's storage path
        becomes relative to it; anything else is taken as a name already."""
        p = Path(path)
        if p.is_absolute() or p.exists():
            if self._storage_path is None:
                self._storage_path = self.health().storage_path
            with contextlib.suppress(ValueError, OSError):
                return p.resolve().relative_to(Path(self._storage_path).resolve()).as_posix()
        return str(path)


def index_of(reply: pb.DescribeReply, name: str) -> Index:
    raw = json.loads(reply.index_json)
    if isinstance(raw, dict) and raw.get("synthesized") == "safetensors":
        from sllm_store.sources import synthesized_index_from_json

        return synthesized_index_from_json(raw, Path(name))
    return parse_index(raw, Path(name))


@contextlib.contextmanager
def model_files(reply: pb.DescribeReply) -> Any:
    """A temporary directory holding the model's small files (config.json...), for load_model."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sllm-store-model-") as d:
        for name, data in reply.small_files.items():
            if "/" not in name and name not in (".", ".."):
                (Path(d) / name).write_bytes(data)
        yield Path(d)


class _SharedMemory:
    """A host allocation in /dev/shm that the server can map; the file is unlinked once both
    sides have it mapped (or when the load ends)."""

    def __init__(self, size: int) -> None:
        self.name = f"{rpc.SHM_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.path = f"/dev/shm/{self.name}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise OutOfMemoryError(f"cannot allocate {format_size(size)} of shared memory: {e}") from None
            self.mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self.mapping, dtype=torch.uint8)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _copies(plan: Any) -> list[tuple[int, int, int, int, int]]:
    """The plan's segments as (file, offset, dest, dest_offset, length), contiguous runs merged."""
    out: list[tuple[int, int, int, int, int]] = []
    for u, coff, slot, doff, n in sorted(plan.segments, key=lambda s: (s[2], s[3])):
        f, off = plan.units[u][0], plan.units[u][1] + coff
        if out:
            pf, poff, pslot, pdoff, pn = out[-1]
            if pf == f and pslot == slot and poff + pn == off and pdoff + pn == doff:
                out[-1] = (pf, poff, pslot, pdoff, pn + n)
                continue
        out.append((f, off, slot, doff, n))
    return out


# GPU memory of Load calls that ended without the server's answer (timeout, lost connection,
# Ctrl-C). The server may still be copying into it through its IPC mapping (it stops when it sees
# the call end, but the client cannot know when), so it is never handed back to PyTorch's
# allocator, where other tensors would get it.
_ABANDONED_GPU_BUFFERS: list[Any] = []


def _abandon_gpu_buffers(name: str, buffers: list[tuple[torch.Tensor, int]]) -> None:
    held = [buf for buf, _ in buffers if buf.is_cuda and buf.numel()]
    if held:
        _ABANDONED_GPU_BUFFERS.append(held)
        logger.warning("the load of %s ended without the server's answer; keeping its %s of GPU memory "
                       "allocated, as the server may still be writing into it", name,
                       format_size(sum(b.numel() for b in held)))


def load_through_store(path: PathLike, device: Any, config: LoadConfig,
                       described: Optional[pb.DescribeReply] = None) -> tuple[dict[str, torch.Tensor], Any]:
    """``load_state_dict`` through the server at ``config.store``; returns (tensors, report)."""
    from sllm_store.loader import (
        LoadReport,
        _allocate,
        _assign_devices,
        _bytes_per_device,
        _make_plan,
        _payload_bytes,
        _views,
    )

    if config.io_mode == "mmap":
        raise ValueError("io_mode='mmap' maps local files; it cannot be used with a store server")
    from sllm_store.remote.objects import is_remote

    if is_remote(path):
        raise ValueError(f"the store server serves models under its storage path, not URLs ({path}); "
                         "load the URL without store=, or fetch it onto the server's storage path")
    t0 = time.perf_counter()
    client = StoreClient.get(config.store)
    name = client.model_name(path)
    for attempt in (0, 1):
        reply = described if (described is not None and attempt == 0) else client.describe(name)
        t_described = time.perf_counter()
        index = index_of(reply, name)
        assign = _assign_devices(index, device)
        plan = _make_plan(index, assign, config)
        buffers: list[tuple[torch.Tensor, int]] = []
        shms: list[_SharedMemory] = []
        dests: list[pb.Destination] = []
        try:
            for dev, size in zip(plan.devices, plan.sizes):
                if size == 0:
                    buffers.append((torch.empty(0, dtype=torch.uint8, device=dev), 0))
                    dests.append(pb.Destination(size=0))
                elif dev.type == "cuda":
                    buf, shift = _allocate(dev, size)
                    handle, offset, _, bus_id = _C.cuda_ipc_export(buf.data_ptr() + shift)
                    buffers.append((buf, shift))
                    dests.append(pb.Destination(
                        cuda=pb.CudaIpcMemory(handle=handle, offset=offset, pci_bus_id=bus_id), size=size))
                elif dev.type == "cpu":
                    shm = _SharedMemory(size)
                    shms.append(shm)
                    buffers.append((shm.tensor, 0))
                    dests.append(pb.Destination(shm=pb.SharedMemory(name=shm.name), size=size))
                else:
                    raise ValueError(f"the store server cannot load into {dev}")
            for dev in {d for d in plan.devices if d.type == "cuda"}:
                torch.cuda.synchronize(dev)  # the memory is ours before another process writes it
            copies = [pb.Copy(file=f, offset=o, dest=d, dest_offset=do, length=n)
                      for f, o, d, do, n in _copies(plan)]
            request = pb.LoadRequest(model=name, fingerprint=reply.fingerprint, dests=dests, copies=copies,
                                     verify=config.verify)
            t_allocated = time.perf_counter()
            try:
                result = client.call("Load", request, default_timeout())
            except (StoreUnavailableError, KeyboardInterrupt):
                _abandon_gpu_buffers(name, buffers)
                raise
            t_loaded = time.perf_counter()
            break
        except ModelChangedError:
            if attempt == 1:
                raise
            logger.info("%s changed on the server while planning; describing it again", name)
        finally:
            for shm in shms:
                shm.unlink()
    tensors = _views(index, assign, plan, buffers)
    seconds = time.perf_counter() - t0
    report = LoadReport(
        path=str(path), bytes=_payload_bytes(index, assign), seconds=seconds,
        devices=_bytes_per_device(plan),
        stats={"io_mode": "store", "store": client.target, "hit": result.hit, "streamed": result.streamed,
               "server_seconds": result.seconds, "copy_seconds": result.copy_seconds,
               "bytes_copied": result.bytes, "describe_seconds": t_described - t0,
               "allocate_seconds": t_allocated - t_described, "rpc_seconds": t_loaded - t_allocated},
    )
    logger.info("loaded %s through %s (%s, %s) in %.3f s, %.2f GB/s", name, client.target,
                format_size(report.bytes), "hit" if result.hit else "miss", seconds, report.gb_per_s)
    return tensors, report
