"""Inputs that are valid but unusual, or that lie: what convert and load make of them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import sllm_store
from sllm_store.errors import ConvertError, FormatError


def _write_safetensors(path: Path, entries: dict, data: bytes) -> Path:
    """A safetensors file written by hand, so that its header can say anything."""
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_safetensors_tensor_at_an_offset_its_dtype_cannot_be_viewed_at(tmp_path) -> None:
    """Valid safetensors: U8[3] then F32[4] at byte 3. Loads copy it into aligned memory."""
    a, b = torch.tensor([7, 8, 9], dtype=torch.uint8), torch.arange(4, dtype=torch.float32) + 1
    _write_safetensors(tmp_path / "m" / "model.safetensors",
                       {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [3, 19]}},
                       a.numpy().tobytes() + b.numpy().tobytes())
    for device in ("cpu", {"b": "cpu"}):
        out = sllm_store.load_state_dict(tmp_path / "m", device)
        assert torch.equal(out["b"], b)
    with pytest.raises(ValueError, match="not a multiple of its element size"):
        sllm_store.load_state_dict(tmp_path / "m", io_mode="mmap")
    conv = sllm_store.convert(tmp_path / "m", tmp_path / "m.sllm", quiet=True)
    assert torch.equal(sllm_store.load_state_dict(conv, io_mode="mmap")["b"], b)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [-4096, -4080]}, "invalid data_offsets"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}, "invalid data_offsets"),
    ({"dtype": "F32", "shape": [4]}, "invalid data_offsets"),
    ({"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}, "invalid shape"),
    ({"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}, "do not hold shape"),
    ({"dtype": "F4", "shape": [2, 4], "data_offsets": [0, 4]}, "unsupported dtype"),
    ("not an object", "not an object"),
])
def test_safetensors_headers_that_lie(tmp_path, entry, message) -> None:
    path = _write_safetensors(tmp_path / "m" / "model.safetensors", {"a": entry}, bytes(32))
    with pytest.raises(FormatError, match=message):
        sllm_store.load_state_dict(tmp_path / "m")
    with pytest.raises(ConvertError, match=message):
        sllm_store.convert(path, tmp_path / "out", quiet=True)


def test_overlapping_and_duplicated_safetensors_tensors(tmp_path) -> None:
    _write_safetensors(tmp_path / "o" / "model.safetensors",
                       {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(32))
    with pytest.raises(FormatError, match="overlap"):
        sllm_store.load_state_dict(tmp_path / "o")
    for i in (1, 2):
        _write_safetensors(tmp_path / "d" / f"model-0000{i}-of-00002.safetensors",
                           {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(FormatError, match="'w' is in both"):
        sllm_store.load_state_dict(tmp_path / "d")
    with pytest.raises(ConvertError, match="'w' is in both"):
        sllm_store.convert(tmp_path / "d", tmp_path / "d.sllm", quiet=True)
    _write_safetensors(tmp_path / "meta" / "model.safetensors",
                       {"__metadata__": ["x"], "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                       bytes(16))
    with pytest.raises(ConvertError, match="__metadata__"):
        sllm_store.convert(tmp_path / "meta", tmp_path / "meta.sllm", quiet=True)


def test_conjugate_and_negative_views_are_saved_resolved(tmp_path) -> None:
    c = torch.randn(4, dtype=torch.complex64)
    sd = {"c": c, "cc": c.conj(), "neg_imag": c.conj().imag}
    out = sllm_store.load_state_dict(sllm_store.save_state_dict(sd, tmp_path / "x"))
    for k, t in sd.items():
        assert torch.equal(out[k], t.resolve_conj().resolve_neg()), k


def test_convert_never_replaces_a_directory_holding_the_source(tmp_path) -> None:
    src = _write_safetensors(tmp_path / "m" / "model.safetensors",
                             {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match="contains, the source"):
        sllm_store.convert(src, tmp_path / "m", overwrite=True, quiet=True)
    assert src.is_file() and (tmp_path / "m" / "config.json").is_file()


def test_torch_checkpoint_wrappers_lose_nothing(tmp_path) -> None:
    t = torch.ones(3)
    torch.save({"model": {"a": t}, "epoch": 3}, tmp_path / "wrapped.pt")
    out = sllm_store.load_state_dict(sllm_store.convert(tmp_path / "wrapped.pt", tmp_path / "w", quiet=True))
    assert set(out) == {"a"}
    torch.save({"model": {"a": t}, "lm_head.weight": t * 2}, tmp_path / "mixed.pt")
    torch.save({"encoder": {"w": t}, "w": t}, tmp_path / "nested.pt")
    for name in ("mixed", "nested"):
        with pytest.raises(ConvertError, match="nests tensors in dicts"):
            sllm_store.convert(tmp_path / f"{name}.pt", tmp_path / name, quiet=True)


def test_partial_load_reports_the_bytes_it_loaded(tmp_path) -> None:
    from sllm_store.loader import load_state_dict_with_report

    path = sllm_store.save_state_dict({"a": torch.zeros(1 << 20, dtype=torch.uint8),
                                       "b": torch.zeros(3 << 20, dtype=torch.uint8)}, tmp_path / "m")
    _, report = load_state_dict_with_report(path, {"a": "cpu"})
    assert report.bytes == 1 << 20


def test_cpu_with_an_index_is_host_memory(tmp_path) -> None:
    path = sllm_store.save_state_dict({"a": torch.arange(5)}, tmp_path / "m")
    for device in ("cpu:0", torch.device("cpu", 0), {"a": "cpu:0"}):
        assert torch.equal(sllm_store.load_state_dict(path, device)["a"], torch.arange(5))
