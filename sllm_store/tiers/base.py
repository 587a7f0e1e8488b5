"""The tier seam: where a checkpoint's bytes come from.

A :class:`Tier` recognizes the paths it serves (:meth:`Tier.accepts`) and opens them
(:meth:`Tier.open`) as a :class:`Checkpoint`: the checkpoint's index, the directory that holds its
``config.json`` and friends, and two steps of a load, :meth:`Checkpoint.allocate` (memory for a
plan) and :meth:`Checkpoint.fill` (the plan's bytes into that memory). Every load, whatever the
tier, runs the same orchestration (:func:`sllm_store.loader.load_opened`): assign devices, plan,
allocate, fill, make views, report.

Example: a tier for a new storage scheme::

    class MyTier:
        name = "mine"

        def accepts(self, path, config):
            return isinstance(path, str) and path.startswith("mine://")

        def open(self, path, config):
            return MyCheckpoint(path, config)   # a Checkpoint subclass with fill()

    sllm_store.tiers.register(MyTier())
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from sllm_store.config import LoadConfig
from sllm_store.index import Index, PathLike
from sllm_store.plan import Buffer, Plan, allocate, device_spec, make_plan, tensor_buffers


class Checkpoint:
    """A checkpoint opened by a tier. Subclasses implement :meth:`fill`; the other steps have
    defaults that a tier may override (the store server's client allocates shared memory, say).

    Use it as a context manager: :meth:`close` releases what the tier holds (temporary files,
    locks, connections).
    """

    tier = "?"

    def __init__(self, path: PathLike, index: Index, config: LoadConfig) -> None:
        self.path = str(path)
        self.index = index
        self.config = config
        self._closers = contextlib.ExitStack()

    def model_dir(self) -> Path:
        """The directory holding the model's ``config.json`` (tokenizer, generation config...),
        valid until :meth:`close`."""
        return Path(self.index.path)

    def check_devices(self, devices: set[torch.device]) -> None:
        """Raise DeviceError for a device this tier cannot load into, before any allocation."""
        from sllm_store.native import _C

        for dev in devices:
            _C.check_device(device_spec(dev))

    def plan(self, assign: dict[str, torch.device], own_slots: bool = False) -> Plan:
        """The plan of loading the ``assign``ed tensors (``own_slots``: into tensors the caller
        has, one destination slot each; see :func:`sllm_store.plan.make_plan`)."""
        return make_plan(self.index, assign, self.config, own_slots=own_slots)

    def allocate(self, plan: Plan) -> list[Buffer]:
        """One allocation per destination slot of ``plan``."""
        return [allocate(dev, size) for dev, size in zip(plan.devices, plan.sizes)]

    def adopt(self, plan: Plan, targets: dict[str, torch.Tensor]) -> list[Buffer]:
        """The buffers of an ``own_slots`` plan: the caller's tensors themselves (a tier whose
        filler cannot write into this process's memory directly overrides this)."""
        return tensor_buffers(plan, targets)

    def fill(self, plan: Plan, buffers: list[Buffer], progress: Any = None) -> dict[str, Any]:
        """Put the plan's bytes into ``buffers``. Returns the load's figures: at least ``io_mode``
        and ``threads``, then the tier's own. May raise ModelChangedError when the checkpoint
        changed since it was opened: the load then opens it again and plans anew (once).

        ``progress`` (a ``_C.LoadProgress`` of the plan's read units, or None): a tier that can
        tell when a unit's bytes are in place (and checked) marks it there, so that a streaming
        load hands its tensors out early; a tier that cannot leaves it, and the tensors become
        ready when ``fill`` returns. Its ``cancelled`` asks the fill to stop."""
        raise NotImplementedError

    def close(self) -> None:
        self._closers.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Tier(Protocol):
    """A source of checkpoints: the local disk, the store server, an object store..."""

    name: str

    def accepts(self, path: PathLike, config: LoadConfig) -> bool:
        """Whether this tier serves ``path`` under ``config`` (cheap: no I/O)."""
        ...

    def open(self, path: PathLike, config: LoadConfig) -> Checkpoint:
        """The opened checkpoint: its index read and checked. Raises the library's errors."""
        ...


def first_accepting(tiers: list[Tier], path: PathLike, config: LoadConfig) -> Optional[Tier]:
    return next((t for t in tiers if t.accepts(path, config)), None)
