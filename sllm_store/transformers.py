"""ServerlessLLM's ``sllm_store.transformers`` API on sllm-store: ``save_model`` and ``load_model``.

``save_model`` writes ServerlessLLM's layout (its config files, ``no_split_modules.json``,
``tied_no_split_modules.json`` and the tensors as :func:`sllm_store.torch.save_dict` writes them);
``load_model`` loads either layout through :func:`sllm_store.load_model`, with no server needed.
See docs/migrating-from-serverlessllm.md.

Example::

    from sllm_store.transformers import save_model, load_model

    save_model(model, "./models/my-model")
    model = load_model("my-model", device_map="auto", torch_dtype=torch.float16)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from sllm_store.errors import InvalidArgumentError
from sllm_store.torch import DeviceMapType, device_of, fresh_destination, model_directory, write_dict

logger = logging.getLogger(__name__)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def no_split_modules(model: nn.Module) -> dict[str, int]:
    """ServerlessLLM's ``no_split_modules.json``: the modules that are placed whole (leaves, and
    those whose class the model lists in ``_no_split_modules``), by dotted name, with their
    parameters' bytes."""
    return _unsplit(model, set(getattr(model, "_no_split_modules", None) or ()), "")


def _unsplit(module: nn.Module, classes: set[str], parent: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, child in module.named_children():
        full = f"{parent}.{name}" if parent else name
        if not list(child.children()) or type(child).__name__ in classes:
            out[full] = _param_bytes(child)
        else:
            out.update(_unsplit(child, classes, full))
    return out


def tied_no_split_modules(model: nn.Module, modules: Mapping[str, int]) -> list[tuple[list[str], int]]:
    """ServerlessLLM's ``tied_no_split_modules.json``: per group of tied parameters, the modules
    of ``modules`` holding them and the parameter's bytes."""
    by_param: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
        sizes[id(p)] = p.numel() * p.element_size()
    groups = []
    for key, names in by_param.items():
        if len(names) < 2:
            continue
        owners = []
        for name in names:
            owner = name
            while "." in owner and owner not in modules:
                owner = owner.rsplit(".", 1)[0]
            if owner not in modules:
                raise InvalidArgumentError(f"tied parameter {name!r} is in no module placed whole")
            owners.append(owner)
        groups.append((owners, sizes[key]))
    return groups


def save_model(model: nn.Module, model_path: str) -> None:
    """Save a transformers model at ``model_path`` in ServerlessLLM's layout: ``config.json``,
    ``generation_config.json`` (for models that generate), ``no_split_modules.json`` (the modules
    placed whole, leaves and ``model._no_split_modules`` classes, with their parameter bytes, as
    ServerlessLLM computes it), ``tied_no_split_modules.json`` (per tied parameter group, the
    modules holding it and its bytes), and the state dict as :func:`sllm_store.torch.save_dict`
    writes it (``tensor_index.json``, ``tensor.data_N``); no safetensors or .bin files.

    Unlike ServerlessLLM's: written into a temporary directory renamed into place when complete;
    ``model_path`` must not exist or be empty (else ``DestinationExistsError``); the model stays
    where it is (ServerlessLLM's moves it to the CPU): its tensors are copied to host memory one
    storage at a time."""
    from sllm_store.model import check_saveable
    from sllm_store.writer import atomic_directory

    check_saveable(model, "save_model")
    target = fresh_destination(model_path)
    with atomic_directory(target, overwrite=True) as tmp:
        write_dict(model.state_dict(), tmp)
        model.config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(tmp)
        modules = no_split_modules(model)
        (tmp / "no_split_modules.json").write_text(json.dumps(modules))
        (tmp / "tied_no_split_modules.json").write_text(json.dumps(tied_no_split_modules(model, modules)))


# accelerate's placement strategies, which ServerlessLLM accepts besides "auto"; our "auto" spreads
# the weights over the GPUs as accelerate's balanced placement does.
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(device_map: DeviceMapType) -> Any:
    """ServerlessLLM's device map as :func:`sllm_store.load_model` takes it: a strategy name
    becomes ``"auto"``; a GPU index, ``"cpu"``, ``"cuda:N"`` or a torch device one device; a dict
    of module prefixes to those, an accelerate-style dict of module prefix -> device."""
    if isinstance(device_map, Mapping):
        return {prefix: device_of(d) for prefix, d in device_map.items()}
    if isinstance(device_map, str) and device_map in STRATEGIES:
        if device_map != "auto":
            logger.info("device_map=%r: placing the model as device_map='auto' does", device_map)
        return "auto"
    return device_of(device_map)


def load_model(
    model_path: Optional[Union[str, os.PathLike]],
    device_map: DeviceMapType = "auto",
    torch_dtype: Optional[torch.dtype] = None,
    quantization: Optional[str] = None,
    storage_path: Optional[str] = None,
    fully_parallel: bool = False,
    hf_model_class: str = "AutoModelForCausalLM",
) -> nn.Module:
    """Load the transformers model saved at ``storage_path / model_path`` (``storage_path``
    defaults to env ``STORAGE_PATH``, else ``./models``, as in ServerlessLLM), with
    :func:`sllm_store.load_model`: the model is built on the meta device while its weights stream
    into one allocation per device; returned in eval mode.

    Args:
        device_map: ``"auto"`` (also ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``,
            all placed as ``"auto"`` places them: over the visible GPUs, else in host memory), a
            device (GPU index, ``"cuda:N"``, ``"cpu"``, ``torch.device``), or a dict of module
            prefixes to devices (accelerate-style: every module must fall under one).
        torch_dtype: dtype of the floating weights; None: the config's (else the checkpoint's).
        quantization: must be None: quantized loading is not supported (``InvalidArgumentError``);
            load unquantized, then quantize the loaded model.
        storage_path: directory that ``model_path`` is relative to.
        fully_parallel: accepted and ignored: loads always overlap building the model with
            reading the weights (what ServerlessLLM's ``fully_parallel=True`` does).
        hf_model_class: name of the transformers class to build, as in ServerlessLLM.

    Unlike ServerlessLLM: ``"cpu"`` is accepted (in ``device_map`` and its dicts); no store
    server is needed (the load runs in this process), though with ``SLLM_STORE_ADDRESS`` set it
    goes through our store server, ``model_path`` naming the model under the server's storage
    path; checkpoints in sllm-store's own (checksummed) format load through the same call, as do
    ServerlessLLM saves; ``no_split_modules.json`` and ``tied_no_split_modules.json`` are not
    needed. The ``trust_remote_code`` that ServerlessLLM passes is not: custom code is not run."""
    import sllm_store

    if quantization is not None:
        raise InvalidArgumentError(f"quantization={quantization!r}: quantized loading is not supported; load "
                                   "the model unquantized, then quantize it")
    if model_path is None:
        raise InvalidArgumentError("model_path is required")
    del fully_parallel  # accepted for compatibility: loads always overlap building the model
    path = Path(model_directory(model_path, storage_path))
    return sllm_store.load_model(path, device_map=_device_map(device_map), torch_dtype=torch_dtype,
                                 hf_model_class=hf_model_class)


__all__ = ["save_model", "load_model"]
