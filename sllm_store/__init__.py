"""sllm-store: load large models fast.

A loading-optimized checkpoint format (``sllm-store convert``) and a C++ streaming loader::

    import sllm_store

    sllm_store.convert("path/to/hf-model", "path/to/model.sllm")
    state_dict = sllm_store.load_state_dict("path/to/model.sllm", device="cpu")

Importing the package is cheap: torch, safetensors and the C++ core are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sllm_store import errors as _errors
from sllm_store.errors import *  # noqa: F403  (the exception hierarchy, listed in errors.__all__)

__version__ = "0.1.0"

# Public name -> module that defines it; imported lazily by __getattr__.
_LAZY = {
    "load_state_dict": "sllm_store.loader",
    "load_into": "sllm_store.loader",
    "PendingLoad": "sllm_store.streaming",
    "verify": "sllm_store.loader",
    "LoadConfig": "sllm_store.config",
    "RemoteOptions": "sllm_store.config",
    "save_state_dict": "sllm_store.writer",
    "convert": "sllm_store.converter",
    "read_index": "sllm_store.index",
    "Index": "sllm_store.index",
    "load_model": "sllm_store.model",
    "StoreClient": "sllm_store.server.client",
    "save_model": "sllm_store.model",
    "residency": "sllm_store.residency",
    "estimate_load_time": "sllm_store.residency",
}

if TYPE_CHECKING:  # pragma: no cover
    from sllm_store.config import LoadConfig, RemoteOptions
    from sllm_store.converter import convert
    from sllm_store.index import Index, read_index
    from sllm_store.loader import load_into, load_state_dict, verify
    from sllm_store.model import load_model, save_model
    from sllm_store.residency import estimate_load_time as estimate_load_time
    from sllm_store.residency import residency as residency
    from sllm_store.server.client import StoreClient as StoreClient
    from sllm_store.streaming import PendingLoad
    from sllm_store.writer import save_state_dict


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sllm_store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


# StoreClient (sllm_store.StoreClient) is left out of the star import: it needs grpc, which only
# the "server" extra installs.
__all__ = [
    "__version__",
    "load_state_dict",
    "load_into",
    "PendingLoad",
    "verify",
    "save_state_dict",
    "load_model",
    "save_model",
    "convert",
    "read_index",
    "Index",
    "LoadConfig",
    "RemoteOptions",
] + list(_errors.__all__)
