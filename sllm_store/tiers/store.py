"""The store tier: loads through a store server (``sllm-store serve``).

When a store server is configured (``store=`` / ``SLLM_STORE_ADDRESS``), :meth:`StoreTier.open`
asks it to describe the model (one Describe: the index, a fingerprint of the version it describes,
and the small files such as ``config.json``). The load is planned like every load; the
destination memory is this process's own (GPU memory exported as CUDA IPC handles, host memory as
a shared-memory file), and :meth:`StoreCheckpoint.fill` asks the server to copy the plan's bytes
into it from its pinned memory pool (one Load).

A server with a GPU pool (``serve --gpu-pool``) on the GPU a load targets holds the model in its
own GPU memory instead (copying it there once): the client attaches to that memory
(:mod:`sllm_store.server.attach`) and its tensors are read-only views of it, with no bytes moved;
with ``copy=True``, or when filling tensors the caller has (``load_into``), the bytes are copied
device to device from the attached memory. A server that cannot hold the model there (its GPU
pool is full of models in use, say) serves it the usual way. A model that changed on the server since it was
described raises ModelChangedError, and the loader describes and plans it again.

Importing this module is cheap: grpc is imported when a checkpoint opens.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from sllm_store.config import LoadConfig
from sllm_store.errors import InvalidArgumentError, LoadCancelledError, StoreUnavailableError
from sllm_store.index import Index, PathLike
from sllm_store.plan import Buffer, Plan, allocate, merged_copies, tensor_buffers
from sllm_store.tiers.base import Checkpoint
from sllm_store.tiers.gpu_attach import attached_buffers, attached_plan, copy_attached, pci_bus_id

logger = logging.getLogger(__name__)


class StoreCheckpoint(Checkpoint):
    """A model of the store server, described; its bytes come from the server's pool."""

    tier = "store"

    def __init__(self, path: PathLike, index: Index, config: LoadConfig, client: Any, name: str,
                 reply: Any, timings: dict[str, float]) -> None:
        super().__init__(path, index, config)
        self.client, self.name, self.reply = client, name, reply
        self._timings = dict(timings)  # the steps of the load so far, for its report
        self._shms: list[Any] = []
        self._dests: list[Any] = []
        self._slot_dest: list[tuple[int, int]] = []  # own slots: slot -> (destination, offset)
        self._copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []  # (shared memory, host tensor)
        self._dir: Optional[Path] = None
        self._attachment: Any = None  # sllm_store.server.attach.Attachment, when attached
        self._shared = False  # the plan's buffers are the attached memory itself

    def model_dir(self) -> Path:
        """The model's small files (config.json...) from the Describe reply, in a temporary
        directory removed at :meth:`close`."""
        if self._dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="sllm-store-model-")
            self._closers.callback(tmp.cleanup)
            self._dir = Path(tmp.name)
            for name, data in self.reply.small_files.items():
                if "/" not in name and name not in (".", ".."):
                    (self._dir / name).write_bytes(data)
        return self._dir

    def check_devices(self, devices: set[torch.device]) -> None:
        unsupported = sorted(str(d) for d in devices if d.type not in ("cpu", "cuda"))
        if unsupported:
            raise InvalidArgumentError(f"the store server cannot load into {', '.join(unsupported)}")
        super().check_devices(devices)

    def plan(self, assign: dict[str, torch.device], own_slots: bool = False) -> Plan:
        """The load's plan; a load to one GPU where the server has a GPU pool attaches to the
        server's copy of the model, and (unless copying) plans views into that memory."""
        devices = set(assign.values())
        if self.reply.attach_socket and len(devices) == 1 and next(iter(devices)).type == "cuda":
            self._attachment = self._attach(next(iter(devices)))
        if self._attachment is not None and not own_slots and not self.config.store.gpu_copy:
            self._shared = True
            return attached_plan(self.index, assign, self._attachment)
        return super().plan(assign, own_slots)

    def _attach(self, dev: torch.device) -> Any:
        """The server's GPU copy of the model mapped here, or None (logged) where it has none
        and cannot make one: the load then goes the usual way."""
        from sllm_store.errors import ModelChangedError, SllmStoreError, UntrustedStoreError
        from sllm_store.server.attach import attach

        if self._attachment is not None:
            return self._attachment
        try:
            t0 = time.perf_counter()
            a = attach(self.reply.attach_socket, self.name, self.reply.fingerprint, pci_bus_id(dev),
                       timeout=self.config.store.timeout, server_uid=self.config.store.server_uid)
            self._closers.callback(self._detach)
            self._timings["attach_seconds"] = time.perf_counter() - t0
            if not a.read_only:
                logger.warning("the driver maps %s's GPU memory read-write: writes to its tensors change "
                               "the server's copy", self.name)
            return a
        except (ModelChangedError, UntrustedStoreError):
            raise
        except SllmStoreError as e:  # DeviceError, PoolExhaustedError... the load goes another way
            logger.info("not attached to %s on %s (%s: %s); loading through the pinned pool", self.name,
                        dev, type(e).__name__, e)
            return None

    def _detach(self) -> None:
        """At close: a copying load lets go of the server's memory; shared tensors hold it
        until they are freed."""
        if self._attachment is not None and not self._shared:
            self._attachment.close()

    def allocate(self, plan: Plan) -> list[Buffer]:
        """GPU memory from PyTorch, exported for the server (CUDA IPC); host memory as shared
        memory files the server maps. Attached: the server's GPU memory itself."""
        from sllm_store.native import _C
        from sllm_store.server import store_pb2 as pb

        if self._shared:
            return attached_buffers(self._attachment, plan.devices[0] if plan.devices else None)
        if self._attachment is not None:  # private memory, copied device to device at fill
            return super().allocate(plan)
        t0 = time.perf_counter()
        buffers: list[Buffer] = []
        self._dests = []
        for dev, size in zip(plan.devices, plan.sizes):
            if size == 0:
                buffers.append((torch.empty(0, dtype=torch.uint8, device=dev), 0))
                self._dests.append(pb.Destination(size=0))
            elif dev.type == "cuda":
                buf, shift = allocate(dev, size)
                handle, offset, _, bus_id = _C.cuda_ipc_export(buf.data_ptr() + shift)
                buffers.append((buf, shift))
                self._dests.append(pb.Destination(
                    cuda=pb.CudaIpcMemory(handle=handle, offset=offset, pci_bus_id=bus_id), size=size))
            else:
                buffers.append((self._shared_destination(size), 0))
        for dev in {d for d in plan.devices if d.type == "cuda"}:
            torch.cuda.synchronize(dev)  # the memory is ours before another process writes it
        self._timings["allocate_seconds"] = time.perf_counter() - t0
        return buffers

    def _shared_destination(self, size: int) -> torch.Tensor:
        """A shared-memory file the server maps, as the next destination; its bytes here."""
        from sllm_store.server import store_pb2 as pb
        from sllm_store.server.client import SharedMemory

        shm = SharedMemory(size)
        self._shms.append(shm)
        self._closers.callback(shm.unlink)
        self._dests.append(pb.Destination(shm=pb.SharedMemory(name=shm.name), size=size))
        return shm.tensor

    def adopt(self, plan: Plan, targets: dict[str, torch.Tensor]) -> list[Buffer]:
        """The caller's tensors as destinations: GPU tensors exported where they lie (one
        destination per GPU allocation holding some of them), host tensors through shared memory
        that :meth:`fill` copies into them."""
        from sllm_store.native import _C
        from sllm_store.server import store_pb2 as pb

        buffers = tensor_buffers(plan, targets)
        if self._attachment is not None:  # copied device to device at fill
            return buffers
        self._dests, self._slot_dest, self._copy_back = [], [], []
        exported: dict[tuple[bytes, str], int] = {}
        for (buf, _), size in zip(buffers, plan.sizes):
            if size == 0:
                self._dests.append(pb.Destination(size=0))
                self._slot_dest.append((len(self._dests) - 1, 0))
            elif buf.is_cuda:
                handle, offset, alloc_size, bus_id = _C.cuda_ipc_export(buf.data_ptr())
                if (handle, bus_id) not in exported:
                    exported[handle, bus_id] = len(self._dests)
                    self._dests.append(pb.Destination(
                        cuda=pb.CudaIpcMemory(handle=handle, offset=0, pci_bus_id=bus_id), size=alloc_size))
                self._slot_dest.append((exported[handle, bus_id], offset))
            else:
                shared = self._shared_destination(size)
                self._slot_dest.append((len(self._dests) - 1, 0))
                self._copy_back.append((shared[:size], buf))
        for dev in {d for d in plan.devices if d.type == "cuda"}:
            torch.cuda.synchronize(dev)  # the parameters are written before the server writes them
        return buffers

    def fill(self, plan: Plan, buffers: list[Buffer], progress: Any = None) -> dict[str, Any]:
        """One Load: the server copies the plan's bytes into the destinations (from its pinned
        pool: the tensors of a streaming load become ready when it answers)."""
        from sllm_store.server import store_pb2 as pb
        from sllm_store.server.client import abandon_gpu_buffers

        if self._attachment is not None:
            t0 = time.perf_counter()
            if not self._shared:
                copy_attached(self.index, plan, buffers, self._attachment)
            return {**self._timings, "io_mode": "attach" if self._shared else "attach-copy", "threads": None,
                    "store": self.client.target, "hit": True, "streamed": False,
                    "copy_seconds": time.perf_counter() - t0, "bytes_copied": 0 if self._shared else None}
        where = self._slot_dest or [(d, 0) for d in range(len(plan.devices))]
        copies = [pb.Copy(file=f, offset=o, dest=where[d][0], dest_offset=where[d][1] + do, length=n)
                  for f, o, d, do, n in merged_copies(plan)]
        request = pb.LoadRequest(model=self.name, fingerprint=self.reply.fingerprint, dests=self._dests,
                                 copies=copies, verify=self.config.verify)
        t0 = time.perf_counter()
        # cancel() of a pending (streaming) load cancels the call
        cancelled = None if progress is None else (lambda: bool(progress.cancelled))
        try:
            try:
                result = self.client.call("Load", request, self.config.store.timeout, cancelled=cancelled)
            except (StoreUnavailableError, LoadCancelledError, KeyboardInterrupt):
                abandon_gpu_buffers(self.name, buffers)  # the server may still be writing there
                raise
        finally:
            for shm in self._shms:  # mapped by the server by now, or never to be
                shm.unlink()
        for shared, target in self._copy_back:
            target.copy_(shared)
        return {**self._timings, "io_mode": "store", "threads": None, "store": self.client.target,
                "hit": result.hit, "streamed": result.streamed, "server_seconds": result.seconds,
                "copy_seconds": result.copy_seconds, "bytes_copied": result.bytes,
                "rpc_seconds": time.perf_counter() - t0}


class StoreTier:
    """Every path, when a store server is configured: the server serves models under its storage
    path."""

    name = "store"

    def accepts(self, path: PathLike, config: LoadConfig) -> bool:
        return bool(config.store.address)

    def open(self, path: PathLike, config: LoadConfig) -> StoreCheckpoint:
        t0 = time.perf_counter()
        from sllm_store.index import is_remote
        from sllm_store.server.client import StoreClient, index_of

        if config.io_mode == "mmap":
            raise InvalidArgumentError(
                "io_mode='mmap' maps local files; it cannot be used with a store server")
        if is_remote(path):
            raise InvalidArgumentError(
                f"the store server serves models under its storage path, not URLs ({path}); "
                "load the URL without store=, or fetch it onto the server's storage path")
        client = StoreClient.get(config.store.address)
        t1 = time.perf_counter()
        name = client.model_name(path)
        reply = client.describe(name)
        timings = {"client_seconds": t1 - t0, "describe_seconds": time.perf_counter() - t1}
        return StoreCheckpoint(path, index_of(reply, name), config, client, name, reply, timings)
