"""SGLang: sllm-store as SGLang's model loader. SGLang takes a loader class as its load format
(``load_format=``: a class is instantiated with the load config), so no plugin or patch is
needed::

    import sglang
    from sllm_store.integrations.sglang import SllmSglangLoader

    engine = sglang.Engine(model_path="./llama-8b.sllm", load_format=SllmSglangLoader,
                           model_loader_extra_config='{"num_threads": 16}')

``model_path`` is what :func:`sllm_store.load_state_dict` takes (a converted checkpoint, a
directory of safetensors files, an ``s3://`` URL, a store-server model with ``store`` or
``SLLM_STORE_ADDRESS``); SGLang reads ``config.json`` from it. The checkpoint is loaded into host
memory (page-cached files mapped, not copied) and handed to the model's own ``load_weights``, so
SGLang's weight loaders do the tensor-parallel slicing, stacking and quantization, then SGLang's
post-processing runs as for its default loader. The extra config takes the same settings as the
vLLM load format: ``num_threads``, ``verify``, ``io_mode``, ``store``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from typing import Any

import torch
from sglang.srt.model_loader.loader import BaseModelLoader, DefaultModelLoader

from sllm_store.integrations.engine import check_open, describe, device_peak, load_for_engine, load_settings

logger = logging.getLogger("sglang.srt.model_loader.sllm")


class SllmSglangLoader(DefaultModelLoader):
    """SGLang's default loader (model construction, quantization, post-processing) with the
    weights read by sllm-store."""

    def __init__(self, load_config: Any) -> None:
        BaseModelLoader.__init__(self, load_config)  # the default loader's own extra keys differ
        self.settings = load_settings(load_config.model_loader_extra_config,
                                      option="model_loader_extra_config")

    def download_model(self, model_config: Any) -> None:
        """Checks that the checkpoint opens (a URL's index is fetched; its data comes with the
        load)."""
        check_open(model_config.model_path, self.settings)

    def _get_all_weights(self, model_config: Any,
                         model: Any) -> Generator[tuple[str, torch.Tensor], None, None]:
        """The checkpoint's tensors in file order, for the model's ``load_weights``."""
        peak: dict[str, int] = {}
        with device_peak(peak):
            tensors, report, t0 = load_for_engine(model_config.model_path, self.settings)
            t1 = time.perf_counter()
            yield from tensors.items()
            del tensors
        logger.info("%s", describe(model_config.model_path, report, t0, t1, peak.get("peak")))


__all__ = ["SllmSglangLoader"]
