"""SGLang's loader hook: ``load_format=SllmSglangLoader`` (SGLang instantiates a class given as
its load format). Without SGLang installed, the adapter runs against a stand-in of the part of
SGLang's loader module it builds on (``BaseModelLoader``, ``DefaultModelLoader.load_model`` calling
``_get_all_weights`` then ``load_weights_and_postprocess``); with SGLang and a GPU, against SGLang
itself (same greedy tokens as its default loader)."""

from __future__ import annotations

import importlib
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import sllm_store
from sllm_store.errors import InvalidArgumentError, MissingFileError

STAND_IN = '''
class BaseModelLoader:
    def __init__(self, load_config):
        self.load_config = load_config


class DefaultModelLoader(BaseModelLoader):
    def __init__(self, load_config):
        super().__init__(load_config)
        unexpected = set(load_config.model_loader_extra_config) - {"enable_multithread_load", "num_threads"}
        if unexpected:
            raise ValueError(f"Unexpected extra config keys: {unexpected}")

    def load_model(self, *, model_config, device_config):
        model = model_config.make_model()
        weights = self._get_all_weights(model_config, model)
        self.load_weights_and_postprocess(model, weights, device_config.device)
        return model

    @staticmethod
    def load_weights_and_postprocess(model, weights, target_device):
        model.load_weights(weights)
        model.postprocessed = True
'''


class Model(torch.nn.Module):
    """A model whose ``load_weights`` fuses two checkpoint tensors into one parameter, as engine
    models stack q/k/v."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = torch.nn.Parameter(torch.zeros(8, 4))
        self.out = torch.nn.Parameter(torch.zeros(4, 4))
        self.postprocessed = False

    def load_weights(self, weights) -> None:
        for name, t in weights:
            if name in ("q", "k"):
                self.qk.data[(0 if name == "q" else 4):][:4].copy_(t)
            else:
                getattr(self, name).data.copy_(t)


@pytest.fixture
def sglang_stand_in(tmp_path, monkeypatch):
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("SGLang is installed: the real one is tested instead")
    pkg = tmp_path / "sglang" / "srt" / "model_loader"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "sglang", tmp_path / "sglang" / "srt", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "loader.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("sllm_store.integrations.sglang")
    for name in [m for m in sys.modules if m.startswith("sglang") or m == "sllm_store.integrations.sglang"]:
        del sys.modules[name]


def _config(model_path, extra=None):
    return (SimpleNamespace(model_path=str(model_path), make_model=Model),
            SimpleNamespace(model_loader_extra_config=extra or {}))


def test_loads_through_the_models_own_weight_loader(sglang_stand_in, tmp_path, caplog) -> None:
    sd = {"q": torch.randn(4, 4), "k": torch.randn(4, 4), "out": torch.randn(4, 4)}
    path = sllm_store.save_state_dict(sd, tmp_path / "m.sllm", quiet=True)
    model_config, load_config = _config(path, {"num_threads": 2, "verify": True})
    loader = sglang_stand_in.SllmSglangLoader(load_config)
    loader.download_model(model_config)
    with caplog.at_level("INFO", logger="sglang.srt.model_loader.sllm"):
        model = loader.load_model(model_config=model_config, device_config=SimpleNamespace(device="cpu"))
    assert torch.equal(model.qk[:4], sd["q"]) and torch.equal(model.qk[4:], sd["k"])
    assert torch.equal(model.out, sd["out"]) and model.postprocessed
    assert "sllm-store loaded" in caplog.text and "local tier" in caplog.text


def test_bad_settings_and_paths(sglang_stand_in, tmp_path) -> None:
    with pytest.raises(InvalidArgumentError, match="takes num_threads, verify, io_mode, store; got threads"):
        sglang_stand_in.SllmSglangLoader(_config(tmp_path, {"threads": 4})[1])
    model_config, load_config = _config(tmp_path / "missing.sllm")
    loader = sglang_stand_in.SllmSglangLoader(load_config)
    with pytest.raises(MissingFileError):
        loader.download_model(model_config)
    with pytest.raises(MissingFileError, match="load format 'sllm'"):
        loader.load_model(model_config=model_config, device_config=SimpleNamespace(device="cpu"))


@pytest.mark.gpu
def test_real_sglang_same_tokens(tiny_llama, tmp_path) -> None:
    sglang = pytest.importorskip("sglang")
    from sllm_store.integrations.sglang import SllmSglangLoader

    converted = sllm_store.convert(tiny_llama, tmp_path / "tiny.sllm", quiet=True)
    prompt, params = [[1, 5, 9, 42, 7]], {"temperature": 0, "max_new_tokens": 8}
    tokens = []
    for model, load_format in ((tiny_llama, "auto"), (converted, SllmSglangLoader)):
        engine = sglang.Engine(model_path=str(model), load_format=load_format, skip_tokenizer_init=True)
        try:
            tokens.append(engine.generate(input_ids=prompt, sampling_params=params)[0]["output_ids"])
        finally:
            engine.shutdown()
    assert tokens[0] == tokens[1]
