"""Streaming loads: the tensors are handed out before their bytes have all arrived.

``load_state_dict(path, device, wait=False)`` returns a :class:`PendingLoad` as soon as the
destination memory is allocated; the bytes keep arriving on the pipeline's threads, in the order
the checkpoint lays them out (a forward pass's order, for checkpoints that record it: see
docs/format.md). A tensor is *ready* once every chunk holding its bytes has landed in its memory
(read, and checked when verifying; for a GPU, the copy completed), never before.

On a GPU, a consumer need not wait on the host: :meth:`PendingLoad.wait_on_device` returns as
soon as the tensors' bytes are read, checked and their copies queued, having made a CUDA stream
(by default the current one) wait on the device for those copies, through the events the copy
streams record after each chunk.

``load_model(path, stream=True)`` returns the model as soon as it is built: forward pre-hooks
(:func:`wait_in_forward`) make each module wait for its own weights (on the device, for a module
on a GPU), so the first layers compute while the last ones load, and remove themselves once the
load is complete.

Example::

    pending = sllm_store.load_state_dict("llama.sllm", "cuda:0", wait=False)
    pending.wait("model.embed_tokens.weight")        # blocks until those bytes are in place
    emb = pending.tensors["model.embed_tokens.weight"]
    ...
    report = pending.result_report()                # waits for the rest; raises the load's error
"""

from __future__ import annotations

import atexit
import bisect
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from sllm_store.errors import InvalidArgumentError, LoadCancelledError, ModelChangedError, UnknownNameError
from sllm_store.index import Index
from sllm_store.plan import Buffer, LoadReport, Plan, views

logger = logging.getLogger(__name__)

_POLL = 0.1  # seconds between checks for Ctrl-C while waiting
_EXIT_WAIT = 30.0  # seconds a load cancelled at exit is given to stop


def tensor_units(index: Index, plan: Plan) -> dict[str, list[int]]:
    """The read units of ``plan`` that hold each assigned tensor's bytes (aliases: their target's)."""
    by_slot: dict[int, list[tuple[int, int, int]]] = {}  # slot -> (dest offset, end, unit), sorted
    for unit, _coff, slot, doff, n in plan.segments:
        by_slot.setdefault(slot, []).append((doff, doff + n, unit))
    ends: dict[int, list[int]] = {}
    for slot, segs in by_slot.items():
        segs.sort()
        ends[slot] = [e for _, e, _ in segs]
    stored_units: dict[str, list[int]] = {}
    out: dict[str, list[int]] = {}
    for name in plan.assign:
        stored = index.resolve(name)
        if stored.name not in stored_units:
            slot, off = plan.placement[stored.name]
            segs, slot_ends = by_slot.get(slot, []), ends.get(slot, [])
            units: set[int] = set()
            k = bisect.bisect_right(slot_ends, off)  # the first segment ending past the tensor's start
            while k < len(segs) and segs[k][0] < off + stored.nbytes:
                units.add(segs[k][2])
                k += 1
            stored_units[stored.name] = sorted(units)
        out[name] = stored_units[stored.name]
    return out


class PendingLoad:
    """A load running in the background: its tensors exist (their memory is allocated) and fill
    as the bytes arrive.

    ``tensors``: the name -> tensor dict a blocking load returns; read a tensor only once
    :meth:`ready` says so (or after :meth:`wait`). An error of the load is raised by the next
    :meth:`wait` (and :meth:`result`); :meth:`cancel` stops the load and frees its memory.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.tensors: dict[str, torch.Tensor] = {}
        self._units: dict[str, list[int]] = {}
        self._progress: Any = None
        self._total = 0
        self._t0 = time.perf_counter()
        self._begun = threading.Event()
        self._finished = threading.Event()
        self._release = threading.Event()  # the opener's files may be closed (see run())
        self._error: Optional[BaseException] = None
        self._report: Optional[LoadReport] = None
        self._thread: Optional[threading.Thread] = None
        self.started = time.time()  # wall clock when the load started
        self.timeline: dict[str, float] = {}  # "allocated", "done" -> seconds since then

    # -- the loader's side ------------------------------------------------------------------

    def begin(self, index: Index, plan: Plan, buffers: list[Buffer]) -> Any:
        """Called by the load once the destination memory exists: publishes the tensors (views
        of ``buffers``) and returns the progress that the tier marks."""
        from sllm_store.native import _C

        if self._begun.is_set():
            raise ModelChangedError(f"{self.path} changed while it was loading; load it again")
        for name in plan.assign:
            stored = index.resolve(name)
            if stored.name != name and plan.assign[name] != plan.devices[plan.placement[stored.name][0]]:
                raise InvalidArgumentError(
                    f"a streaming load cannot place the tied tensor {name!r} on another device than "
                    f"{stored.name!r}; load it with wait=True")
        self._units = tensor_units(index, plan)
        self._total = sum(u[2] for u in plan.units)
        self._progress = _C.LoadProgress(len(plan.units))
        self.tensors = views(index, plan, buffers)
        self.timeline["allocated"] = time.perf_counter() - self._t0
        self._begun.set()
        return self._progress

    def run(self, load: Callable[[PendingLoad], tuple[Any, LoadReport]], *,
            closer: Optional[Callable[[], None]] = None) -> PendingLoad:
        """Run ``load(self)`` on a thread of its own and return once the tensors exist (raising
        what the load raised before that). ``closer``: called on that thread once the load has
        ended and :meth:`release` was called (it closes what the caller opened and still
        reads: the checkpoint's config files, say)."""
        if closer is None:
            self._release.set()
        self._thread = threading.Thread(target=self._body, args=(load, closer), name="sllm-stream",
                                        daemon=True)
        _running.add(self)  # until _body ends, whatever becomes of the load
        self._thread.start()
        while not self._begun.wait(_POLL):
            pass
        if self._progress is None:  # failed before any memory was allocated
            self._release.set()
            self._thread.join()
            assert self._error is not None
            raise self._error
        return self

    def release(self) -> None:
        """The caller no longer needs the files the load opened (config files, say)."""
        self._release.set()

    def _body(self, load: Callable[[PendingLoad], tuple[Any, LoadReport]],
              closer: Optional[Callable[[], None]]) -> None:
        try:
            _, self._report = load(self)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting threads
            # The frames' locals (the load's buffers among them) must not outlive the load.
            traceback.clear_frames(e.__traceback__)
            self._error = e
        finally:
            self.timeline["done"] = time.perf_counter() - self._t0
            if self._progress is not None:
                self._progress.close()
            self._finished.set()
            _running.discard(self)
            self._begun.set()
            if closer is not None:
                self._release.wait()
                try:
                    closer()
                except Exception:  # noqa: BLE001 - the load's outcome stands
                    logger.exception("closing %s after its load failed", self.path)

    # -- the caller's side ------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether the load has ended (completely, failed or cancelled)."""
        return self._finished.is_set()

    @property
    def progress(self) -> tuple[int, int]:
        """(bytes landed, bytes to load) of the read units."""
        if self._finished.is_set() and self._error is None:
            return self._total, self._total
        return (self._progress.bytes if self._progress is not None else 0), self._total

    @property
    def report(self) -> Optional[LoadReport]:
        """The load's :class:`LoadReport` once it has completed, else None."""
        return self._report if self._finished.is_set() else None

    def ready(self, name: Optional[str] = None) -> bool:
        """Whether tensor ``name`` (None: every tensor) is complete in its memory."""
        if self._finished.is_set():
            return self._error is None
        return bool(self._progress.all_marked(self._units_of(list(self._units) if name is None else [name])))

    def wait(self, names: Union[str, Iterable[str], None] = None, timeout: Optional[float] = None) -> bool:
        """Block until the tensor(s) ``names`` (None: the whole load) are complete; False if
        ``timeout`` seconds pass first. Raises the load's error (e.g. ``ChecksumError``,
        ``LoadCancelledError``) if it failed. Ctrl-C while waiting cancels the load."""
        units = None if names is None else self._units_of(_name_list(names))
        return self._wait_units(units, timeout)

    def wait_on_device(self, names: Union[str, Iterable[str], None] = None, stream: Any = None,
                       timeout: Optional[float] = None) -> bool:
        """Make a CUDA stream wait, on the GPU, for the tensor(s) ``names`` (None: every tensor):
        returns once their bytes are read, checked and their copies queued, without waiting for
        the copies themselves; work queued on the stream afterwards sees the complete tensors.
        ``stream``: a ``torch.cuda.Stream`` or a raw stream handle of the tensors' device
        (default: that device's current stream). Tensors in host memory (or filled by a tier that
        copies on the host) are waited for on the host, as :meth:`wait` does. False if
        ``timeout`` seconds pass first; raises the load's error as :meth:`wait` does. A copy that
        fails on the device after it was queued is reported by the next :meth:`wait` (and leaves
        the device's context in error, so the stream's later work fails too)."""
        if self._finished.is_set() and self._error is not None:
            raise self._error  # a cancelled load has no tensors left to look at
        picked = list(self._units) if names is None else _name_list(names)
        groups = self._device_groups(picked)
        cuda_devices = [d for d in groups if d]
        if stream is not None and len(cuda_devices) > 1:
            raise InvalidArgumentError(f"these tensors are on {len(cuda_devices)} GPUs "
                                       f"({', '.join(cuda_devices)}): one stream cannot wait for them all")
        deadline = None if timeout is None else time.monotonic() + timeout
        for device, units in groups.items():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._wait_group(device, units, stream, left):
                return False
        return True

    def result(self, timeout: Optional[float] = None) -> dict[str, torch.Tensor]:
        """The tensors, once every one is complete (TimeoutError after ``timeout`` seconds)."""
        if not self.wait(None, timeout):
            raise TimeoutError(f"the load of {self.path} did not complete in {timeout} s")
        return self.tensors

    def result_report(self, timeout: Optional[float] = None) -> LoadReport:
        """The :class:`LoadReport`, once the load has completed."""
        self.result(timeout)
        assert self._report is not None
        return self._report

    def cancel(self) -> bool:
        """Stop the load: its workers stop, its memory is freed (once no tensor of it is
        referenced elsewhere) and later waits raise ``LoadCancelledError``. False if the load
        had already ended."""
        if self._finished.is_set():
            return False
        self._progress.cancel()
        self._finished.wait()
        if self._error is None:  # it completed meanwhile
            return False
        self.tensors = {}
        return True

    def __enter__(self) -> PendingLoad:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self.cancel()

    def _units_of(self, names: Iterable[str]) -> list[int]:
        out: set[int] = set()
        for n in names:
            if n not in self._units:
                raise UnknownNameError(f"{n!r} is not a tensor of this load")
            out.update(self._units[n])
        return sorted(out)

    def _device_groups(self, names: list[str]) -> dict[str, list[int]]:
        """The read units of the tensors ``names``, by their device ("cuda:N"; "" for host memory)."""
        by_device: dict[str, list[str]] = {}
        for n in names:
            if n not in self._units:
                raise UnknownNameError(f"{n!r} is not a tensor of this load")
            device = self.tensors[n].device
            by_device.setdefault(str(device) if device.type == "cuda" else "", []).append(n)
        return {device: self._units_of(group) for device, group in by_device.items()}

    def _wait_group(self, device: str, units: list[int], stream: Any, timeout: Optional[float]) -> bool:
        """:meth:`wait_on_device` for the ``units`` of one device ("": host memory, waited for on
        the host)."""
        if not device:
            return self._wait_units(units, timeout)
        if not self._wait_units(units, timeout, queued=True):
            return False
        if self._progress.stream_wait(units, _stream_handle(stream, device), device):
            return True
        return self._wait_units(units, timeout)  # the load ended meanwhile: on the host

    def _wait_units(self, units: Optional[list[int]], timeout: Optional[float], queued: bool = False) -> bool:
        """Wait on the host for ``units`` (None: the whole load) to be complete (``queued``: or
        their copies to a device queued)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if self._finished.is_set():
                    if self._error is not None:
                        raise self._error
                    return True
                if units is not None and self._progress.wait(units, 0, queued):
                    return True
                left = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
                if left <= 0:
                    return False
                if units is None:
                    self._finished.wait(left)
                else:
                    self._progress.wait(units, left, queued)
        except KeyboardInterrupt:
            self.cancel()
            raise


# Loads whose threads still run. The interpreter must not exit under them: the C++ core's threads
# of a load would find it gone and abort the process. An exiting process cancels them instead.
_running: weakref.WeakSet[PendingLoad] = weakref.WeakSet()


@atexit.register
def _cancel_at_exit() -> None:
    """Cancel every load still running, then wait for them together, at most :data:`_EXIT_WAIT`
    seconds in all."""
    running = [p for p in list(_running) if p._progress is not None and not p._finished.is_set()]
    for pending in running:
        pending._progress.cancel()
    deadline = time.monotonic() + _EXIT_WAIT
    for pending in running:
        if not pending._finished.wait(max(0.0, deadline - time.monotonic())):
            logger.warning("the load of %s did not stop within %.0f s of the exit", pending.path,
                           _EXIT_WAIT)


def _name_list(names: Union[str, Iterable[str]]) -> list[str]:
    """``names`` as a list: one tensor name, or an iterable of them (InvalidArgumentError for
    anything else)."""
    if isinstance(names, str):
        return [names]
    if not isinstance(names, Iterable):
        raise InvalidArgumentError(f"names are a tensor name or an iterable of them, got {names!r}")
    return list(names)


def _stream_handle(stream: Any, device: str) -> int:
    """The driver's handle of ``stream`` (a ``torch.cuda.Stream``, a handle, or None: the current
    stream of ``device``)."""
    if stream is None:
        return int(torch.cuda.current_stream(torch.device(device)).cuda_stream)
    if isinstance(stream, int):
        return stream
    return int(stream.cuda_stream)


def wait_in_forward(model: nn.Module, pending: PendingLoad, names: dict[str, str]) -> int:
    """Forward pre-hooks that make each module of ``model`` wait for its own parameters and
    buffers of the pending load (``names``: checkpoint name -> the model's name) before it
    runs: on the device (the current stream waits) for a module on a GPU, else on the host.
    They remove themselves once the load is complete. Returns the modules hooked."""
    by_model_name = {m: c for c, m in names.items()}
    handles: list[Any] = []

    def remove_all() -> None:
        for h in handles:
            h.remove()
        handles.clear()

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = [by_model_name[prefix + n] for n, _ in
               (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
               if prefix + n in by_model_name]
        if not own:
            continue
        groups = pending._device_groups(own)

        def hook(_module: nn.Module, _args: Any, groups: dict[str, list[int]] = groups) -> None:
            for device, units in groups.items():
                pending._wait_group(device, units, None, None)
            if pending.done:
                remove_all()

        handles.append(module.register_forward_pre_hook(hook))
    return len(handles)


__all__ = ["PendingLoad", "LoadCancelledError", "tensor_units", "wait_in_forward"]
