"""When a load checks checksums without being told: on for GPUs and the store server, off for local
files into CPU memory, never for checkpoints without checksums; ``verify=`` and
``SLLM_STORE_VERIFY`` always win."""

from __future__ import annotations

import pytest
import torch

import sllm_store
from sllm_store.config import LoadConfig
from sllm_store.errors import ChecksumError
from sllm_store.loader import load_state_dict_with_report


@pytest.mark.parametrize(
    ("tier", "devices", "checksummed", "chunk_size", "want"),
    [
        ("local", {"cpu"}, True, None, False),
        ("local", {"cuda"}, True, None, True),
        ("local", {"cpu", "cuda"}, True, None, True),
        ("local", {"cuda"}, False, None, False),  # safetensors: nothing to check
        ("local", {"cuda"}, True, 1 << 20, False),  # another read size: not whole chunks
        ("remote", {"cuda"}, True, None, True),  # the remote cache's reload
        ("store", {"cpu"}, True, None, True),
        ("store", {"cuda"}, False, None, False),
    ],
)
def test_default(monkeypatch, tier, devices, checksummed, chunk_size, want) -> None:
    monkeypatch.delenv("SLLM_STORE_VERIFY", raising=False)
    config = LoadConfig.resolve(chunk_size=chunk_size)
    assert config.verify is None
    assert config.with_default_verify(tier, devices, checksummed).verify is want


@pytest.mark.parametrize(("env", "arg", "want"), [("1", None, True), ("0", None, False), ("0", True, True),
                                                  ("1", False, False)])
def test_argument_and_environment_win(monkeypatch, env, arg, want) -> None:
    monkeypatch.setenv("SLLM_STORE_VERIFY", env)
    config = LoadConfig.resolve(verify=arg)
    for tier, devices in (("local", {"cpu"}), ("local", {"cuda"}), ("store", {"cpu"})):
        assert config.with_default_verify(tier, devices, True).verify is want


def _corrupted(tmp_path):
    sd = {"w": torch.arange(100_000, dtype=torch.float32)}
    path = sllm_store.save_state_dict(sd, tmp_path / "m.sllm", chunk_size="64KiB")
    data = next(p for p in path.iterdir() if p.name.startswith("data-"))
    with open(data, "r+b") as f:
        f.seek(70_000)
        b = f.read(1)
        f.seek(70_000)
        f.write(bytes([b[0] ^ 1]))
    return path


def test_cpu_load_of_local_files_does_not_verify_by_default(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SLLM_STORE_VERIFY", raising=False)
    path = _corrupted(tmp_path)
    sd, report = load_state_dict_with_report(path, "cpu")
    assert report.stats["chunks_verified"] == 0
    assert not torch.equal(sd["w"], torch.arange(100_000, dtype=torch.float32))
    with pytest.raises(ChecksumError):
        sllm_store.load_state_dict(path, "cpu", verify=True)
    monkeypatch.setenv("SLLM_STORE_VERIFY", "1")
    with pytest.raises(ChecksumError):
        sllm_store.load_state_dict(path, "cpu")
