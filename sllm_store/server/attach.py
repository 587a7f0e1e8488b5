"""Attaching to a model the store server holds in GPU memory: the socket protocol, both ends.

The server listens on a unix socket of its own (``<gRPC socket>.gpu``, or ``.sllm-store-gpu.sock``
in the storage path when the server listens on TCP). A client connects and sends one request; the
server answers with the model's placement and, in the same message, one file descriptor per
block of GPU memory that holds it (``SCM_RIGHTS``); the client maps each read-only
(``_C.VmmMapping``). The connection then stays open for as long as the client holds the mapping:
the server counts the model as attached (never evicted) until the socket closes, which happens
when the client releases it or dies.

Messages are a 4-byte big-endian length and that many bytes of JSON (at most 1 MiB)::

    request: {"model": NAME, "fingerprint": FP, "pci_bus_id": "0000:17:00.0"}
    reply:   {"ok": true, "device": "cuda:0", "blobs": [SIZE, ...],
              "placement": {TENSOR: [BLOB, OFFSET], ...}}        + one fd per blob
             {"ok": false, "error": "PoolExhaustedError", "message": "..."}

The server treats every client as untrusted: the request is size-limited and read with a
deadline, names go through the storage path's checks, and at most ``max_clients`` connections are
served at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Optional

from sllm_store import errors
from sllm_store.errors import SllmStoreError, StoreError, StoreUnavailableError

logger = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
REQUEST_TIMEOUT_S = 30.0
MAX_FDS = 250  # SCM_MAX_FD is 253 on Linux


def socket_path(grpc_unix_path: Optional[str], storage_path: str | Path) -> str:
    """Where the attach socket of a server lies: beside its gRPC unix socket, else in its storage path."""
    if grpc_unix_path:
        return grpc_unix_path + ".gpu"
    return str(Path(storage_path) / ".sllm-store-gpu.sock")


def _send(sock: socket.socket, obj: Any, fds: Optional[list[int]] = None) -> None:
    data = json.dumps(obj).encode()
    msg = struct.pack(">I", len(data)) + data
    if fds:
        socket.send_fds(sock, [msg], fds)
    else:
        sock.sendall(msg)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("connection closed mid-message")
        buf += part
    return bytes(buf)


def _recv(sock: socket.socket, want_fds: int = 0) -> tuple[Any, list[int]]:
    """One message, and the fds that came with it (``want_fds``: at most that many)."""
    fds: list[int] = []
    if want_fds:
        head, fds, flags, _addr = socket.recv_fds(sock, 4, want_fds)
    else:
        head, flags = sock.recv(4), 0
    try:
        if not head:
            raise ConnectionError("connection closed before a message")
        if flags & getattr(socket, "MSG_CTRUNC", 0):
            raise ValueError("more descriptors than one message may carry")
        (n,) = struct.unpack(">I", head + _recv_exact(sock, 4 - len(head)))
        if n > MAX_MESSAGE:
            raise ValueError(f"message of {n} bytes (at most {MAX_MESSAGE})")
        return json.loads(_recv_exact(sock, n)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# -- the server's end ------------------------------------------------------------------------


class AttachServer:
    """Serves attach requests for a :class:`sllm_store.server.gpu.GpuPools` on a unix socket."""

    def __init__(self, path: str, gpus: Any, *, max_clients: int = 256) -> None:
        self.path, self.gpus = path, gpus
        self._slots = threading.BoundedSemaphore(max_clients)
        self._closing = threading.Event()
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of a server that died (the gRPC socket is checked first)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._accept, name="sllm-attach", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                self._refuse(conn, errors.StoreBusyError("too many clients attached to the store server"))
                continue
            threading.Thread(target=self._serve, args=(conn,), name="sllm-attach-client", daemon=True).start()

    @staticmethod
    def _refuse(conn: socket.socket, e: BaseException) -> None:
        try:
            name = type(e).__name__ if isinstance(e, SllmStoreError) else "StoreError"
            _send(conn, {"ok": False, "error": name, "message": str(e)})
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(REQUEST_TIMEOUT_S)
            try:
                req, _ = _recv(conn)
                model, fp, bus_id = (req.get(k) for k in ("model", "fingerprint", "pci_bus_id"))
                if not all(isinstance(v, str) for v in (model, fp, bus_id)):
                    raise errors.InvalidArgumentError("a request names model, fingerprint, pci_bus_id")
                device = self.gpus.device_of(bus_id)
                if device is None:
                    raise errors.InvalidArgumentError(f"the store server has no GPU pool on the GPU {bus_id}")
                resident, blobs = self.gpus.lease(model, fp, device)
            except Exception as e:  # noqa: BLE001 - every failure is answered, none ends the server
                if not isinstance(e, SllmStoreError):
                    e = StoreError(f"attach request failed: {type(e).__name__}: {e}")
                logger.info("attach refused: %s", e)
                self._refuse(conn, e)
                return
            try:
                self._hand_over(conn, resident, blobs)
                conn.settimeout(None)
                while conn.recv(4096):  # the client holds the mapping until it closes the socket
                    pass
            except OSError:
                pass
            finally:
                self.gpus.release(resident)
                conn.close()
        finally:
            self._slots.release()

    def _hand_over(self, conn: socket.socket, resident: Any, blobs: list[tuple[int, Any]]) -> None:
        if len(blobs) > MAX_FDS:
            raise OSError(f"{len(blobs)} blocks of GPU memory: more than one message carries")
        order = {b: i for i, b in enumerate(resident.blobs)}
        placement = {name: [order[b], off] for name, (b, off) in resident.placement.items()}
        fds = [alloc.export_fd() for _size, alloc in blobs]
        try:
            _send(conn, {"ok": True, "device": resident.device, "blobs": [size for size, _ in blobs],
                         "placement": placement}, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        self._closing.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# -- the client's end ------------------------------------------------------------------------


class Attachment:
    """A model resident in the store server's GPU memory, mapped into this process.

    ``mappings[i]`` is block i (``_C.VmmMapping``: ``address``, ``size``, ``read_only``);
    ``placement`` gives each stored tensor's (block, offset). The server counts the model as
    attached until :meth:`close` (or this object's collection, or the process's exit).
    """

    def __init__(self, sock: socket.socket, device: str, sizes: list[int], mappings: list[Any],
                 placement: dict[str, tuple[int, int]]) -> None:
        self._sock: Optional[socket.socket] = sock
        self._closed = False
        self.server_device, self.sizes, self.mappings, self.placement = device, sizes, mappings, placement

    @property
    def read_only(self) -> bool:
        return all(m.read_only for m in self.mappings)

    def close(self) -> None:
        """Unmap the blocks (once the GPU work queued on them has finished) and end the lease."""
        if self._closed:
            return
        self._closed = True
        _finish_gpu_work({m.ordinal for m in self.mappings})
        for m in self.mappings:
            m.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit
            pass


def _finish_gpu_work(ordinals: set[int]) -> None:
    """Wait for this process's queued GPU work on those devices: kernels may still read tensors
    whose last reference just went (their memory is not PyTorch's, nothing else orders it)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    for ordinal in ordinals:
        torch.cuda.synchronize(ordinal)


def attach(path: str, model: str, fingerprint: str, pci_bus_id: str, *, timeout: float = 60.0,
           server_uid: Optional[int] = None) -> Attachment:
    """Attach to ``model`` on the GPU ``pci_bus_id`` through the server's attach socket at
    ``path`` (made resident there first if it is not). Raises the error class the server names
    (PoolExhaustedError, ModelTooLargeError... the caller may load the model another way),
    StoreUnavailableError when the socket cannot be reached, UntrustedStoreError when the process
    on the other end does not run as ``server_uid`` (default: this process's user)."""
    from sllm_store.native import _C

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise StoreUnavailableError(f"cannot attach through {path}: {e}") from None
        _check_peer(sock, path, os.getuid() if server_uid is None else server_uid)
        try:
            _send(sock, {"model": model, "fingerprint": fingerprint, "pci_bus_id": pci_bus_id})
            reply, fds = _recv(sock, want_fds=MAX_FDS)
        except (OSError, ValueError) as e:
            raise StoreUnavailableError(f"cannot attach through {path}: {e}") from None
        with _closing_fds(fds):
            if not reply.get("ok"):
                cls = getattr(errors, str(reply.get("error")), None)
                if not (isinstance(cls, type) and issubclass(cls, SllmStoreError)):
                    cls = StoreError
                raise cls(str(reply.get("message")))
            sizes = [int(s) for s in reply["blobs"]]
            if len(fds) != len(sizes):
                raise StoreError(f"the server sent {len(fds)} descriptors for {len(sizes)} blocks")
            mappings: list[Any] = []
            try:
                for fd, size in zip(fds, sizes):
                    mappings.append(_C.VmmMapping(pci_bus_id, fd, size, True))
            except BaseException:
                for m in mappings:
                    m.close()
                raise
        placement = {str(k): (int(v[0]), int(v[1])) for k, v in reply["placement"].items()}
        sock.settimeout(None)
        return Attachment(sock, str(reply.get("device")), sizes, mappings, placement)
    except BaseException:
        sock.close()
        raise


def _check_peer(sock: socket.socket, path: str, uid: int) -> None:
    """The process listening on ``path`` runs as ``uid`` (SO_PEERCRED), or UntrustedStoreError."""
    _pid, peer_uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    if peer_uid != uid:
        raise errors.UntrustedStoreError(f"the attach socket {path} is served by uid {peer_uid}, not {uid} "
                                         "(SLLM_STORE_SERVER_UID)")


class _closing_fds:
    """Closes received descriptors on leaving the block (a mapping keeps what it imported)."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds

    def __enter__(self) -> list[int]:
        return self.fds

    def __exit__(self, *exc: Any) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass

