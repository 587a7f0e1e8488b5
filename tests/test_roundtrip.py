"""save_state_dict -> load_state_dict round trips: every dtype, odd shapes, options, the index."""

from __future__ import annotations

import gc
import pathlib
from collections import OrderedDict

import pytest
import torch
from _helpers import (
    DTYPES,
    INDEX_NAME,
    INT_DTYPES,
    PLAIN_FLOAT_DTYPES,
    assert_state_dict_identical,
    assert_tensor_identical,
    check_checksums,
    check_index_invariants,
    dtype_name,
    random_tensor,
    read_index_json,
    stored_tensors,
)

import sllm_store

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

SMALL_CHUNK = 4 * 4096  # 16 KiB: a multiple of the 4096 alignment

ODD_SHAPES = [(), (1,), (0,), (3, 0, 2), (7, 13), (2, 3, 5, 7), (4097,)]


def roundtrip(sd, path, *, save_kwargs=None, load_kwargs=None):
    save_kwargs = {"quiet": True, **(save_kwargs or {})}
    ret = sllm_store.save_state_dict(sd, path, **save_kwargs)
    assert isinstance(ret, pathlib.Path)
    assert ret.resolve() == pathlib.Path(path).resolve()
    return sllm_store.load_state_dict(path, **(load_kwargs or {}))


def check_single_allocation(loaded: dict, most: int = 1) -> None:
    """Every non-empty returned tensor is a view into one host allocation (or into one mapping per
    data file, ``most`` of them, when the files were mapped)."""
    ptrs = {t.untyped_storage().data_ptr() for t in loaded.values() if t.numel() > 0}
    assert len(ptrs) <= most, f"{len(ptrs)} distinct storages"


# --------------------------------------------------------------------------------------------
# dtypes and shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_roundtrip_every_dtype(tmp_path, dtype, rng):
    sd = OrderedDict()
    for i, shape in enumerate(ODD_SHAPES):
        sd[f"x{i}"] = random_tensor(dtype, shape, rng)
    loaded = roundtrip(sd, tmp_path / "m")
    assert_state_dict_identical(loaded, sd)
    for t in loaded.values():
        assert t.device.type == "cpu"
    index = check_index_invariants(tmp_path / "m")
    for name, t in sd.items():
        e = index["tensors"][name]
        assert e["dtype"] == dtype_name(dtype)
        assert e["shape"] == list(t.shape)
        assert e["nbytes"] == t.numel() * t.element_size()


def test_all_expected_dtypes_present():
    """The suite covers every dtype this torch has (guards against silently dropping some)."""
    names = {dtype_name(d) for d in DTYPES}
    for must in ["float32", "bfloat16", "float16", "int64", "uint8", "bool", "complex64"]:
        assert must in names
    for maybe in ["float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"]:
        if hasattr(torch, maybe):
            assert maybe in names


def test_roundtrip_mixed_dtypes_one_checkpoint(tmp_path, mixed_state_dict):
    loaded = roundtrip(mixed_state_dict, tmp_path / "m", save_kwargs={"chunk_size": SMALL_CHUNK})
    assert_state_dict_identical(loaded, mixed_state_dict)
    check_single_allocation(loaded)
    index = check_index_invariants(tmp_path / "m")
    # Order in the mapping = source order; offsets increase in storage order within a file.
    assert list(index["tensors"]) == list(mixed_state_dict)
    last = {}
    for e in stored_tensors(index).values():
        assert e["offset"] >= last.get(e["file"], 0)
        last[e["file"]] = e["offset"]
    check_checksums(tmp_path / "m")


def test_scalars_and_zero_size(tmp_path, rng):
    sd = OrderedDict(
        s_f32=torch.tensor(3.5),
        s_i64=torch.tensor(-7),
        s_bool=torch.tensor(True),
        s_bf16=torch.tensor(1.25, dtype=torch.bfloat16),
        z0=torch.empty(0),
        z1=torch.empty((3, 0, 2), dtype=torch.int16),
        z2=torch.empty((0, 5), dtype=torch.bfloat16),
        after=random_tensor(torch.float32, (17,), rng),
    )
    loaded = roundtrip(sd, tmp_path / "m")
    assert_state_dict_identical(loaded, sd)
    assert loaded["s_f32"].shape == torch.Size([])
    assert loaded["s_f32"].item() == 3.5
    assert loaded["s_i64"].item() == -7
    assert loaded["s_bool"].item() is True
    index = check_index_invariants(tmp_path / "m")
    assert index["tensors"]["s_f32"]["shape"] == []
    for name in ("z0", "z1", "z2"):
        assert index["tensors"][name]["nbytes"] == 0


def test_only_zero_size_tensors(tmp_path):
    sd = OrderedDict(a=torch.empty(0), b=torch.empty((2, 0), dtype=torch.int64))
    loaded = roundtrip(sd, tmp_path / "m")
    assert_state_dict_identical(loaded, sd)
    assert read_index_json(tmp_path / "m")["total_bytes"] == 0


def test_empty_state_dict(tmp_path):
    loaded = roundtrip(OrderedDict(), tmp_path / "m")
    assert loaded == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float64])
def test_non_contiguous_inputs(tmp_path, dtype, rng):
    base = random_tensor(dtype, (24, 37), rng)
    sd = OrderedDict(
        transposed=base.t(),
        stepped=base[::3, 1::2],
        column=base[:, 5],
        offset_view=base[10:12],  # contiguous but at a storage offset within a bigger storage
        expanded=base[0:1, :].expand(4, 37),  # stride 0
        permuted=random_tensor(dtype, (3, 4, 5), rng).permute(2, 0, 1),
        every_other_col=base[:, ::2],
    )
    for t in list(sd.values())[:3]:
        assert not t.is_contiguous()
    loaded = roundtrip(sd, tmp_path / "m")
    assert_state_dict_identical(loaded, sd)
    for t in loaded.values():
        assert t.is_contiguous()
    index = check_index_invariants(tmp_path / "m")
    # Stored as the contiguous copy: a view into a bigger storage stores only its own bytes.
    e = index["tensors"]["offset_view"]
    assert e["nbytes"] == 2 * 37 * dtype.itemsize
    e = index["tensors"]["expanded"]
    assert e["nbytes"] == 4 * 37 * dtype.itemsize


def test_large_tensors_span_many_chunks(tmp_path, rng):
    sd = OrderedDict()
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.uint8, torch.float64]):
        numel = 100_000 // dtype.itemsize + 13 * i  # ~100 KB, not chunk aligned
        sd[f"big{i}"] = random_tensor(dtype, (numel,), rng)
        sd[f"small{i}"] = random_tensor(torch.int32, (3,), rng)
    path = tmp_path / "m"
    loaded = roundtrip(sd, path, save_kwargs={"chunk_size": SMALL_CHUNK})
    assert_state_dict_identical(loaded, sd)
    check_single_allocation(loaded)
    index = check_index_invariants(path)
    assert index["chunk_size"] == SMALL_CHUNK
    assert sum(len(f["checksums"]) for f in index["files"]) >= 400_000 // SMALL_CHUNK
    check_checksums(path)
    # Load with a small I/O chunk size and verification as well.
    again = sllm_store.load_state_dict(path, chunk_size=2 * 4096, num_threads=4)
    assert_state_dict_identical(again, sd)
    again = sllm_store.load_state_dict(path, chunk_size=3 * 4096, num_threads=1)
    assert_state_dict_identical(again, sd)
    again = sllm_store.load_state_dict(path, verify=True, num_threads=4)
    assert_state_dict_identical(again, sd)


def test_many_small_tensors(tmp_path):
    g = torch.Generator()
    g.manual_seed(3)
    dtypes = [torch.float32, torch.float16, torch.int64, torch.bool, torch.uint8, torch.bfloat16]
    sd = OrderedDict()
    for i in range(600):
        shape = tuple(int(s) for s in torch.randint(1, 6, (i % 3,), generator=g))
        sd[f"layers.{i}.w"] = random_tensor(dtypes[i % len(dtypes)], shape, g)
    loaded = roundtrip(sd, tmp_path / "m", save_kwargs={"chunk_size": SMALL_CHUNK})
    assert_state_dict_identical(loaded, sd)
    check_single_allocation(loaded)
    check_index_invariants(tmp_path / "m")
    check_checksums(tmp_path / "m")


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_files", [2, 3])
def test_num_files(tmp_path, num_files, rng):
    sd = OrderedDict((f"w{i}", random_tensor(torch.float32, (64, 64), rng)) for i in range(12))
    sd["scalar"] = torch.tensor(1.0)
    sd["empty"] = torch.empty(0, dtype=torch.int8)
    path = tmp_path / "m"
    loaded = roundtrip(sd, path, save_kwargs={"num_files": num_files, "chunk_size": SMALL_CHUNK})
    assert_state_dict_identical(loaded, sd)
    check_single_allocation(loaded, most=num_files)  # page-cached after the save: the files mapped
    index = check_index_invariants(path)
    assert len(index["files"]) == num_files
    assert sorted(p.name for p in path.glob("data-*.bin")) == [f"data-{i:05d}.bin" for i in range(num_files)]
    assert {e["file"] for e in stored_tensors(index).values() if e["nbytes"]} == set(range(num_files))
    check_checksums(path)


@pytest.mark.parametrize("io_mode", ["auto", "buffered", "direct"])
@pytest.mark.parametrize("num_threads", [1, 4, 16])
def test_io_modes_and_threads(saved_checkpoint, io_mode, num_threads):
    path, sd = saved_checkpoint
    loaded = sllm_store.load_state_dict(path, io_mode=io_mode, num_threads=num_threads)
    assert_state_dict_identical(loaded, sd)
    check_single_allocation(loaded, most=len(read_index_json(path)["files"]) if io_mode == "auto" else 1)


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_io_modes_on_tmpfs(tmpfs_dir, mixed_state_dict, io_mode):
    """O_DIRECT is usually refused on tmpfs: direct mode must fall back and still be correct."""
    path = tmpfs_dir / "m"
    sllm_store.save_state_dict(mixed_state_dict, path, chunk_size=SMALL_CHUNK, quiet=True)
    loaded = sllm_store.load_state_dict(path, io_mode=io_mode, num_threads=2, verify=True)
    assert_state_dict_identical(loaded, mixed_state_dict)


def test_verify_true_on_good_data(saved_checkpoint):
    path, sd = saved_checkpoint
    loaded = sllm_store.load_state_dict(path, verify=True)
    assert_state_dict_identical(loaded, sd)
    assert sllm_store.verify(path) is None
    assert sllm_store.verify(path, num_threads=1) is None
    check_checksums(path)


def test_path_as_str_and_pathlike(saved_checkpoint):
    path, sd = saved_checkpoint
    assert_state_dict_identical(sllm_store.load_state_dict(str(path)), sd)
    assert_state_dict_identical(sllm_store.load_state_dict(path, device=torch.device("cpu")), sd)
    sllm_store.verify(str(path))
    sllm_store.read_index(str(path))
    sllm_store.read_index(path)


def test_dtype_conversion_on_save(tmp_path, rng):
    sd = OrderedDict()
    for dt in PLAIN_FLOAT_DTYPES:
        # Finite values: conversion of NaN payloads is not what this test is about.
        sd[f"f.{dtype_name(dt)}"] = (torch.randn(9, 7, generator=rng) * 10).to(dt)
    for dt in INT_DTYPES:
        sd[f"i.{dtype_name(dt)}"] = random_tensor(dt, (9, 7), rng)
    sd["bool"] = random_tensor(torch.bool, (5,), rng)
    sd["f.scalar"] = torch.tensor(0.1, dtype=torch.float64)
    path = tmp_path / "m"
    loaded = roundtrip(sd, path, save_kwargs={"dtype": torch.bfloat16})
    assert list(loaded) == list(sd)
    for name, t in sd.items():
        if t.is_floating_point():
            assert_tensor_identical(loaded[name], t.to(torch.bfloat16), name)
        else:
            assert_tensor_identical(loaded[name], t, name)
    index = check_index_invariants(path)
    assert index["tensors"]["f.float32"]["dtype"] == "bfloat16"
    assert index["tensors"]["i.int64"]["dtype"] == "int64"


def test_metadata_and_source(tmp_path, rng):
    sd = OrderedDict(a=random_tensor(torch.float32, (3,), rng))
    path = tmp_path / "m"
    sllm_store.save_state_dict(sd, path, metadata={"purpose": "test", "n": "1"}, quiet=True)
    index = read_index_json(path)
    src = index["source"]
    assert src["format"] == "state_dict"
    assert isinstance(src["name"], str)
    assert src["metadata"]["purpose"] == "test"
    assert src["metadata"]["n"] == "1"
    assert index["created_by"] == f"sllm-store {sllm_store.__version__}"


def test_more_files_than_tensors(tmp_path, rng):
    sd = OrderedDict(a=random_tensor(torch.float32, (10,), rng), b=torch.tensor(2))
    loaded = roundtrip(sd, tmp_path / "m", save_kwargs={"num_files": 5})
    assert_state_dict_identical(loaded, sd)
    check_index_invariants(tmp_path / "m")
    sllm_store.verify(tmp_path / "m")


def test_unusual_tensor_names(tmp_path, rng):
    names = ["módulo.peso", "with space", 'quote"and\\backslash', "emoji.🦙", "a" * 300, "0"]
    sd = OrderedDict((n, random_tensor(torch.float16, (3, i + 1), rng)) for i, n in enumerate(names))
    loaded = roundtrip(sd, tmp_path / "m")
    assert_state_dict_identical(loaded, sd)


def test_concurrent_loads_from_threads(saved_checkpoint):
    from concurrent.futures import ThreadPoolExecutor

    path, sd = saved_checkpoint

    def work(i):
        out = sllm_store.load_state_dict(path, num_threads=2, verify=i % 2 == 0)
        assert_state_dict_identical(out, sd)
        return True

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(work, range(8)))


def test_version_attribute():
    assert sllm_store.__version__ == "0.1.0"


def test_save_accepts_parameters(tmp_path):
    lin = torch.nn.Linear(8, 4)
    sd = OrderedDict(lin.named_parameters())
    assert all(p.requires_grad for p in sd.values())
    loaded = roundtrip(sd, tmp_path / "m")
    assert_state_dict_identical(loaded, {k: v.detach() for k, v in sd.items()})


def test_save_does_not_modify_input(tmp_path, make_state_dict):
    sd = make_state_dict(dtypes=PLAIN_FLOAT_DTYPES + INT_DTYPES, shapes=((4, 6), ()))
    sd["t"] = sd["t.float32.0"].t()
    before = {k: (v.clone(), v.data_ptr()) for k, v in sd.items()}
    sllm_store.save_state_dict(sd, tmp_path / "m", dtype=torch.bfloat16, quiet=True)
    for k, v in sd.items():
        assert v.data_ptr() == before[k][1]
        assert_tensor_identical(v, before[k][0], k)


def test_overwrite_on_save(tmp_path, rng):
    path = tmp_path / "m"
    a = OrderedDict(a=random_tensor(torch.float32, (1000,), rng), b=torch.tensor(1))
    b = OrderedDict(c=random_tensor(torch.int8, (10,), rng))
    sllm_store.save_state_dict(a, path, num_files=2, quiet=True)
    sllm_store.save_state_dict(b, path, overwrite=True, quiet=True)
    assert_state_dict_identical(sllm_store.load_state_dict(path), b)
    # No stale data files from the first save.
    assert sorted(p.name for p in path.glob("data-*.bin")) == ["data-00000.bin"]


# --------------------------------------------------------------------------------------------
# tied tensors and storage sharing
# --------------------------------------------------------------------------------------------


def test_tied_tensors(tmp_path, rng):
    emb = random_tensor(torch.float32, (50, 8), rng)
    other = random_tensor(torch.float16, (8,), rng)
    sd = OrderedDict()
    sd["embed.weight"] = emb
    sd["norm.weight"] = other
    sd["lm_head.weight"] = emb  # the same tensor object under a second name
    path = tmp_path / "m"
    loaded = roundtrip(sd, path)
    assert_state_dict_identical(loaded, sd)
    assert loaded["lm_head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert loaded["lm_head.weight"].shape == loaded["embed.weight"].shape
    assert loaded["lm_head.weight"].stride() == loaded["embed.weight"].stride()
    check_single_allocation(loaded)
    index = check_index_invariants(path)
    assert index["tensors"]["lm_head.weight"] == {"alias_of": "embed.weight"}
    assert "alias_of" not in index["tensors"]["embed.weight"]
    assert index["total_bytes"] == emb.nbytes + other.nbytes
    # Writing through one name is seen through the other (same storage).
    loaded["embed.weight"][0, 0] = 123.0
    assert loaded["lm_head.weight"][0, 0].item() == 123.0


def test_tied_tensors_three_names_and_views(tmp_path, rng):
    base = random_tensor(torch.bfloat16, (16, 4), rng)
    sd = OrderedDict(a=base, b=base, c=base)
    sd["first_row"] = base[0]  # shares storage but is a different view: stored on its own
    sd["t"] = base.t()
    loaded = roundtrip(sd, tmp_path / "m")
    assert_state_dict_identical(loaded, sd)
    assert loaded["a"].data_ptr() == loaded["b"].data_ptr() == loaded["c"].data_ptr()
    index = read_index_json(tmp_path / "m")
    assert index["tensors"]["b"] == {"alias_of": "a"}
    assert index["tensors"]["c"] in ({"alias_of": "a"}, {"alias_of": "b"})
    assert "alias_of" not in index["tensors"]["first_row"]
    assert "alias_of" not in index["tensors"]["t"]


def test_cpu_loads_map_the_files_cached_or_cold(saved_checkpoint):
    """Into CPU memory, a whole checkpoint loads as views of its files, page-cached or cold
    (usable sooner than a copy; no memory of its own to fault in); a partial load never maps, and
    a cold one is then read with O_DIRECT."""
    from sllm_store.loader import load_state_dict_with_report
    from sllm_store.utils import evict_page_cache

    path, sd = saved_checkpoint
    sllm_store.load_state_dict(path, io_mode="buffered")  # cached now
    loaded, report = load_state_dict_with_report(path)
    assert report.stats["io_mode"] == "mmap"
    assert_state_dict_identical(loaded, sd)
    del loaded  # mapped pages stay cached while mapped
    gc.collect()
    for f in path.glob("data-*.bin"):
        evict_page_cache(f)
    loaded, report = load_state_dict_with_report(path)
    assert report.stats["io_mode"] == "mmap"
    assert_state_dict_identical(loaded, sd)
    del loaded
    gc.collect()
    for f in path.glob("data-*.bin"):
        evict_page_cache(f)
    name = next(iter(sd))
    loaded, report = load_state_dict_with_report(path, {name: "cpu"})
    assert report.stats["io_mode"] in ("direct", "buffered") and set(loaded) == {name}  # buffered where
    # O_DIRECT is refused, or where the eviction left pages cached


def test_returned_tensors_view_one_allocation(saved_checkpoint):
    path, _ = saved_checkpoint
    loaded = sllm_store.load_state_dict(path, io_mode="buffered")
    check_single_allocation(loaded)
    nonempty = [t for t in loaded.values() if t.numel() > 0]
    assert len(nonempty) > 1
    storage_size = nonempty[0].untyped_storage().nbytes()
    index = read_index_json(path)
    assert storage_size >= index["total_bytes"]


# --------------------------------------------------------------------------------------------
# read_index and page-cache eviction
# --------------------------------------------------------------------------------------------


def test_read_index_on_good_checkpoint(saved_checkpoint):
    path, _ = saved_checkpoint
    idx = sllm_store.read_index(path)
    assert idx is not None


def test_evict_page_cache(saved_checkpoint):
    from sllm_store.utils import evict_page_cache

    path, sd = saved_checkpoint
    evict_page_cache(path)  # a directory
    evict_page_cache(path / "data-00000.bin")  # a file
    evict_page_cache(str(path / INDEX_NAME))
    assert_state_dict_identical(sllm_store.load_state_dict(path, io_mode="buffered"), sd)


# --------------------------------------------------------------------------------------------
# GPU (enabled where CUDA exists)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_roundtrip_cuda(tmp_path, dtype, rng):
    sd = OrderedDict((f"x{i}", random_tensor(dtype, s, rng)) for i, s in enumerate(ODD_SHAPES))
    sd["big"] = random_tensor(dtype, (50_000,), rng)
    sd["tied"] = sd["big"]
    sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size=SMALL_CHUNK, quiet=True)
    loaded = sllm_store.load_state_dict(tmp_path / "m", device="cuda:0", verify=True)
    assert list(loaded) == list(sd)
    for name, t in loaded.items():
        assert t.device == torch.device("cuda", 0), name
        assert_tensor_identical(t, sd[name], name)
    assert loaded["tied"].data_ptr() == loaded["big"].data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 0)], ids=str)
def test_cuda_device_spellings(saved_checkpoint, device):
    path, sd = saved_checkpoint
    loaded = sllm_store.load_state_dict(path, device=device, num_threads=4)
    for name, t in loaded.items():
        assert t.device.type == "cuda"
        assert_tensor_identical(t, sd[name], name)


def test_checksums_match_the_reference_xxh3() -> None:
    """The core's XXH3-64 (AVX2 where the CPU has it, else SSE2) gives the reference library's
    digests: for sizes around each of XXH3's code paths (0-16, 17-128, 129-240, stripes, blocks,
    long input), one-shot, streamed in pieces split anywhere (ChunkHasher), and from the staged
    copier (host memory here; the fake-CUDA tests compare its fused copy with xxh3_64)."""
    import numpy as np

    xxhash = pytest.importorskip("xxhash")
    from sllm_store.native import _C

    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (1 << 20) + 4099, dtype=np.uint8).tobytes()
    sizes = [0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1023, 1024, 1025, 4096, 65536 + 63, len(data)]
    for n in sizes:
        assert _C.xxh3_64(data[:n]) == xxhash.xxh3_64_intdigest(data[:n], seed=0), n
    for n in sizes[-4:]:
        h = _C.ChunkHasher(n + 1)  # one chunk, fed in random pieces
        pos = 0
        while pos < n:
            k = int(rng.integers(1, 70_000))
            h.update(data[pos:min(n, pos + k)])
            pos += k
        assert h.finish() == ([xxhash.xxh3_64_intdigest(data[:n], seed=0)] if n else []), n
    out = np.zeros(len(data), np.uint8)
    copier = _C.StagedCopier([("cpu", out.ctypes.data, out.nbytes)], 1 << 20, 1)
    assert copier.copy(data, [(0, 0, 0, len(data))]) == xxhash.xxh3_64_intdigest(data, seed=0)
    assert out.tobytes() == data
