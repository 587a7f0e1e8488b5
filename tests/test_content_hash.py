"""Per-tensor content hashes in the index (docs/format.md, "Content hashes"): what the writer
records on every path that writes the format, how readers parse the field, and the helpers that
compare two indexes."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from _helpers import assert_state_dict_identical, random_tensor, read_index_json, write_index_json

import sllm_store
from sllm_store.errors import FormatError
from sllm_store.index import Index, read_index, shared_bytes, write_index
from sllm_store.native import _C
from sllm_store.writer import HASH_BESIDE_WRITE

FORM = re.compile(r"xxh3-64:[0-9a-f]{16}")


def _hash(data: bytes | memoryview) -> str:
    return f"xxh3-64:{_C.xxh3_64(data):016x}"


def _tensor_hash(t: torch.Tensor) -> str:
    """The content hash of ``t``'s C-contiguous bytes."""
    flat = t.detach().contiguous().reshape(-1)
    return _hash(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def _check_against_data_files(path: Path) -> Index:
    """Every stored tensor of the (uncompressed) checkpoint at ``path`` records the hash of its
    ``nbytes`` bytes at ``offset``, read back from its data file; aliases record none."""
    index = read_index(path)
    assert not index.compressed
    raw = read_index_json(path)["tensors"]
    stored = [n for n, t in index.tensors.items() if t.alias_of is None]
    assert stored and index.content_hashes().keys() == set(stored)
    for name, t in index.tensors.items():
        if t.alias_of is not None:
            assert t.content_hash is None and "content_hash" not in raw[name]
            continue
        with open(index.file_path(t.file), "rb") as f:
            f.seek(t.offset)
            data = f.read(t.nbytes)
        assert len(data) == t.nbytes
        assert t.content_hash == raw[name]["content_hash"] == _hash(data), name
        assert FORM.fullmatch(t.content_hash)
    return index


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator()
    g.manual_seed(seed)
    base = random_tensor(torch.float32, (700, 500), g)  # larger than HASH_BESIDE_WRITE
    assert base.nbytes > HASH_BESIDE_WRITE
    emb = random_tensor(torch.bfloat16, (64, 32), g)
    return {
        "embed": emb,
        "big": base,
        "big.t": base[:, :300].t(),  # a non-contiguous view: stored (and hashed) as its copy
        "exact": random_tensor(torch.uint8, (HASH_BESIDE_WRITE,), g),
        "just_below": random_tensor(torch.uint8, (HASH_BESIDE_WRITE - 1,), g),
        "scalar": torch.tensor(0.5),
        "empty": torch.zeros(3, 0),
        "mask": torch.tensor([True, False, True]),
        "lm_head": emb,  # tied: an alias
    }


def test_each_stored_tensor_records_the_hash_of_its_bytes(tmp_path, mixed_state_dict) -> None:
    sd = {**mixed_state_dict, **_state()}
    path = sllm_store.save_state_dict(sd, tmp_path / "m", num_files=3, chunk_size="64KiB", quiet=True)
    index = _check_against_data_files(path)
    assert index.tensors["lm_head"].alias_of == "embed"
    for name, t in sd.items():  # the same as hashing the source tensors themselves
        assert index.resolve(name).content_hash == _tensor_hash(t), name
    assert index.tensors["empty"].content_hash == "xxh3-64:2d06800538d394c2"  # no bytes
    xxhash = pytest.importorskip("xxhash")  # an independent implementation of the same function
    assert index.tensors["big.t"].content_hash == "xxh3-64:" + xxhash.xxh3_64_hexdigest(
        sd["big.t"].contiguous().numpy().tobytes())


def test_identical_tensors_in_separate_checkpoints_have_equal_hashes(tmp_path) -> None:
    g = torch.Generator()
    g.manual_seed(3)
    shared, other = random_tensor(torch.float16, (300, 40), g), random_tensor(torch.float16, (300, 40), g)
    a = sllm_store.save_state_dict({"first": torch.ones(10), "x": shared, "y": other}, tmp_path / "a",
                                   quiet=True)
    b = sllm_store.save_state_dict({"z": shared.clone(), "w": other + 1, "pad": torch.zeros(999)},
                                   tmp_path / "b", num_files=2, quiet=True)
    ha, hb = read_index(a).content_hashes(), read_index(b).content_hashes()
    assert read_index(a).tensors["x"].offset != read_index(b).tensors["z"].offset  # not a position
    assert ha["x"] == hb["z"]
    assert ha["y"] != hb["w"] and ha["x"] != ha["y"]
    assert len(set(ha.values()) | set(hb.values())) == 6 - 1


def test_the_hash_is_of_bytes_not_values_or_dtypes(tmp_path) -> None:
    v = torch.tensor([0.5, 1.0, -2.0, 3.0, 0.25])  # exact in both dtypes
    ints = torch.arange(5, dtype=torch.int32)
    sd = {"fp16": v.half(), "bf16": v.bfloat16(), "fp16.again": v.half().clone(),
          "int32": ints, "as_float32": ints.view(torch.float32)}  # same bytes, another dtype
    h = read_index(sllm_store.save_state_dict(sd, tmp_path / "m", quiet=True)).content_hashes()
    assert h["fp16"] != h["bf16"]
    assert h["fp16"] == h["fp16.again"]
    assert h["int32"] == h["as_float32"]


def test_convert_from_safetensors_records_them(tmp_path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _state(1).items() if k not in ("lm_head", "big.t")}
    save_file(sd, str(tmp_path / "m.safetensors"))
    dst = sllm_store.convert(tmp_path / "m.safetensors", tmp_path / "c", quiet=True, access_order="none")
    index = _check_against_data_files(dst)
    assert index.source["format"] == "safetensors"
    assert index.content_hashes() == {name: _tensor_hash(t) for name, t in sd.items()}
    cast = sllm_store.convert(tmp_path / "m.safetensors", tmp_path / "bf16", dtype="bfloat16", quiet=True)
    hashes = _check_against_data_files(cast).content_hashes()
    assert hashes["big"] == _tensor_hash(sd["big"].bfloat16()) != index.content_hashes()["big"]
    assert hashes["exact"] == index.content_hashes()["exact"]  # uint8: not cast


def test_convert_from_a_model_directory_and_save_model_record_them(tmp_path, tiny_llama) -> None:
    for kind in ("sharded", "bin"):
        dst = sllm_store.convert(tiny_llama.dirs[kind], tmp_path / kind, quiet=True)
        index = _check_against_data_files(dst)
        assert index.content_hashes() == {n: _tensor_hash(t) for n, t in tiny_llama.state_dict.items()}
    saved = sllm_store.save_model(tiny_llama.model, tmp_path / "saved", quiet=True, access_order="none")
    assert _check_against_data_files(saved).content_hashes() == read_index(tmp_path / "bin").content_hashes()


def test_convert_from_a_serverlessllm_checkpoint_records_them(tmp_path) -> None:
    from sllm_store.torch import save_dict

    sd = {k: v for k, v in _state(2).items() if k != "lm_head"}
    save_dict(sd, tmp_path / "sllm")
    dst = sllm_store.convert(tmp_path / "sllm", tmp_path / "c", quiet=True, access_order="none")
    index = _check_against_data_files(dst)
    assert index.source["format"] == "serverlessllm"
    assert index.content_hashes() == {name: _tensor_hash(t) for name, t in sd.items()}


def test_compressed_checkpoints_record_the_hash_of_the_raw_bytes(tmp_path) -> None:
    pytest.importorskip("zstandard")
    sd = {k: v for k, v in _state(4).items() if k != "big.t"}
    sd["zeros"] = torch.zeros(512, 512)  # compresses: stored as a zstd chunk
    sd["steps"] = torch.arange(300_000, dtype=torch.int32)
    plain = _check_against_data_files(sllm_store.save_state_dict(sd, tmp_path / "plain", quiet=True))
    path = sllm_store.save_state_dict(sd, tmp_path / "z", compress="zstd", chunk_size="256KiB", quiet=True)
    index = read_index(path)
    assert index.version == 2 and any(c.codec == "zstd" for f in index.files for c in f.chunks)
    assert index.content_hashes() == plain.content_hashes()
    loaded = sllm_store.load_state_dict(path)
    for name in index.tensors:
        assert index.resolve(name).content_hash == _tensor_hash(loaded[name]) == _tensor_hash(sd[name])
    # not the stored (compressed) bytes at the tensor's offset
    with open(index.file_path(0), "rb") as f:
        t = index.tensors["zeros"]
        f.seek(t.offset)
        assert _hash(f.read(t.nbytes)) != t.content_hash


def test_an_index_without_the_field_loads_unchanged(tmp_path) -> None:
    sd = _state(5)
    path = sllm_store.save_state_dict(sd, tmp_path / "m", quiet=True)
    raw = read_index_json(path)
    for t in raw["tensors"].values():
        t.pop("content_hash", None)
    write_index_json(path, raw)
    index = read_index(path)
    assert index.content_hashes() == {}
    assert all(t.content_hash is None for t in index.tensors.values())
    assert shared_bytes(index, index) == 0
    assert all("content_hash" not in t for t in index.to_json()["tensors"].values())
    loaded = sllm_store.load_state_dict(path)
    assert_state_dict_identical(loaded, sd)
    assert loaded["lm_head"].data_ptr() == loaded["embed"].data_ptr()
    # on some tensors only: those keep theirs
    raw["tensors"]["big"]["content_hash"] = _tensor_hash(sd["big"])
    write_index_json(path, raw)
    assert read_index(path).content_hashes() == {"big": _tensor_hash(sd["big"])}


@pytest.mark.parametrize("bad", [
    "xxh3-64:0123456789ABCDEF", "xxh3_64:0123456789abcdef", "XXH3-64:0123456789abcdef",
    "xxh3-64:0123456789abcde", "xxh3-64:0123456789abcdef0", "0123456789abcdef",
    "xxh3-64:0123456789abcdef\n", " xxh3-64:0123456789abcdef", "xxh3-64:0123456789abcdeg", "",
    123, None, True, ["xxh3-64:0123456789abcdef"], {"xxh3-64": "0123456789abcdef"},
])
def test_a_malformed_hash_is_a_format_error_naming_the_tensor(tmp_path, bad) -> None:
    path = sllm_store.save_state_dict({"a.b": torch.ones(4), "victim.w": torch.zeros(4)}, tmp_path / "m",
                                      quiet=True)
    raw = read_index_json(path)
    raw["tensors"]["victim.w"]["content_hash"] = bad
    write_index_json(path, raw)
    with pytest.raises(FormatError, match=r"'victim\.w'.*content_hash"):
        read_index(path)
    with pytest.raises(FormatError, match="content_hash"):
        sllm_store.load_state_dict(path)


def test_an_alias_entry_ignores_other_keys(tmp_path) -> None:
    e = torch.ones(8)
    path = sllm_store.save_state_dict({"e": e, "tied": e}, tmp_path / "m", quiet=True)
    raw = read_index_json(path)
    raw["tensors"]["tied"]["content_hash"] = "not a hash"
    write_index_json(path, raw)
    index = read_index(path)
    assert index.tensors["tied"].content_hash is None and list(index.content_hashes()) == ["e"]


def test_save_load_save_and_index_rewrites_keep_them(tmp_path) -> None:
    sd = _state(6)
    first = read_index(sllm_store.save_state_dict(sd, tmp_path / "a", quiet=True))
    loaded = sllm_store.load_state_dict(tmp_path / "a")
    second = read_index(sllm_store.save_state_dict(
        loaded, tmp_path / "b", num_files=2, chunk_size="128KiB", access_order=["mask", "big"], quiet=True))
    assert first.content_hashes() == second.content_hashes()
    assert len(first.content_hashes()) == len(sd) - 1  # the alias has none
    assert first.tensors["big"].offset != second.tensors["big"].offset
    write_index(second, tmp_path / "b")  # parse -> write -> parse
    assert read_index(tmp_path / "b").content_hashes() == second.content_hashes()
    assert read_index(tmp_path / "b").tensors == second.tensors


def test_shared_bytes_of_two_models_sharing_an_embedding(tmp_path) -> None:
    g = torch.Generator()
    g.manual_seed(8)
    emb = random_tensor(torch.bfloat16, (128, 64), g)
    frozen, l1 = random_tensor(torch.float32, (64, 64), g), random_tensor(torch.float32, (64, 64), g)
    base = {"embed": emb, "layers.0": frozen, "layers.1": l1, "lm_head": emb}
    tuned_emb = emb.clone()
    tuned = {"embed": tuned_emb, "layers.0": frozen.clone(), "layers.1": l1 + 1, "lm_head": tuned_emb,
             "extra": torch.ones(10)}
    a = read_index(sllm_store.save_state_dict(base, tmp_path / "base", quiet=True))
    b = read_index(sllm_store.save_state_dict(tuned, tmp_path / "tuned", quiet=True))
    both = emb.nbytes + frozen.nbytes  # the tied lm_head counts once: it is no stored tensor
    assert shared_bytes(a, b) == both
    assert shared_bytes(b, a) == both
    assert shared_bytes(a, a) == a.total_bytes
    assert shared_bytes(b, b) == b.total_bytes

    # (hash, nbytes) is the key: the same hash with another size is not a match
    other = dataclasses.replace(b, tensors=dict(b.tensors))
    other.tensors["embed"] = dataclasses.replace(b.tensors["embed"], nbytes=emb.nbytes - 2)
    assert shared_bytes(a, other) == frozen.nbytes
    # two copies of one tensor in b both count; tensors without a hash never do
    twice = read_index(sllm_store.save_state_dict({"e1": emb.clone(), "e2": emb.clone()}, tmp_path / "t",
                                                  quiet=True))
    assert shared_bytes(a, twice) == 2 * emb.nbytes
    assert shared_bytes(twice, a) == emb.nbytes
    unhashed = dataclasses.replace(a, tensors={n: dataclasses.replace(t, content_hash=None)
                                               for n, t in a.tensors.items()})
    assert shared_bytes(unhashed, b) == shared_bytes(b, unhashed) == 0


def test_the_index_json_holds_the_documented_form(tmp_path) -> None:
    """The example of docs/format.md: one 1 MiB tensor filling its file has the file's checksum."""
    path = sllm_store.save_state_dict({"w": torch.zeros(512, 512)}, tmp_path / "m", quiet=True)
    raw = json.loads((path / "sllm_index.json").read_text())
    assert raw["tensors"]["w"]["content_hash"] == "xxh3-64:918780b90550bf34"
    assert raw["files"][0]["checksums"] == ["918780b90550bf34"]
    assert raw["version"] == 1
