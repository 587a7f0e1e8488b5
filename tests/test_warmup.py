"""The kernel warm-up that runs beside a model's load (sllm_store.warmup)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from sllm_store import warmup

LLAMA = {"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_shapes_follow_the_config() -> None:
    assert warmup.shapes(LLAMA) == ([32, 64, 160], 64, 4)
    assert warmup.shapes({"hidden_size": 64}) == ([64], 64, 0)
    assert warmup.shapes({}) == ([], 0, 0)
    # values that are not sizes are ignored, never trusted
    assert warmup.shapes({"hidden_size": True, "intermediate_size": -3}) == ([], 0, 0)
    assert warmup.shapes({"hidden_size": "64", "num_attention_heads": 4}) == ([], 0, 0)
    assert warmup.shapes({"hidden_size": 1 << 40}) == ([], 0, 0)
    assert warmup.shapes({"hidden_size": 66, "num_attention_heads": 4}) == ([66], 66, 0)  # no head size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [LLAMA, {"hidden_size": 64}, {},
                                    {"hidden_size": 66, "num_attention_heads": 4}])
def test_warm_up_runs_a_layers_operations(dtype, config) -> None:
    warmup.warm_up(torch.device("cpu"), dtype, config)
    assert warmup.scratch_bytes(config, dtype) >= 0


def _model_dir(tmp_path: Path, config: object) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_nothing_to_warm_up(tmp_path) -> None:
    d = _model_dir(tmp_path, LLAMA)
    assert warmup.start(torch.device("cpu"), torch.bfloat16, d, 1 << 20) is None
    assert warmup.start(torch.device("cuda:0"), torch.int8, d, 1 << 20) is None
    assert warmup.start(torch.device("cuda:0"), None, d, 1 << 20) is None
    assert warmup.start(torch.device("cuda:0"), torch.bfloat16, tmp_path / "missing", 1 << 20) is None
    assert warmup.start(torch.device("cuda:0"), torch.bfloat16, _model_dir(tmp_path, [1, 2]), 1 << 20) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure of a device that is not there")
def test_a_failed_warm_up_is_logged_never_raised(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="sllm_store.warmup")
    thread = warmup.start(torch.device("cuda:0"), torch.bfloat16, _model_dir(tmp_path, LLAMA), 1 << 20)
    assert thread is not None
    thread.join(30)
    assert not thread.is_alive()
    assert "kernel warm-up on cuda:0 skipped" in caplog.text


@pytest.mark.gpu
def test_warm_up_on_the_gpu(tmp_path, caplog, monkeypatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    monkeypatch.setattr(warmup, "_warmed", set())
    caplog.set_level(logging.DEBUG, logger="sllm_store.warmup")
    d = _model_dir(tmp_path, {"text_config": LLAMA})  # a multimodal config: its language model's shapes
    thread = warmup.start(torch.device("cuda:0"), torch.bfloat16, d, 1 << 20)
    assert thread is not None
    thread.join(120)
    assert "kernels warmed up on cuda:0" in caplog.text
    assert warmup.start(torch.device("cuda:0"), torch.bfloat16, d, 1 << 20) is None  # warmed already
    # a model that leaves no room beside it is left alone
    monkeypatch.setattr(warmup, "_warmed", set())
    caplog.clear()
    total = torch.cuda.mem_get_info(0)[1]
    thread = warmup.start(torch.device("cuda:0"), torch.bfloat16, d, total)
    thread.join(120)
    assert "no room beside the weights" in caplog.text


def test_a_process_warms_a_device_up_once_per_dtype_and_shapes(tmp_path, monkeypatch) -> None:
    """A second load of a model warms nothing up again; another dtype or other shapes do; a
    warm-up that failed is tried again."""
    ran = []
    monkeypatch.setattr(warmup, "_warmed", set())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 << 30, 80 << 30))
    monkeypatch.setattr(warmup, "warm_up",
                        lambda device, dtype, config: ran.append((dtype, config.get("intermediate_size"))))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    llama, small = _model_dir(tmp_path / "a", LLAMA), _model_dir(tmp_path / "b", {"hidden_size": 64})
    dev = torch.device("cuda:0")

    def start(dtype, d):
        thread = warmup.start(dev, dtype, d, 1 << 20)
        if thread is not None:
            thread.join(30)
        return thread is not None

    assert start(torch.bfloat16, llama) and not start(torch.bfloat16, llama)
    assert start(torch.float16, llama) and start(torch.bfloat16, small)
    assert ran == [(torch.bfloat16, 160), (torch.float16, 160), (torch.bfloat16, None)]

    def fail(device, dtype, config):
        raise RuntimeError("no device")

    monkeypatch.setattr(warmup, "warm_up", fail)
    assert start(torch.float32, small) and start(torch.float32, small)  # failed: tried again
