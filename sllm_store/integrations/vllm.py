"""vLLM's ``sllm`` load format: ``vllm serve MODEL --load-format sllm`` and
``LLM(model=MODEL, load_format="sllm")``, with an unpatched vLLM.

sllm-store declares :func:`register` as a ``vllm.general_plugins`` entry point, which vLLM runs in
every process it starts (engine and workers), so installing both is enough. ``MODEL`` is what
``load_state_dict`` takes: a converted checkpoint, a Hugging Face model directory of safetensors
files (loaded through the same pipeline), an ``s3://`` URL (the remote tier and its cache), or,
with ``SLLM_STORE_ADDRESS`` set or ``store`` given, a model of the store server.

The checkpoint is loaded into host memory (page-cached files are mapped, not copied) and its
tensors are handed to ``model.load_weights`` in file order, so the engine's own weight loaders do
the tensor-parallel slicing, stacking and quantization; no second copy of the model is made on the
device. ``--model-loader-extra-config`` takes the load's settings as JSON: ``num_threads``,
``verify``, ``io_mode``, ``store``.

Example::

    vllm serve ./llama-8b.sllm --load-format sllm \\
        --model-loader-extra-config '{"num_threads": 16, "verify": true}'
"""

from __future__ import annotations

import time

from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig as VllmLoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from sllm_store._units import format_size
from sllm_store.errors import CheckpointMismatchError
from sllm_store.integrations.engine import (
    LOAD_FORMAT,
    SAVE_SETTING,
    check_open,
    describe,
    device_peak,
    load_for_engine,
    load_settings,
    naming_the_format,
    peak_words,
)

# Under vLLM's logger, so that the line is in vLLM's log (from every worker).
logger = init_logger("vllm.model_executor.model_loader.sllm")


class SllmModelLoader(BaseModelLoader):
    """Loads a model's weights with sllm-store (see the module's docstring)."""

    def __init__(self, load_config: VllmLoadConfig) -> None:
        super().__init__(load_config)
        self.settings = load_settings(load_config.model_loader_extra_config)
        # Set by sllm_store.vllm.save: each worker saves its rank's parameters after loading them.
        self.save_to = (load_config.model_loader_extra_config or {}).get(SAVE_SETTING)

    def download_model(self, model_config: ModelConfig) -> None:
        """Checks that the checkpoint opens (a URL's index is fetched; its data comes with the
        load)."""
        check_open(model_config.model, self.settings)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        from sllm_store.vllm import read_manifest

        manifest = read_manifest(model_config.model)
        if manifest is not None:
            self._load_engine_ready(model, model_config, manifest)
            return
        peak: dict[str, int] = {}
        with device_peak(peak):
            tensors, report, t0 = load_for_engine(model_config.model, self.settings)
            t1 = time.perf_counter()
            expected = {name for name, _ in model.named_parameters()}
            loaded = model.load_weights(iter(tensors.items()))
            del tensors
        if loaded is not None and model_config.quantization is None:
            missing = sorted(expected - set(loaded))
            if missing:
                raise CheckpointMismatchError(
                    f"{model_config.model!r} lacks weights for {len(missing)} parameters of "
                    f"{type(model).__name__}, e.g. {', '.join(missing[:5])}: is it a checkpoint of this "
                    "model?")
        logger.info("%s", describe(model_config.model, report, t0, t1, peak.get("peak")))
        if self.save_to:
            self._save_rank(model)

    def _save_rank(self, model: nn.Module) -> None:
        from sllm_store.vllm import save_rank

        t0 = time.perf_counter()
        rank = _rank()[0]
        path = save_rank(model, self.save_to, rank)
        logger.info("sllm-store saved the parameters of rank %d to %s in %.2f s", rank, path,
                    time.perf_counter() - t0)

    def _load_engine_ready(self, model: nn.Module, model_config: ModelConfig, manifest: dict) -> None:
        """This rank's converted checkpoint, copied straight into the parameters' memory."""
        from sllm_store.loader import fill_opened, with_checkpoint
        from sllm_store.vllm import check_manifest, engine_parameters, engine_signature, rank_path

        t0 = time.perf_counter()
        rank, tp, pp = _rank()
        check_manifest(manifest, engine_signature(model_config, tp, pp), repr(model_config.model))
        path = rank_path(model_config.model, rank)
        targets = engine_parameters(model)
        peak: dict[str, int] = {}
        with naming_the_format(path), device_peak(peak):
            report = with_checkpoint(path, self.settings,
                                     lambda checkpoint: fill_opened(checkpoint, targets, t0=t0))
        logger.info("sllm-store loaded %s (engine-ready rank %d of %d, %s, %s tier) in %.2f s, %.2f GB/s, "
                    "straight into the parameters%s", model_config.model, rank, tp * pp,
                    format_size(report.bytes), report.stats["tier"], report.seconds, report.gb_per_s,
                    peak_words(peak.get("peak")))


def _rank() -> tuple[int, int, int]:
    """(this worker's rank, tensor-parallel size, pipeline-parallel size); rank =
    pp_rank * tp_size + tp_rank."""
    from vllm.distributed import (
        get_pipeline_model_parallel_rank,
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tp_group,
    )

    tp, pp = get_tp_group().world_size, get_pp_group().world_size
    return get_pipeline_model_parallel_rank() * tp + get_tensor_model_parallel_rank(), tp, pp


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the ``sllm`` load format."""
    register_model_loader(LOAD_FORMAT)(SllmModelLoader)


__all__ = ["LOAD_FORMAT", "SllmModelLoader", "load_settings", "register"]
