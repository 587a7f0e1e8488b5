"""Converting checkpoints into the sllm-store format.

Sources (detected from ``src``):

- a Hugging Face model directory: sharded safetensors (``model.safetensors.index.json``), a
  single ``model.safetensors`` (or other ``*.safetensors``), or ``pytorch_model*.bin`` (sharded
  with ``pytorch_model.bin.index.json`` or single), read with ``weights_only=True``; its
  non-weight files (config, tokenizer, generation config, ...) are copied so the destination is a
  complete model directory;
- a single ``.safetensors`` file;
- a torch state-dict file (``.bin``, ``.pt``, ``.pth``, ...), loaded memory-mapped with
  ``weights_only=True`` where torch supports it.

Tensors are streamed one at a time; the destination appears only once complete.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from sllm_store._units import SizeLike, parse_size
from sllm_store.errors import ConvertError, MissingFileError, MissingSourceError
from sllm_store.formats import (
    SAFETENSORS_INDEX,
    SERVERLESSLLM_INDEX,
    is_serverlessllm,
    safetensors_entries,
    safetensors_header,
    safetensors_shards,
    serverlessllm_partitions,
    shards_from_index,
)
from sllm_store.index import DEFAULT_CHUNK_SIZE, PathLike
from sllm_store.order import AccessOrder, resolve_order
from sllm_store.writer import (
    CheckpointWriter,
    TensorSpec,
    atomic_directory,
    cast_spec,
    resolve_dtype,
    specs_from_state_dict,
)

logger = logging.getLogger(__name__)

BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Weight files of other frameworks: not copied into the destination.
FOREIGN_WEIGHTS = (".msgpack", ".h5", ".gguf", ".onnx", ".ot", ".tflite", ".mlmodel")

def _safetensors_specs(paths: list[Path]) -> tuple[list[TensorSpec], dict[str, str]]:
    from safetensors import safe_open

    specs: list[TensorSpec] = []
    metadata: dict[str, str] = {}
    where: dict[str, Path] = {}
    for path in paths:
        header, start = safetensors_header(path)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise ConvertError(f"'{path}': __metadata__ must be an object of strings, "
                               f"got {type(meta).__name__}")
        metadata.update({str(k): str(v) for k, v in meta.items()})
        order = safetensors_entries(header, path, path.stat().st_size - start)
        for entry in order:
            if entry.name in where:
                raise ConvertError(f"tensor {entry.name!r} is in both '{where[entry.name]}' and '{path}'")
            where[entry.name] = path
        handle: dict[str, Any] = {}

        def get(name: str, path: Path = path, handle: dict[str, Any] = handle) -> torch.Tensor:
            if "h" not in handle:  # opened on first use, kept open for the file's tensors
                try:
                    handle["h"] = safe_open(str(path), framework="pt", device="cpu")
                except Exception as e:  # safetensors raises its own error types
                    raise ConvertError(f"cannot open '{path}': {e}") from None
            try:
                return handle["h"].get_tensor(name)
            except Exception as e:
                raise ConvertError(f"cannot read tensor {name!r} from '{path}': {e}") from None

        for entry in order:
            specs.append(TensorSpec(entry.name, getattr(torch, entry.dtype), entry.shape,
                                    lambda n=entry.name, g=get: g(n)))
    return specs, metadata


def _torch_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            logger.warning("'%s' is a legacy torch file: loading it whole into memory", path)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip / weights_only errors come in many types
        raise ConvertError(f"cannot load torch checkpoint '{path}': {e}") from None
    for key in ("state_dict", "model", "module"):  # common wrappers of a state dict
        # Unwrapped only when nothing else at the top is a tensor (else those would be lost).
        if (isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping) and len(obj) <= 3
                and not any(isinstance(v, torch.Tensor) for k, v in obj.items() if k != key)):
            logger.info("'%s': converting the state dict under %r", path, key)
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ConvertError(f"'{path}' does not hold a state dict (got {type(obj).__name__})")
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)
              and any(isinstance(x, torch.Tensor) for x in v.values())]
    if nested:
        raise ConvertError(f"'{path}' nests tensors in dicts ({', '.join(map(repr, nested[:3]))}): save "
                           "a flat state dict (name -> tensor), e.g. model.state_dict()")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if skipped:
        logger.warning("'%s': skipping %d non-tensor entries (%s)", path, len(skipped), skipped[:3])
    return tensors


def _torch_specs(paths: list[Path]) -> list[TensorSpec]:
    specs: list[TensorSpec] = []
    for path in paths:
        specs.extend(specs_from_state_dict(_torch_state_dict(path)))
    return specs


def _serverlessllm_specs(src: Path) -> list[TensorSpec]:
    """The tensors of a ServerlessLLM checkpoint, read through our loader as views of its files
    (strided ones are written as their contiguous copies; tied names stay tied)."""
    from sllm_store.errors import InvalidArgumentError
    from sllm_store.loader import load_state_dict

    try:
        state = load_state_dict(src, "cpu", io_mode="mmap")
    except InvalidArgumentError:  # a tensor its dtype cannot be viewed at: copied instead
        state = load_state_dict(src, "cpu", io_mode="buffered")
    return specs_from_state_dict(state)


def _detect(src: Path) -> tuple[str, list[Path], list[Path]]:
    """(kind, weight files, files that are weights and must not be copied)."""
    if not src.exists():
        raise MissingSourceError(f"source '{src}' does not exist")
    if is_serverlessllm(src):
        parts = serverlessllm_partitions(src)
        return "serverlessllm", parts, parts + [src / SERVERLESSLLM_INDEX]
    if src.is_file():
        if src.suffix == ".safetensors":
            return "safetensors", [src], [src]
        return "torch", [src], [src]
    st = safetensors_shards(src)
    if st:
        return "huggingface", st, st + [src / SAFETENSORS_INDEX]
    if (src / BIN_INDEX).is_file():
        shards = shards_from_index(src, BIN_INDEX)
        return "huggingface-bin", shards, shards + [src / BIN_INDEX]
    bins = [src / "pytorch_model.bin"] if (src / "pytorch_model.bin").is_file() else []
    if bins:
        return "huggingface-bin", bins, bins
    raise ConvertError(
        f"no weights found in '{src}' (looked for {SAFETENSORS_INDEX}, *.safetensors, "
        f"{BIN_INDEX}, pytorch_model.bin)"
    )


def model_files(src: Path, weights: list[Path], dst: Path) -> list[Path]:
    """The files a model needs besides its weights: the regular files at the top of its directory
    (config, tokenizer, generation config, model card), relative to it. Subdirectories (training
    checkpoints, an earlier conversion) and hidden files are not copied."""
    skip = {p.resolve() for p in weights}
    out = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.is_symlink() and not p.resolve().is_relative_to(src.resolve()):
            continue
        if not p.is_file() or p.resolve() in skip or p.suffix in (*FOREIGN_WEIGHTS, ".safetensors"):
            continue
        if p.suffix in TORCH_SUFFIXES and (p.name.startswith("pytorch_model") or p.name.startswith("model")):
            continue
        if p.resolve() == dst.resolve():
            continue
        out.append(p.relative_to(src))
    return out


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    dtype: Any = None,
    chunk_size: SizeLike = DEFAULT_CHUNK_SIZE,
    num_files: int = 1,
    overwrite: bool = False,
    quiet: Optional[bool] = None,
    compress: Optional[str] = None,
    access_order: AccessOrder = "auto",
) -> Path:
    """Convert a checkpoint into an sllm-store directory at ``dst``.

    Args:
        src: Hugging Face model directory, ``.safetensors`` file or torch state-dict file.
        dst: destination directory (must not exist unless ``overwrite``), or an ``s3://`` URL:
            converted in a temporary directory, then uploaded (see :func:`sllm_store.remote.upload`).
        dtype: cast floating-point weights (fp16/bf16/fp32/fp64) to this dtype, e.g. "bfloat16".
        chunk_size: checksum and read unit, a multiple of 4096 (default 32 MiB).
        num_files: number of data files to spread the tensors over.
        overwrite: replace an existing ``dst``.
        quiet: no progress bar (default: quiet unless stderr is a terminal).
        compress: ``"zstd"`` or ``"zstd:LEVEL"`` (1..22, default 1): compress every chunk
            losslessly, byte-grouped for floating-point weights (needs ``zstandard``).
        access_order: the order in which a forward pass first uses the tensors, in which the data
            is laid out and which the index records (streaming loads compute in it while the
            rest loads): ``"auto"`` traces it from the model that ``src/config.json`` describes,
            built on the meta device (its registration order if its forward cannot run there;
            the names' natural order without a config or ``transformers``); ``"none"`` keeps
            the source's order; or the tensor names in order.

    Example::

        sllm_store.convert("Llama-3-8B", "Llama-3-8B.sllm", dtype="bfloat16")

    Raises:
        MissingSourceError: ``src`` or a shard it lists does not exist.
        ConvertError: ``src`` holds no weights or cannot be read.
        DestinationExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    from sllm_store.index import is_remote

    if is_remote(dst):  # convert beside the source's temp space, upload, clean up
        import tempfile

        from sllm_store.remote import upload

        with tempfile.TemporaryDirectory(prefix="sllm-convert-") as tmp:
            local = convert(src, Path(tmp) / "model.sllm", dtype=dtype, chunk_size=chunk_size,
                            num_files=num_files, quiet=quiet, compress=compress, access_order=access_order)
            upload(local, str(dst), quiet=quiet)
        return dst  # type: ignore[return-value]  # the URL
    src_p, dst_p = Path(src), Path(dst)
    if src_p.resolve() == dst_p.resolve() or dst_p.resolve() in src_p.resolve().parents:
        # Replacing the destination (overwrite=True) would delete the source with it.
        raise ConvertError(f"the destination '{dst_p}' is, or contains, the source '{src_p}'")
    target = resolve_dtype(dtype)
    size = parse_size(chunk_size)
    # Options are checked before the (possibly long) source scan.
    writer = CheckpointWriter(dst_p, chunk_size=size, num_files=num_files, quiet=quiet, compress=compress)
    try:
        kind, weights, not_copied = _detect(src_p)
    except MissingFileError as e:  # a shard the source's index lists
        raise MissingSourceError(str(e)) from None
    metadata: dict[str, str] = {}
    if kind in ("safetensors", "huggingface"):
        specs, metadata = _safetensors_specs(weights)
    elif kind == "serverlessllm":
        specs = _serverlessllm_specs(src_p)
    else:
        specs = _torch_specs(weights)
    if not specs:
        raise ConvertError(f"'{src_p}' holds no tensors")
    specs = [cast_spec(s, target) for s in specs]
    extras = model_files(src_p, not_copied, dst_p) if src_p.is_dir() else []
    logger.info("converting %s (%s, %d tensors, %d files) -> %s", src_p, kind, len(specs),
                len(weights), dst_p)
    source = {"format": kind.split("-")[0] if kind != "torch" else "torch",
              "name": src_p.name, "metadata": metadata}
    from sllm_store.building import meta_model

    order = resolve_order(access_order, specs, build=lambda: meta_model(src_p) if src_p.is_dir() else None)
    with atomic_directory(dst_p, overwrite) as tmp:
        for rel in extras:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_p / rel, tmp / rel)
        writer.directory = tmp
        writer.write(specs, source=source, access_order=order)
    return dst_p
