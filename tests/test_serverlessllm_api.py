"""ServerlessLLM's Python API on sllm-store: ``sllm_store.torch`` (``save_dict``, ``load_dict``) and
``sllm_store.transformers`` (``save_model``, ``load_model``).

The layout checks here are written from ServerlessLLM's writer rules, not from our writer's code:
``tensor_index.json`` maps each name (in state-dict order) to ``[offset, storage bytes, shape,
stride, "torch.<dtype>"]``; each storage is written once, whole, padded with zeros to a multiple
of 8; a new ``tensor.data_N`` starts when ``partition bytes + record bytes (unpadded)`` would pass
the partition size; offsets count across partitions.
"""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import assert_tensor_identical, subprocess_env

import sllm_store
import sllm_store.torch as sllm_torch
from sllm_store.errors import DestinationExistsError, InvalidArgumentError


def _dtypes() -> list[torch.dtype]:
    names = ["float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
             "float8_e4m3fn", "float8_e5m2"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g) * 50
    return base > 0 if dtype == torch.bool else base.to(dtype)


def _state() -> dict[str, torch.Tensor]:
    """Every dtype (odd sizes, so records need padding), a transposed view, a tied tensor, a view
    of the first rows of a storage written before the whole tensor, a scalar and an empty one."""
    sd: dict[str, torch.Tensor] = {}
    for i, dt in enumerate(_dtypes()):
        sd[f"model.{str(dt).removeprefix('torch.')}.w"] = _tensor((3, 5), dt, i)
    sd["model.strided"] = _tensor((6, 11), torch.float32, 100).t()
    sd["lm_head.tied"] = sd["model.float32.w"]
    whole = _tensor((8, 5), torch.float16, 101)
    sd["head_rows"] = whole[:3]
    sd["whole"] = whole
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    sd["empty"] = torch.empty(0, 4)
    return sd


def _read_index(root: Path) -> dict[str, list[Any]]:
    return json.loads((root / "tensor_index.json").read_text())


def _concatenated(root: Path) -> bytes:
    parts = sorted(root.glob("tensor.data_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    return b"".join(p.read_bytes() for p in parts)


def _expected_index(sd: dict[str, torch.Tensor]) -> tuple[dict[str, list[Any]], int]:
    """The index ServerlessLLM's writer produces for ``sd`` (all in one partition) and the bytes
    its data takes."""
    index: dict[str, list[Any]] = {}
    offsets: dict[int, int] = {}
    end = 0
    for name, t in sd.items():
        storage = t.untyped_storage()
        if storage.data_ptr() not in offsets:
            offsets[storage.data_ptr()] = end
            end += -(-storage.nbytes() // 8) * 8
        index[name] = [offsets[storage.data_ptr()], storage.nbytes(), list(t.shape), list(t.stride()),
                       str(t.dtype)]
    return index, end


# -- save_dict: the layout ---------------------------------------------------------------------------

def test_save_dict_index_entries_and_records(tmp_path) -> None:
    sd = _state()
    sllm_torch.save_dict(sd, tmp_path / "m")
    index = _read_index(tmp_path / "m")
    want, total = _expected_index(sd)
    assert list(index) == list(sd)  # state-dict order
    assert index == want
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["tensor.data_0", "tensor_index.json"]
    data = (tmp_path / "m" / "tensor.data_0").read_bytes()
    assert len(data) == total
    for name, (offset, size, _shape, _stride, _dtype) in index.items():
        assert offset % 8 == 0, name
        assert data[offset:offset + size] == bytes(sd[name].untyped_storage()), name
        padded = -(-size // 8) * 8
        assert data[offset + size:offset + padded] == bytes(padded - size), f"{name}: padding is not zeros"
    names = {str(dt) for dt in _dtypes()}
    assert names <= {e[4] for e in index.values()}


def test_save_dict_strided_tied_and_partial_views(tmp_path) -> None:
    sd = _state()
    sllm_torch.save_dict(sd, tmp_path / "m")
    index = _read_index(tmp_path / "m")
    assert index["model.strided"][2:4] == [[11, 6], [1, 11]]  # the transposed view keeps its stride
    assert index["model.strided"][1] == 6 * 11 * 4
    assert index["lm_head.tied"] == index["model.float32.w"]  # tied: one record, same offset
    offsets = [e[0] for e in index.values()]
    assert len(set(offsets)) == len(offsets) - 2  # tied and whole are the only shared records
    # The first rows of a storage: the whole storage is the record, and the whole tensor shares it.
    assert index["head_rows"][:2] == index["whole"][:2] == [index["head_rows"][0], 8 * 5 * 2]
    assert index["head_rows"][2:] == [[3, 5], [5, 1], "torch.float16"]
    assert index["scalar"][2:] == [[], [], "torch.float64"]
    assert index["empty"][1:4] == [0, [0, 4], [4, 1]]


def test_record_padding_to_eight(tmp_path) -> None:
    sd = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.arange(5, dtype=torch.int16),
          "c": torch.ones(2, dtype=torch.float32), "d": torch.ones(1, dtype=torch.bool)}
    sllm_torch.save_dict(sd, tmp_path / "m")
    index = _read_index(tmp_path / "m")
    assert [index[k][:2] for k in sd] == [[0, 3], [8, 10], [24, 8], [32, 1]]
    data = (tmp_path / "m" / "tensor.data_0").read_bytes()
    assert len(data) == 40
    assert data[:8] == bytes([0, 1, 2, 0, 0, 0, 0, 0])
    assert data[18:24] == bytes(6) and data[33:] == bytes(7)


def test_partitions(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sllm_torch, "PARTITION_SIZE", 28)
    # 12-byte records (16 with padding): 16 + 12 = 28 is not past 28, so two share a partition
    # (the rule counts the new record without its padding); a third would pass it.
    sd = {f"t{i}": torch.full((3,), float(i)) for i in range(5)}
    sd["big"] = torch.arange(10, dtype=torch.float32)  # 40 bytes, larger than a partition: alone
    sllm_torch.save_dict(sd, tmp_path / "m")
    root = tmp_path / "m"
    files = sorted(p.name for p in root.glob("tensor.data_*"))
    assert files == ["tensor.data_0", "tensor.data_1", "tensor.data_2", "tensor.data_3"]
    sizes = [(root / f).stat().st_size for f in files]
    assert sizes == [32, 32, 16, 40]
    index = _read_index(root)
    assert [index[k][0] for k in sd] == [0, 16, 32, 48, 64, 80]  # offsets count across partitions
    data = _concatenated(root)
    for name, t in sd.items():
        offset, size = index[name][:2]
        assert data[offset:offset + size] == bytes(t.untyped_storage()), name


def _partition_sizes(sd: dict[str, torch.Tensor], limit: int) -> list[int]:
    """The sizes of the partition files ServerlessLLM's writer makes for ``sd`` under ``limit``."""
    sizes: list[int] = []
    seen: set[int] = set()
    for t in sd.values():
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        if not sizes or sizes[-1] + storage.nbytes() > limit:
            sizes.append(0)
        sizes[-1] += -(-storage.nbytes() // 8) * 8
    return sizes


def test_three_partitions_of_every_dtype(tmp_path, monkeypatch) -> None:
    sd = _state()
    want, total = _expected_index(sd)
    limit = next(n for n in range(total // 3, total) if len(_partition_sizes(sd, n)) == 3)
    monkeypatch.setattr(sllm_torch, "PARTITION_SIZE", limit)
    sllm_torch.save_dict(sd, tmp_path / "m")
    root = tmp_path / "m"
    files = sorted(root.glob("tensor.data_*"))
    assert [p.name for p in files] == ["tensor.data_0", "tensor.data_1", "tensor.data_2"]
    assert [p.stat().st_size for p in files] == _partition_sizes(sd, limit)
    assert _read_index(root) == want  # partitioning does not change offsets
    data = _concatenated(root)
    for name, (offset, size, *_rest) in want.items():
        assert data[offset:offset + size] == bytes(sd[name].untyped_storage()), name
    got = sllm_torch.load_dict("m", {"": "cpu"}, storage_path=str(tmp_path))
    for name, t in sd.items():
        assert_tensor_identical(got[name], t, name)


def test_save_dict_refuses_existing_destination(tmp_path) -> None:
    sd = {"w": torch.ones(2)}
    (tmp_path / "empty").mkdir()
    sllm_torch.save_dict(sd, tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "tensor_index.json").is_file()
    before = (tmp_path / "empty" / "tensor.data_0").read_bytes()
    with pytest.raises(DestinationExistsError, match="not empty"):
        sllm_torch.save_dict({"w": torch.zeros(2)}, tmp_path / "empty")
    assert (tmp_path / "empty" / "tensor.data_0").read_bytes() == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationExistsError):
        sllm_torch.save_dict(sd, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]  # no temporary left


def test_save_dict_refuses_unsupported_tensors(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in recent torch
        q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    for bad in (q, torch.empty(3, device="meta"), torch.ones(3, 3).to_sparse()):
        with pytest.raises(InvalidArgumentError):
            sllm_torch.save_dict({"ok": torch.ones(2), "bad": bad}, tmp_path / "m")
        assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []


def test_save_dict_logs_progress(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="sllm_store.torch"):
        sllm_torch.save_dict({"w": torch.ones(2)}, tmp_path / "m")
    assert any("wrote 1 tensors" in r.getMessage() for r in caplog.records)


# -- load_dict ---------------------------------------------------------------------------------------

def test_load_dict_round_trip_bit_identical(tmp_path) -> None:
    sd = _state()
    sllm_torch.save_dict(sd, tmp_path / "m")
    for device_map in ({"": "cpu"}, {"model": "cpu", "lm_head": torch.device("cpu"), "head_rows": "cpu",
                                     "whole": "cpu", "scalar": "cpu", "empty": "cpu"},
                       {"": "cpu", "model.strided": "cpu"}):
        got = sllm_torch.load_dict("m", device_map, storage_path=str(tmp_path))
        assert list(got) == list(sd)
        for name, t in sd.items():
            assert_tensor_identical(got[name], t, name)
            assert got[name].device.type == "cpu"
        assert got["model.strided"].stride() == (1, 11)
        assert got["lm_head.tied"].data_ptr() == got["model.float32.w"].data_ptr()


def test_load_dict_device_map_errors(tmp_path) -> None:
    sllm_torch.save_dict({"model.a.w": torch.ones(2), "lm_head.w": torch.ones(2)}, tmp_path / "m")
    partial = sllm_torch.load_dict("m", {"model": "cpu"}, storage_path=str(tmp_path))
    assert list(partial) == ["model.a.w"]  # as ServerlessLLM, the tensors no prefix places are left out
    for device_map in ({"model": "cpu", "lm_head": "cpu", "nothing": "cpu"}, {"": "cpu", "nothing": "cpu"},
                       {"model.a.": "cpu", "": "cpu"}, {"model.a.w.x": "cpu", "": "cpu"}):
        with pytest.raises(InvalidArgumentError, match="prefixes of no tensor"):
            sllm_torch.load_dict("m", device_map, storage_path=str(tmp_path))
    for device in ("gpu?", -1, True):
        with pytest.raises(InvalidArgumentError):
            sllm_torch.load_dict("m", {"": device}, storage_path=str(tmp_path))


def test_expand_device_map() -> None:
    names = ["model.layers.0.w", "model.layers.1.w", "model.layers.10.w", "model.norm.w", "lm_head.w"]
    got = sllm_torch.expand_device_map({"": 0, "model.layers": "cpu", "model.layers.1": "cuda:1",
                                        "lm_head.w": torch.device("cuda", 2)}, names)
    assert {k: str(v) for k, v in got.items()} == {
        "model.layers.0.w": "cpu", "model.layers.1.w": "cuda:1", "model.layers.10.w": "cpu",
        "model.norm.w": "cuda:0", "lm_head.w": "cuda:2"}  # the longest prefix, on dot boundaries
    assert set(sllm_torch.expand_device_map({"": 3}, names).values()) == {torch.device("cuda", 3)}
    assert set(sllm_torch.expand_device_map({"model": 0}, names)) == set(names) - {"lm_head.w"}
    with pytest.raises(InvalidArgumentError, match="prefixes of no tensor"):
        sllm_torch.expand_device_map({"": 0, "model.layer": 1}, names)


def test_load_dict_storage_path_resolution(tmp_path, monkeypatch) -> None:
    sd = {"w": torch.arange(5.0)}
    sllm_torch.save_dict(sd, tmp_path / "env" / "m")
    sllm_torch.save_dict({"w": torch.zeros(5)}, tmp_path / "arg" / "m")
    sllm_torch.save_dict({"w": torch.ones(5)}, tmp_path / "cwd" / "models" / "m")
    monkeypatch.delenv("STORAGE_PATH", raising=False)
    monkeypatch.chdir(tmp_path / "cwd")
    assert torch.equal(sllm_torch.load_dict("m", {"": "cpu"})["w"], torch.ones(5))  # ./models
    monkeypatch.setenv("STORAGE_PATH", str(tmp_path / "env"))
    assert torch.equal(sllm_torch.load_dict("m", {"": "cpu"})["w"], sd["w"])
    got = sllm_torch.load_dict("m", {"": "cpu"}, storage_path=str(tmp_path / "arg"))  # the argument wins
    assert torch.equal(got["w"], torch.zeros(5))
    absolute = sllm_torch.load_dict(str(tmp_path / "arg" / "m"), {"": "cpu"})  # as os.path.join does
    assert torch.equal(absolute["w"], torch.zeros(5))


def test_load_dict_reads_our_own_format(tmp_path) -> None:
    sd = {"model.a": torch.randn(4, 3), "model.b": torch.arange(7, dtype=torch.int64)}
    sd["lm_head"] = sd["model.a"]
    sllm_store.save_state_dict(sd, tmp_path / "ours", quiet=True)
    for device_map in ({"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}):
        got = sllm_torch.load_dict("ours", device_map, storage_path=str(tmp_path))
        for name, t in sd.items():
            assert_tensor_identical(got[name], t, name)


def test_signatures_match_serverlessllm() -> None:
    from sllm_store import transformers as sllm_transformers

    def params(f: Any) -> list[tuple[str, Any]]:
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]

    empty = inspect.Parameter.empty
    assert params(sllm_torch.save_dict) == [("state_dict", empty), ("model_path", empty)]
    assert params(sllm_torch.load_dict) == [("model_path", empty), ("device_map", empty),
                                            ("storage_path", None)]
    assert params(sllm_transformers.save_model) == [("model", empty), ("model_path", empty)]
    assert params(sllm_transformers.load_model) == [
        ("model_path", empty), ("device_map", "auto"), ("torch_dtype", None), ("quantization", None),
        ("storage_path", None), ("fully_parallel", False), ("hf_model_class", "AutoModelForCausalLM")]


def test_importing_the_api_leaves_torch_and_transformers_alone() -> None:
    code = ("import sllm_store.torch, sllm_store.transformers, sys\n"
            "import torch, transformers\n"
            "assert torch.__name__ == 'torch' and hasattr(torch, 'nn') and hasattr(torch, 'cuda')\n"
            "assert 'sllm_store' not in torch.__file__ and hasattr(transformers, 'AutoConfig')\n"
            "assert sys.modules['torch'] is torch and sys.modules['sllm_store.torch'] is not torch\n"
            "from sllm_store.torch import save_dict, load_dict\n"
            "from sllm_store.transformers import save_model, load_model\n")
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=subprocess_env())


# -- transformers: save_model / load_model --------------------------------------------------------------

def _llama(tie: bool, dtype: torch.dtype = torch.float32) -> Any:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    # Built in ``dtype`` as from_pretrained builds it (rotary buffers stay float32).
    kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_config(cfg, **{kw: dtype}).eval()


def _logits(model: Any) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tie", [False, True])
def test_save_model_writes_serverlessllm_files(tmp_path, tie) -> None:
    from sllm_store.transformers import save_model

    transformers = pytest.importorskip("transformers")
    model = _llama(tie)
    save_model(model, str(tmp_path / "llama"))
    root = tmp_path / "llama"
    files = sorted(p.name for p in root.iterdir())
    assert files == ["config.json", "generation_config.json", "no_split_modules.json", "tensor.data_0",
                     "tensor_index.json", "tied_no_split_modules.json"]
    modules = json.loads((root / "no_split_modules.json").read_text())
    assert {"model.layers.0", "model.layers.1", "model.embed_tokens", "lm_head", "model.norm"} <= set(modules)
    assert modules["model.layers.0"] == sum(p.nbytes for p in model.model.layers[0].parameters())
    tied = json.loads((root / "tied_no_split_modules.json").read_text())
    emb = model.model.embed_tokens.weight.nbytes
    assert tied == ([[["model.embed_tokens", "lm_head"], emb]] if tie else [])
    config = transformers.AutoConfig.from_pretrained(root)
    assert config.tie_word_embeddings == tie and config.num_hidden_layers == 2
    index = _read_index(root)
    sd = model.state_dict()
    assert list(index) == list(sd)
    assert index == _expected_index(sd)[0]
    shared = index["lm_head.weight"][0] == index["model.embed_tokens.weight"][0]
    assert shared == tie
    assert next(model.parameters()).device.type == "cpu"


def test_tied_no_split_modules_groups() -> None:
    from torch import nn

    from sllm_store.transformers import no_split_modules, tied_no_split_modules

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

    class Net(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block(), Block()])
            self.blocks[2].lin.weight = self.blocks[0].lin.weight

    net = Net()
    modules = no_split_modules(net)
    assert modules == {"blocks.0": 24, "blocks.1": 24, "blocks.2": 24}  # 2x2 weight + 2 bias, float32
    assert tied_no_split_modules(net, modules) == [(["blocks.0", "blocks.2"], 16)]
    assert no_split_modules(nn.Linear(2, 2)) == {}


@pytest.mark.parametrize("tie", [False, True])
def test_load_model_outputs_equal(tmp_path, tie, monkeypatch) -> None:
    from sllm_store.transformers import load_model, save_model

    model = _llama(tie)
    save_model(model, str(tmp_path / "llama"))
    want = _logits(model)
    ours = load_model("llama", storage_path=str(tmp_path), device_map="cpu")
    assert not ours.training and next(ours.parameters()).dtype == torch.float32
    assert torch.equal(_logits(ours), want)
    if tie:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    monkeypatch.setenv("STORAGE_PATH", str(tmp_path))
    for device_map in ({"": "cpu"}, {"model": "cpu", "lm_head": torch.device("cpu")}, "auto", "balanced"):
        again = load_model("llama", device_map=device_map, fully_parallel=True)
        assert torch.equal(_logits(again), want), device_map


def test_load_model_dtypes(tmp_path) -> None:
    from sllm_store.transformers import load_model, save_model

    model = _llama(False, torch.bfloat16)
    save_model(model, str(tmp_path / "llama"))
    ours = load_model("llama", device_map="cpu", storage_path=str(tmp_path), torch_dtype=torch.bfloat16)
    assert next(ours.parameters()).dtype == torch.bfloat16
    assert torch.equal(_logits(ours), _logits(model))
    as_float = load_model("llama", device_map="cpu", storage_path=str(tmp_path), torch_dtype=torch.float32)
    assert next(as_float.parameters()).dtype == torch.float32
    assert torch.equal(as_float.lm_head.weight, model.lm_head.weight.float())


def test_load_model_of_our_own_format(tmp_path) -> None:
    from sllm_store.transformers import load_model, save_model

    model = _llama(True)
    save_model(model, str(tmp_path / "llama"))
    sllm_store.convert(tmp_path / "llama", tmp_path / "converted", quiet=True)
    assert not (tmp_path / "converted" / "tensor_index.json").exists()
    ours = load_model("converted", device_map={"": "cpu"}, storage_path=str(tmp_path))
    assert torch.equal(_logits(ours), _logits(model))


def test_load_model_refuses_quantization_and_bad_arguments(tmp_path) -> None:
    from sllm_store.transformers import load_model

    with pytest.raises(InvalidArgumentError, match="quantiz"):
        load_model("absent", device_map="cpu", storage_path=str(tmp_path), quantization="int8")
    with pytest.raises(InvalidArgumentError):
        load_model(None, device_map="cpu", storage_path=str(tmp_path))
    with pytest.raises(InvalidArgumentError):
        load_model("absent", device_map=-1, storage_path=str(tmp_path))
