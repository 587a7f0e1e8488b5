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
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from sllm_store.errors import InvalidArgumentError
from sllm_store.torch import DeviceMapType, device_of, fresh_destination, model_directory, write_dict


def no_split_modules(model: nn.Module) -> list[str]:
    """The modules (dotted names) whose class the model lists in ``_no_split_modules``."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    return [name for name, m in model.named_modules() if name and type(m).__name__ in classes]


def tied_no_split_modules(model: nn.Module, modules: list[str]) -> list[list[str]]:
    """Groups of those modules that hold the same (tied) parameter."""
    longest_first = sorted(modules, key=len, reverse=True)

    def owner(param_name: str) -> Optional[str]:
        return next((m for m in longest_first if param_name.startswith(m + ".")), None)

    by_param: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        m = owner(name)
        if m is not None:
            by_param.setdefault(id(p), set()).add(m)
    return [sorted(g) for g in by_param.values() if len(g) > 1]


def save_model(model: nn.Module, model_path: str) -> None:
    """Save a transformers model at ``model_path`` in ServerlessLLM's layout: config.json,
    generation_config.json (models that generate), no_split_modules.json,
    tied_no_split_modules.json, tensor_index.json and tensor.data_N. Written into a temporary
    directory renamed into place when complete; ``model_path`` must not exist or be empty. The
    model is not moved (ServerlessLLM's moves it to the CPU): its tensors are copied one at a time."""
    from sllm_store.writer import atomic_directory

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


def _device_map(device_map: DeviceMapType) -> Any:
    """ServerlessLLM's device map as :func:`sllm_store.load_model` takes it."""
    if isinstance(device_map, Mapping):
        return {prefix: device_of(d) for prefix, d in device_map.items()}
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return device_of(device_map)
    return device_map  # "auto", "cpu", "cuda:0", a torch device


def load_model(
    model_path: Optional[Union[str, os.PathLike]],
    device_map: DeviceMapType = "auto",
    torch_dtype: Optional[torch.dtype] = None,
    quantization: Optional[str] = None,
    storage_path: Optional[str] = None,
    fully_parallel: bool = False,
    hf_model_class: str = "AutoModelForCausalLM",
) -> nn.Module:
    """Load the model at ``storage_path / model_path`` (``STORAGE_PATH``, else ``./models``) in
    ServerlessLLM's layout or ours, with :func:`sllm_store.load_model`.

    ``device_map``: ``"auto"``, a device, or a dict of module prefixes to GPU indexes; ``"cpu"``
    is accepted too (ServerlessLLM refuses it). ``fully_parallel`` changes nothing: the model is
    always built while its weights load. ``quantization`` other than None raises
    ``InvalidArgumentError``: load unquantized, then quantize. ``hf_model_class`` names the
    transformers class to build (default ``AutoModelForCausalLM``, as ServerlessLLM's)."""
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
