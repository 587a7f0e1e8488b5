"""Mapping between torch dtypes and the dtype names stored in the index."""

from __future__ import annotations

import torch

from sllm_store.errors import FormatError, InvalidArgumentError
from sllm_store.index import ITEMSIZES

# Names known to this torch build (older builds lack some float8 / uint types). Quantized
# dtypes are not listed: their scale and zero point are not plain bytes.
NAME_TO_DTYPE: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in ITEMSIZES if isinstance(getattr(torch, n, None), torch.dtype)
}
DTYPE_TO_NAME: dict[torch.dtype, str] = {d: n for n, d in NAME_TO_DTYPE.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_TO_NAME[dtype]
    except KeyError:
        raise InvalidArgumentError(f"unsupported dtype {dtype}") from None


def dtype_from_name(name: str, *, where: str = "") -> torch.dtype:
    try:
        return NAME_TO_DTYPE[name]
    except KeyError:
        raise FormatError(
            f"{where}unknown dtype {name!r} (this torch {torch.__version__} knows: "
            f"{', '.join(NAME_TO_DTYPE)})"
        ) from None


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize
