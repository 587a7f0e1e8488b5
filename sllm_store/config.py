"""Settings: every ``SLLM_STORE_*`` environment variable is read here, and nowhere else.

A load's settings are one object, :class:`LoadConfig`, with a section per tier: the local reads
(its own fields), ``store`` (:class:`StoreSettings`, the store server's client), ``remote``
(:class:`RemoteOptions`, object-store connections) and ``cache`` (:class:`CacheSettings`, the local
disk cache of remote checkpoints). Each value comes from the argument when one is given, else from
the environment, else from the default. :data:`VARIABLES` lists every variable with its default
and meaning (docs/configuration.md is that table). The AWS variables (``AWS_REGION``...) are read
where object-store connections are made (:mod:`sllm_store.remote.objects`), as every AWS client
reads them.

Example::

    config = LoadConfig.resolve(num_threads=8, verify=True)
    config.remote.max_gets, config.cache.directory
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

from sllm_store._units import SizeLike, parse_size
from sllm_store.errors import InvalidArgumentError

IO_MODES = ("auto", "buffered", "direct", "mmap")

DEFAULT_REMOTE_GETS = 24  # GETs in flight for a remote load (docs/benchmarks.md, design notes)
DEFAULT_STORE_TIMEOUT = 600.0  # seconds a load through a store server may take


@dataclass(frozen=True)
class Variable:
    """One environment variable: its section, default (as documented) and what it changes."""

    name: str
    section: str
    default: str
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable("SLLM_STORE_NUM_THREADS", "load", "CPU count, clamped to 4..16",
             "Reader threads of a local load (`num_threads=`)."),
    Variable("SLLM_STORE_IO_MODE", "load", "`auto`",
             "`auto` (`mmap` for a whole checkpoint into CPU memory; otherwise O_DIRECT when under half "
             "of the files' pages are cached, else `buffered`), "
             "`buffered`, `direct` or `mmap` (CPU only) (`io_mode=`)."),
    Variable("SLLM_STORE_CHUNK_SIZE", "load", "the checkpoint's chunk size",
             "Read unit of a local load, e.g. `16MiB`; not with verification (`chunk_size=`)."),
    Variable("SLLM_STORE_VERIFY", "load", "on, except for loads into CPU memory from local files",
             "`1`: check every chunk's checksum while loading; `0`: do not (`verify=`). Remote "
             "downloads are always checked."),
    Variable("SLLM_STORE_STAGING_BUFFERS", "load", "`2`",
             "Page-locked staging buffers per reader thread of a GPU load (one fills while one "
             "is copied)."),
    Variable("SLLM_STORE_FOLLOW_LINKS", "load", "`0`",
             "`1`: load a converted checkpoint whose data files are links to files outside its "
             "directory (refused by default)."),
    Variable("SLLM_STORE_ADDRESS", "store", "unset (load in this process)",
             "Load through the store server at this address: `unix:///path` or `host:port` "
             "(`store=`)."),
    Variable("SLLM_STORE_TIMEOUT", "store", "`600`",
             "Seconds a load through the store server may take."),
    Variable("SLLM_STORE_GPU_COPY", "store", "`0`",
             "`1`: a load to a GPU on which the store server holds the model gets a private copy "
             "of its weights (a device-to-device copy) instead of read-only shared memory (`copy=`)."),
    Variable("SLLM_STORE_SERVER_UID", "store", "this process's uid",
             "The user a store server on a unix socket must run as; a server of another user is "
             "refused (`UntrustedStoreError`)."),
    Variable("SLLM_STORE_REMOTE_GETS", "remote", "`24`",
             "Ranged GETs in flight for a remote load (`RemoteOptions(max_gets=)`)."),
    Variable("SLLM_STORE_CACHE_DIR", "cache", "`~/.cache/sllm-store`",
             "Directory of the local cache of remote checkpoints."),
    Variable("SLLM_STORE_CACHE_SIZE", "cache", "no limit",
             "Size limit of that cache, e.g. `200GiB`: least recently used entries are evicted."),
    Variable("SLLM_STORE_WRITE_BEHIND", "cache", "an eighth of the RAM, at most 8 GiB",
             "Bytes of downloaded chunks that may wait for their cache write; `0` writes each "
             "chunk before the next is fetched."),
    Variable("SLLM_STORE_LIBCUDA", "device", "`libcuda.so.1`",
             "The CUDA driver library to load (the tests point it at a CPU stand-in)."),
    Variable("STORAGE_PATH", "serverlessllm", "`./models`",
             "The directory that ServerlessLLM's API (`sllm_store.torch`, `sllm_store.transformers`) "
             "resolves `model_path` in when `storage_path` is not given, as ServerlessLLM does."),
)


def _env(name: str) -> Optional[str]:
    """The stripped value of a variable, None if unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def _env_int(name: str) -> Optional[int]:
    """An integer environment variable (None if unset or empty), or a ValueError naming it."""
    value = _env(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}") from None


def _env_size(name: str) -> Optional[int]:
    """A size environment variable such as ``16MiB`` (None if unset or empty), or a ValueError
    naming it."""
    value = _env(name)
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise InvalidArgumentError(f"{name}: {e}") from None


def _env_bool(name: str) -> Optional[bool]:
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off (None if unset or empty)."""
    value = _env(name)
    if value is None:
        return None
    if value.lower() in ("0", "false", "no", "off"):
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    raise InvalidArgumentError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {value!r}")


def _bool_arg(name: str, value: Any) -> Optional[bool]:
    """A yes/no argument as given: True, False or None (InvalidArgumentError for anything else)."""
    if value is not None and not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True, False or None, got {value!r}")
    return value


def default_num_threads() -> int:
    # Reads are I/O bound: more threads than cores still help to keep the device queue full.
    return max(4, min(16, os.cpu_count() or 4))


def cuda_library() -> str:
    """The CUDA driver library to load (``SLLM_STORE_LIBCUDA``); "" for ``libcuda.so.1``."""
    return _env("SLLM_STORE_LIBCUDA") or ""


def serverlessllm_storage_path(storage_path: Optional[str] = None) -> str:
    """The storage path of ServerlessLLM's API: ``storage_path``, else ``STORAGE_PATH``, else
    ``./models``."""
    return storage_path or _env("STORAGE_PATH") or "./models"


def store_address(address: Optional[str] = None) -> Optional[str]:
    """The store server to load through: ``address``, else ``SLLM_STORE_ADDRESS``, else None."""
    return address or _env("SLLM_STORE_ADDRESS")


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 16 << 30


@dataclass(frozen=True)
class StoreSettings:
    """The store server's client: where the server is, how long a load through it may take, and
    whether a model the server holds in GPU memory is shared (mapped read-only) or copied."""

    address: Optional[str] = None
    timeout: float = DEFAULT_STORE_TIMEOUT
    server_uid: int = field(default_factory=os.getuid)  # the user a unix-socket server must run as
    gpu_copy: bool = False  # a private device-to-device copy instead of the server's shared memory

    @classmethod
    def resolve(cls, address: Optional[str] = None, timeout: Optional[float] = None,
                server_uid: Optional[int] = None, gpu_copy: Optional[bool] = None) -> StoreSettings:
        if timeout is None:
            raw = _env("SLLM_STORE_TIMEOUT")
            try:
                timeout = DEFAULT_STORE_TIMEOUT if raw is None else float(raw)
            except ValueError:
                raise InvalidArgumentError(
                    f"SLLM_STORE_TIMEOUT must be a number of seconds, got {raw!r}") from None
        if timeout <= 0:
            raise InvalidArgumentError(f"the store timeout must be positive, got {timeout}")
        if server_uid is None:
            server_uid = _env_int("SLLM_STORE_SERVER_UID")
        if gpu_copy is None:
            gpu_copy = bool(_env_bool("SLLM_STORE_GPU_COPY"))
        return cls(address=store_address(address), timeout=float(timeout),
                   server_uid=os.getuid() if server_uid is None else server_uid, gpu_copy=gpu_copy)


@dataclass(frozen=True)
class RemoteOptions:
    """Object-store connections for ``s3://`` and ``http(s)://`` checkpoints. ``None`` fields
    come from the environment: the AWS variables and files for the connection (see
    :mod:`sllm_store.remote.objects`), ``SLLM_STORE_REMOTE_GETS`` for ``max_gets``.

    Example::

        RemoteOptions(endpoint_url="http://127.0.0.1:8333", region="us-east-1", max_gets=32)
    """

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    anonymous: bool = False
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    timeout_s: float = 60.0
    max_retries: int = 5
    max_gets: Optional[int] = None  # ranged GETs in flight for one load

    def resolved(self) -> RemoteOptions:
        """These options with ``max_gets`` filled in (environment, then the default)."""
        gets = self.max_gets
        if gets is None:
            gets = _env_int("SLLM_STORE_REMOTE_GETS")
            gets = DEFAULT_REMOTE_GETS if gets is None else gets
        if gets < 1:
            raise InvalidArgumentError(f"max_gets (SLLM_STORE_REMOTE_GETS) must be >= 1, got {gets}")
        return self if gets == self.max_gets else replace(self, max_gets=int(gets))

    @property
    def gets(self) -> int:
        """GETs in flight: ``max_gets`` once resolved."""
        return self.max_gets if self.max_gets is not None else self.resolved().gets


@dataclass(frozen=True)
class CacheSettings:
    """The local disk cache of remote checkpoints."""

    directory: Path
    size_limit: Optional[int] = None  # bytes; None: no limit
    write_behind: int = 256 << 20  # bytes of fetched chunks that may wait for their cache write

    @classmethod
    def resolve(cls, directory: Union[str, os.PathLike[str], None] = None,
                size_limit: Optional[SizeLike] = None,
                write_behind: Optional[SizeLike] = None) -> CacheSettings:
        d = Path(directory or _env("SLLM_STORE_CACHE_DIR") or Path.home() / ".cache" / "sllm-store")
        limit = parse_size(size_limit) if size_limit is not None else _env_size("SLLM_STORE_CACHE_SIZE")
        behind = (parse_size(write_behind) if write_behind is not None
                  else _env_size("SLLM_STORE_WRITE_BEHIND"))
        if behind is None:
            behind = max(256 << 20, min(8 << 30, _ram_bytes() // 8))
        if behind < 0 or (limit is not None and limit < 0):
            raise InvalidArgumentError("cache sizes must not be negative")
        return cls(directory=d.expanduser(), size_limit=limit, write_behind=behind)


@dataclass(frozen=True)
class LoadConfig:
    """Settings of one load. Build it with :meth:`resolve` (arguments > environment > defaults)."""

    num_threads: int
    io_mode: str
    chunk_size: Optional[int]
    verify: Optional[bool]  # None: the default for the load's tier and devices (with_default_verify)
    staging_buffers: int = 2
    follow_links: bool = False  # data files linked out of a converted checkpoint's directory
    store: StoreSettings = field(default_factory=StoreSettings)
    remote: RemoteOptions = field(default_factory=RemoteOptions)
    cache: Optional[CacheSettings] = None  # None: CacheSettings.resolve() when a URL needs it

    @classmethod
    def resolve(
        cls,
        *,
        num_threads: Optional[int] = None,
        io_mode: Optional[str] = None,
        chunk_size: Optional[SizeLike] = None,
        verify: Optional[bool] = None,
        store: Optional[str] = None,
        remote: Optional[RemoteOptions] = None,
        cache: Optional[CacheSettings] = None,
        copy: Optional[bool] = None,
    ) -> LoadConfig:
        if num_threads is None:
            num_threads = _env_int("SLLM_STORE_NUM_THREADS")
        try:
            threads = default_num_threads() if num_threads is None else int(num_threads)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"num_threads must be an integer >= 1, got {num_threads!r}") from None
        if threads < 1:
            raise InvalidArgumentError(f"num_threads must be >= 1, got {threads}")
        if io_mode is None:
            io_mode = (_env("SLLM_STORE_IO_MODE") or "auto").lower()
            if io_mode not in IO_MODES:
                raise InvalidArgumentError(f"io_mode (env SLLM_STORE_IO_MODE) must be one of {IO_MODES}, "
                                 f"got {io_mode!r}")
        if io_mode not in IO_MODES:
            raise InvalidArgumentError(f"io_mode must be one of {IO_MODES}, got {io_mode!r}")
        size = parse_size(chunk_size) if chunk_size is not None else _env_size("SLLM_STORE_CHUNK_SIZE")
        if size is not None and (size <= 0 or size % 4096):
            hint = " (K/M/G are powers of 1000: use KiB/MiB/GiB)" if size > 0 else ""
            raise InvalidArgumentError(f"chunk_size must be a positive multiple of 4096, got {size}{hint}")
        verify = _bool_arg("verify", verify)
        if verify is None:
            verify = _env_bool("SLLM_STORE_VERIFY")
        staging = _env_int("SLLM_STORE_STAGING_BUFFERS")
        staging = 2 if staging is None else staging
        if staging < 1:
            raise InvalidArgumentError(f"SLLM_STORE_STAGING_BUFFERS must be >= 1, got {staging}")
        return cls(num_threads=threads, io_mode=io_mode, chunk_size=size, verify=verify,
                   staging_buffers=staging, follow_links=bool(_env_bool("SLLM_STORE_FOLLOW_LINKS")),
                   store=StoreSettings.resolve(store, gpu_copy=_bool_arg("copy", copy)),
                   remote=(remote or RemoteOptions()).resolved(), cache=cache)

    def cache_settings(self) -> CacheSettings:
        """The cache section (resolved from the environment when not given)."""
        return self.cache if self.cache is not None else CacheSettings.resolve()

    def with_default_verify(self, tier: str, device_types: set[str], checksummed: bool) -> LoadConfig:
        """This config with ``verify`` decided, when neither the argument nor the environment did.

        Verification is on by default wherever it costs little (docs/benchmarks.md): loads to a
        GPU, whose chunks are checked in the staging buffers as they are read, and loads through
        the store server, which checks a model once when it reads it into its pool. It is off for
        loads of local files into CPU memory, where hashing adds about a tenth to a load from the
        page cache, and when a read size other than the checksummed chunk is asked for
        (``chunk_size``), or when the checkpoint has no checksums (safetensors files).
        """
        if self.verify is not None:
            return self
        if not checksummed:
            return replace(self, verify=False)
        if tier == "store":
            return replace(self, verify=True)
        return replace(self, verify=self.chunk_size is None and bool(device_types - {"cpu"}))

    def with_changes(self, **changes: Any) -> LoadConfig:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return replace(self, **changes)


def variables_table() -> str:
    """:data:`VARIABLES` as the Markdown table of docs/configuration.md."""
    rows = ["| variable | section | default | what it changes |", "|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.section} | {v.default} | {v.meaning} |" for v in VARIABLES]
    return "\n".join(rows) + "\n"
