"""What client and server share: addresses, the method table, and error transport.

Errors cross the wire as a gRPC status code plus the trailing metadata key ``sllm-store-error``
naming the :mod:`sllm_store.errors` class, so the client raises the same class the server did.
"""

from __future__ import annotations

import os
import re
from typing import Any

from sllm_store import errors
from sllm_store.server import store_pb2 as pb

SERVICE = "sllm_store.v1.SllmStore"
ERROR_KEY = "sllm-store-error"
SHM_PREFIX = "sllm-store-"
SHM_NAME = re.compile(r"sllm-store-fd-([0-9]{1,10})-([0-9]{1,10})")  # a client's memfd
MAX_MESSAGE = 256 * 1024 * 1024

# method -> (request class, reply class)
METHODS: dict[str, tuple[Any, Any]] = {
    "Health": (pb.HealthRequest, pb.HealthReply),
    "Status": (pb.StatusRequest, pb.StatusReply),
    "Describe": (pb.DescribeRequest, pb.DescribeReply),
    "Prefetch": (pb.PrefetchRequest, pb.PrefetchReply),
    "Load": (pb.LoadRequest, pb.LoadReply),
    "Evict": (pb.EvictRequest, pb.EvictReply),
}

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # A restarted server is found again within a second (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def default_address() -> str:
    """``unix://`` socket in a private directory of this user (mode 0700) under
    ``$XDG_RUNTIME_DIR`` (else ``/tmp``): ``sllm-store-UID/store.sock``."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return f"unix://{base}/sllm-store-{os.getuid()}/store.sock"


def is_default_address(target: str) -> bool:
    return target == normalize_address(default_address())


def private_directory(path: str, create: bool) -> None:
    """Check (and with ``create``, make) the directory of the default socket: a real directory of
    this user that nobody else may enter. Another user could otherwise create the socket (or the
    directory) first and stand in for the server; UntrustedStoreError then."""
    import stat

    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise errors.StoreError(f"cannot create the socket directory '{path}': {e.strerror or e}") \
                from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # no server has made it: connecting finds no server
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise errors.UntrustedStoreError(
            f"the socket directory '{path}' is not a private directory of this user (uid {os.getuid()}): "
            "another user may have made it; remove it, or give the server an address of your own")


def normalize_address(address: str) -> str:
    """A gRPC target from ``unix:///path``, ``/path.sock``, ``host:port`` or ``port``.

    TCP without a host binds/connects to loopback (``127.0.0.1``): the server is reachable from
    other hosts only when a host is given explicitly.
    """
    a = address.strip()
    if not a:
        raise ValueError("empty store address")
    if a.startswith("unix:"):
        path = a[len("unix://"):] if a.startswith("unix://") else a[len("unix:"):]
        if not path:
            raise ValueError(f"invalid unix socket address {address!r}")
        return "unix://" + os.path.abspath(path)
    if a.startswith("/") or a.startswith("."):
        return "unix://" + os.path.abspath(a)
    if a.isdigit():
        return f"127.0.0.1:{a}"
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid store address {address!r} (expected unix:///path or host:port)")
    return f"{host or '127.0.0.1'}:{port}"


def unix_path(target: str) -> str | None:
    return target[len("unix://"):] if target.startswith("unix://") else None


# sllm_store.errors class name -> gRPC status code name
_CODES = {
    "ModelNotFoundError": "NOT_FOUND",
    "MissingFileError": "NOT_FOUND",
    "PathEscapeError": "PERMISSION_DENIED",
    "PoolExhaustedError": "RESOURCE_EXHAUSTED",
    "ModelTooLargeError": "RESOURCE_EXHAUSTED",
    "OutOfMemoryError": "RESOURCE_EXHAUSTED",
    "ModelChangedError": "ABORTED",
    "StoreBusyError": "RESOURCE_EXHAUSTED",
    "StoreUnavailableError": "UNAVAILABLE",
    "FormatError": "FAILED_PRECONDITION",
    "UnsupportedVersionError": "FAILED_PRECONDITION",
    "TruncatedFileError": "FAILED_PRECONDITION",
    "ChecksumError": "DATA_LOSS",
    "ReadError": "UNAVAILABLE",
    "DeviceError": "FAILED_PRECONDITION",
}


def status_code_name(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in _CODES:
            return _CODES[cls.__name__]
    if isinstance(exc, ValueError):
        return "INVALID_ARGUMENT"
    return "INTERNAL"


def error_class(name: str) -> type[errors.SllmStoreError]:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.SllmStoreError):
        return cls
    return errors.StoreError
