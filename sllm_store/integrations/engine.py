"""What the engine integrations share: the load's settings from an engine's extra loader config,
and the host-memory load whose tensors an engine's own weight loaders take. Imports no engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch

from sllm_store._units import format_size
from sllm_store.config import LoadConfig
from sllm_store.errors import InvalidArgumentError, SllmStoreError
from sllm_store.index import PathLike

LOAD_FORMAT = "sllm"
SETTINGS = ("num_threads", "verify", "io_mode", "store")
SAVE_SETTING = "save_engine_ready"  # vLLM: the workers save their rank's parameters (sllm_store.vllm)


def load_settings(extra: Any, option: str = "--model-loader-extra-config") -> LoadConfig:
    """The load's settings from an engine's extra loader config (unknown keys are an error)."""
    extra = dict(extra or {})
    extra.pop(SAVE_SETTING, None)
    unknown = sorted(set(extra) - set(SETTINGS))
    if unknown:
        raise InvalidArgumentError(f"{option} for load format '{LOAD_FORMAT}' takes "
                                   f"{', '.join(SETTINGS)}; got {', '.join(unknown)}")
    return LoadConfig.resolve(**extra)


def load_for_engine(model: PathLike, settings: LoadConfig) -> tuple[dict[str, torch.Tensor], Any, float]:
    """The checkpoint in host memory (page-cached files mapped, not copied), for the engine's
    weight loaders; (tensors, report, start time). Errors name the load format."""
    from sllm_store.loader import load

    t0 = time.perf_counter()
    with naming_the_format(model):
        tensors, report = load(model, "cpu", settings)
    return tensors, report, t0


@contextmanager
def naming_the_format(model: PathLike) -> Iterator[None]:
    """An sllm-store error inside, raised again (same class) with the load format and the model
    named, as the engine's log shows it."""
    try:
        yield
    except SllmStoreError as e:
        raise type(e)(f"load format '{LOAD_FORMAT}' cannot load {str(model)!r}: {e}") from e


def describe(model: PathLike, report: Any, t0: float, t1: float, peak: Optional[int] = None) -> str:
    """The one log line of a load: size, tier, read time and speed, hand-over time, and (on a
    GPU) the most device memory the load took beyond the engine's parameters."""
    return (f"sllm-store loaded {model} ({format_size(report.bytes)}, {report.stats['tier']} tier) in "
            f"{time.perf_counter() - t0:.2f} s: read {report.seconds:.2f} s at {report.gb_per_s:.2f} GB/s, "
            f"handed to the model in {time.perf_counter() - t1:.2f} s{peak_words(peak)}")


def peak_words(peak: Optional[int]) -> str:
    return "" if peak is None else f"; peak extra device memory {format_size(peak)} ({peak} bytes)"


@contextmanager
def device_peak(out: dict[str, int]) -> Iterator[None]:
    """``out["peak"]``: the most memory PyTorch allocated on the current CUDA device during the
    block beyond what was allocated when it began (nothing without CUDA in use). Resets the
    device's peak statistics, as a memory profiler does."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        yield
        return
    dev = torch.cuda.current_device()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    yield
    out["peak"] = max(0, torch.cuda.max_memory_allocated(dev) - base)


def check_open(model: PathLike, settings: LoadConfig) -> None:
    """Open the checkpoint (a URL's index is fetched; its data comes with the load)."""
    from sllm_store.loader import with_checkpoint

    with_checkpoint(model, settings, lambda checkpoint: None)
