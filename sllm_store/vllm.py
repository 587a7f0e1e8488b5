"""Engine-ready checkpoints for vLLM: each parallel rank's parameters as the engine's weight
loaders leave them (sliced for its tensor-parallel rank, stacked, in the engine's dtype), saved
once as one converted checkpoint per rank; the ``sllm`` load format
(:mod:`sllm_store.integrations.vllm`) then copies each rank's bytes straight into its parameters'
memory (:func:`sllm_store.load_into`): no weight loader runs, no per-tensor work in Python, no
second copy of the model. vLLM's post-processing of the weights (repacking for the CPU backend,
quantization kernels' layouts) runs after the load, as for every load format.

Layout of a saved directory::

    OUT/
      sllm_vllm.json            the engine configuration it was saved with
      config.json, tokenizer... the model directory's other files, so OUT serves as the model
      rank-0/ ... rank-N/       converted checkpoints, rank = pp_rank * tp_size + tp_rank

Save (an engine is started with the settings the checkpoint is for, then shut down)::

    import sllm_store.vllm
    sllm_store.vllm.save("Llama-3-8B", "llama-8b-tp2", tensor_parallel_size=2)

or ``sllm-store save-vllm Llama-3-8B llama-8b-tp2 --tensor-parallel-size 2``; then::

    vllm serve llama-8b-tp2 --load-format sllm --tensor-parallel-size 2

A checkpoint saved with other parallel sizes, another dtype, quantization or architecture is
refused with the reason, before any weight is read.

Importing this module does not import vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from sllm_store.errors import (
    CheckpointMismatchError,
    DestinationExistsError,
    FormatError,
    InvalidArgumentError,
    MissingDependencyError,
)
from sllm_store.index import PathLike
from sllm_store.integrations.engine import SAVE_SETTING

logger = logging.getLogger(__name__)

MANIFEST = "sllm_vllm.json"
FORMAT = "sllm-store vllm engine-ready 1"
SIGNATURE = ("tensor_parallel_size", "pipeline_parallel_size", "dtype", "quantization", "architectures")



def engine_signature(model_config: Any, tp_size: int, pp_size: int) -> dict[str, Any]:
    """What an engine-ready checkpoint must match: parallel sizes, dtype, quantization,
    architecture."""
    return {"tensor_parallel_size": int(tp_size), "pipeline_parallel_size": int(pp_size),
            "dtype": str(model_config.dtype).removeprefix("torch."),
            "quantization": model_config.quantization,
            "architectures": list(getattr(model_config, "architectures", None) or
                                  getattr(model_config.hf_config, "architectures", None) or [])}


def read_manifest(model: PathLike) -> Optional[dict[str, Any]]:
    """The manifest of an engine-ready checkpoint directory, or None for any other path."""
    path = Path(model) / MANIFEST if not str(model).startswith(("s3://", "http://", "https://")) else None
    if path is None or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FormatError(f"{path} is not an engine-ready manifest of this version "
                          f"(format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT!r})")
    return manifest


def check_manifest(manifest: dict[str, Any], signature: dict[str, Any], where: str) -> None:
    """CheckpointMismatchError naming every setting the engine runs with that differs from the
    one the checkpoint was saved with."""
    saved = manifest.get("engine", {})
    diffs = [f"{k}: saved with {saved.get(k)!r}, the engine runs with {signature[k]!r}"
             for k in SIGNATURE if saved.get(k) != signature[k]]
    if diffs:
        raise CheckpointMismatchError(
            f"the engine-ready checkpoint {where} was saved for another engine configuration ("
            + "; ".join(diffs) + "): run the engine with the saved settings, or save the model again with "
            "these (or load its original checkpoint)")


def rank_path(model: PathLike, rank: int) -> str:
    """The converted checkpoint of one rank (a path, a store-server name or a URL)."""
    return f"{str(model).rstrip('/')}/rank-{rank}"


def save(model: PathLike, path: PathLike, *, overwrite: bool = False, **engine_args: Any) -> Path:
    """Save ``model`` (a converted checkpoint or a safetensors model directory) as vLLM holds it
    with ``engine_args`` (``tensor_parallel_size``, ``pipeline_parallel_size``, ``dtype``...): an
    engine-ready directory (see the module).

    A vLLM engine is started on ``model`` with the ``sllm`` load format; each worker writes its
    rank's parameters as its weight loaders leave them, before vLLM's post-processing (which every
    load runs again: the CPU backend, for one, repacks linear weights into a form that is not a
    parameter). The directory is assembled under a temporary name and renamed into place when
    complete; the engine is shut down before returning.

    Raises:
        DestinationExistsError: ``path`` exists and not ``overwrite``.
        InvalidArgumentError: ``engine_args`` names a load format or loader settings.
        MissingDependencyError: vLLM is not installed.
    """
    try:
        from vllm import LLM
    except ImportError:
        raise MissingDependencyError("saving for vLLM", "vllm", "vllm") from None
    taken = sorted({"load_format", "model_loader_extra_config", "model"} & set(engine_args))
    if taken:
        raise InvalidArgumentError(f"save sets {', '.join(taken)} itself")
    out = Path(path)
    if out.exists() and not overwrite:
        raise DestinationExistsError(f"{out} exists (pass overwrite=True to replace it)")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    llm = None
    try:
        tmp.mkdir(parents=True)
        llm = LLM(model=str(model), load_format="sllm", model_loader_extra_config={SAVE_SETTING: str(tmp)},
                  **engine_args)
        vllm_config = llm.llm_engine.vllm_config
        parallel = vllm_config.parallel_config
        ranks = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        missing = [r for r in range(ranks) if not (tmp / f"rank-{r}" / "sllm_index.json").is_file()]
        if missing:
            raise FormatError(f"the engine's workers saved no parameters for ranks {missing}")
        _copy_model_files(Path(model), tmp)
        manifest = {"format": FORMAT, "model": str(model),
                    "engine": engine_signature(vllm_config.model_config, parallel.tensor_parallel_size,
                                               parallel.pipeline_parallel_size),
                    "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if llm is not None:
            _shutdown(llm)
    logger.info("saved %d engine-ready ranks of %s to %s in %.1f s", ranks, model, out,
                time.perf_counter() - t0)
    return out


def save_rank(model: Any, directory: PathLike, rank: int) -> Path:
    """In a worker: this rank's parameters (the model's state without the tensors whose memory
    another one covers, as vLLM's ``sharded_state`` keeps them) into ``directory/rank-N``."""
    from sllm_store.writer import save_state_dict

    return save_state_dict(engine_parameters(model), Path(directory) / f"rank-{rank}", quiet=True)


def engine_parameters(model: Any) -> dict[str, Any]:
    """What an engine-ready checkpoint holds of a vLLM model, and what loading one fills."""
    from vllm.model_executor.model_loader import ShardedStateLoader

    return ShardedStateLoader._filter_subtensors(model.state_dict())


def _shutdown(llm: Any) -> None:
    """Stop the engine's processes now rather than at interpreter exit."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def _copy_model_files(src: Path, dst: Path) -> None:
    """The model directory's other files (config, tokenizer, generation config), as ``convert``
    copies them: the weights and the files that index them left out, for every layout a load
    opens (converted, safetensors, ServerlessLLM)."""
    if not src.is_dir():
        return
    from sllm_store.converter import model_files
    from sllm_store.formats import describing_files, open_index

    index = open_index(src)
    weights = [*src.glob("*.index.json"), src / MANIFEST, *describing_files(src),
               *(index.file_path(i) for i in range(len(index.files)))]
    for rel in model_files(src, weights, dst):
        shutil.copy2(src / rel, dst / rel.name)


__all__ = ["MANIFEST", "save", "read_manifest", "check_manifest", "engine_signature", "rank_path"]
