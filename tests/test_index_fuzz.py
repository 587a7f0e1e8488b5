"""Malformed indexes: every one is a clean SllmStoreError, or it loads exactly the bytes it
describes. A seeded fuzzer mutates a valid index (values of every awkward kind, deleted fields)
and loads each mutation, with and without verification; targeted cases cover the inputs that
Python's own parsers would let escape as other exceptions."""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import sllm_store
from sllm_store.errors import FormatError, SllmStoreError

AWKWARD = [None, True, -1, 0, 1, 7, 4096, 2**31, 2**63 - 1, 2**63, 2**64 + 1, 3.5, 1e300, "", "x", "a" * 5000,
           "a\x00b", "../x", "/etc/passwd", "none", "zstd", "float32", [], [1], [2**63], {}, {"a": 1}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(64, 32, generator=g), "b": torch.arange(100, dtype=torch.int32),
          "c": torch.zeros(0, 4), "d": torch.randn(3, generator=g).to(torch.bfloat16)}
    sd["tied"] = sd["a"]
    path = tmp_path_factory.mktemp("fuzz") / "m.sllm"
    sllm_store.save_state_dict(sd, path, chunk_size="4KiB", num_files=2, quiet=True)
    return path


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(raw: dict, rng: random.Random) -> dict:
    raw = copy.deepcopy(raw)
    for _ in range(rng.choice((1, 1, 2, 3))):
        path = rng.choice(_paths(raw)[1:])
        parent = raw
        for k in path[:-1]:
            parent = parent[k]
        if rng.random() < 0.85:
            parent[path[-1]] = rng.choice(AWKWARD)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    return raw


def _check_described_bytes(path: Path, loaded: dict[str, torch.Tensor]) -> None:
    """What a load returned is what its index describes: each tensor's bytes at its offset."""
    index = sllm_store.read_index(path)
    for name, t in loaded.items():
        stored = index.resolve(name)
        with open(index.file_path(stored.file), "rb") as f:
            f.seek(stored.offset)
            want = f.read(stored.nbytes)
        got = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert got == want, name
        assert t.dtype == getattr(torch, stored.dtype) and tuple(t.shape) == stored.shape, name


def test_mutated_indexes_load_exactly_or_fail_cleanly(checkpoint: Path, tmp_path: Path) -> None:
    raw = json.loads((checkpoint / "sllm_index.json").read_text())
    work = tmp_path / "m.sllm"
    work.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "sllm_index.json":
            os.link(f, work / f.name)
    rng = random.Random(20261205)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(1500):
        mutated = _mutate(raw, rng)
        try:
            text = json.dumps(mutated)
        except ValueError:  # an integer json cannot write
            continue
        (work / "sllm_index.json").write_text(text)
        for verify in (False, True):
            try:
                loaded = sllm_store.load_state_dict(work, verify=verify, num_threads=2)
            except SllmStoreError:
                outcomes["refused"] += 1
                continue
            except Exception as e:  # the failure names the mutation that escaped
                pytest.fail(f"mutation {i} escaped as {type(e).__name__}: {e}\n{text[:2000]}")
            outcomes["loaded"] += 1
            _check_described_bytes(work, loaded)
    assert outcomes["refused"] > 1000 and outcomes["loaded"] > 10, outcomes


def _index_with(checkpoint: Path, tmp_path: Path, text: str) -> Path:
    work = tmp_path / "t.sllm"
    work.mkdir(exist_ok=True)
    for f in checkpoint.iterdir():
        if f.name != "sllm_index.json" and not (work / f.name).exists():
            os.link(f, work / f.name)
    (work / "sllm_index.json").write_text(text)
    return work


def _text(checkpoint: Path) -> str:
    return (checkpoint / "sllm_index.json").read_text()


@pytest.mark.parametrize("case", ["deep", "long_int", "nan", "infinity", "huge_float", "duplicate_tensor"])
def test_json_that_python_accepts_is_a_format_error(checkpoint: Path, tmp_path: Path, case: str) -> None:
    text = _text(checkpoint)
    text = {
        "deep": text[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}",
        "long_int": text.replace('"alignment": 4096', '"alignment": 1' + "0" * 5000, 1),
        "nan": text[:-1] + ', "x": NaN}',
        "infinity": text[:-1] + ', "x": -Infinity}',
        "huge_float": text[:-1] + ', "x": 1e400}',
        "duplicate_tensor": text.replace('"tensors": {', '"tensors": {"b": {"alias_of": "a"}, ', 1),
    }[case]
    with pytest.raises(FormatError):
        sllm_store.load_state_dict(_index_with(checkpoint, tmp_path, text))


def _edit(checkpoint: Path, tmp_path: Path, change: Any) -> Path:
    raw = json.loads(_text(checkpoint))
    change(raw)
    return _index_with(checkpoint, tmp_path, json.dumps(raw))


@pytest.mark.parametrize("case", ["long_name", "nul_name", "huge_dim", "huge_size", "codec_list",
                                  "raw_group"])
def test_out_of_range_fields_are_format_errors(checkpoint: Path, tmp_path: Path, case: str) -> None:
    def change(raw: dict) -> None:
        f0, c = raw["files"][0], raw["tensors"]["c"]
        if case == "long_name":
            f0["name"] = "d" * 300 + ".bin"
        elif case == "nul_name":
            f0["name"] = "da\x00ta.bin"
        elif case == "huge_dim":  # a zero-size tensor whose strides cannot be addressed
            c["shape"] = [0, 2**62, 4]
        elif case == "huge_size":
            f0["size"] = 2**63
        elif case in ("codec_list", "raw_group"):
            raw["version"] = 2
            size = f0["size"]
            f0["stored_size"] = size
            f0["chunks"] = [{"offset": o, "length": min(4096, size - o), "codec": "none", "group": 1}
                            for o in range(0, size, 4096)]
            if case == "codec_list":
                f0["chunks"][0]["codec"] = ["zstd"]
            else:
                f0["chunks"][0]["group"] = 2

    with pytest.raises(FormatError):
        sllm_store.load_state_dict(_edit(checkpoint, tmp_path, change), verify=False)
