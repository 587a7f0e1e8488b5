"""The client side of the store server: what ``load_state_dict(..., store=...)`` runs.

The client plans the load exactly like the in-process loader (one allocation per device, tensors
as views), allocates the memory itself (PyTorch for GPUs, a ``/dev/shm`` file for host memory),
and asks the server to fill it. Errors come back as the :mod:`sllm_store.errors` class the server
raised; an unreachable server, one that dies mid-call, or one that does not answer within the
timeout raises :class:`~sllm_store.errors.StoreUnavailableError`.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Optional

import grpc

from sllm_store._units import format_size
from sllm_store.config import StoreSettings
from sllm_store.errors import OutOfMemoryError, StoreBusyError, StoreUnavailableError, UntrustedStoreError
from sllm_store.index import Index, PathLike, parse_index, strict_json
from sllm_store.server import rpc
from sllm_store.server import store_pb2 as pb

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds for quick calls (health, describe, status)


class StoreClient:
    """A connection to a store server.

    Example::

        client = StoreClient("unix:///tmp/sllm-store.sock")
        client.prefetch("llama-8b")
        print(client.status().pool_used)
    """

    _cache: dict[tuple[int, str], StoreClient] = {}
    _cache_lock = threading.Lock()

    def __init__(self, address: Optional[str] = None, timeout: Optional[float] = None,
                 server_uid: Optional[int] = None) -> None:
        settings = StoreSettings.resolve()
        # Seconds a Describe or Prefetch may take (the store settings' timeout by default)
        self.timeout = timeout or settings.timeout
        # The user a server on a unix socket must run as (this process's by default)
        self.server_uid = settings.server_uid if server_uid is None else server_uid
        self._peer_checked = False
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
        if not self._peer_checked:
            self._check_peer()
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

    def prefetch(self, model: str, *, verify: bool = False) -> pb.PrefetchReply:
        return self.call("Prefetch", pb.PrefetchRequest(model=model, verify=verify), self.timeout)

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
    raw = strict_json(reply.index_json, f"the index of {name!r} from the store server")
    if isinstance(raw, dict) and raw.get("synthesized") == "safetensors":
        from sllm_store.formats import synthesized_index_from_json

        return synthesized_index_from_json(raw, Path(name))
    return parse_index(raw, Path(name))


class SharedMemory:
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
        import torch

        self.tensor = torch.frombuffer(self.mapping, dtype=torch.uint8)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# GPU memory of Load calls that ended without the server's answer (timeout, lost connection,
# Ctrl-C). The server may still be copying into it through its IPC mapping (it stops when it sees
# the call end, but the client cannot know when), so it is never handed back to PyTorch's
# allocator, where other tensors would get it.
ABANDONED_GPU_BUFFERS: list[Any] = []


def abandon_gpu_buffers(name: str, buffers: list[tuple[Any, int]]) -> None:
    held = [buf for buf, _ in buffers if buf.is_cuda and buf.numel()]
    if held:
        ABANDONED_GPU_BUFFERS.append(held)
        logger.warning("the load of %s ended without the server's answer; keeping its %s of GPU memory "
                       "allocated, as the server may still be writing into it", name,
                       format_size(sum(b.numel() for b in held)))
