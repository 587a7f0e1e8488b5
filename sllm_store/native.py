"""The C++ core (``sllm_store._C``), configured from the settings when first imported.

Modules of the package import the core from here (``from sllm_store.native import _C``), so that
the settings it needs (the CUDA driver library to load) are applied before its first use.
"""

from __future__ import annotations

from sllm_store import _C
from sllm_store.config import cuda_library

_C.set_cuda_library(cuda_library())

__all__ = ["_C"]
