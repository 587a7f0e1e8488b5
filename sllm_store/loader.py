"""Loading checkpoints: one orchestration for every tier.

:func:`load_opened` runs every load: assign devices, plan (:mod:`sllm_store.plan`), let the tier
allocate and fill the destinations (:mod:`sllm_store.tiers`), then make the tensors as views into
one allocation per device and report. :func:`load_state_dict` opens the path with the first tier
that accepts it (a store server, an object store, the local disk) and runs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, TypeVar, Union

import torch

from sllm_store._units import SizeLike, format_size
from sllm_store.config import LoadConfig, RemoteOptions
from sllm_store.dtypes import dtype_from_name
from sllm_store.errors import CheckpointMismatchError, ModelChangedError
from sllm_store.index import Index, PathLike, check_data_files, is_converted, read_index
from sllm_store.plan import Buffer, DeviceMap, LoadReport, Plan, assign_devices, make_report, views
from sllm_store.streaming import PendingLoad
from sllm_store.tiers import Checkpoint, open_checkpoint

logger = logging.getLogger(__name__)

T = TypeVar("T")


def load_opened(checkpoint: Checkpoint, device: DeviceMap, t0: Optional[float] = None,
                stream: Optional[PendingLoad] = None, on_fill: Optional[Callable[[], None]] = None,
                ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Load the tensors of an opened checkpoint onto ``device`` (a device, or a mapping of tensor
    names to devices: the names it leaves out are not loaded); returns (tensors, report).
    ``stream``: the tensors are handed to it as soon as their memory is allocated, and it follows
    the bytes as they land (a non-blocking load). ``on_fill``: called once the load is planned and
    its memory taken, as the bytes start to move (the moving releases the GIL: Python work started
    there runs beside it without delaying the load's own Python steps)."""
    t1 = time.perf_counter()
    t0 = t1 if t0 is None else t0
    assign = assign_devices(checkpoint.index, device)
    plan, buffers = _prepare(checkpoint, assign, checkpoint.allocate)
    t2 = time.perf_counter()
    if on_fill is not None:
        on_fill()
    if stream is not None:  # the tensors go out now, their bytes arriving
        progress = stream.begin(checkpoint.index, plan, buffers)
        stats = checkpoint.fill(plan, buffers, progress)
        t3 = time.perf_counter()
        tensors = stream.tensors
    else:  # views once filled: an alias placed on another device is a copy of its target's bytes
        stats = checkpoint.fill(plan, buffers)
        t3 = time.perf_counter()
        tensors = views(checkpoint.index, plan, buffers)
    stats.update(_stages(t0, t1, t2, t3))
    report = _report(checkpoint, plan, t0, stats)
    logger.info("loaded %s (%s, %s tier) in %.3f s, %.2f GB/s", checkpoint.path, format_size(report.bytes),
                checkpoint.tier, report.seconds, report.gb_per_s)
    return tensors, report


def fill_opened(checkpoint: Checkpoint, targets: Mapping[str, torch.Tensor], *, strict: bool = True,
                t0: Optional[float] = None) -> LoadReport:
    """Copy the tensors of an opened checkpoint into ``targets`` (existing tensors, e.g. an
    engine's parameters), each in place: no other memory is allocated for them. ``strict``: every
    tensor of the checkpoint must have a target. Names, shapes and dtypes are checked before any
    byte is read."""
    t1 = time.perf_counter()
    t0 = t1 if t0 is None else t0
    index = checkpoint.index
    check_targets(index, targets, strict)
    into: dict[str, torch.Tensor] = {}  # stored tensor -> destination (an alias's, if only it is given)
    for name, t in targets.items():
        into.setdefault(index.resolve(name).name, t)
    assign = {name: t.device for name, t in into.items()}
    plan, buffers = _prepare(checkpoint, assign, lambda p: checkpoint.adopt(p, into), own_slots=True)
    t2 = time.perf_counter()
    stats = checkpoint.fill(plan, buffers)
    t3 = time.perf_counter()
    for name, t in targets.items():  # tied names given as tensors of their own
        stored = into[index.resolve(name).name]
        if t.data_ptr() != stored.data_ptr():
            t.copy_(stored)
    stats.update(_stages(t0, t1, t2, t3))
    report = _report(checkpoint, plan, t0, stats)
    logger.info("filled %d tensors from %s (%s, %s tier) in %.3f s, %.2f GB/s", len(targets), checkpoint.path,
                format_size(report.bytes), checkpoint.tier, report.seconds, report.gb_per_s)
    return report


def _prepare(checkpoint: Checkpoint, assign: dict[str, torch.device],
             buffers_for: Callable[[Plan], list[Buffer]], own_slots: bool = False,
             ) -> tuple[Plan, list[Buffer]]:
    """The steps every load shares before the bytes move: check the devices, settle the
    verification default, plan, and take the destination buffers (``buffers_for(plan)``)."""
    checkpoint.check_devices(set(assign.values()))
    checkpoint.config = checkpoint.config.with_default_verify(
        checkpoint.tier, {d.type for d in assign.values()}, any(f.checksums for f in checkpoint.index.files))
    plan = checkpoint.plan(assign, own_slots)
    return plan, buffers_for(plan)


def _stages(t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    """A load's timeline in the report: opening the checkpoint (``t0`` to ``t1``), planning and
    taking the memory (to ``t2``), moving the bytes (to ``t3``), and the tensors made after."""
    return {"open_seconds": t1 - t0, "prepare_seconds": t2 - t1, "fill_seconds": t3 - t2,
            "finish_seconds": time.perf_counter() - t3}


def _report(checkpoint: Checkpoint, plan: Plan, t0: float, stats: dict[str, Any]) -> LoadReport:
    return make_report(checkpoint.path, checkpoint.index, plan, t0, tier=checkpoint.tier,
                       io_mode=stats.pop("io_mode"), threads=stats.pop("threads"), detail=stats)


def check_targets(index: Index, targets: Mapping[str, torch.Tensor], strict: bool) -> None:
    """CheckpointMismatchError naming every target the checkpoint lacks or has in another shape
    or dtype, every target that is not contiguous, and (``strict``) every stored tensor without a
    target."""
    problems = []
    missing = sorted(n for n in targets if n not in index.tensors)
    if missing:
        problems.append(f"{len(missing)} tensors missing from the checkpoint ({_some(missing)})")
    if strict:
        covered = {index.resolve(n).name for n in targets if n in index.tensors}
        extra = sorted(t.name for t in index.tensors.values() if t.alias_of is None and t.name not in covered)
        if extra:
            problems.append(f"{len(extra)} tensors of the checkpoint with nowhere to go ({_some(extra)})")
    shaped = []
    for name, t in targets.items():
        if name not in index.tensors:
            continue
        stored = index.resolve(name)
        want = (tuple(stored.shape), dtype_from_name(stored.dtype))
        if (tuple(t.shape), t.dtype) != want:
            shaped.append(f"{name}: checkpoint {list(want[0])} {stored.dtype}, target {list(t.shape)} "
                          f"{str(t.dtype).removeprefix('torch.')}")
        elif not t.is_contiguous():
            shaped.append(f"{name}: the target is not contiguous")
        elif stored.strides is not None:
            shaped.append(f"{name}: strided in the checkpoint (load it with load_state_dict)")
    if shaped:
        problems.append(f"{len(shaped)} tensors that do not match ({'; '.join(shaped[:5])}"
                        f"{'; ...' if len(shaped) > 5 else ''})")
    if problems:
        raise CheckpointMismatchError(f"the checkpoint {index.path} does not fit the tensors to fill: "
                                      + "; ".join(problems))


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def with_checkpoint(path: PathLike, config: LoadConfig, use: Callable[[Checkpoint], T]) -> T:
    """``use(checkpoint)`` with ``path`` opened by the first tier that accepts it, and closed
    after; a checkpoint that changed while it was planned (ModelChangedError) is opened again and
    used anew, once."""
    for attempt in (0, 1):
        with open_checkpoint(path, config) as checkpoint:
            try:
                return use(checkpoint)
            except ModelChangedError:
                if attempt:
                    raise
                logger.info("%s changed while it was planned; opening it again", path)
    raise AssertionError("unreachable")  # pragma: no cover


def load(path: PathLike, device: DeviceMap, config: LoadConfig) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Open ``path`` with the first tier that accepts it and load it onto ``device``."""
    t0 = time.perf_counter()
    return with_checkpoint(path, config, lambda checkpoint: load_opened(checkpoint, device, t0))


def start(path: PathLike, device: DeviceMap, config: LoadConfig) -> PendingLoad:
    """:func:`load` in the background: a :class:`~sllm_store.streaming.PendingLoad`, returned
    once the tensors' memory exists."""
    t0 = time.perf_counter()
    return PendingLoad(str(path)).run(
        lambda pending: with_checkpoint(path, config, lambda cp: load_opened(cp, device, t0, stream=pending)))


def start_opened(checkpoint: Checkpoint, device: DeviceMap, t0: float) -> PendingLoad:
    """A :class:`~sllm_store.streaming.PendingLoad` of an opened checkpoint onto ``device``,
    returned once its tensors exist. It owns the checkpoint from then on: it closes it once the
    load has ended and ``release()`` was called (when the caller has read the config files)."""
    return PendingLoad(checkpoint.path).run(lambda p: load_opened(checkpoint, device, t0, stream=p),
                                            closer=checkpoint.close)


def load_state_dict(
    path: PathLike,
    device: DeviceMap = "cpu",
    *,
    num_threads: Optional[int] = None,
    chunk_size: Optional[SizeLike] = None,
    verify: Optional[bool] = None,
    io_mode: Optional[str] = None,
    store: Optional[str] = None,
    remote: Optional[RemoteOptions] = None,
    wait: bool = True,
    copy: Optional[bool] = None,
) -> Union[dict[str, torch.Tensor], PendingLoad]:
    """Load a converted checkpoint as a ``dict[str, torch.Tensor]``.

    Args:
        path: directory written by :func:`sllm_store.convert` / :func:`sllm_store.save_state_dict`;
            plain safetensors (a file, or a model directory) load too, through the same pipeline.
            An ``s3://bucket/prefix`` or ``http(s)://`` URL of a converted checkpoint streams from
            the object store (parallel ranged GETs, copied into place as they arrive) and is
            written through to the local cache (``SLLM_STORE_CACHE_DIR``); later loads of the URL
            load the cache entry.
        device: target device (``"cpu"``), or a mapping of every tensor name to a device.
        num_threads: reader threads (default: env ``SLLM_STORE_NUM_THREADS`` or the CPU count,
            clamped to 4..16), also for a URL's copy in the local cache. The GETs in flight of a
            download are ``remote``'s ``max_gets``.
        chunk_size: read unit in bytes or as ``"16MiB"`` (default: the checkpoint's chunk size).
        verify: check every chunk's checksum while loading (env ``SLLM_STORE_VERIFY``). Default:
            on for loads to a GPU and through a store server, off for loads of local files into
            CPU memory (where it adds about a tenth to a load from the page cache). A ``chunk_size``
            other than the checkpoint's turns the default off. Remote downloads are always checked.
        io_mode: ``"auto"`` (``"mmap"`` for a whole checkpoint into CPU memory; otherwise
            O_DIRECT when the files are not in the page cache, else buffered; env
            ``SLLM_STORE_IO_MODE``), ``"buffered"``, ``"direct"`` (O_DIRECT, falling back to
            buffered where the filesystem refuses it) or ``"mmap"`` (CPU only: tensors are views
            of private copy-on-write mappings of the data files, faulted in by the worker threads;
            no copy, shares the page cache; the files must not be truncated while in use).
        store: address of a store server (``sllm-store serve``), e.g. ``"unix:///run/sllm.sock"``
            (env ``SLLM_STORE_ADDRESS``). The server copies the model from its pinned-memory cache
            into this process's memory; ``path`` is then a model name relative to the server's
            storage path (a local path inside it works too). Without a store, the load runs in
            this process.
        remote: :class:`sllm_store.RemoteOptions` (endpoint, region, anonymous access,
            credentials, GETs in flight) for URLs; by default from the standard AWS environment
            variables and ``SLLM_STORE_REMOTE_GETS``.

        wait: ``False`` returns a :class:`~sllm_store.streaming.PendingLoad` as soon as the
            tensors' memory is allocated, while the bytes keep arriving in the background:
            ``pending.wait(name)`` blocks until a tensor is complete, ``pending.result()`` until
            all are, ``pending.cancel()`` stops the load (docs/streaming.md).
        copy: with a store server that holds the model in GPU memory (``serve --gpu-pool``), a
            load to that GPU maps the server's copy read-only (no bytes move); ``True`` makes a
            private device-to-device copy instead, for weights that will be modified (env
            ``SLLM_STORE_GPU_COPY``; docs/gpu-tier.md).

    All tensors of one device are views into a single allocation; tied tensors share storage.

    Example::

        sd = sllm_store.load_state_dict("llama.sllm", verify=True)
        model.load_state_dict(sd)

    Raises:
        MissingFileError, TruncatedFileError, FormatError, UnsupportedVersionError: bad checkpoint.
        ChecksumError: ``verify=True`` and a chunk is corrupted.
        DeviceError: the device is unknown or unavailable.
        StoreError: with a store, what the server reported (e.g. ``ModelNotFoundError``), or
            ``StoreUnavailableError`` when it cannot be reached or does not answer in time.
    """
    config = LoadConfig.resolve(
        num_threads=num_threads, io_mode=io_mode, chunk_size=chunk_size, verify=verify, store=store,
        remote=remote, copy=copy,
    )
    if not wait:
        return start(path, device, config)
    tensors, _ = load(path, device, config)
    return tensors


def load_into(path: PathLike, targets: Mapping[str, torch.Tensor], *, strict: bool = True,
              **settings: Any) -> LoadReport:
    """Fill existing tensors in place with a checkpoint's tensors of the same names (e.g. an
    inference engine's parameters, on any devices): the bytes go straight into their memory, and
    no other copy of the model is made. ``settings`` are :func:`load_state_dict`'s (threads,
    verify, store, remote...). ``strict`` (default): every tensor of the checkpoint must have a
    target. Returns the :class:`LoadReport`.

    Example::

        params = dict(model.named_parameters())
        sllm_store.load_into("model.sllm", params)

    Raises:
        CheckpointMismatchError: a target missing from the checkpoint, of another shape or dtype,
            not contiguous, or (``strict``) a checkpoint tensor without a target; raised before
            any byte is read. Otherwise as :func:`load_state_dict`.
    """
    t0 = time.perf_counter()
    config = LoadConfig.resolve(**settings)
    return with_checkpoint(path, config,
                           lambda checkpoint: fill_opened(checkpoint, targets, strict=strict, t0=t0))


def load_state_dict_with_report(
    path: PathLike, device: DeviceMap = "cpu", **kwargs: Any
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Like :func:`load_state_dict`, also returning a :class:`LoadReport` (time, GB/s, placement)."""
    return load(path, device, LoadConfig.resolve(**kwargs))


def verify(path: PathLike, *, num_threads: Optional[int] = None) -> None:
    """Check a converted checkpoint completely: index, every data file, every chunk checksum.
    Safetensors weights and ServerlessLLM checkpoints have no checksums: their index and the
    sizes of their data files are checked.

    Returns None if all is well; raises the specific :class:`SllmStoreError` otherwise.

    Example::

        sllm_store.verify("llama.sllm")
    """
    from sllm_store.formats import open_index
    from sllm_store.tiers.local import verify_files

    if not is_converted(path):  # safetensors or ServerlessLLM: no checksums to check
        index = open_index(path)
        check_data_files(index)
        logger.info("%s (%s) has no checksums: its index and data file sizes are checked", path,
                    index.source.get("format"))
        return
    index = read_index(path)
    verify_files(index, LoadConfig.resolve(num_threads=num_threads, verify=True, chunk_size=index.chunk_size))
