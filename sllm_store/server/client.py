"""The client of the store server: :class:`StoreClient` (RPCs), and the destination memory a
load hands to the server (:class:`SharedMemory` for host memory; GPU memory through CUDA IPC).

The store tier (:mod:`sllm_store.tiers.store`) plans a load like every tier (one allocation per
device, tensors as views), allocates the memory itself and asks the server to fill it. Errors come
back as the :mod:`sllm_store.errors` class the server raised; an unreachable server, one that dies
mid-call, or one that does not answer within the timeout raises
:class:`~sllm_store.errors.StoreUnavailableError`.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import grpc

from sllm_store._units import format_size
from sllm_store.config import StoreSettings
from sllm_store.errors import (
    LoadCancelledError,
    OutOfMemoryError,
    StoreBusyError,
    StoreUnavailableError,
    UntrustedStoreError,
)
from sllm_store.index import Index, PathLike, parse_index, strict_json
from sllm_store.server import rpc
from sllm_store.server import store_pb2 as pb

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds for quick calls (health, describe, status)


class StoreClient:
    """A connection to a store server. Unset arguments come from the store settings
    (:class:`sllm_store.config.StoreSettings`: ``SLLM_STORE_ADDRESS``, ``SLLM_STORE_TIMEOUT``,
    ``SLLM_STORE_SERVER_UID``); without an address it is the default socket.

    Example::

        client = StoreClient("unix:///tmp/sllm-store.sock")
        client.prefetch("llama-8b")
        print(client.status().pool_used)
    """

    _shared: dict[tuple[Any, ...], StoreClient] = {}
    _shared_lock = threading.Lock()

    def __init__(self, address: Optional[str] = None, timeout: Optional[float] = None,
                 server_uid: Optional[int] = None) -> None:
        settings = StoreSettings.resolve(address, timeout, server_uid)
        self.timeout = settings.timeout  # seconds a Describe or Prefetch may take
        self.server_uid = settings.server_uid  # the user a server on a unix socket must run as
        self._peer_checked = False
        self.target = rpc.normalize_address(settings.address or rpc.default_address())
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
    def get(cls, address: Optional[str] = None, *, timeout: Optional[float] = None,
            server_uid: Optional[int] = None) -> StoreClient:
        """A client shared by this process for these arguments (channels are reusable)."""
        s = StoreSettings.resolve(address, timeout, server_uid)
        target = rpc.normalize_address(s.address or rpc.default_address())
        key = (os.getpid(), target, s.timeout, s.server_uid)
        with cls._shared_lock:
            client = cls._shared.get(key)
            if client is None:
                client = cls._shared[key] = cls(s.address, s.timeout, s.server_uid)
            return client

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, request: Any, timeout: Optional[float] = None,
             cancelled: Optional[Callable[[], bool]] = None) -> Any:
        """One RPC. A server that is busy (``StoreBusyError``: its load limit reached) is asked
        again, with backoff, until ``timeout`` has passed. ``cancelled``: polled while the call
        runs; once it is true the call is cancelled (the server stops its work at the next step)
        and LoadCancelledError raised."""
        timeout = timeout or CONNECT_TIMEOUT
        if not self._peer_checked:
            self._check_peer()
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                left = max(0.001, deadline - time.monotonic())
                if cancelled is None:
                    return self._stubs[method](request, timeout=left)
                return _until_cancelled(self._stubs[method].future(request, timeout=left), cancelled)
            except grpc.RpcError as e:
                err = self._error(method, e, timeout)
            if not isinstance(err, StoreBusyError) or time.monotonic() + delay >= deadline:
                raise err
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _check_peer(self) -> None:
        """For a unix socket: the default socket's directory is this user's own, and the process
        listening runs as ``server_uid`` (``SO_PEERCRED``); else UntrustedStoreError. A socket
        nobody listens on is left to the RPC, which then reports the server unreachable."""
        import socket
        import struct

        path = rpc.unix_path(self.target)
        if path is None or not hasattr(socket, "SO_PEERCRED"):
            self._peer_checked = True
            return
        if rpc.is_default_address(self.target):
            rpc.private_directory(os.path.dirname(path), create=False)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(CONNECT_TIMEOUT)
            try:
                s.connect(path)
            except OSError:
                return  # not listening (yet): checked on a later call
            _pid, uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
        if uid != self.server_uid:
            raise UntrustedStoreError(
                f"the store server at {self.target} runs as uid {uid}, not {self.server_uid}: refusing to "
                "load through it (set SLLM_STORE_SERVER_UID to the uid of a server you trust)")
        self._peer_checked = True

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
        return self.call("Describe", pb.DescribeRequest(model=model), self.timeout)

    def prefetch(self, model: str, *, verify: bool = True, to: str = "dram", pin: bool = False
                 ) -> pb.PrefetchReply:
        """Make ``model`` resident in the pinned pool (``to="dram"``) or in the server's GPU pool
        on ``to="cuda:N"`` (the server's device numbering); ``pin``: keep it there."""
        return self.call("Prefetch", pb.PrefetchRequest(model=model, verify=verify, to=to, pin=pin),
                         self.timeout)

    def evict(self, model: str = "", tier: str = "") -> list[str]:
        """Drop ``model`` (or every model not in use) from ``tier`` ("dram", "gpu", "cuda:N";
        "" for every tier)."""
        return list(self.call("Evict", pb.EvictRequest(model=model, tier=tier)).evicted)

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
    raw = strict_json(reply.index_json, f"the index of {name!r} from the store server")
    if isinstance(raw, dict) and raw.get("synthesized"):
        from sllm_store.formats import synthesized_index_from_json

        return synthesized_index_from_json(raw, Path(name))
    return parse_index(raw, Path(name))


class SharedMemory:
    """A host allocation that the server can map: a memfd, sized and then sealed against
    shrinking and growing (``F_SEAL_SHRINK | F_SEAL_GROW``), so that nothing this process does
    to it can make the server's copy into it fault. The server opens it through
    ``/proc/PID/fd/FD`` (its name says which) and checks the seals. It has no path: it is gone
    when this process and the server have both closed it, whatever happens to either."""

    def __init__(self, size: int) -> None:
        import fcntl

        fd = os.memfd_create(rpc.SHM_PREFIX + "load", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise OutOfMemoryError(f"cannot allocate {format_size(size)} of shared memory: {e}") from None
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd: Optional[int] = fd
        self.name = f"{rpc.SHM_PREFIX}fd-{os.getpid()}-{fd}"
        import torch

        self.tensor = torch.frombuffer(self.mapping, dtype=torch.uint8)

    def unlink(self) -> None:
        """Close the descriptor (the mapping, and the tensors on it, stay valid)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


# GPU memory of Load calls that ended without the server's answer (timeout, lost connection,
# Ctrl-C). The server may still be copying into it through its IPC mapping (it stops when it sees
# the call end, but the client cannot know when), so it is never handed back to PyTorch's
# allocator, where other tensors would get it.
ABANDONED_GPU_BUFFERS: list[Any] = []


def _until_cancelled(future: Any, cancelled: Callable[[], bool], poll: float = 0.05) -> Any:
    """The RPC ``future``'s result, unless ``cancelled()`` turns true first: then the RPC is
    cancelled and LoadCancelledError raised."""
    while True:
        try:
            return future.result(timeout=poll)
        except grpc.FutureTimeoutError:
            if cancelled():
                future.cancel()
                raise LoadCancelledError("the load was cancelled while the store server copied it") from None


def abandon_gpu_buffers(name: str, buffers: list[tuple[Any, int]]) -> None:
    held = [buf for buf, _ in buffers if buf.is_cuda and buf.numel()]
    if held:
        ABANDONED_GPU_BUFFERS.append(held)
        logger.warning("the load of %s ended without the server's answer; keeping its %s of GPU memory "
                       "allocated, as the server may still be writing into it", name,
                       format_size(sum(b.numel() for b in held)))
