"""ServerlessLLM checkpoints (``tensor_index.json`` + ``tensor.data_N``) read through our pipeline:
``load_state_dict``, ``load_model``, ``verify``, ``convert`` and the store server.

The checkpoints are written here by :func:`write_serverlessllm`, which follows ServerlessLLM's
writer rule by rule (its ``save_dict`` and C++ ``TensorWriter``), so these tests do not depend on
our own compatibility API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import assert_tensor_identical, serve_command, subprocess_env

import sllm_store
from sllm_store.errors import FormatError, MissingFileError, StoreUnavailableError


def write_serverlessllm(state_dict: dict[str, torch.Tensor], root: Path, partition: int = 10 << 30) -> Path:
    """ServerlessLLM's layout: in state-dict order, each storage not written yet is written whole
    (its untyped storage's bytes) and padded with zeros to a multiple of 8; a new partition
    ``tensor.data_N`` starts when the current one would pass ``partition`` bytes; offsets count
    in the concatenation of the partitions; ``tensor_index.json`` maps every name to
    ``[offset, storage bytes, shape, stride, "torch.<dtype>"]``."""
    root.mkdir(parents=True)
    index: dict[str, Any] = {}
    written: dict[int, int] = {}  # storage address -> offset
    part, part_size, offset, out = -1, 0, 0, None
    for name, t in state_dict.items():
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr not in written:
            if part == -1 or part_size + size > partition:
                if out is not None:
                    out.close()
                part, part_size = part + 1, 0
                out = open(root / f"tensor.data_{part}", "wb")  # noqa: SIM115 - closed above/below
            pad = (8 - size % 8) % 8
            out.write(bytes(storage) + b"\0" * pad)
            written[ptr] = offset
            offset, part_size = offset + size + pad, part_size + size + pad
        index[name] = [written[ptr], size, list(t.shape), list(t.stride()), str(t.dtype)]
    if out is not None:
        out.close()
    (root / "tensor_index.json").write_text(json.dumps(index))
    return root


def _dtypes() -> list[torch.dtype]:
    names = ["float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
             "float8_e4m3fn", "float8_e5m2"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for dt in _dtypes():
        name = str(dt).removeprefix("torch.")
        base = torch.randn(9, 7, generator=g) * 50
        sd[f"{name}.m"] = base.to(dt) if dt != torch.bool else base > 0
    sd["strided"] = torch.randn(6, 11, generator=g).t()  # transposed: non-contiguous
    sd["tied"] = sd["float32.m"]
    whole = torch.randn(8, 5, generator=g)
    sd["head_rows"] = whole[:3]  # another view of a storage, written first: the whole storage goes
    sd["whole"] = whole
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.empty(0, 4)
    return sd


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert_tensor_identical(got[k].cpu(), v, k)


@pytest.fixture
def ckpt(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = _state()
    return write_serverlessllm(sd, tmp_path / "m", partition=600), sd


def test_layout_has_several_partitions(ckpt) -> None:
    path, _ = ckpt
    assert len(list(path.glob("tensor.data_*"))) >= 3


@pytest.mark.parametrize("io_mode", ["buffered", "direct", "mmap"])
def test_loads_bit_identical(ckpt, io_mode) -> None:
    path, sd = ckpt
    got = sllm_store.load_state_dict(path, io_mode=io_mode)
    _same(got, sd)
    assert got["strided"].stride() == sd["strided"].stride()
    assert got["tied"].data_ptr() == got["float32.m"].data_ptr()
    assert got["head_rows"].untyped_storage().data_ptr() == got["whole"].untyped_storage().data_ptr()


def test_partial_and_mixed_device_maps(ckpt) -> None:
    path, sd = ckpt
    got = sllm_store.load_state_dict(path, {"strided": "cpu", "whole": "cpu", "tied": "cpu"})
    assert set(got) == {"strided", "whole", "tied"}
    for k in got:
        assert torch.equal(got[k], sd[k])


def test_verify_info_and_convert(ckpt, tmp_path) -> None:
    path, sd = ckpt
    sllm_store.verify(path)  # index and sizes: the format has no checksums
    index = sllm_store.formats.open_index(path)
    assert index.source["format"] == "serverlessllm"
    out = sllm_store.convert(path, tmp_path / "ours", quiet=True)
    sllm_store.verify(out)
    converted = sllm_store.read_index(out)
    assert converted.files[0].checksums and converted.alignment == 4096
    assert not (out / "tensor_index.json").exists()
    _same(sllm_store.load_state_dict(out, verify=True), sd)


def test_rank_directory(tmp_path) -> None:
    sd = {"w": torch.arange(10.0), "b": torch.ones(3, dtype=torch.int64)}
    write_serverlessllm(sd, tmp_path / "vllm-save" / "rank_0")
    _same(sllm_store.load_state_dict(tmp_path / "vllm-save" / "rank_0"), sd)


def test_load_model_of_a_transformers_save(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()  # float32: no buffer cast
    root = write_serverlessllm(model.state_dict(), tmp_path / "llama")
    model.config.save_pretrained(root)
    ours = sllm_store.load_model(root, device_map="cpu")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, model(ids).logits)


@pytest.mark.parametrize("entry, message", [
    ([0, 8, [2], [1]], "expected \\[offset, size, shape, stride, dtype\\]"),
    ([0, 8, [2], [1], "torch.float128"], "unknown dtype"),
    ([0, 8, [2], [1], "float32"], "unknown dtype"),
    ([0, 8, [2, 2], [1], "torch.float32"], "does not match shape"),
    ([0, 8, [4], [1], "torch.float32"], "past its storage"),
    ([1 << 20, 8, [2], [1], "torch.float32"], "past the end"),
    ([-8, 8, [2], [1], "torch.float32"], "non-negative"),
    ([0, 8, [2], [-1], "torch.float32"], "invalid stride"),
    ([0, 8, "2", [1], "torch.float32"], "invalid shape"),
])
def test_malformed_index_is_a_format_error(tmp_path, entry, message) -> None:
    root = write_serverlessllm({"ok": torch.zeros(4)}, tmp_path / "m")
    index = json.loads((root / "tensor_index.json").read_text())
    index["bad"] = entry
    (root / "tensor_index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match=message) as e:
        sllm_store.load_state_dict(root)
    assert "'bad'" in str(e.value) or "bad" in str(e.value)


def test_missing_partition_and_bad_json(tmp_path) -> None:
    root = write_serverlessllm({"a": torch.zeros(100), "b": torch.ones(100)}, tmp_path / "m", partition=500)
    (root / "tensor.data_0").unlink()
    with pytest.raises(MissingFileError, match="partitions are missing"):
        sllm_store.load_state_dict(root)
    (root / "tensor_index.json").write_text("[1, 2]")
    with pytest.raises(FormatError):
        sllm_store.load_state_dict(root)


def test_truncated_partition(tmp_path) -> None:
    root = write_serverlessllm({"a": torch.zeros(100)}, tmp_path / "m")
    with open(root / "tensor.data_0", "r+b") as f:
        f.truncate(100)
    with pytest.raises(FormatError, match="past the end"):
        sllm_store.load_state_dict(root)


def test_through_the_store_server(ckpt) -> None:
    path, sd = ckpt
    sock_dir = tempfile.mkdtemp(prefix="sllm-", dir="/tmp")
    address = f"unix://{sock_dir}/s.sock"
    command = serve_command("--storage-path", str(path.parent), "--mem-pool-size", "16MiB", "--chunk-size",
                            "1MiB", "--listen", address)
    proc = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                got = sllm_store.load_state_dict(path.name, store=address)
                break
            except StoreUnavailableError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        _same(got, sd)
        assert got["strided"].stride() == sd["strided"].stride()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert os.path.isdir(path)


def test_cli_info_verify_and_convert(ckpt, tmp_path, capsys) -> None:
    from sllm_store.cli import main

    path, sd = ckpt
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "serverlessllm" in out and "tensor.data_0" in out
    assert main(["verify", str(path)]) == 0
    assert "index and file sizes checked" in capsys.readouterr().out
    assert main(["convert", str(path), str(tmp_path / "c"), "-q"]) == 0
    _same(sllm_store.load_state_dict(tmp_path / "c"), sd)


# -- ServerlessLLM's API: sllm_store.torch and sllm_store.transformers --------------------------------

def test_save_dict_writes_serverlessllm_layout_byte_for_byte(tmp_path, monkeypatch) -> None:
    import sllm_store.torch as sllm_torch

    sd = _state()
    monkeypatch.setattr(sllm_torch, "PARTITION_SIZE", 600)
    sllm_torch.save_dict(sd, tmp_path / "ours")
    write_serverlessllm(sd, tmp_path / "ref", partition=600)
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == names and len(names) > 3
    for name in names:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    index = json.loads((tmp_path / "ours" / "tensor_index.json").read_text())
    assert index["tied"][0] == index["float32.m"][0] and index["strided"][3] == [1, 11]
    with pytest.raises(sllm_store.DestinationExistsError):
        sllm_torch.save_dict(sd, tmp_path / "ours")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_load_dict_device_maps_and_storage_path(tmp_path, monkeypatch) -> None:
    from sllm_store.torch import load_dict, save_dict

    sd = {"model.a.w": torch.arange(6.0), "model.b.w": torch.ones(2, 3), "lm_head.w": torch.zeros(4)}
    save_dict(sd, tmp_path / "m")
    maps = ({"": "cpu"}, {"model": "cpu", "lm_head": torch.device("cpu")}, {"model.a": "cpu", "": "cpu"})
    for device_map in maps:
        got = load_dict("m", device_map, storage_path=str(tmp_path))
        _same(got, sd)
    monkeypatch.setenv("STORAGE_PATH", str(tmp_path))
    _same(load_dict("m", {"": "cpu"}), sd)
    with pytest.raises(sllm_store.InvalidArgumentError, match="prefixes of no tensor"):
        load_dict("m", {"model": "cpu", "lm_head": "cpu", "nothing": "cpu"})
    assert list(load_dict("m", {"model": "cpu"})) == ["model.a.w", "model.b.w"]  # lm_head.w left out


@pytest.mark.parametrize("tie", [False, True])
def test_save_model_and_load_model(tmp_path, tie) -> None:
    transformers = pytest.importorskip("transformers")
    from sllm_store.transformers import load_model, save_model

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    save_model(model, str(tmp_path / "llama"))
    files = {p.name for p in (tmp_path / "llama").iterdir()}
    assert {"config.json", "generation_config.json", "no_split_modules.json", "tied_no_split_modules.json",
            "tensor_index.json", "tensor.data_0"} <= files
    assert not [f for f in files if f.endswith((".safetensors", ".bin"))]
    assert "model.layers.1" in json.loads((tmp_path / "llama" / "no_split_modules.json").read_text())
    ours = load_model("llama", device_map="cpu", storage_path=str(tmp_path), fully_parallel=True)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, model(ids).logits)
    with pytest.raises(sllm_store.InvalidArgumentError, match="quantiz"):
        load_model("llama", device_map="cpu", storage_path=str(tmp_path), quantization="int8")
    converted = sllm_store.convert(tmp_path / "llama", tmp_path / "converted", quiet=True)
    again = load_model("converted", device_map={"": "cpu"}, storage_path=str(tmp_path))  # our format too
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert (converted / "config.json").is_file()


def test_save_dict_keeps_views_into_one_buffer(tmp_path) -> None:
    """Tensors that start inside a shared storage (as loaders return them) are written as records
    of their own; ServerlessLLM's rule alone would point them all at the storage's start."""
    from sllm_store.torch import load_dict, save_dict

    flat = torch.arange(100, dtype=torch.float32)
    sd = {"a": flat[:10].view(2, 5), "b": flat[10:40].view(5, 6).t(), "b2": None, "c": flat[40:]}
    sd["b2"] = sd["b"]
    save_dict(sd, tmp_path / "m")
    got = load_dict("m", {"": "cpu"}, storage_path=str(tmp_path))
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert got["b2"].data_ptr() == got["b"].data_ptr()
