"""ServerlessLLM's ``sllm_store.torch`` API on sllm-store: ``save_dict`` and ``load_dict``.

Code written for ServerlessLLM's store runs unchanged. ``save_dict`` writes ServerlessLLM's layout
(``tensor_index.json`` + ``tensor.data_N``), so a mixed fleet keeps working; ``load_dict`` reads
that layout or ours through sllm-store's pipeline, in this process (no server needed) or through
our store server when ``SLLM_STORE_ADDRESS`` is set. Unlike ServerlessLLM, ``"cpu"`` is accepted
wherever a GPU index is. See docs/migrating-from-serverlessllm.md.

Example::

    from sllm_store.torch import save_dict, load_dict

    save_dict(model.state_dict(), "./models/my-model")
    state_dict = load_dict("my-model", {"": 0})          # under STORAGE_PATH, else ./models
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from sllm_store.errors import DestinationExistsError, InvalidArgumentError

logger = logging.getLogger(__name__)

PARTITION_SIZE = 10 << 30  # a new data partition starts past this many bytes (ServerlessLLM's rule)
INDEX = "tensor_index.json"

DeviceMapType = Union[str, Mapping[str, Any]]


def model_directory(model_path: Union[str, os.PathLike], storage_path: Optional[str]) -> Path:
    """``storage_path / model_path``; ``storage_path`` defaults to env ``STORAGE_PATH``, else
    ``./models`` (ServerlessLLM's rule)."""
    from sllm_store.config import serverlessllm_storage_path

    return Path(serverlessllm_storage_path(storage_path)) / model_path


def device_of(value: Any) -> torch.device:
    """A ServerlessLLM device: a GPU index, or (here) ``"cpu"``, ``"cuda:N"``, a torch device."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"invalid device {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(f"invalid GPU index {value} (for host memory, pass 'cpu')")
        return torch.device("cuda", value)
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"invalid device {value!r} (a GPU index, 'cpu' or 'cuda:N')") from None


def write_dict(state_dict: Mapping[str, torch.Tensor], directory: Path) -> dict[str, Any]:
    """Write ``state_dict`` into ``directory`` in ServerlessLLM's layout; returns its index.

    In state-dict order, each storage not written yet is written whole (the bytes of its untyped
    storage), padded with zeros to a multiple of 8; tensors sharing a storage share its offset.
    A new partition starts when the current one would pass :data:`PARTITION_SIZE`; offsets count
    in the concatenation of the partitions.

    The layout has no place for a view's offset into its storage, so where ServerlessLLM's own
    writer would lose it (a tensor that starts inside its storage: views into one flat buffer,
    as loaders return them), the tensor is written as a record of its own (its contiguous bytes);
    identical views stay shared."""
    _check_tensors(state_dict)
    whole = _whole_storages(state_dict)
    index: dict[str, Any] = {}
    written: dict[Any, tuple[int, int]] = {}  # record key -> (offset, size)
    part, part_size, offset, out = -1, 0, 0, None
    try:
        for name, t in state_dict.items():
            storage = t.untyped_storage()
            ptr = (str(storage.device), storage.data_ptr())
            own = ptr in whole
            key = ptr if own else (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key not in written:
                data = _bytes_of(storage if own else t.clone(memory_format=torch.contiguous_format)
                                 .untyped_storage())
                size = data.numel()
                if part == -1 or part_size + size > PARTITION_SIZE:
                    if out is not None:
                        out.close()
                    part, part_size = part + 1, 0
                    out = open(directory / f"tensor.data_{part}", "wb")  # noqa: SIM115 - closed in turn
                pad = (8 - size % 8) % 8
                out.write(memoryview(data.numpy()))
                out.write(bytes(pad))
                written[key] = (offset, size)
                offset, part_size = offset + size + pad, part_size + size + pad
            stride = list(t.stride()) if own else list(t.contiguous().stride())
            index[name] = [*written[key], list(t.shape), stride, str(t.dtype)]
    finally:
        if out is not None:
            out.close()
    (directory / INDEX).write_text(json.dumps(index))
    logger.info("wrote %d tensors (%d bytes in %d partitions) to %s", len(index), offset, part + 1, directory)
    return index


def _check_tensors(state_dict: Mapping[str, torch.Tensor]) -> None:
    from sllm_store.dtypes import NAME_TO_DTYPE

    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or t.is_meta:
            raise InvalidArgumentError(f"{name!r} is not a tensor with data")
        if t.layout != torch.strided:
            raise InvalidArgumentError(f"{name!r}: unsupported layout {t.layout} (only dense tensors)")
        if str(t.dtype).removeprefix("torch.") not in NAME_TO_DTYPE:
            raise InvalidArgumentError(f"{name!r}: unsupported dtype {t.dtype}")


def _whole_storages(state_dict: Mapping[str, torch.Tensor]) -> set[tuple[str, int]]:
    """The storages written whole: those whose every tensor starts at the storage's start."""
    starts: dict[tuple[str, int], bool] = {}
    for t in state_dict.values():
        ptr = (str(t.untyped_storage().device), t.untyped_storage().data_ptr())
        starts[ptr] = starts.get(ptr, True) and t.storage_offset() == 0
    return {ptr for ptr, at_start in starts.items() if at_start}


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A storage's bytes as a uint8 tensor in host memory."""
    host = storage.cpu() if storage.device.type != "cpu" else storage
    return torch.empty(0, dtype=torch.uint8).set_(host)


def fresh_destination(model_path: Union[str, os.PathLike]) -> Path:
    """``model_path``, which must not exist or be an empty directory."""
    target = Path(model_path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DestinationExistsError(f"'{target}' exists and is not empty; save into a new directory")
    return target


def save_dict(state_dict: Mapping[str, torch.Tensor], model_path: Union[str, os.PathLike]) -> None:
    """Save ``state_dict`` at ``model_path`` in ServerlessLLM's layout (``tensor_index.json`` and
    ``tensor.data_0``, ``tensor.data_1``...; see :func:`write_dict`), which ServerlessLLM's
    loaders and ours both read.

    Unlike ServerlessLLM's: the checkpoint is written into a temporary directory beside
    ``model_path`` and renamed into place when complete, so a failed save leaves nothing behind;
    ``model_path`` must not exist or be an empty directory (else ``DestinationExistsError``);
    tensors may be on any device (each storage is copied to host memory in turn); an unsupported
    tensor (quantized, sparse, meta) raises ``InvalidArgumentError`` before anything is written."""
    from sllm_store.writer import atomic_directory

    target = fresh_destination(model_path)
    with atomic_directory(target, overwrite=True) as tmp:
        write_dict(state_dict, tmp)


def expand_device_map(device_map: DeviceMapType, names: list[str]) -> dict[str, torch.device]:
    """Each tensor's device under a ServerlessLLM device map: a dict of name prefixes to devices
    (the longest prefix that is the name or a dotted parent of it wins; ``""`` matches all).
    Tensors no prefix matches are left out (not loaded), as ServerlessLLM leaves them out."""
    if not isinstance(device_map, Mapping):
        return dict.fromkeys(names, device_of(device_map))
    prefixes = sorted(device_map, key=len, reverse=True)
    devices = {p: device_of(device_map[p]) for p in prefixes}
    out: dict[str, torch.device] = {}
    used: set[str] = set()
    for name in names:
        p = next((p for p in prefixes if p == "" or name == p or name.startswith(p + ".")), None)
        if p is None:
            continue
        out[name] = devices[p]
        used.add(p)
    unused = [p for p in prefixes if p not in used]
    if unused:
        raise InvalidArgumentError(f"device_map names prefixes of no tensor: {unused[:5]}")
    return out


def load_dict(model_path: Union[str, os.PathLike], device_map: DeviceMapType,
              storage_path: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Load the checkpoint at ``storage_path / model_path`` as a dict of name -> tensor.

    ``storage_path`` defaults to env ``STORAGE_PATH``, else ``./models``, as in ServerlessLLM.
    ``device_map`` is ServerlessLLM's: a dict of tensor-name prefixes to devices, ``{"": 0}``
    putting everything on GPU 0; the longest prefix that is a tensor's name or a dotted parent of
    it places the tensor (``""`` matches every name); tensors no prefix matches are not loaded,
    and a prefix that matches no tensor raises ``InvalidArgumentError``. A device is a GPU index,
    ``"cuda:N"`` or a ``torch.device``.

    Unlike ServerlessLLM: ``"cpu"`` is accepted wherever a GPU index is; no store server is
    needed (the load runs in this process, through sllm-store's pipeline), though with
    ``SLLM_STORE_ADDRESS`` set it goes through our store server, ``model_path`` then naming the
    checkpoint under the server's storage path; and checkpoints in sllm-store's own format (as
    ``sllm_store.convert`` writes them) load through the same call. A map of several prefixes
    reads the checkpoint's tensor names from ``storage_path / model_path`` first, as
    ServerlessLLM reads its ``tensor_index.json``. Tied tensors come back sharing storage."""
    import sllm_store

    path = model_directory(model_path, storage_path)
    if not isinstance(device_map, Mapping):
        return sllm_store.load_state_dict(path, device_of(device_map))
    if list(device_map) == [""]:  # everything on one device: no need to read the names first
        return sllm_store.load_state_dict(path, device_of(device_map[""]))
    from sllm_store.formats import open_index

    names = list(open_index(path).tensors)
    return sllm_store.load_state_dict(path, expand_device_map(device_map, names))


__all__ = ["save_dict", "load_dict", "PARTITION_SIZE"]
