"""Bad inputs raise the exact exception class of the contract, with a message naming the file."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict

import pytest
import torch
from _helpers import (
    INDEX_NAME,
    assert_tensor_identical,
    random_tensor,
    read_index_json,
    run_cli,
    write_index_json,
)

import sllm_store
from sllm_store import errors as E

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def load(path):
    return sllm_store.load_state_dict(path)


def load_verify(path):
    return sllm_store.load_state_dict(path, verify=True)


def verify(path):
    return sllm_store.verify(path)


def read_index(path):
    return sllm_store.read_index(path)


INDEX_READERS = [load, load_verify, verify, read_index]
DATA_READERS = [load, load_verify, verify]


def assert_error(excinfo, cls, *names_any):
    """Exact class, a SllmStoreError, and (when given) one of ``names_any`` is in the message."""
    err = excinfo.value
    assert type(err) is cls, f"expected exactly {cls.__name__}, got {type(err).__name__}: {err}"
    assert isinstance(err, sllm_store.SllmStoreError)
    if names_any:
        msg = str(err)
        assert any(n in msg for n in names_any), f"message does not name {names_any}: {msg!r}"


def first_stored(index):
    for name, e in index["tensors"].items():
        if "alias_of" not in e and e["nbytes"] > 0:
            return name, e
    raise AssertionError("no stored tensor")


def test_errors_are_reexported():
    for name in E.__all__:
        assert getattr(sllm_store, name) is getattr(E, name)
    assert issubclass(E.UnsupportedVersionError, E.FormatError)
    assert issubclass(E.MissingFileError, FileNotFoundError)
    assert issubclass(E.DestinationExistsError, FileExistsError)
    assert issubclass(E.DestinationExistsError, E.ConvertError)
    assert issubclass(E.ReadError, OSError)
    assert issubclass(E.OutOfMemoryError, MemoryError)


# ----------------------------------------------------------------------------------------------
# index problems
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [3, 4, 999, 0])
@pytest.mark.parametrize("reader", INDEX_READERS, ids=lambda f: f.__name__)
def test_unsupported_version(saved_checkpoint, version, reader):
    path, _ = saved_checkpoint
    index = read_index_json(path)
    index["version"] = version
    write_index_json(path, index)
    with pytest.raises(E.UnsupportedVersionError) as ei:
        reader(path)
    assert_error(ei, E.UnsupportedVersionError, INDEX_NAME)


@pytest.mark.parametrize(
    "text",
    ["this is not json", "", "{", '{"format": "sllm-store", "version": 1,', "[1, 2, 3]", "null"],
    ids=["garbage", "empty", "brace", "truncated", "list", "null"],
)
@pytest.mark.parametrize("reader", INDEX_READERS, ids=lambda f: f.__name__)
def test_malformed_index_json(saved_checkpoint, text, reader):
    path, _ = saved_checkpoint
    (path / INDEX_NAME).write_text(text)
    with pytest.raises(E.FormatError) as ei:
        reader(path)
    assert_error(ei, E.FormatError, INDEX_NAME)


def test_binary_garbage_index(saved_checkpoint):
    path, _ = saved_checkpoint
    (path / INDEX_NAME).write_bytes(bytes(range(256)) * 4)
    with pytest.raises(E.FormatError) as ei:
        load(path)
    assert_error(ei, E.FormatError, INDEX_NAME)


def test_wrong_format_name(saved_checkpoint):
    path, _ = saved_checkpoint
    index = read_index_json(path)
    index["format"] = "not-sllm-store"
    write_index_json(path, index)
    with pytest.raises(E.FormatError) as ei:
        load(path)
    assert_error(ei, E.FormatError, INDEX_NAME)


@pytest.mark.parametrize("field", ["format", "version", "chunk_size", "files", "tensors"])
@pytest.mark.parametrize("reader", INDEX_READERS, ids=lambda f: f.__name__)
def test_missing_top_level_field(saved_checkpoint, field, reader):
    path, _ = saved_checkpoint
    index = read_index_json(path)
    del index[field]
    write_index_json(path, index)
    with pytest.raises(E.FormatError) as ei:
        reader(path)
    assert_error(ei, E.FormatError, INDEX_NAME)


@pytest.mark.parametrize("field", ["dtype", "shape", "file", "offset", "nbytes"])
@pytest.mark.parametrize("reader", INDEX_READERS, ids=lambda f: f.__name__)
def test_missing_tensor_field(saved_checkpoint, field, reader):
    path, _ = saved_checkpoint
    index = read_index_json(path)
    name, entry = first_stored(index)
    del entry[field]
    write_index_json(path, index)
    with pytest.raises(E.FormatError) as ei:
        reader(path)
    assert_error(ei, E.FormatError, INDEX_NAME, name)


@pytest.mark.parametrize("field", ["name", "size", "checksums"])
def test_missing_file_field(saved_checkpoint, field):
    path, _ = saved_checkpoint
    index = read_index_json(path)
    del index["files"][0][field]
    write_index_json(path, index)
    with pytest.raises(E.FormatError) as ei:
        load_verify(path)
    assert_error(ei, E.FormatError, INDEX_NAME, "data-00000.bin")


def _bad_offset_negative(index):
    name, e = first_stored(index)
    e["offset"] = -256
    return name


def _bad_offset_past_end(index):
    name, e = first_stored(index)
    e["offset"] = index["files"][e["file"]]["size"] + 4096
    return name


def _bad_offset_overflows(index):
    name = "big.a"  # 100 KiB: starting 256 bytes before the end of its file overflows it
    e = index["tensors"][name]
    e["offset"] = index["files"][e["file"]]["size"] - 256
    return name


def _bad_offset_huge(index):
    name, e = first_stored(index)
    e["offset"] = 2**62
    return name


def _bad_file_index(index):
    name, e = first_stored(index)
    e["file"] = len(index["files"])
    return name


def _bad_file_negative(index):
    name, e = first_stored(index)
    e["file"] = -1
    return name


def _bad_nbytes(index):
    name, e = first_stored(index)
    e["nbytes"] = e["nbytes"] + 1
    return name


def _bad_nbytes_negative(index):
    name, e = first_stored(index)
    e["nbytes"] = -4
    return name


def _bad_dtype(index):
    name, e = first_stored(index)
    e["dtype"] = "float128"
    return name


def _bad_shape(index):
    name, e = first_stored(index)
    e["shape"] = [-1] + list(e["shape"])
    return name


def _bad_shape_type(index):
    name, e = first_stored(index)
    e["shape"] = "7x13"
    return name


def _bad_offset_type(index):
    name, e = first_stored(index)
    e["offset"] = "0"
    return name


def _bad_alias(index):
    index["tensors"]["dangling"] = {"alias_of": "no.such.tensor"}
    return "no.such.tensor"


def _bad_tensors_type(index):
    index["tensors"] = [1, 2, 3]
    return INDEX_NAME


def _bad_files_type(index):
    index["files"] = {"name": "data-00000.bin"}
    return INDEX_NAME


def _bad_chunk_size(index):
    index["chunk_size"] = 0
    return INDEX_NAME


def _bad_version_type(index):
    index["version"] = "one"
    return INDEX_NAME


def _bad_file_size(index):
    index["files"][0]["size"] = -4096
    return "data-00000.bin"


BAD_INDEX_EDITS = [
    _bad_offset_negative,
    _bad_offset_past_end,
    _bad_offset_overflows,
    _bad_offset_huge,
    _bad_file_index,
    _bad_file_negative,
    _bad_nbytes,
    _bad_nbytes_negative,
    _bad_dtype,
    _bad_shape,
    _bad_shape_type,
    _bad_offset_type,
    _bad_alias,
    _bad_tensors_type,
    _bad_files_type,
    _bad_chunk_size,
    _bad_version_type,
    _bad_file_size,
]


@pytest.mark.parametrize("edit", BAD_INDEX_EDITS, ids=lambda f: f.__name__[5:])
@pytest.mark.parametrize("reader", INDEX_READERS, ids=lambda f: f.__name__)
def test_bad_index_values(saved_checkpoint, edit, reader):
    path, _ = saved_checkpoint
    index = read_index_json(path)
    named = edit(index)
    write_index_json(path, index)
    with pytest.raises(E.FormatError) as ei:
        reader(path)
    # UnsupportedVersionError is a FormatError too; anything else must be exactly FormatError.
    expected = type(ei.value) if isinstance(ei.value, E.UnsupportedVersionError) else E.FormatError
    assert_error(ei, expected, INDEX_NAME, named)


@pytest.mark.parametrize("reader", [load_verify, verify], ids=lambda f: f.__name__)
def test_wrong_number_of_checksums(saved_checkpoint, reader):
    path, _ = saved_checkpoint
    index = read_index_json(path)
    index["files"][0]["checksums"] = index["files"][0]["checksums"][:-1]
    write_index_json(path, index)
    with pytest.raises(E.FormatError) as ei:
        reader(path)
    assert_error(ei, E.FormatError, INDEX_NAME, "data-00000.bin")


@pytest.mark.parametrize("reader", [load_verify, verify], ids=lambda f: f.__name__)
def test_malformed_checksum_string(saved_checkpoint, reader):
    path, _ = saved_checkpoint
    index = read_index_json(path)
    index["files"][0]["checksums"][0] = "not-a-hex-digest"
    write_index_json(path, index)
    with pytest.raises(E.FormatError) as ei:
        reader(path)
    assert_error(ei, E.FormatError, INDEX_NAME, "data-00000.bin")


# ----------------------------------------------------------------------------------------------
# missing / truncated / corrupted files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", INDEX_READERS, ids=lambda f: f.__name__)
def test_missing_index(saved_checkpoint, reader):
    path, _ = saved_checkpoint
    (path / INDEX_NAME).unlink()
    with pytest.raises(E.MissingFileError) as ei:
        reader(path)
    assert_error(ei, E.MissingFileError, INDEX_NAME)
    assert isinstance(ei.value, FileNotFoundError)


@pytest.mark.parametrize("reader", INDEX_READERS, ids=lambda f: f.__name__)
def test_nonexistent_directory(tmp_path, reader):
    path = tmp_path / "does-not-exist"
    with pytest.raises(E.MissingFileError) as ei:
        reader(path)
    assert_error(ei, E.MissingFileError, "does-not-exist")


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("reader", DATA_READERS, ids=lambda f: f.__name__)
def test_missing_data_file(saved_checkpoint, which, reader):
    path, _ = saved_checkpoint
    name = f"data-{which:05d}.bin"
    (path / name).unlink()
    with pytest.raises(E.MissingFileError) as ei:
        reader(path)
    assert_error(ei, E.MissingFileError, name)
    assert isinstance(ei.value, FileNotFoundError)


@pytest.mark.parametrize("keep", ["half", "zero", "minus_one", "minus_page"])
@pytest.mark.parametrize("reader", DATA_READERS, ids=lambda f: f.__name__)
def test_truncated_data_file(saved_checkpoint, keep, reader):
    path, _ = saved_checkpoint
    f = path / "data-00000.bin"
    size = f.stat().st_size
    new = {"half": size // 2, "zero": 0, "minus_one": size - 1, "minus_page": size - 4096}[keep]
    with open(f, "r+b") as fh:
        fh.truncate(new)
    with pytest.raises(E.TruncatedFileError) as ei:
        reader(path)
    assert_error(ei, E.TruncatedFileError, "data-00000.bin")


def _flip_byte_in_tensor(path, tensor_name=None):
    index = read_index_json(path)
    if tensor_name is None:
        tensor_name, e = first_stored(index)
    else:
        e = index["tensors"][tensor_name]
    fname = index["files"][e["file"]]["name"]
    pos = e["offset"] + e["nbytes"] // 2
    with open(path / fname, "r+b") as fh:
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0x5A]))
    return fname


def test_flipped_byte_detected_by_verify(saved_checkpoint):
    path, sd = saved_checkpoint
    fname = _flip_byte_in_tensor(path, "big.a")
    with pytest.raises(E.ChecksumError) as ei:
        sllm_store.load_state_dict(path, verify=True)
    assert_error(ei, E.ChecksumError, fname)
    with pytest.raises(E.ChecksumError) as ei:
        sllm_store.verify(path)
    assert_error(ei, E.ChecksumError, fname)
    with pytest.raises(E.ChecksumError):
        sllm_store.load_state_dict(path, verify=True, num_threads=1, io_mode="buffered")
    # Without verification the load goes through, with the corrupted value.
    loaded = sllm_store.load_state_dict(path, verify=False)
    assert not torch.equal(
        loaded["big.a"].view(torch.uint8).reshape(-1), sd["big.a"].view(torch.uint8).reshape(-1)
    )


def test_flipped_byte_in_padding_detected_by_verify(saved_checkpoint):
    path, _ = saved_checkpoint
    f = path / "data-00001.bin"
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size - 1)  # the last byte of a file is padding (or data): both count
        fh.write(b"\x01")
    with pytest.raises(E.ChecksumError) as ei:
        sllm_store.verify(path)
    assert_error(ei, E.ChecksumError, "data-00001.bin")


def test_wrong_checksum_in_index(saved_checkpoint):
    path, _ = saved_checkpoint
    index = read_index_json(path)
    c = index["files"][1]["checksums"][0]
    index["files"][1]["checksums"][0] = format(int(c, 16) ^ 1, "016x")
    write_index_json(path, index)
    sllm_store.load_state_dict(path)  # no verification: fine
    with pytest.raises(E.ChecksumError) as ei:
        sllm_store.load_state_dict(path, verify=True)
    assert_error(ei, E.ChecksumError, "data-00001.bin")


def test_flipped_byte_cli_verify(saved_checkpoint):
    path, _ = saved_checkpoint
    sllm_store.verify(path)
    fname = _flip_byte_in_tensor(path, "big.a")
    bad = run_cli("verify", path)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    assert fname in lines[0]
    assert "checksum" in lines[0].lower()


# ----------------------------------------------------------------------------------------------
# convert / save destination and source problems
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_safetensors(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator()
    g.manual_seed(0)
    src = tmp_path / "src.safetensors"
    sd = {"a": random_tensor(torch.float32, (10, 10), g), "b": torch.arange(5)}
    save_file(sd, src)
    return src, sd


def test_convert_destination_exists(tmp_path, small_safetensors):
    src, sd = small_safetensors
    dst = tmp_path / "dst"
    sllm_store.convert(src, dst, quiet=True)
    marker = dst / "extra-file.txt"
    marker.write_text("keep?")
    with pytest.raises(E.DestinationExistsError) as ei:
        sllm_store.convert(src, dst, quiet=True)
    assert_error(ei, E.DestinationExistsError, "dst")
    assert isinstance(ei.value, FileExistsError)
    assert isinstance(ei.value, E.ConvertError)
    assert marker.exists(), "a refused convert must not touch the destination"
    # overwrite=True replaces it.
    sllm_store.convert(src, dst, overwrite=True, quiet=True)
    loaded = sllm_store.load_state_dict(dst)
    assert sorted(loaded) == sorted(sd)
    assert_tensor_identical(loaded["a"], sd["a"], "a")


def test_convert_destination_is_empty_dir(tmp_path, small_safetensors):
    src, _ = small_safetensors
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(E.DestinationExistsError):
        sllm_store.convert(src, dst, quiet=True)
    sllm_store.convert(src, dst, overwrite=True, quiet=True)
    sllm_store.verify(dst)


def test_convert_destination_is_a_file(tmp_path, small_safetensors):
    src, _ = small_safetensors
    dst = tmp_path / "dst"
    dst.write_text("x")
    with pytest.raises(E.DestinationExistsError):
        sllm_store.convert(src, dst, quiet=True)


def test_save_destination_exists(tmp_path):
    sd = OrderedDict(a=torch.ones(3))
    dst = tmp_path / "dst"
    sllm_store.save_state_dict(sd, dst, quiet=True)
    with pytest.raises(E.DestinationExistsError) as ei:
        sllm_store.save_state_dict(OrderedDict(b=torch.zeros(2)), dst, quiet=True)
    assert_error(ei, E.DestinationExistsError, "dst")
    assert list(sllm_store.load_state_dict(dst)) == ["a"]
    sllm_store.save_state_dict(OrderedDict(b=torch.zeros(2)), dst, overwrite=True, quiet=True)
    assert list(sllm_store.load_state_dict(dst)) == ["b"]


def test_convert_nonexistent_source(tmp_path):
    src = tmp_path / "no-such-model"
    dst = tmp_path / "dst"
    with pytest.raises(E.ConvertError) as ei:
        sllm_store.convert(src, dst, quiet=True)
    assert_error(ei, E.MissingSourceError, "no-such-model")
    assert isinstance(ei.value, FileNotFoundError)
    assert not dst.exists()


@pytest.mark.parametrize(
    "name,content",
    [
        ("garbage.safetensors", b"\x00\x01garbage" * 100),
        ("huge-header.safetensors", (2**40).to_bytes(8, "little") + b"{}"),
        ("garbage.bin", b"not a pickle at all" * 10),
        ("garbage.pt", b""),
        ("notes.txt", b"hello"),
    ],
)
def test_convert_garbage_file_source(tmp_path, name, content):
    src = tmp_path / name
    src.write_bytes(content)
    dst = tmp_path / "dst"
    with pytest.raises(E.ConvertError) as ei:
        sllm_store.convert(src, dst, quiet=True)
    assert_error(ei, E.ConvertError, name)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == [name], "convert left files behind"


@pytest.mark.parametrize("layout", ["empty", "config_only", "garbage_shard", "missing_shard"])
def test_convert_bad_model_dir(tmp_path, layout):
    from safetensors.torch import save_file

    src = tmp_path / "model"
    src.mkdir()
    expect_name = "model"
    if layout == "config_only":
        (src / "config.json").write_text("{}")
    elif layout == "garbage_shard":
        (src / "config.json").write_text("{}")
        (src / "model.safetensors").write_bytes(b"garbage" * 50)
        expect_name = "model.safetensors"
    elif layout == "missing_shard":
        save_file({"a": torch.ones(2)}, src / "model-00001-of-00002.safetensors")
        weight_map = {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        expect_name = "model-00002-of-00002.safetensors"
    dst = tmp_path / "dst"
    with pytest.raises(E.ConvertError) as ei:
        sllm_store.convert(src, dst, quiet=True)
    expected = E.MissingSourceError if layout == "missing_shard" else E.ConvertError
    assert_error(ei, expected, expect_name)
    assert not dst.exists()


# ----------------------------------------------------------------------------------------------
# devices and options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["tpu:0", "banana", "cuda:99", "cpu:x", ""])
def test_unknown_device(saved_checkpoint, device):
    path, _ = saved_checkpoint
    with pytest.raises((E.DeviceError, ValueError)) as ei:
        sllm_store.load_state_dict(path, device=device)
    assert not isinstance(ei.value, E.FormatError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(saved_checkpoint):
    path, _ = saved_checkpoint
    with pytest.raises((E.DeviceError, ValueError)):
        sllm_store.load_state_dict(path, device="cuda:0")


def test_unknown_io_mode(saved_checkpoint):
    path, _ = saved_checkpoint
    with pytest.raises((ValueError, E.SllmStoreError)):
        sllm_store.load_state_dict(path, io_mode="mmap-please")


def test_error_does_not_poison_later_loads(saved_checkpoint, tmp_path):
    path, sd = saved_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "data-00001.bin").unlink()
    for _ in range(3):
        with pytest.raises(E.MissingFileError):
            sllm_store.load_state_dict(broken)
    loaded = sllm_store.load_state_dict(path, verify=True)
    assert sorted(loaded) == sorted(sd)


@pytest.mark.parametrize("name", ["sllm_index.json", "source.json", "data.bin.done", "x.lock", "twice"])
def test_reserved_or_repeated_data_file_names(tmp_path, name: str) -> None:
    sd = {"w": torch.ones(256, 512, dtype=torch.bfloat16), "v": torch.zeros(64)}
    path = sllm_store.save_state_dict(sd, tmp_path / "c", num_files=2)
    raw = json.loads((path / "sllm_index.json").read_text())
    assert len(raw["files"]) >= 2
    if name == "twice":
        raw["files"][1]["name"] = raw["files"][0]["name"]
    else:
        raw["files"][0]["name"] = name
    (path / "sllm_index.json").write_text(json.dumps(raw))
    with pytest.raises(E.FormatError, match="listed twice" if name == "twice" else "reserved"):
        sllm_store.read_index(path)
