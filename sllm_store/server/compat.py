"""``sllm-store start``: ServerlessLLM's command line for its store server, run by ours.

ServerlessLLM (PyPI ``serverless-llm-store``) starts its server with ``sllm-store start --host
--port --storage-path --num-thread --chunk-size --mem-pool-size --disk-size
--registration-required``. :func:`start_settings` turns those flags into the arguments of
:func:`sllm_store.server.service.serve` (and the warnings for what is done differently);
:func:`start` checks them and serves. The differences (docs/cli.md#start):

* the default host is ``127.0.0.1`` (loopback), not ``0.0.0.0``;
* sizes are read as ServerlessLLM reads them: ``KB``, ``MB``, ``GB``, ``TB`` are powers of 1024
  (``32MB`` is 32 MiB), unlike ``serve``, where they are powers of 1000;
* ``--disk-size`` and ``--registration-required true`` have no effect: the server keeps no disk
  cache, and serves any model under the storage path without registration.

Example::

    kwargs, warnings = start_settings(build_parser().parse_args(["start", "--port", "9000"]))
    kwargs["listen"]  # "127.0.0.1:9000"
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any

from sllm_store._units import format_size, parse_size
from sllm_store.config import serverlessllm_storage_path
from sllm_store.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

_SERVERLESSLLM_UNITS = ("k", "kb", "m", "mb", "g", "gb", "t", "tb")  # powers of 1024 there
_TRUE = ("1", "true", "t", "yes", "y", "on")  # what click's BOOL reads
_FALSE = ("0", "false", "f", "no", "n", "off")
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?")


def parse_serverlessllm_size(value: str, flag: str, *, block: bool = True) -> int:
    """Bytes from a size as ServerlessLLM writes it: ``KB``/``MB``/``GB``/``TB`` (any case, ``M``
    alike) are powers of 1024, as in its ``to_num_bytes``; ``KiB``/``MiB``..., fractions and a bare
    byte count are read as everywhere else. ``block``: a positive multiple of 4096 bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", value)
    unit = m.group(2).lower() if m else ""
    try:
        n = parse_size(f"{m.group(1)}{unit[0]}iB" if m and unit in _SERVERLESSLLM_UNITS else value)
    except InvalidArgumentError:
        raise InvalidArgumentError(
            f"{flag}: invalid size {value!r} (examples: 32MB, 4GB; MB and GB are MiB and GiB, as in "
            "ServerlessLLM)") from None
    if n <= 0 or (block and n % 4096):
        need = "a positive multiple of 4096 bytes" if block else "positive"
        raise InvalidArgumentError(f"{flag}: {value!r} is not {need} (e.g. 32MB)")
    return n


def parse_bool(value: str, flag: str) -> bool:
    """``true``/``false`` and the other spellings click's BOOL takes (1/0, yes/no, on/off, t/f, y/n)."""
    v = value.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise InvalidArgumentError(f"{flag}: expected true or false, got {value!r}")


def _host(host: str) -> str:
    """The host as given (IPv6 without brackets), checked: a name or an IP address."""
    h = host.strip()
    h = h[1:-1] if h.startswith("[") and h.endswith("]") else h
    if ":" in h:
        try:
            ipaddress.IPv6Address(h)
            return h
        except ValueError:
            pass
    elif _HOSTNAME.fullmatch(h):
        return h
    raise InvalidArgumentError(f"--host: invalid host {host!r} (e.g. 127.0.0.1, 0.0.0.0, localhost)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tcp(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def client_address(host: str, port: int) -> str:
    """The address a client on this machine loads through (``store=...``)."""
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1"}
    return _tcp(wildcard.get(host, host), port)


def start_settings(args: Any) -> tuple[dict[str, Any], list[str]]:
    """(the keyword arguments of ``serve``, warnings to log) for the parsed ``start`` flags
    (host, port, storage_path, num_thread, chunk_size, mem_pool_size, disk_size,
    registration_required); InvalidArgumentError naming the flag for a bad value."""
    host = _host(args.host)
    if not 1 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port: {args.port} is not a TCP port (1..65535)")
    if args.num_thread is not None and args.num_thread < 1:
        raise InvalidArgumentError(f"--num-thread: must be at least 1, got {args.num_thread}")
    kwargs = {
        "storage_path": serverlessllm_storage_path(args.storage_path),
        "mem_pool_size": parse_serverlessllm_size(args.mem_pool_size, "--mem-pool-size"),
        "listen": _tcp(host, args.port),
        "num_threads": args.num_thread,
        "block_size": parse_serverlessllm_size(args.chunk_size, "--chunk-size"),
    }
    warnings = []
    if not _is_loopback(host):
        where = "every network interface" if host in ("0.0.0.0", "::") else host
        warnings.append(f"listening on {kwargs['listen']} ({where}): the server is reachable from the "
                        "network, without authentication; --host 127.0.0.1 keeps it on this machine")
    if args.disk_size is not None:
        size = parse_serverlessllm_size(args.disk_size, "--disk-size", block=False)
        warnings.append(f"--disk-size {args.disk_size} ({format_size(size)}) has no effect: the server "
                        "reads models from the storage path and keeps no disk cache of its own")
    if parse_bool(args.registration_required, "--registration-required"):
        warnings.append("--registration-required true is ignored: the server serves every model under "
                        "the storage path on demand, no registration needed")
    return kwargs, warnings


def start(args: Any) -> None:
    """Run the store server for ``sllm-store start`` ARGS until SIGTERM/SIGINT."""
    from sllm_store.server.service import DEFAULT_MAX_LOADS, available_memory, check_serve_arguments, serve

    kwargs, warnings = start_settings(args)
    for warning in warnings:
        logger.warning("%s", warning)
    pool = kwargs["mem_pool_size"]
    check_serve_arguments(kwargs["storage_path"], pool, kwargs["block_size"], DEFAULT_MAX_LOADS,
                          allow_large_pool=True)
    available = available_memory()
    if available is not None and pool > available:
        raise InvalidArgumentError(
            f"a {format_size(pool)} memory pool is more than the {format_size(available)} of memory "
            "available: choose a smaller --mem-pool-size (sllm-store serve --allow-large-pool allocates "
            "it anyway)")
    host = _host(args.host)
    logger.info("clients on this machine load with store=%r (or SLLM_STORE_ADDRESS)",
                client_address(host, args.port))
    serve(**kwargs)
