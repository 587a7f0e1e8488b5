"""Building ``transformers`` models without their weights: the parameters on the meta device (no
storage, no initialisation), the buffers computed as the model's constructor computes them.

:func:`build` is what :func:`sllm_store.load_model` builds before assigning the loaded tensors;
:func:`meta_model` builds a model wholly on the meta device, for tracing its access order.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sllm_store.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

# Building a model patches process-wide state (nn.Module.register_parameter, the default dtype,
# as from_pretrained does): one build at a time, and the patch acts only on the building thread.
_BUILD_LOCK = threading.Lock()
_BUILDING = threading.local()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside (by this thread) goes to the meta device (no storage, no
    init cost); buffers stay real, so values computed at construction (rotary caches) are kept."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        if getattr(_BUILDING, "active", False) and param is not None and param.device.type != "meta":
            p = module._parameters[name]
            kwargs = dict(p.__dict__)
            kwargs["requires_grad"] = p.requires_grad
            module._parameters[name] = type(p)(p.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    _BUILDING.active = True
    try:
        yield
    finally:
        _BUILDING.active = False
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _default_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    if dtype is None or not dtype.is_floating_point:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def model_class(hf_model_class: Any, config: Any = None) -> Any:
    """The class to build: ``hf_model_class`` (a class, or its name in transformers), else the
    architecture that the config names (``config.architectures``), else AutoModelForCausalLM."""
    import transformers

    if hf_model_class is None:
        names = list(getattr(config, "architectures", None) or [])
        found = [getattr(transformers, n, None) for n in names if isinstance(n, str)]
        return next((c for c in found if c is not None), transformers.AutoModelForCausalLM)
    if not isinstance(hf_model_class, str):
        return hf_model_class
    cls = getattr(transformers, hf_model_class, None)
    if cls is None:
        raise InvalidArgumentError(f"transformers has no class {hf_model_class!r}")
    return cls


def _no_init_weights() -> Any:
    """transformers' context that skips weight initialisation (pointless: weights are assigned)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4.x
        except ImportError:  # pragma: no cover - very old transformers: init runs on meta
            return contextlib.nullcontext()
    return no_init_weights()


def meta_model(model_dir: Path) -> Optional[nn.Module]:
    """The transformers model that ``model_dir/config.json`` describes, built wholly on the meta
    device (for tracing its access order); None when there is no config or it cannot be built."""
    if not (model_dir / "config.json").is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(model_dir)
        cls = model_class(None, config)
        with torch.device("meta"):
            return cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    except Exception as e:  # noqa: BLE001 - no model: the caller falls back to the names
        logger.info("cannot build the model of %s on the meta device (%s: %s)", model_dir,
                    type(e).__name__, e)
        return None


class _EmptyOnMeta(TorchFunctionMode):
    """``torch.empty`` without a device makes a meta tensor (on the thread that enters it: torch's
    function modes are per thread). Modules make their parameters' storage with it (nn.Linear,
    nn.Embedding...), so that storage is never allocated: mapping and unmapping gigabytes of it
    stalls behind a load's page faults running in the same process (seconds, on a cold start)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def build(cls: Any, config: Any, dtype: Optional[torch.dtype], trust_remote_code: bool) -> nn.Module:
    """The model with its parameters on the meta device and its buffers computed. Built with
    :class:`_EmptyOnMeta` first; a model that makes a buffer with ``torch.empty`` (it would be
    left on the meta device) or cannot be built so is built again with real storage."""
    try:
        model = _construct(cls, config, dtype, trust_remote_code, empty_on_meta=True)
        if not any(b.is_meta for b in model.buffers()):
            return model
        logger.debug("%s makes a buffer with torch.empty: built again with real storage", cls.__name__)
    except Exception as e:  # noqa: BLE001 - the build with real storage raises what is wrong
        logger.debug("%s cannot be built with torch.empty on the meta device (%s: %s)", cls.__name__,
                     type(e).__name__, e)
    return _construct(cls, config, dtype, trust_remote_code, empty_on_meta=False)


def _construct(cls: Any, config: Any, dtype: Optional[torch.dtype], trust_remote_code: bool,
               empty_on_meta: bool) -> nn.Module:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    kwargs: dict[str, Any] = {("dtype" if major >= 5 else "torch_dtype"): dtype} if dtype else {}
    empty = _EmptyOnMeta() if empty_on_meta else contextlib.nullcontext()
    with _BUILD_LOCK, _parameters_on_meta(), _default_dtype(dtype), _no_init_weights(), empty:
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
        return cls._from_config(config, **kwargs)
