"""Tensors over GPU memory attached from the store server (:mod:`sllm_store.server.attach`).

The store tier uses these to plan a load as views into the server's copy of a model
(:func:`attached_plan`, :func:`attached_buffers`) or to copy from it device to device
(:func:`copy_attached`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from sllm_store.errors import StoreError
from sllm_store.index import Index
from sllm_store.plan import Buffer, Plan


def pci_bus_id(dev: torch.device) -> str:
    """The PCI bus id of a CUDA device of this process, as the driver writes it
    (``0000:17:00.0``): how two processes name the same GPU."""
    p = torch.cuda.get_device_properties(dev)
    return f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"


def attached_plan(index: Index, assign: dict[str, torch.device], attachment: Any) -> Plan:
    """A plan whose slots are the attached blocks of GPU memory and whose placement is the
    server's: nothing to read or copy."""
    dev = next(iter(assign.values()))
    placement: dict[str, tuple[int, int]] = {}
    for name in assign:
        stored = index.resolve(name)
        where = attachment.placement.get(stored.name)
        if where is None:
            raise StoreError(f"the server's GPU copy of {index.path} has no tensor {stored.name!r}")
        block, off = where
        inside = 0 <= block < len(attachment.sizes) and 0 <= off <= attachment.sizes[block] - stored.nbytes
        if not inside:
            raise StoreError(f"the server places {stored.name!r} outside the memory it shares")
        placement[stored.name] = where
    return Plan(dict(assign), [], [], [dev] * len(attachment.sizes), list(attachment.sizes), placement)


class _DeviceMemory:
    """Attached GPU memory as ``__cuda_array_interface__``: a tensor made from it keeps this
    object, hence the attachment, alive."""

    def __init__(self, address: int, size: int, owner: Any) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


def attached_buffers(attachment: Any, dev: Optional[torch.device]) -> list[Buffer]:
    """One uint8 tensor over each attached block (on ``dev``); the attachment lives while any
    tensor viewing them does."""
    out: list[Buffer] = []
    for m in attachment.mappings:
        t = torch.as_tensor(_DeviceMemory(m.address, m.size, attachment), device=dev)
        out.append((t, 0))
    return out


def copy_runs(index: Index, plan: Plan, attachment: Any) -> list[tuple[int, int, int, int, int]]:
    """The device-to-device copies of :func:`copy_attached`: (block, source offset, slot,
    destination offset, length), tensors contiguous at both ends merged into one run. Raises
    StoreError for a tensor the server places outside the memory it shares."""
    runs: list[list[int]] = []
    for name, (slot, off) in sorted(plan.placement.items(), key=lambda kv: attachment.placement[kv[0]]):
        n = index.tensors[name].nbytes
        block, src_off = attachment.placement[name]
        if not (0 <= block < len(attachment.sizes) and 0 <= src_off <= attachment.sizes[block] - n):
            raise StoreError(f"the server places {name!r} outside the memory it shares")
        last = runs[-1] if runs else None
        if last and last[0] == block and last[2] == slot and last[1] + last[4] == src_off \
                and last[3] + last[4] == off:
            last[4] += n
        else:
            runs.append([block, src_off, slot, off, n])
    return [(b, so, s, o, n) for b, so, s, o, n in runs]


def copy_attached(index: Index, plan: Plan, buffers: list[Buffer], attachment: Any) -> None:
    """Copy each planned tensor from the attached memory into ``buffers`` (device to device, one
    copy per run contiguous at both ends), then wait for the copies."""
    dev = next((b.device for b, _ in buffers if b.is_cuda), None)
    sources = attached_buffers(attachment, dev)
    for block, src_off, slot, off, n in copy_runs(index, plan, attachment):
        dst, shift = buffers[slot]
        dst[shift + off:shift + off + n].copy_(sources[block][0][src_off:src_off + n], non_blocking=True)
    if dev is not None:
        torch.cuda.synchronize(dev)
