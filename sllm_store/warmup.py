"""Kernel warm-up: a model's first forward pays for loading the GPU's math libraries and kernels.

A fresh process's first matrix product creates the cuBLAS handles and loads cuBLAS/cuBLASLt, and
with lazy module loading every kernel is loaded on its first launch. Done after the weights
arrive, that start-up delays the first output; :func:`start` runs it in a thread of its own while
the weights load and the model is built: products at the shapes of the model's layers (from its
``config.json``), attention and the element-wise operations of a decoder layer, in the model's
dtype, on zero-filled scratch tensors that are freed afterwards. A process warms each device up
once for a dtype and a set of shapes: later loads of such a model find the kernels loaded, and
their weights the memory torch keeps cached.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

TOKENS = 16  # rows of the scratch activations: a short prompt

# (device, dtype, shapes) warmed up in this process, or being warmed up
_warmed: set[tuple[str, torch.dtype, tuple[Any, ...]]] = set()
_warmed_lock = threading.Lock()


def shapes(config: dict[str, Any]) -> tuple[list[int], int, int]:
    """(the output widths of the layer's products, the hidden size, attention heads) that
    ``config`` (a parsed config.json) names; empty or zero where it does not say."""
    def width(key: str) -> int:
        value = config.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20 else 0

    hidden = width("hidden_size")
    if not hidden:
        return [], 0, 0
    heads = width("num_attention_heads")
    heads = heads if heads and hidden % heads == 0 else 0
    outs = {hidden, width("intermediate_size")}
    if heads:
        outs.add((width("num_key_value_heads") or heads) * (hidden // heads))
    return sorted(o for o in outs if o), hidden, heads


def scratch_bytes(config: dict[str, Any], dtype: torch.dtype) -> int:
    """The device memory :func:`warm_up` holds at most (its largest weight, activations)."""
    outs, hidden, _ = shapes(config)
    widest = max(outs, default=0)
    return (widest * hidden + 4 * TOKENS * widest) * max(dtype.itemsize, 4)


def warm_up(device: torch.device, dtype: torch.dtype, config: dict[str, Any]) -> None:
    """One pass of a decoder layer's operations on ``device`` (synchronized at the end)."""
    outs, hidden, heads = shapes(config)
    if not hidden:
        return
    with torch.no_grad():
        x = torch.zeros(TOKENS, hidden, dtype=dtype, device=device)
        for out in outs:
            torch.nn.functional.linear(x, torch.zeros(out, hidden, dtype=dtype, device=device))
        if heads:
            q = x.view(1, TOKENS, heads, hidden // heads).transpose(1, 2)
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        h = x.float()
        (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        torch.nn.functional.silu(x) * x
        torch.softmax(h, dim=-1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the scratch memory goes back to the device for the weights


def start(device: torch.device, dtype: Optional[torch.dtype], model_dir: Path, weights_bytes: int
          ) -> Optional[threading.Thread]:
    """Warm ``device`` up in a thread of its own while ``weights_bytes`` load there. None where there
    is nothing to warm (not a GPU, no floating dtype, no readable config.json) or no room for the
    scratch tensors beside the weights. A failure is logged, never raised: the load goes on and
    the model's own forward reports any real problem."""
    if device.type != "cuda" or dtype is None or not dtype.is_floating_point:
        return None
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("text_config"), dict):  # a multimodal model: its language model's shapes
        config = config["text_config"]
    outs, hidden, heads = shapes(config)
    key = (str(device), dtype, (tuple(outs), hidden, heads))
    with _warmed_lock:
        if key in _warmed:
            logger.debug("kernels of %s on %s already warmed up in this process", dtype, device)
            return None
        _warmed.add(key)

    def run() -> None:
        t0 = time.perf_counter()
        try:
            # Room for the scratch tensors whether or not the weights' memory is taken yet: a
            # device the weights nearly fill is left to them.
            free, total = torch.cuda.mem_get_info(device)
            need = 2 * scratch_bytes(config, dtype) + (256 << 20)
            if free < need or total - weights_bytes < need + (1 << 30):
                logger.debug("no kernel warm-up on %s: no room beside the weights", device)
                _forget(key)
                return
            warm_up(device, dtype, config)
        except Exception as e:  # noqa: BLE001 - advisory work: the load must not fail for it
            logger.info("kernel warm-up on %s skipped (%s: %s)", device, type(e).__name__, e)
            _forget(key)
            return
        logger.debug("kernels warmed up on %s in %.2f s", device, time.perf_counter() - t0)

    # not a daemon: an exit waits for it rather than finalizing under a running CUDA call
    thread = threading.Thread(target=run, name="sllm-warm-up", daemon=False)
    thread.start()
    return thread


def _forget(key: tuple[str, torch.dtype, tuple[Any, ...]]) -> None:
    """A warm-up that did not run: a later load tries again."""
    with _warmed_lock:
        _warmed.discard(key)
