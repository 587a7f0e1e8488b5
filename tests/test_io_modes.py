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


def test_chunks_read_back_only_where_the_load_holds_all_their_tensors(tmp_path) -> None:
    """A load while downloading writes a chunk of its cache from the device only if the chunk's
    segments hold every tensor byte of it (``covered_units``); a partial load's other chunks are
    written from their GET buffers. Checked against a byte map of the checkpoint's tensors."""
    from sllm_store.config import LoadConfig
    from sllm_store.plan import assign_devices, make_plan
    from sllm_store.tiers.remote import covered_units

    g = torch.Generator().manual_seed(5)
    sd = {f"t{i}": torch.randn(10000 + 3333 * i, generator=g) for i in range(8)}
    path = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="16KiB")
    index = sllm_store.read_index(path)
    config = LoadConfig.resolve(num_threads=2, verify=True)
    for names in (list(sd), ["t1", "t4", "t5"], ["t0", "t2", "t3", "t6"], ["t3"], ["t7"], []):
        assign = assign_devices(index, dict.fromkeys(names, "cpu")) if len(names) < len(sd) else \
            assign_devices(index, "cpu")
        plan = make_plan(index, assign, config, whole_chunks=True)
        got = {plan.units[u][:2] for u in covered_units(index, plan)}
        want = set()
        for f_i, off, length, _ in plan.units:
            inside = [t for t in index.tensors.values() if t.alias_of is None and t.file == f_i
                      and t.offset < off + length and off < t.offset + t.nbytes]
            if inside and all(t.name in names for t in inside):
                want.add((f_i, off))
        assert got == want, names
        assert bool(got) == bool(names)
