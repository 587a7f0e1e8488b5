"""The gRPC service of ``sllm-store serve`` and :func:`serve`.

Destinations named by a client are opened here: CUDA IPC handles with ``_C.CudaIpcMapping``
(the GPU is found by PCI bus id), host memory as the client's sealed memfd (opened through
``/proc/PID/fd/FD`` and mapped). A memfd has no path, so nothing is left behind if either side
dies. Every opened destination is closed when the call ends, successfully or not.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Optional

import grpc

from sllm_store import __version__
from sllm_store._units import format_size
from sllm_store.errors import DeviceError, FormatError, InvalidArgumentError, SllmStoreError, StoreBusyError
from sllm_store.native import _C
from sllm_store.server import rpc
from sllm_store.server import store_pb2 as pb
from sllm_store.server.models import Dest, PooledModels
from sllm_store.server.pool import BlockPool

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def open_destinations(dests: Any) -> Iterator[list[Dest]]:
    """Map the client's destinations; yields (device, address, size) for ``_C.run_copies``."""
    out: list[Dest] = []
    with contextlib.ExitStack() as stack:
        for d in dests:
            kind = d.WhichOneof("kind")
            if d.size == 0 or kind is None:
                out.append(("cpu", 0, 0))
            elif kind == "cuda":
                try:
                    m = _C.CudaIpcMapping(d.cuda.pci_bus_id, d.cuda.handle)
                except SllmStoreError as e:
                    raise DeviceError(f"cannot open the client's GPU memory: {e}") from None
                stack.callback(m.close)
                if d.cuda.offset + d.size > m.size:
                    raise FormatError(f"GPU destination of {d.size} bytes at offset {d.cuda.offset} overruns "
                                      f"the client's allocation ({m.size} bytes)")
                out.append((f"cuda:{m.ordinal}", m.base + d.cuda.offset, d.size))
            else:
                out.append(_open_shm(d.shm.name, d.size, stack))
        yield out


def _open_shm(name: str, size: int, stack: contextlib.ExitStack) -> Dest:
    """Map a client's host destination: its sealed memfd, opened through ``/proc/PID/fd/FD``.
    Only a memfd sealed against shrinking is taken, so that the client cannot truncate it under
    the server's copy (which would kill the server with SIGBUS)."""
    import fcntl

    m = rpc.SHM_NAME.fullmatch(name)
    if m is None:
        raise FormatError(f"invalid shared-memory name {name!r} (expected {rpc.SHM_PREFIX}fd-PID-FD)")
    path = f"/proc/{int(m.group(1))}/fd/{int(m.group(2))}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise FormatError(f"cannot open the client's shared memory {name!r}: {e.strerror or e} "
                          "(did the client exit?)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise FormatError(f"{name!r} is not shared memory of this user")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise FormatError(f"{name!r} is not a memfd sealed against shrinking")
        if st.st_size < size:
            raise FormatError(f"shared memory {name!r} has {st.st_size} bytes, the load needs {size}")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    import ctypes

    view = (ctypes.c_char * size).from_buffer(mm)
    address = ctypes.addressof(view)

    def close() -> None:
        nonlocal view
        del view
        mm.close()

    stack.callback(close)
    return ("cpu", address, size)


DEFAULT_MAX_LOADS = 56  # loads and prefetches at once; more are refused with StoreBusyError
RESERVED_RPC_THREADS = 8  # RPC threads beyond that, for Health, Status, Describe and Evict


class StoreService:
    """The RPC handlers. Each takes (request, context) and returns the reply message."""

    def __init__(self, models: PooledModels, *, cuda: bool, max_loads: int = DEFAULT_MAX_LOADS,
                 gpus: Any = None, attach_socket: str = "") -> None:
        self.models = models
        self.gpus = gpus  # sllm_store.server.gpu.GpuPools, or None without --gpu-pool
        self.attach_socket = attach_socket if gpus is not None else ""
        self.cuda = cuda
        self.max_loads = max_loads
        self._loads = threading.BoundedSemaphore(max_loads)

    def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthReply:
        return pb.HealthReply(version=__version__, cuda=self.cuda, pinned=self.models.pool.pinned,
                              pid=os.getpid(), storage_path=str(self.models.storage))

    def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusReply:
        s = self.models.status()
        g = self.gpus.status() if self.gpus is not None else {"pools": [], "models": {}}
        models = [pb.ModelStatus(**m, gpu=[pb.GpuResidency(**r) for r in g["models"].pop(m["name"], [])])
                  for m in s.pop("models")]
        models += [pb.ModelStatus(name=name, tier="gpu", gpu=[pb.GpuResidency(**r) for r in rs])
                   for name, rs in g["models"].items()]  # resident on a GPU, no longer in the pool
        return pb.StatusReply(models=models, gpu_pools=[pb.GpuPoolStatus(**p) for p in g["pools"]],
                              attach_socket=self.attach_socket, **s)

    def Describe(self, request: pb.DescribeRequest, context: Any) -> pb.DescribeReply:
        index_json, fp, small = self.models.describe(request.model)
        gpu = []
        if self.gpus is not None:
            key, _ = self.models.resolve(request.model)
            gpu = [pb.GpuResidency(**self.gpus.residency(r)) for r in self.gpus.resident_on(key, fp)]
        return pb.DescribeReply(index_json=index_json, fingerprint=fp, small_files=small, gpu=gpu,
                                attach_socket=self.attach_socket)

    @contextlib.contextmanager
    def _load_slot(self) -> Iterator[None]:
        """Loads and prefetches may wait long (fills, streams): at most ``max_loads`` run at once,
        so that RPC threads stay free for Health, Status and Describe. Beyond that the call is
        refused at once (the client retries), rather than holding a thread while it waits."""
        if not self._loads.acquire(blocking=False):
            raise StoreBusyError(f"the store server is running {self.max_loads} loads and prefetches "
                                 "already (--max-loads)")
        try:
            yield
        finally:
            self._loads.release()

    def Prefetch(self, request: pb.PrefetchRequest, context: Any) -> pb.PrefetchReply:
        t0 = time.perf_counter()
        to = request.to or "dram"
        with self._load_slot():
            if to == "dram":
                hit, nbytes = self.models.prefetch(request.model, verify=request.verify)
            elif self.gpus is None:
                raise InvalidArgumentError(f"cannot prefetch to {to}: the server has no GPU pool")
            else:
                out = self.gpus.make_resident(request.model, to, pin=request.pin)
                hit, nbytes = out["hit"], out["bytes"]
        return pb.PrefetchReply(hit=hit, seconds=time.perf_counter() - t0, bytes=nbytes)

    def Load(self, request: pb.LoadRequest, context: Any) -> pb.LoadReply:
        with self._load_slot():
            return self._load(request, context)

    def _load(self, request: pb.LoadRequest, context: Any) -> pb.LoadReply:
        t0 = time.perf_counter()
        copies = [(c.file, c.offset, c.dest, c.dest_offset, c.length) for c in request.copies]
        # The client may give up (deadline, cancellation, a dead process): then stop writing into
        # its memory at once; with a GPU destination it may hand that memory to other tensors.
        gone = threading.Event()
        context.add_callback(gone.set)
        with open_destinations(request.dests) as dests:
            out = self.models.load(request.model, request.fingerprint, copies, dests, verify=request.verify,
                                  cancelled=lambda: gone.is_set() or not context.is_active())
        seconds = time.perf_counter() - t0
        logger.info("served %s: %s in %.3f s (%s%s)", request.model, format_size(out["bytes"]), seconds,
                    "hit" if out["hit"] else "miss", ", streamed" if out["streamed"] else "")
        return pb.LoadReply(hit=out["hit"], seconds=seconds, copy_seconds=out["copy_seconds"],
                            bytes=out["bytes"], streamed=out["streamed"])

    def Evict(self, request: pb.EvictRequest, context: Any) -> pb.EvictReply:
        tier = request.tier
        if tier not in ("", "dram", "gpu") and not tier.startswith("cuda:"):
            raise InvalidArgumentError(f"unknown tier {tier!r}: dram, gpu or cuda:N")
        if tier not in ("", "dram") and self.gpus is None:
            raise InvalidArgumentError(f"cannot evict from {tier}: the server has no GPU pool (--gpu-pool)")
        evicted: list[str] = []
        if self.gpus is not None and tier != "dram":
            key = self.models.resolve(request.model)[0] if request.model else ""
            evicted += self.gpus.evict(key, tier if tier.startswith("cuda:") else "")
        if tier in ("", "dram"):
            evicted += self.models.evict(request.model)
        return pb.EvictReply(evicted=evicted)


def _handler(name: str, fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Wraps a handler: logs, and turns exceptions into a status + the error class name."""

    def call(request: Any, context: Any) -> Any:
        try:
            return fn(request, context)
        except Exception as e:  # every failure reaches the client with its class
            if not context.is_active():  # the call has ended (client gone, shutdown): nothing to report
                logger.info("%s: %s", name, e)
                context.abort(grpc.StatusCode.CANCELLED, str(e))
            cls = type(e).__name__ if isinstance(e, SllmStoreError) else "StoreError"
            code = getattr(grpc.StatusCode, rpc.status_code_name(e))
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("%s failed", name)
            else:
                logger.warning("%s: %s: %s", name, type(e).__name__, e)
            context.set_trailing_metadata(((rpc.ERROR_KEY, cls),))
            context.abort(code, str(e) or type(e).__name__)

    return call


def add_service(server: grpc.Server, service: StoreService) -> None:
    """Serve ``service``'s handlers on ``server`` (before it starts)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _handler(name, getattr(service, name)),
            request_deserializer=req.FromString,
            response_serializer=rep.SerializeToString,
        )
        for name, (req, rep) in rpc.METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(rpc.SERVICE, handlers),))


def make_server(address: str, max_loads: int = DEFAULT_MAX_LOADS) -> tuple[grpc.Server, str]:
    """A gRPC server bound to ``address``, not started, with no service yet (:func:`add_service`);
    returns (server, target). Binding comes first so that an address in use is refused before
    anything is allocated. It has ``RESERVED_RPC_THREADS`` threads more than the load limit, for
    the quick calls."""
    max_workers = max_loads + RESERVED_RPC_THREADS
    target = rpc.normalize_address(address)
    # No SO_REUSEPORT: a second server on a TCP port in use must fail, not share the port.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sllm-rpc"),
                         options=[*rpc.CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
    sock = rpc.unix_path(target)
    if sock is not None and rpc.is_default_address(target):
        rpc.private_directory(os.path.dirname(sock), create=True)
    if sock is not None:
        Path(sock).parent.mkdir(parents=True, exist_ok=True)
        if os.path.exists(sock):
            if _socket_alive(target):
                raise SllmStoreError(f"another sllm-store server is listening on {target}")
            os.unlink(sock)  # stale socket of a server that died
        old = os.umask(0o177)  # the socket is created owner-only (0600)
        try:
            port = server.add_insecure_port(target)
        finally:
            os.umask(old)
    else:
        try:
            port = server.add_insecure_port(target)
        except RuntimeError as e:  # grpc: "Failed to bind to address ..."
            raise SllmStoreError(f"cannot listen on {target} (is the port in use?): {e}") from None
    if port == 0:
        raise SllmStoreError(f"cannot listen on {target}")
    if sock is None and target.endswith(":0"):
        target = target[:-2] + f":{port}"
    return server, target


def _remove_socket(target: str) -> None:
    sock = rpc.unix_path(target)
    if sock is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def _socket_alive(target: str) -> bool:
    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=1.0)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (``MemAvailable``); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_serve_arguments(storage_path: str, mem_pool_size: int, block_size: int, max_loads: int,
                          allow_large_pool: bool = False) -> None:
    """What :func:`serve` checks before it allocates anything."""
    from sllm_store.errors import ModelNotFoundError

    if not Path(storage_path).is_dir():
        raise ModelNotFoundError(f"storage path '{storage_path}' is not a directory")
    if max_loads < 1:
        raise InvalidArgumentError(f"max_loads must be >= 1, got {max_loads}")
    if block_size <= 0 or block_size % 4096 or mem_pool_size < block_size:
        raise InvalidArgumentError(f"the memory pool ({format_size(mem_pool_size)}) must hold at least one "
                                   f"block of a positive multiple of 4096 bytes ({block_size})")
    available = available_memory()
    if available is not None and mem_pool_size > available and not allow_large_pool:
        raise InvalidArgumentError(
            f"a {format_size(mem_pool_size)} memory pool is more than the {format_size(available)} of "
            "memory available: choose a smaller --mem-pool-size, or pass --allow-large-pool to "
            "allocate it anyway")


def serve(storage_path: str, mem_pool_size: int, *, listen: Optional[str] = None,
          num_threads: Optional[int] = None, block_size: int = 32 << 20, io_mode: str = "auto",
          copy_threads: int = 4, max_loads: int = DEFAULT_MAX_LOADS, ready: Optional[threading.Event] = None,
          stop: Optional[threading.Event] = None, allow_large_pool: bool = False,
          gpu_pools: Optional[dict[str, int]] = None) -> None:
    """Run the store server until SIGTERM/SIGINT (or ``stop`` is set).

    The arguments are checked first (the storage path, the load limit, and a pool no larger
    than the memory available unless ``allow_large_pool``), before the pool is allocated.
    ``gpu_pools``: {"cuda:N": bytes} of GPU memory the server may keep models in, which clients
    on this host attach to (:mod:`sllm_store.server.gpu`).

    Example::

        serve("/models", 32 << 30, listen="unix:///run/sllm-store.sock")
    """
    from sllm_store.config import default_num_threads

    threads = num_threads or default_num_threads()
    check_serve_arguments(storage_path, mem_pool_size, block_size, max_loads, allow_large_pool)
    address = rpc.normalize_address(listen or rpc.default_address())
    if rpc.is_default_address(address):  # before the pool: a directory another user made is refused
        rpc.private_directory(os.path.dirname(rpc.unix_path(address) or ""), create=True)
    import sllm_store.dtypes  # noqa: F401  (imports torch now, not on the first client's request)

    if gpu_pools:  # before the pool: a device that cannot share its memory is refused at once
        from sllm_store.server.gpu import check_gpu_pools

        check_gpu_pools(gpu_pools)
    server, target = make_server(address, max_loads)  # an address in use is refused before the pool
    try:
        logger.info("allocating the memory pool (%s)", format_size(mem_pool_size))
        pool = BlockPool(mem_pool_size, block_size, threads=threads)
        models = PooledModels(storage_path, pool, num_threads=threads, io_mode=io_mode,
                              copy_threads=copy_threads)
        gpus = None
        if gpu_pools:
            from sllm_store.server.gpu import GpuPools

            gpus = GpuPools(models, gpu_pools, copy_threads=copy_threads)
    except BaseException:
        server.stop(None)
        _remove_socket(target)
        raise
    service = StoreService(models, cuda=_C.cuda_device_count() > 0, max_loads=max_loads, gpus=gpus)
    add_service(server, service)
    attacher = None
    if gpus is not None:
        from sllm_store.server.attach import AttachServer, socket_path

        attach_path = socket_path(rpc.unix_path(target), str(models.storage))
        attacher = AttachServer(attach_path, gpus)
        service.attach_socket = attach_path
        logger.info("clients attach to models in GPU memory through %s", attach_path)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    logger.info("sllm-store %s serving %s on %s (pool %s, %s, %d threads)", __version__, models.storage,
                target, format_size(pool.size), "pinned" if pool.pinned else "pageable", threads)
    if ready is not None:
        ready.set()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        logger.info("shutting down")
        server.stop(grace=5).wait()
        if attacher is not None:
            attacher.close()
        if gpus is not None:
            gpus.close()
        models.close()
        _remove_socket(target)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logger.info("sllm-store server stopped")
