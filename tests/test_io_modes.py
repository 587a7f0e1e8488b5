"""io_mode='mmap' (CPU): tensors are copy-on-write views of the data files."""

from __future__ import annotations

import pytest
import torch

import sllm_store


@pytest.fixture()
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"w{i}": torch.randn(100 + i, 300, generator=g) for i in range(8)}
    sd["half"] = torch.randn(7, 3, generator=g).half()
    sd["scalar"] = torch.tensor(3, dtype=torch.int8)
    sd["empty"] = torch.zeros(0, 4)
    sd["tied"] = sd["w0"]
    path = tmp_path / "m"
    sllm_store.save_state_dict(sd, path, chunk_size=64 * 1024, num_files=3, quiet=True)
    return path, sd


@pytest.mark.parametrize("threads", [1, 4])
def test_mmap_round_trip(ckpt, threads) -> None:
    path, sd = ckpt
    loaded = sllm_store.load_state_dict(path, io_mode="mmap", num_threads=threads, verify=True)
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert loaded["tied"].data_ptr() == loaded["w0"].data_ptr()


def test_mmap_writes_do_not_reach_the_file(ckpt) -> None:
    path, sd = ckpt
    loaded = sllm_store.load_state_dict(path, io_mode="mmap")
    loaded["w1"].fill_(7.0)
    again = sllm_store.load_state_dict(path, io_mode="mmap", verify=True)
    assert torch.equal(again["w1"], sd["w1"])
    sllm_store.verify(path)


def test_mmap_detects_corruption(ckpt) -> None:
    path, _ = ckpt
    data = path / "data-00001.bin"
    raw = bytearray(data.read_bytes())
    raw[10] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(sllm_store.ChecksumError, match="data-00001.bin"):
        sllm_store.load_state_dict(path, io_mode="mmap", verify=True)


def test_mmap_is_cpu_only(ckpt) -> None:
    path, _ = ckpt
    with pytest.raises(ValueError, match="mmap"):
        sllm_store.load_state_dict(path, device="meta", io_mode="mmap")


def test_env_selects_io_mode(ckpt, monkeypatch) -> None:
    path, sd = ckpt
    monkeypatch.setenv("SLLM_STORE_IO_MODE", "mmap")
    from sllm_store.config import LoadConfig

    assert LoadConfig.resolve().io_mode == "mmap"
    loaded = sllm_store.load_state_dict(path)
    assert torch.equal(loaded["w3"], sd["w3"])
    monkeypatch.setenv("SLLM_STORE_IO_MODE", "bogus")
    with pytest.raises(ValueError, match="io_mode"):
        sllm_store.load_state_dict(path)
