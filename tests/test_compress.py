"""Compressed checkpoints (zstd per chunk, byte grouping): round trips, corruption, mixed chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers import DTYPES, assert_state_dict_identical, random_tensor, read_index_json, run_cli

import sllm_store
from sllm_store.errors import ChecksumError, FormatError, UnsupportedVersionError
from sllm_store.index import CODECS
from sllm_store.native import _C

zstandard = pytest.importorskip("zstandard")


def _normal(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_byte_grouping_is_reversible_and_matches_numpy(group: int) -> None:
    data = bytes(np.random.default_rng(group).integers(0, 256, 10_007, dtype=np.uint8))
    grouped = _C.group_bytes(data, group)
    assert _C.ungroup_bytes(grouped, group) == data
    m = len(data) // group * group
    expected = np.frombuffer(data[:m], np.uint8).reshape(-1, group).T.tobytes() + data[m:]
    assert grouped == expected


def test_decode_chunk_into_new_bytes_or_callers_buffer() -> None:
    raw = _normal(torch.bfloat16, (3001,), 0).view(torch.uint8).numpy().tobytes()
    frame = zstandard.ZstdCompressor(level=1).compress(_C.group_bytes(raw, 2))
    zstd = CODECS["zstd"]
    assert _C.decode_chunk(frame, zstd, len(raw), 2) == raw
    out = bytearray(len(raw) + 5)
    assert _C.decode_chunk(frame, zstd, len(raw), 2, out=out) is None
    assert bytes(out[:len(raw)]) == raw
    with pytest.raises(ValueError, match="holds 10 bytes"):
        _C.decode_chunk(frame, zstd, len(raw), 2, out=bytearray(10))
    with pytest.raises(ValueError, match="writable"):
        _C.decode_chunk(frame, zstd, len(raw), 2, out=bytes(len(raw)))
    with pytest.raises(ChecksumError, match="corrupted"):
        _C.decode_chunk(frame[:-7] + b"garbage", zstd, len(raw), 2, out=out)


def test_decode_chunk_with_its_checksum() -> None:
    """checksum=True returns the decoded bytes' XXH3-64 and leaves the frame's own checksum to
    it: a flipped byte in a raw block decodes, and only the digest shows it."""
    raw = _normal(torch.bfloat16, (1024, 512), 0).view(torch.uint8).numpy().tobytes()
    frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(_C.group_bytes(raw, 2))
    zstd = CODECS["zstd"]
    data, digest = _C.decode_chunk(frame, zstd, len(raw), 2, checksum=True)
    assert data == raw and digest == _C.xxh3_64(raw)
    out = bytearray(len(raw))
    assert _C.decode_chunk(frame, zstd, len(raw), 2, out=out, checksum=True) == (None, digest)
    assert bytes(out) == raw
    bad = bytearray(frame)
    bad[64 * 1024] ^= 0x01  # in the first block: the low bytes of bf16, stored raw
    data, bad_digest = _C.decode_chunk(bytes(bad), zstd, len(raw), 2, checksum=True)
    assert bad_digest == _C.xxh3_64(data) and bad_digest != digest
    with pytest.raises(ChecksumError, match="checksum"):
        _C.decode_chunk(bytes(bad), zstd, len(raw), 2)


def test_roundtrip_every_dtype_compressed(tmp_path, mixed_state_dict) -> None:
    sd = dict(mixed_state_dict)
    sd["smooth.bf16"] = _normal(torch.bfloat16, (300, 300), 1)
    sd["smooth.f32"] = _normal(torch.float32, (200, 100), 2)
    sd["tied"] = sd["smooth.bf16"]
    path = sllm_store.save_state_dict(sd, tmp_path / "c", compress="zstd:3", chunk_size="64KiB")
    raw = read_index_json(path)
    assert raw["version"] == 2 and raw["compression"] == {"codec": "zstd", "level": 3}
    for verify in (False, True):
        out = sllm_store.load_state_dict(path, verify=verify)
        assert_state_dict_identical(out, sd)
        assert out["tied"].data_ptr() == out["smooth.bf16"].data_ptr()
    sllm_store.verify(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_verified_chunks_of_several_hashed_pieces_and_a_tail(tmp_path, dtype) -> None:
    """A verified compressed load hashes each chunk while un-grouping it, piece by piece: chunks
    of several pieces, and a last chunk whose length is not a multiple of the group, check out."""
    sd = {"a": _normal(dtype, (700_001,), 3), "b": torch.arange(5, dtype=torch.uint8)}
    path = sllm_store.save_state_dict(sd, tmp_path / "c", compress="zstd", chunk_size="1MiB")
    chunks = read_index_json(path)["files"][0]["chunks"]
    assert {c["group"] for c in chunks} == {dtype.itemsize}
    assert read_index_json(path)["total_bytes"] % dtype.itemsize  # a tail after the last element
    for verify in (True, False):
        assert_state_dict_identical(sllm_store.load_state_dict(path, verify=verify, num_threads=2), sd)


@pytest.mark.parametrize("num_threads", [1, 4])
@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_partial_and_threaded_loads(tmp_path, num_threads, io_mode) -> None:
    sd = {f"w{i}": _normal(torch.bfloat16, (257, 129 + i), i) for i in range(12)}
    path = sllm_store.save_state_dict(sd, tmp_path / "c", compress="zstd", chunk_size="16KiB", num_files=2)
    out = sllm_store.load_state_dict(path, num_threads=num_threads, io_mode=io_mode)
    assert_state_dict_identical(out, sd)
    part = sllm_store.load_state_dict(path, {"w3": "cpu", "w7": "cpu"}, num_threads=num_threads)
    assert set(part) == {"w3", "w7"}
    assert torch.equal(part["w7"], sd["w7"])


def test_compressed_is_smaller_and_grouped(tmp_path) -> None:
    sd = {"w": _normal(torch.bfloat16, (512, 1024), 0)}
    plain = sllm_store.save_state_dict(sd, tmp_path / "p", chunk_size="256KiB")
    comp = sllm_store.save_state_dict(sd, tmp_path / "c", chunk_size="256KiB", compress="zstd")
    p_size = (plain / "data-00000.bin").stat().st_size
    c_size = (comp / "data-00000.bin").stat().st_size
    assert c_size < p_size / 1.25  # random-normal bf16: ~1.4x with byte grouping
    chunks = read_index_json(comp)["files"][0]["chunks"]
    assert {c["codec"] for c in chunks} == {"zstd"} and {c["group"] for c in chunks} == {2}


def test_mixed_raw_and_compressed_chunks(tmp_path) -> None:
    g = torch.Generator().manual_seed(5)
    sd = {
        "zeros": torch.zeros(64 * 1024, dtype=torch.float32),  # compresses to nothing
        "noise": random_tensor(torch.uint8, (256 * 1024,), g),  # incompressible: stored raw
        "ones": torch.ones(64 * 1024, dtype=torch.float16),
    }
    path = sllm_store.save_state_dict(sd, tmp_path / "c", chunk_size="64KiB", compress="zstd")
    codecs = [c["codec"] for c in read_index_json(path)["files"][0]["chunks"]]
    assert "none" in codecs and "zstd" in codecs
    assert_state_dict_identical(sllm_store.load_state_dict(path, verify=True), sd)


def _corrupt_first_zstd_chunk(path, at: int | None = None, mask: int = 0xFF) -> dict:
    """XOR one byte of the first zstd chunk's stored bytes with ``mask``: the byte ``at`` bytes
    into it (default: its middle). Returns the chunk's entry of the index."""
    raw = read_index_json(path)
    chunk = next(c for c in raw["files"][0]["chunks"] if c["codec"] == "zstd")
    where = chunk["offset"] + (chunk["length"] // 2 if at is None else at)
    with open(path / raw["files"][0]["name"], "r+b") as f:
        f.seek(where)
        b = f.read(1)
        f.seek(where)
        f.write(bytes([b[0] ^ mask]))
    return chunk


def test_corrupted_compressed_chunk_is_an_error_not_garbage(tmp_path) -> None:
    sd = {"w": _normal(torch.bfloat16, (256, 512), 0)}
    path = sllm_store.save_state_dict(sd, tmp_path / "c", chunk_size="64KiB", compress="zstd")
    _corrupt_first_zstd_chunk(path)
    # Without verify too: the zstd frame's own checksum catches it, naming file and chunk.
    for verify in (False, True):
        with pytest.raises(ChecksumError, match=r"data-00000\.bin.*chunk at offset"):
            sllm_store.load_state_dict(path, verify=verify)
    with pytest.raises(ChecksumError):
        sllm_store.verify(path)


def test_a_change_only_a_checksum_sees_is_caught_with_and_without_verify(tmp_path) -> None:
    """A flipped byte in a stored (raw) block of a frame decodes without a zstd error: with
    verify, the chunk's checksum of the decoded bytes catches it (and the frame's own checksum
    is not computed as well); without, the frame's checksum does."""
    sd = {"w": _normal(torch.bfloat16, (1024, 512), 0)}  # one 1 MiB chunk: its low bytes stored raw
    path = sllm_store.save_state_dict(sd, tmp_path / "c", chunk_size="1MiB", compress="zstd")
    # inside the first 128 KiB block: the low bytes, stored raw
    chunk = _corrupt_first_zstd_chunk(path, at=64 * 1024, mask=0x01)
    assert chunk["offset"] == 0 and chunk["codec"] == "zstd" and chunk["group"] == 2
    with pytest.raises(ChecksumError, match=r"checksum mismatch in '.*data-00000\.bin' chunk at offset 0"):
        sllm_store.load_state_dict(path, verify=True)
    with pytest.raises(ChecksumError, match=r"compressed data is corrupted \(zstd: .*checksum"):
        sllm_store.load_state_dict(path, verify=False)


def test_truncated_compressed_file(tmp_path) -> None:
    sd = {"w": _normal(torch.bfloat16, (256, 512), 0)}
    path = sllm_store.save_state_dict(sd, tmp_path / "c", chunk_size="64KiB", compress="zstd")
    data = path / "data-00000.bin"
    data.write_bytes(data.read_bytes()[:8192])
    with pytest.raises(sllm_store.TruncatedFileError):
        sllm_store.load_state_dict(path)


def test_malformed_chunk_table(tmp_path) -> None:
    sd = {"w": _normal(torch.bfloat16, (256, 512), 0)}
    path = sllm_store.save_state_dict(sd, tmp_path / "c", chunk_size="64KiB", compress="zstd")
    raw = read_index_json(path)
    bad = json.loads(json.dumps(raw))
    bad["files"][0]["chunks"][1]["offset"] += 1  # misaligned
    (path / "sllm_index.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="misaligned"):
        sllm_store.load_state_dict(path)
    bad = json.loads(json.dumps(raw))
    bad["files"][0]["chunks"][0]["codec"] = "lz4"
    (path / "sllm_index.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="unknown codec"):
        sllm_store.load_state_dict(path)
    bad = json.loads(json.dumps(raw))
    bad["version"] = 1  # version 1 readers would ignore the chunk table: refused
    (path / "sllm_index.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="version 1"):
        sllm_store.load_state_dict(path)
    bad["version"] = 3
    (path / "sllm_index.json").write_text(json.dumps(bad))
    with pytest.raises(UnsupportedVersionError):
        sllm_store.load_state_dict(path)
    bad = json.loads(json.dumps(raw))
    bad["alignment"] = 512  # stored chunks must still start at multiples of 4096 (O_DIRECT)
    bad["files"][0]["chunks"][1]["offset"] += 512
    (path / "sllm_index.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="misaligned"):
        sllm_store.load_state_dict(path)


def test_uncompressed_checkpoints_stay_version_1(tmp_path) -> None:
    path = sllm_store.save_state_dict({"w": torch.ones(10)}, tmp_path / "p")
    assert read_index_json(path)["version"] == 1


def test_mmap_refuses_compressed(tmp_path) -> None:
    path = sllm_store.save_state_dict({"w": torch.ones(10)}, tmp_path / "c", compress="zstd")
    with pytest.raises(ValueError, match="compressed"):
        sllm_store.load_state_dict(path, io_mode="mmap")


def test_bad_compress_spec(tmp_path) -> None:
    for spec in ("lz4", "zstd:0", "zstd:x"):
        with pytest.raises(ValueError):
            dst = tmp_path / spec.replace(":", "_")
            sllm_store.save_state_dict({"w": torch.ones(10)}, dst, compress=spec)


def test_cli_convert_compress_and_info(tmp_path) -> None:
    from safetensors.torch import save_file

    sd = {"a": _normal(torch.bfloat16, (512, 256), 0), "b": _normal(torch.float32, (128, 128), 1)}
    save_file(sd, tmp_path / "m.safetensors")
    r = run_cli("convert", str(tmp_path / "m.safetensors"), str(tmp_path / "m.sllm"),
                "--compress", "zstd:2", "--chunk-size", "64KiB", "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("info", str(tmp_path / "m.sllm"))
    assert r.returncode == 0, r.stderr
    assert "compression: zstd level 2" in r.stdout and "byte groups" in r.stdout
    assert_state_dict_identical(sllm_store.load_state_dict(tmp_path / "m.sllm"), sd, check_order=False)
    r = run_cli("convert", str(tmp_path / "m.safetensors"), str(tmp_path / "x.sllm"), "--compress", "gzip")
    assert r.returncode == 1 and "unknown compression" in r.stderr


def test_every_dtype_alone_compressed(tmp_path) -> None:
    g = torch.Generator().manual_seed(3)
    for i, dtype in enumerate(DTYPES):
        sd = {"x": random_tensor(dtype, (123, 7), g)}
        path = sllm_store.save_state_dict(sd, tmp_path / f"d{i}", compress="zstd", chunk_size="4KiB")
        assert_state_dict_identical(sllm_store.load_state_dict(path, verify=True), sd)


def test_compressed_model_through_store_server(tmp_path) -> None:
    """The server decodes compressed chunks into its pool (it caches raw bytes), cached or streamed."""
    import signal
    import subprocess
    import sys
    import time

    from _helpers import subprocess_env

    from sllm_store.loader import load_state_dict_with_report
    from sllm_store.server.client import StoreClient

    sd = {f"w{i}": _normal(torch.bfloat16, (300, 257), i) for i in range(8)}
    sllm_store.save_state_dict(sd, tmp_path / "m" / "c", compress="zstd", chunk_size="64KiB")
    sock = f"unix://{tmp_path}/s.sock"
    for pool, streamed in (("4MiB", False), ("512KiB", True)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "sllm_store", "serve", "--storage-path", str(tmp_path / "m"),
             "--mem-pool-size", pool, "--chunk-size", "128KiB", "--listen", sock, "--num-threads", "2"],
            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            client = StoreClient(sock)
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.health(timeout=1)
                    break
                except sllm_store.SllmStoreError:
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
            for verify in (False, True):
                out, report = load_state_dict_with_report("c", "cpu", store=sock, verify=verify)
                assert report.stats["streamed"] is streamed
                assert_state_dict_identical(out, sd)
            if not streamed:
                assert report.stats["hit"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.gpu
@pytest.mark.parametrize("verify", [False, True])
def test_compressed_load_to_gpu(tmp_path, mixed_state_dict, verify) -> None:
    sd = dict(mixed_state_dict)
    sd["smooth"] = _normal(torch.bfloat16, (700, 300), 4)
    path = sllm_store.save_state_dict(sd, tmp_path / "c", compress="zstd", chunk_size="64KiB")
    out = sllm_store.load_state_dict(path, "cuda:0", verify=verify)
    assert {t.device.type for t in out.values()} == {"cuda"}
    assert_state_dict_identical(out, sd)


def test_failed_compressed_write_stops_its_threads(tmp_path, monkeypatch) -> None:
    import threading
    import time

    from sllm_store import writer

    real, calls = writer._tensor_bytes, []

    def failing(t):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the source went away")
        return real(t)

    monkeypatch.setattr(writer, "_tensor_bytes", failing)
    sd = {f"w{i}": _normal(torch.bfloat16, (256, 512), i) for i in range(6)}
    with pytest.raises(RuntimeError, match="went away"):
        sllm_store.save_state_dict(sd, tmp_path / "c", chunk_size="64KiB", compress="zstd")
    deadline = time.monotonic() + 10
    while any(t.name.startswith("sllm-zstd") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("sllm-zstd") for t in threading.enumerate())
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []


def test_auto_reads_compressed_checkpoints_buffered(tmp_path) -> None:
    """Cold compressed chunks load faster buffered than with O_DIRECT (docs/benchmarks.md, design notes)."""
    from sllm_store.loader import load_state_dict_with_report
    from sllm_store.utils import evict_page_cache

    sd = {"w": _normal(torch.bfloat16, (256, 512), 0)}
    comp = sllm_store.save_state_dict(sd, tmp_path / "c", chunk_size="64KiB", compress="zstd")
    evict_page_cache(comp)
    out, report = load_state_dict_with_report(comp)
    assert report.stats["io_mode"] == "buffered"
    assert_state_dict_identical(out, sd)
    from sllm_store.config import LoadConfig
    from sllm_store.plan import choose_io_mode

    files = [str(p) for p in comp.glob("*.bin")]
    assert choose_io_mode(LoadConfig.resolve(io_mode="direct"), files, compressed=True) == "direct"
