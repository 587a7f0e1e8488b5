"""One exception hierarchy for everything sllm-store raises on bad input or failed I/O.

Every error is a :class:`SllmStoreError`; the subclasses name the problem, and where the problem
is about a file the message names the file. Several subclasses also derive from the matching
built-in exception (``FileNotFoundError``, ``FileExistsError``, ``MemoryError``) so that code
written against the built-ins keeps working.

The C++ core raises these same classes: its errors are translated in ``csrc/bindings.cpp``.
"""

from __future__ import annotations


class SllmStoreError(Exception):
    """Base class of every error raised by sllm-store."""


class InvalidArgumentError(SllmStoreError, ValueError):
    """An argument or setting has a value the library cannot use (an unknown ``io_mode``, a
    ``chunk_size`` that is not a multiple of 4096, an unknown dtype or model class...)."""


class UnknownNameError(InvalidArgumentError, KeyError):
    """A name that is not there: a device map naming a tensor the checkpoint lacks, a module that
    a device map does not place, a tensor that is not part of a pending load. Also a ``KeyError``."""

    __str__ = Exception.__str__  # the message as given (KeyError's would quote it)


class MissingDependencyError(SllmStoreError, ImportError):
    """An optional package that this use needs is not installed; the message names the extra
    that brings it."""

    def __init__(self, what: str, package: str, extra: str) -> None:
        super().__init__(f"{what} needs the '{package}' package: pip install 'sllm-store[{extra}]' "
                         f"(from a checkout: pip install -e '.[{extra}]')")


class LoadCancelledError(SllmStoreError):
    """The load stopped before it completed: cancelled by the caller (``PendingLoad.cancel``)
    or interrupted."""


class FormatError(SllmStoreError):
    """A converted checkpoint is malformed: bad index JSON, missing fields, impossible offsets."""


class UnsupportedVersionError(FormatError):
    """The index was written by a newer (or unknown) version of the format."""


class MissingFileError(FormatError, FileNotFoundError):
    """A file the checkpoint needs (index or data file) does not exist."""


class TruncatedFileError(FormatError):
    """A data file is shorter than the index says it is."""


class CheckpointMismatchError(FormatError):
    """A checkpoint does not fit what it is loaded into: tensors missing, extra, or of another
    shape or dtype; or a checkpoint saved for another engine configuration."""


class ChecksumError(SllmStoreError):
    """A chunk's checksum does not match the one recorded in the index."""


class ReadError(SllmStoreError, OSError):
    """Reading a data file failed (I/O error reported by the operating system)."""


class WriteError(SllmStoreError, OSError):
    """Writing a checkpoint failed (a full disk, a file size limit, an I/O error); nothing of it
    was left behind."""


class ConvertError(SllmStoreError):
    """The source of a conversion cannot be read or understood."""


class MissingSourceError(ConvertError, FileNotFoundError):
    """The source of a conversion (or a shard its index lists) does not exist."""


class DestinationExistsError(ConvertError, FileExistsError):
    """The destination of a conversion exists and ``overwrite`` was not given."""


class DeviceError(SllmStoreError):
    """A target device is unknown, unavailable, or failed during a copy."""


class OutOfMemoryError(SllmStoreError, MemoryError):
    """Host or device memory for the load could not be allocated."""


class StoreError(SllmStoreError):
    """A problem reported by (or about) the store server (``sllm-store serve``)."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The store server cannot be reached, went away during a call, or did not answer in time."""


class ModelNotFoundError(StoreError, FileNotFoundError):
    """The store server has no model of that name under its storage path."""


class PathEscapeError(StoreError, PermissionError):
    """A model name points outside the store server's storage path (``..``, absolute, symlink)."""


class PoolExhaustedError(StoreError, MemoryError):
    """The store server's memory pool has no room: the models filling it are in use."""


class ModelTooLargeError(StoreError, MemoryError):
    """A model is larger than the store server's whole memory pool, so it cannot be cached."""


class ModelChangedError(StoreError):
    """A model's files changed on disk between planning a load and running it."""


class UntrustedStoreError(StoreError, PermissionError):
    """The store server at the address runs as another user than the one the client trusts, or
    its private socket directory is not this user's: the client refuses to talk to it."""


class StoreBusyError(StoreError):
    """The server already runs as many loads as it allows at once (so that Health and Status
    stay answerable); the client retries until its timeout before raising it."""


class RemoteError(SllmStoreError):
    """A problem with a remote checkpoint (``s3://...``, ``https://...``)."""


class RemoteNotFoundError(RemoteError, FileNotFoundError):
    """The bucket, the prefix or an object of a remote checkpoint does not exist."""


class RemoteAuthError(RemoteError, PermissionError):
    """The object store refused the credentials (missing, wrong, or without permission)."""


class RemoteUnavailableError(RemoteError, ConnectionError):
    """The object store could not be reached, or went away during a transfer (after retries)."""


class CacheError(RemoteError, OSError):
    """The local cache of remote checkpoints cannot be written (disk full, permissions, a file
    too large for the filesystem)."""


__all__ = [
    "SllmStoreError",
    "LoadCancelledError",
    "InvalidArgumentError",
    "UnknownNameError",
    "MissingDependencyError",
    "FormatError",
    "UnsupportedVersionError",
    "MissingFileError",
    "TruncatedFileError",
    "CheckpointMismatchError",
    "ChecksumError",
    "ReadError",
    "WriteError",
    "ConvertError",
    "MissingSourceError",
    "DestinationExistsError",
    "DeviceError",
    "OutOfMemoryError",
    "StoreError",
    "StoreUnavailableError",
    "ModelNotFoundError",
    "PathEscapeError",
    "PoolExhaustedError",
    "ModelTooLargeError",
    "ModelChangedError",
    "StoreBusyError",
    "UntrustedStoreError",
    "RemoteError",
    "RemoteNotFoundError",
    "RemoteAuthError",
    "RemoteUnavailableError",
    "CacheError",
]
