"""Loading and saving ``transformers`` models: :func:`load_model` and :func:`save_model`.

:func:`load_model` is a drop-in for ``AutoModelForCausalLM.from_pretrained(path, torch_dtype=...,
device_map=...)``: the model is built with its parameters on the meta device (no random
initialisation, no memory), the weights stream through the C++ pipeline straight into one
allocation per device and are assigned as the parameters; buffers that are not in the checkpoint
(rotary caches, position ids) are computed normally at construction; tied weights are re-tied.
When the placement is known up front (an explicit device), the weights load while another
thread imports transformers and builds the model; that thread starts as the bytes start to move.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from sllm_store import building, warmup
from sllm_store.config import LoadConfig
from sllm_store.errors import InvalidArgumentError, MissingDependencyError, SllmStoreError, UnknownNameError
from sllm_store.index import Index, PathLike
from sllm_store.loader import load_opened, start_opened, with_checkpoint
from sllm_store.plan import LoadReport, as_device
from sllm_store.streaming import PendingLoad, wait_in_forward
from sllm_store.tiers import open_checkpoint
from sllm_store.tiers.base import Checkpoint

logger = logging.getLogger(__name__)

DeviceMapLike = Union[str, int, torch.device, Mapping[str, Union[str, int, torch.device]]]


def _checkpoint_dtype(index: Index) -> Optional[torch.dtype]:
    """The most common floating dtype of the stored weights (what ``dtype="auto"`` picks)."""
    from sllm_store.dtypes import dtype_from_name

    counts: Counter[str] = Counter()
    for t in index.tensors.values():
        if t.alias_of is None and dtype_from_name(t.dtype).is_floating_point:
            counts[t.dtype] += t.nbytes
    return dtype_from_name(counts.most_common(1)[0][0]) if counts else None


def _keep_in_fp32(model: nn.Module, dtype: Optional[torch.dtype]) -> Optional[re.Pattern[str]]:
    """Parameter names that stay float32, as from_pretrained keeps them: the model's
    ``_keep_in_fp32_modules`` when loading as float16, ``_keep_in_fp32_modules_strict`` when
    loading as float16 or bfloat16."""
    modules: list[str] = []
    if dtype == torch.float16:
        modules += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        modules += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not modules:
        return None
    return re.compile(r"(^|\.)(" + "|".join(map(re.escape, modules)) + r")($|\.)")


def _config_dtype(root: Path) -> Optional[torch.dtype]:
    """The floating dtype config.json names (``dtype``, or ``torch_dtype`` before transformers 5)."""
    try:
        raw = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = raw.get("dtype") or raw.get("torch_dtype") if isinstance(raw, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _device_of(name: str, device_map: Mapping[str, Any]) -> Any:
    """Device of a parameter/buffer name under an accelerate-style module-prefix device map."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in device_map:
            return device_map[prefix]
    raise UnknownNameError(f"device_map does not place {name!r}")


def _normalize_device(d: Any) -> torch.device:
    if isinstance(d, int):
        return torch.device("cuda", d)
    if d == "disk":
        raise SllmStoreError("device_map places weights on 'disk': offloading is not supported")
    return as_device(d)


def _auto_device_map(model: nn.Module, dtype: Optional[torch.dtype], max_memory: Any) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"": "cpu"}
    try:
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory
    except ImportError:  # pragma: no cover - depends on the environment
        raise SllmStoreError(
            "device_map='auto' needs the 'accelerate' package (pip install accelerate)"
        ) from None
    no_split = getattr(model, "_no_split_modules", None) or []
    memory = max_memory or get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)


def _fast_single_device(device_map: DeviceMapLike, index: Index) -> Optional[torch.device]:
    """The one device every weight goes to, when that is known before the model exists."""
    if isinstance(device_map, Mapping):
        devices = {str(_normalize_device(d)) for d in device_map.values()}
        return _normalize_device(next(iter(device_map.values()))) if len(devices) == 1 else None
    if device_map == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if torch.cuda.device_count() == 1:
            free, _ = torch.cuda.mem_get_info(0)
            if index.total_bytes < 0.9 * free:
                return torch.device("cuda", 0)
        return None
    return _normalize_device(device_map)


def _match_keys(checkpoint: list[str], expected: set[str], prefix: str) -> dict[str, str]:
    """Checkpoint name -> model name, adding or removing the base-model prefix when needed."""
    mapping = {}
    for name in checkpoint:
        if name in expected:
            mapping[name] = name
        elif prefix and f"{prefix}.{name}" in expected:
            mapping[name] = f"{prefix}.{name}"
        elif prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in expected:
            mapping[name] = name[len(prefix) + 1:]
    return mapping


def load_model(
    path: PathLike,
    *,
    device_map: DeviceMapLike = "auto",
    torch_dtype: Any = None,
    dtype: Any = None,
    hf_model_class: Any = None,
    trust_remote_code: bool = False,
    max_memory: Optional[Mapping[Any, Any]] = None,
    num_threads: Optional[int] = None,
    verify: Optional[bool] = None,
    store: Optional[str] = None,
    stream: bool = False,
    copy: Optional[bool] = None,
    **config_kwargs: Any,
) -> nn.Module:
    """Load a ``transformers`` model from a converted (or plain safetensors) model directory.

    A drop-in for ``AutoModelForCausalLM.from_pretrained(path, torch_dtype=..., device_map=...)``.

    Args:
        path: model directory (config.json plus weights in the sllm-store format or safetensors),
            or the ``s3://`` / ``http(s)://`` URL of an uploaded one: its config files come first,
            then its weights stream to ``device_map`` while the model is built, and are cached
            locally (see docs/remote.md).
        device_map: ``"auto"`` (fit over the visible GPUs, then CPU, as accelerate does), a device
            (``"cuda:0"``, ``"cpu"``, ``0``), or an accelerate-style dict of module prefix -> device.
        torch_dtype: dtype of floating weights (``dtype`` is the same, as transformers 5 names it);
            ``None`` or ``"auto"``: the config's ``dtype`` if it sets one, else the checkpoint's.
        hf_model_class: a ``transformers`` class or its name (``"AutoModelForCausalLM"``,
            ``"AutoModel"``, ``"BertForMaskedLM"``, ...). By default, the architecture that the
            checkpoint's config.json names (``architectures``), else ``AutoModelForCausalLM``.
        trust_remote_code: passed to ``AutoConfig`` / the auto class.
        max_memory: for ``device_map="auto"``, e.g. ``{0: "20GiB", "cpu": "64GiB"}``.
        num_threads, verify, store, copy: see :func:`sllm_store.load_state_dict`. With a store server,
            ``path`` is the model's name there; config files come from the server too.
        stream: return the model as soon as it is built, while its weights still arrive (in the
            checkpoint's access order): each module's forward first waits for its own weights,
            so the first layers compute while the last ones load; outputs are bit-identical to
            a blocking load. ``model.sllm_load`` is the :class:`~sllm_store.PendingLoad`
            (``wait()``, ``progress``, ``report``); an error of the load is raised by the
            forward that needs the missing weights (docs/streaming.md).
        **config_kwargs: overrides applied to the config (like ``from_pretrained``'s kwargs).

    Returns the model in eval mode, its weights views into one allocation per device.

    Unlike ``from_pretrained``, every parameter must come from the checkpoint: a head the
    checkpoint lacks (a classifier on a base model, say) raises ``SllmStoreError`` instead of
    being initialised at random, since serving random weights is never what a loader wants.
    transformers 5's renaming of legacy checkpoint keys (GPT-NeoX ``embed_out``, per-expert MoE
    tensors) is not applied: such checkpoints raise the same error. Without ``transformers``
    installed it raises ``MissingDependencyError`` naming the extra that brings it.

    Example::

        model = sllm_store.load_model("llama-3-8b.sllm", device_map="cuda:0",
                                      torch_dtype=torch.bfloat16)
    """
    model, _ = load_model_with_report(
        path, device_map=device_map, torch_dtype=torch_dtype, dtype=dtype, hf_model_class=hf_model_class,
        trust_remote_code=trust_remote_code, max_memory=max_memory, num_threads=num_threads,
        verify=verify, store=store, stream=stream, copy=copy, **config_kwargs,
    )
    return model


def load_model_with_report(
    path: PathLike,
    *,
    device_map: DeviceMapLike = "auto",
    torch_dtype: Any = None,
    dtype: Any = None,
    hf_model_class: Any = None,
    trust_remote_code: bool = False,
    max_memory: Optional[Mapping[Any, Any]] = None,
    num_threads: Optional[int] = None,
    verify: Optional[bool] = None,
    store: Optional[str] = None,
    stream: bool = False,
    copy: Optional[bool] = None,
    **config_kwargs: Any,
) -> tuple[nn.Module, Optional[LoadReport]]:
    """:func:`load_model`, also returning the :class:`~sllm_store.plan.LoadReport` (None for a
    streaming load: its ``model.sllm_load.report`` once it completes)."""
    t0 = time.perf_counter()
    require_transformers("load_model")
    if dtype is not None:  # transformers 5 names it dtype; torch_dtype is the older name
        if torch_dtype is not None and torch_dtype != dtype:
            raise InvalidArgumentError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: give one")
        torch_dtype = dtype
    load_config = LoadConfig.resolve(num_threads=num_threads, verify=verify, store=store, copy=copy)
    options = _ModelOptions(device_map, torch_dtype, hf_model_class, trust_remote_code, max_memory,
                            config_kwargs, stream)
    if stream:  # the load outlives this call: the checkpoint is closed when it ends
        checkpoint = open_checkpoint(path, load_config)
        try:
            return _load_model(checkpoint, t0, options)
        except BaseException:
            checkpoint.close()
            raise
    # One opening gives the index, the config files and the weights, whatever the tier.
    return with_checkpoint(path, load_config, lambda checkpoint: _load_model(checkpoint, t0, options))


def require_transformers(what: str) -> None:
    """MissingDependencyError naming the extra that brings ``transformers`` when it is not
    installed: found without importing it (the build imports it beside the load)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise MissingDependencyError(what, "transformers", "transformers")


def check_saveable(model: Any, what: str) -> None:
    """InvalidArgumentError unless ``model`` is a transformers model (one whose config saves)."""
    if not callable(getattr(getattr(model, "config", None), "save_pretrained", None)):
        raise InvalidArgumentError(
            f"{what} saves a transformers model (one with a config), not a {type(model).__name__}; "
            "save a module's weights with sllm_store.save_state_dict(module.state_dict(), path)")


@dataclass
class _ModelOptions:
    device_map: DeviceMapLike
    torch_dtype: Any
    hf_model_class: Any
    trust_remote_code: bool
    max_memory: Optional[Mapping[Any, Any]]
    config_kwargs: dict[str, Any]
    stream: bool = False


def _build_while_loading(checkpoint: Checkpoint, options: _ModelOptions, dtype: Optional[torch.dtype],
                         early: Optional[torch.device], t0: float, timings: dict[str, float],
                         ) -> tuple[nn.Module, Any]:
    """The model built on the meta device, and (when ``early`` is known) the weights loaded onto
    it meanwhile: the load runs in this thread (so that Ctrl-C cancels it) while another thread,
    started once the load has planned and taken its memory, imports transformers and builds the
    model. ``timings`` gets ``build_s`` (importing, the
    config, building) and, for a blocking load, ``build_wait_s`` (how long the loaded weights
    waited for the model)."""
    root = checkpoint.model_dir()
    built: dict[str, Any] = {}

    def build() -> None:
        started = time.perf_counter()
        try:
            import transformers

            logger.debug("transformers imported in %.2f s", time.perf_counter() - started)
            config = transformers.AutoConfig.from_pretrained(
                root, trust_remote_code=options.trust_remote_code, **options.config_kwargs
            )
            cls = building.model_class(options.hf_model_class, config)
            try:
                built["model"] = building.build(cls, config, dtype, options.trust_remote_code)
                logger.debug("model built on the meta device in %.2f s", time.perf_counter() - started)
            except (AttributeError, KeyError, TypeError, ValueError) as e:  # a class for another config
                raise SllmStoreError(
                    f"cannot build {cls.__name__} from '{root}/config.json' ({type(e).__name__}: {e}); "
                    "if the checkpoint is of another model class, pass it as hf_model_class=...") from e
        except BaseException as e:  # re-raised in the caller's thread
            built["error"] = e
        timings["build_s"] = time.perf_counter() - started

    loaded: Any = None
    if early is not None and options.stream:  # the load runs on its own thread from the start
        loaded = start_opened(checkpoint, early, t0)
        build()
    elif early is not None:
        # The build starts as the bytes start to move (without the GIL): started before the load's
        # own Python steps, it would hold them up, each switch between the threads waiting for
        # the interpreter's switch interval.
        builder = threading.Thread(target=build, name="sllm-build-model", daemon=True)
        try:
            loaded = load_opened(checkpoint, early, t0, on_fill=builder.start)
        finally:
            if builder.ident is not None:  # started
                waited = time.perf_counter()
                builder.join()
                timings["build_wait_s"] = time.perf_counter() - waited
    else:
        build()
    if "error" in built:
        if options.stream and loaded is not None:
            loaded.cancel()
            loaded.release()
        raise built["error"]
    return built["model"], loaded


def _load_model(checkpoint: Checkpoint, t0: float, options: _ModelOptions) -> tuple[nn.Module, LoadReport]:
    from sllm_store.writer import resolve_dtype

    index, root = checkpoint.index, checkpoint.model_dir()
    if options.torch_dtype in (None, "auto"):  # as from_pretrained: the config's dtype, else the weights'
        dtype = _config_dtype(root) or _checkpoint_dtype(index)
    else:
        dtype = resolve_dtype(options.torch_dtype)
    # from_pretrained's default (None) puts everything in host memory
    device_map = "cpu" if options.device_map is None else options.device_map
    early = _fast_single_device(device_map, index)
    if early is not None:  # the first forward's kernels load while the weights do
        warmup.start(early, dtype, root, index.total_bytes)
    timings: dict[str, float] = {}
    model, loaded = _build_while_loading(checkpoint, options, dtype, early, t0, timings)

    if early is not None:
        placement: dict[str, Any] = {"": early}
    elif isinstance(device_map, Mapping):
        placement = dict(device_map)
    else:
        placement = _auto_device_map(model, dtype, options.max_memory)
    devices = {k: _normalize_device(v) for k, v in placement.items()}

    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = _match_keys(list(index.tensors), expected, prefix)
    unexpected = [n for n in index.tensors if n not in names]
    if unexpected:
        logger.warning("%d checkpoint tensors are not used by %s: %s", len(unexpected),
                       type(model).__name__, unexpected[:5])
    assign = {n: _device_of(names[n], devices) for n in names}
    if options.stream:
        pending = loaded if loaded is not None else start_opened(checkpoint, assign, t0)
        try:
            return _stream_into(model, pending, names, dtype, root, expected, devices), None
        except BaseException:
            pending.cancel()
            raise
        finally:
            pending.release()  # the checkpoint is closed when its load ends
    if loaded is None:
        loaded = load_opened(checkpoint, assign, t0)
    tensors, report = loaded
    assembling = time.perf_counter()
    state = _model_state(model, tensors, names, dtype)
    _assign_state(model, state, root, expected, devices)
    model = _place(model, devices, root)
    report.seconds = time.perf_counter() - t0
    # where the model's time beside the load went (docs/benchmarks.md)
    report.stats["model"] = {**timings, "assemble_s": time.perf_counter() - assembling}
    return model, report


def _stream_into(model: nn.Module, pending: PendingLoad, names: dict[str, str], dtype: Optional[torch.dtype],
                 root: Path, expected: set[str], devices: Mapping[str, torch.device]) -> nn.Module:
    """The model with the tensors of a pending load as its weights, each module's forward
    waiting for its own (cast tensors and models over several devices wait for theirs first)."""
    state = _model_state(model, pending.tensors, names, dtype, pending)
    _assign_state(model, state, root, expected, devices)
    if len({str(d) for d in devices.values()}) > 1:
        logger.info("a model over several devices is dispatched once its weights have loaded")
        pending.wait()
    model = _place(model, devices, root)
    hooked = wait_in_forward(model, pending, names)
    logger.info("streaming %s: %d modules wait for their weights", pending.path, hooked)
    model.sllm_load = pending
    return model


def _model_state(model: nn.Module, tensors: dict[str, torch.Tensor], names: dict[str, str],
                 dtype: Optional[torch.dtype], pending: Optional[PendingLoad] = None,
                 ) -> dict[str, torch.Tensor]:
    """The model's state dict from the loaded tensors, cast to ``dtype`` as from_pretrained casts
    (modules kept in float32 stay so). ``pending``: the tensors are still arriving; a tensor is
    waited for before it is cast or copied."""
    keep_fp32 = _keep_in_fp32(model, dtype)
    state: dict[str, torch.Tensor] = {}
    cast_bytes: Counter[torch.device] = Counter()
    all_bytes: Counter[torch.device] = Counter()
    for ckpt_name, model_name in names.items():
        t = tensors[ckpt_name]
        want = torch.float32 if keep_fp32 is not None and keep_fp32.search(model_name) else dtype
        all_bytes[t.device] += t.nbytes
        if want is not None and t.is_floating_point() and t.dtype != want and _castable(t.dtype):
            cast_bytes[t.device] += t.nbytes
            if pending is not None:
                pending.wait(ckpt_name)
            t = t.to(want)
        state[model_name] = t
    # Cast tensors are new allocations. When they are most of a device's bytes, copy the few
    # uncast ones out too, so that the loaded block (mostly stale now) can be freed.
    copy_out = {d for d in cast_bytes if cast_bytes[d] * 2 > all_bytes[d]}
    if copy_out:
        block_views = {tensors[c].data_ptr() for c in names}
        stored_as: dict[str, list[str]] = {}  # model name -> the checkpoint names that fill it
        for c, m in names.items():
            stored_as.setdefault(m, []).append(c)
        copies: dict[tuple[Any, ...], torch.Tensor] = {}  # tied views stay tied
        for model_name, t in state.items():
            if t.device in copy_out and t.data_ptr() in block_views:
                key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
                if key not in copies:
                    if pending is not None:
                        pending.wait(stored_as[model_name])
                    copies[key] = t.clone()
                state[model_name] = copies[key]
    return state


def _assign_state(model: nn.Module, state: dict[str, torch.Tensor], root: Path, expected: set[str],
                  devices: Mapping[str, torch.device]) -> None:
    """Assign the state as the model's parameters and buffers; every parameter must be there."""
    incompatible = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise SllmStoreError(
            f"'{root}' lacks weights for {len(still_meta)} parameters of {type(model).__name__}: "
            f"{still_meta[:5]}" + (" ..." if len(still_meta) > 5 else "") + "; if the checkpoint is of "
            f"another model class than {type(model).__name__}, pass it as hf_model_class=..."
        )
    logger.debug("missing keys re-tied or buffers: %s", incompatible.missing_keys[:10])
    missing_buffers = [n for n, _ in model.named_buffers() if n in expected and n not in state]
    if missing_buffers:
        logger.warning("'%s' lacks %d persistent buffers of %s, kept as the model initialised them: %s",
                       root, len(missing_buffers), type(model).__name__, missing_buffers[:5])
    _place_buffers(model, devices)


def _place(model: nn.Module, devices: Mapping[str, torch.device], root: Path) -> nn.Module:
    """The model dispatched over its devices, with its generation config, in eval mode."""
    if len({str(d) for d in devices.values()}) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map={k: _accelerate_device(v) for k, v in devices.items()})
    model.hf_device_map = {k: str(v) for k, v in devices.items()}
    with contextlib.suppress(Exception):  # a model without generation config is fine
        if model.can_generate():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(root)
    model.eval()
    return model


def _castable(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _accelerate_device(d: torch.device) -> Union[int, str]:
    return d.index if d.type == "cuda" and d.index is not None else str(d)


def _place_buffers(model: nn.Module, devices: Mapping[str, torch.device]) -> None:
    """Move buffers (persistent ones not in the checkpoint, non-persistent ones) to their device."""
    for module_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            target = _device_of(full, devices)
            if buf.device != target:
                module._buffers[name] = buf.to(target)


def save_model(model: nn.Module, path: PathLike, *, overwrite: bool = False, quiet: Optional[bool] = None,
               chunk_size: Any = None, num_files: int = 1, compress: Optional[str] = None,
               access_order: Any = "auto") -> Path:
    """Save a ``transformers`` model like ``save_pretrained``, with weights in the sllm-store format.

    Writes config.json, generation_config.json (when the model has one) and the weights (tied
    weights stored once) into a temporary directory that is renamed to ``path`` when complete.
    ``compress="zstd"`` stores the weights compressed (see :func:`sllm_store.convert`).
    ``access_order``: as :func:`sllm_store.convert`'s; ``"auto"`` traces a forward pass of a copy
    of the model built on the meta device.

    Example::

        sllm_store.save_model(model, "my-model.sllm")
        model = sllm_store.load_model("my-model.sllm", device_map="cuda:0")
    """
    from sllm_store._units import parse_size
    from sllm_store.index import DEFAULT_CHUNK_SIZE
    from sllm_store.writer import CheckpointWriter, atomic_directory, specs_from_state_dict

    check_saveable(model, "save_model")
    target = Path(path)
    writer = CheckpointWriter(
        target, chunk_size=parse_size(chunk_size or DEFAULT_CHUNK_SIZE), num_files=num_files, quiet=quiet,
        compress=compress,
    )
    from sllm_store.order import resolve_order

    specs = specs_from_state_dict(model.state_dict())
    order = resolve_order(access_order, specs, model=model)
    with atomic_directory(target, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(tmp)
        writer.directory = tmp
        writer.write(specs, source={"format": "transformers", "name": type(model).__name__,
                                    "metadata": {}}, access_order=order)
    return target
