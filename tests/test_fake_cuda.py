"""The GPU code paths of the C++ core on a machine without a GPU, through a CPU stand-in for the
CUDA driver (tests/fake_cuda.cpp, loaded with SLLM_STORE_LIBCUDA): pinned staging buffers,
per-worker streams and events, host-to-device copies, and what a failing copy does.

"Device memory" is host memory there, so the loader runs with ``cuda:0`` destinations that are
numpy buffers, and the bytes can be checked. Each case runs in a fresh process: the driver is
loaded once per process, and this one must stay CPU-only.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _helpers import subprocess_env

import sllm_store

HERE = Path(__file__).resolve().parent


def _run(lib: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    e = subprocess_env()
    e.update(SLLM_STORE_LIBCUDA=str(lib), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=e, capture_output=True,
                          text=True, timeout=120)


LOAD = """
    import sys, numpy as np, sllm_store
    from sllm_store.native import _C
    from sllm_store.config import LoadConfig
    from sllm_store.plan import assign_devices, encodings, make_plan
    from sllm_store.errors import SllmStoreError

    path, verify = sys.argv[-2], sys.argv[-1] == "1"
    assert _C.cuda_device_count() == 1, _C.cuda_unavailable_reason()
    index = sllm_store.read_index(path)
    config = LoadConfig.resolve(num_threads=4, io_mode="buffered", verify=verify)
    plan = make_plan(index, assign_devices(index, "cuda:0"), config)
    bufs = [np.zeros(size + 4096, np.uint8) for size in plan.sizes]
    dests = [("cuda:0", b.ctypes.data + (-b.ctypes.data % 4096), size) for b, size in zip(bufs, plan.sizes)]
    files = [str(index.file_path(i)) for i in range(len(index.files))]
    try:
        stats = _C.run_load(files, plan.units, plan.segments, dests, num_threads=4, io_mode="buffered",
                            verify=verify, buffers_per_thread=2, encodings=encodings(index, plan.units))
    except SllmStoreError as e:
        print(f"ERROR {type(e).__name__}: {e}")
        sys.exit(3)
    ref = sllm_store.load_state_dict(path)  # the CPU path, for comparison
    for name, (slot, off) in plan.placement.items():
        base = dests[slot][1] - bufs[slot].ctypes.data
        got = bufs[slot][base + off: base + off + index.tensors[name].nbytes].tobytes()
        want = ref[name].contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
        assert got == want, name
    print("OK", stats["chunks_staged"], stats["chunks_verified"])
"""


def _checkpoint(tmp_path: Path, compress: bool) -> Path:
    g = torch.Generator().manual_seed(3)
    sd = {f"w{i}": torch.randn(300, 200 + i, generator=g).to(torch.bfloat16) for i in range(5)}
    sd["ids"] = torch.arange(5000)
    return sllm_store.save_state_dict(sd, tmp_path / ("z" if compress else "p"), chunk_size="64KiB",
                                      compress="zstd" if compress else None)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("verify", [False, True])
def test_gpu_pipeline_on_the_fake_driver(fake_libcuda, tmp_path, compress, verify) -> None:
    if compress:
        pytest.importorskip("zstandard")
    path = _checkpoint(tmp_path, compress)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD), str(path), "1" if verify else "0"],
                       env={**subprocess_env(), "SLLM_STORE_LIBCUDA": str(fake_libcuda)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    ok, staged, verified = r.stdout.split()
    assert ok == "OK" and int(staged) > 0  # every chunk went through the staging buffers
    assert (int(verified) > 0) == verify


def test_a_failing_device_copy_is_a_device_error(fake_libcuda, tmp_path) -> None:
    path = _checkpoint(tmp_path, False)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD), str(path), "0"],
                       env={**subprocess_env(), "SLLM_STORE_LIBCUDA": str(fake_libcuda),
                            "FAKE_CUDA_FAIL_COPY": "3"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "ERROR DeviceError" in r.stdout and "illegal memory access" in r.stdout


def test_missing_driver_library_is_reported(tmp_path) -> None:
    r = _run(tmp_path / "nope.so", "from sllm_store.native import _C; print(_C.cuda_device_count(), "
                                   "_C.cuda_unavailable_reason())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("0 CUDA driver not found") and "nope.so" in r.stdout


def test_store_copies_to_the_device_and_their_cancel_hook(fake_libcuda) -> None:
    """The store server's copy path (run_copies into cuda:0 on one stream per thread) and its
    cancel hook, which stops the copy when the client has gone."""
    r = _run(fake_libcuda, """
        import numpy as np
        from sllm_store.native import _C
        from sllm_store.errors import SllmStoreError
        src = np.arange(8 << 20, dtype=np.uint8)
        dst = np.zeros(8 << 20, np.uint8)
        dests = [("cuda:0", dst.ctypes.data, dst.nbytes)]
        copies = [(src.ctypes.data + o, 0, o, 1 << 20) for o in range(0, 8 << 20, 1 << 20)]
        _C.run_copies(copies, dests, num_threads=4, piece_size=1 << 20)
        assert (dst == src).all()
        try:
            _C.run_copies(copies, dests, num_threads=1, piece_size=1 << 20, cancelled=lambda: True)
            print("not cancelled")
        except SllmStoreError as e:
            print("cancelled:", e)
    """, FAKE_CUDA_COPY_MS="30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("cancelled: copy cancelled"), r.stdout


def test_staged_copier_checksums_and_copies_through_pinned_buffers(fake_libcuda) -> None:
    """_C.StagedCopier (the remote load's copies): its `slots` page-locked buffers are made up
    front, on a thread of its own; from many threads at once, chunks of sizes
    around the checksum's 256 KiB block go through those buffers into
    cuda:0 and host memory; each call returns the chunk's XXH3-64; bad pieces are FormatErrors,
    and a failing device copy is a DeviceError."""
    r = _run(fake_libcuda, """
        import numpy as np
        from concurrent.futures import ThreadPoolExecutor
        from sllm_store.native import _C
        from sllm_store.errors import DeviceError, FormatError
        rng = np.random.default_rng(7)
        sizes = [1, 4095, 256 << 10, (256 << 10) + 1, (1 << 20) + 77, 3 << 20] * 4
        chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
        total = sum(sizes)
        gpu, host = np.zeros(total, np.uint8), np.zeros(total, np.uint8)
        c = _C.StagedCopier([("cuda:0", gpu.ctypes.data, total), ("cpu", host.ctypes.data, total)],
                            3 << 20, 3)
        import time
        deadline = time.monotonic() + 10
        while c.buffers < 3 and time.monotonic() < deadline:  # made up front, before any copy
            time.sleep(0.01)
        assert c.buffers == 3 and c.staged and c.pin_error == "", (c.buffers, c.pin_error)
        offs = np.cumsum([0] + sizes[:-1])

        def one(i):
            n, o = sizes[i], int(offs[i])
            half = n // 2  # the first half to the GPU, the rest to host memory
            return c.copy(chunks[i], [(0, 0, o, half), (half, 1, o + half, n - half)])

        with ThreadPoolExecutor(8) as ex:
            digests = list(ex.map(one, range(len(chunks))))
        assert digests == [_C.xxh3_64(x) for x in chunks]
        for i, x in enumerate(chunks):
            n, o, half = sizes[i], int(offs[i]), sizes[i] // 2
            assert gpu[o:o + half].tobytes() == x[:half] and host[o + half:o + n].tobytes() == x[half:]
        assert c.staged and c.buffers == 3, c.buffers
        for bad in ([(0, 0, total - 1, 2)], [(5, 0, 0, 4096)], [(0, 2, 0, 1)]):
            try:
                c.copy(chunks[1], bad)
                raise SystemExit(f"no error for {bad}")
            except FormatError:
                pass
        try:
            for i in range(10):
                c.copy(chunks[5], [(0, 0, 0, 1 << 20)])
            print("no device error")
        except DeviceError as e:
            print("OK", e)
    """, FAKE_CUDA_FAIL_COPY="30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK") and "illegal memory access" in r.stdout, r.stdout


# Random chunks (24 of up to 3 MiB, and `extra` sizes) for a StagedCopier of two 1 MiB blocks
# into cuda:0 and host memory, laid out one after the other (offs); fill_halves(one) runs and
# checks fills that split each chunk between the two.
FILL_CHUNKS = """
        import numpy as np
        from concurrent.futures import ThreadPoolExecutor
        from sllm_store.native import _C
        from sllm_store.errors import FormatError
        rng = np.random.default_rng({seed})
        sizes = [int(rng.integers(1, 3 << 20)) for _ in range(24)] + {extra}
        chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
        total = sum(sizes)
        offs = np.cumsum([0] + sizes[:-1])
        gpu, host = np.zeros(total, np.uint8), np.zeros(total, np.uint8)
        c = _C.StagedCopier([("cuda:0", gpu.ctypes.data, total), ("cpu", host.ctypes.data, total)],
                            1 << 20, 2)

        def fill_halves(one):  # one(i) fills chunk i, its first half to host memory, the rest to the GPU
            with ThreadPoolExecutor(6) as ex:
                digests = list(ex.map(one, range(len(chunks))))
            assert digests == [_C.xxh3_64(x) for x in chunks]
            for i, x in enumerate(chunks):
                n, o, half = sizes[i], int(offs[i]), sizes[i] // 2
                assert host[o:o + half].tobytes() == x[:half], i
                assert gpu[o + half:o + n].tobytes() == x[half:], i
"""


def test_staged_copier_fill_streams_pieces_through_blocks(fake_libcuda) -> None:
    """StagedCopier.fill (a GET's body streamed into the staging blocks): chunks given in pieces
    of any size, from more threads than there are blocks (a fill that must wait for a block holds
    none, so none waits forever), land in cuda:0 and host memory with their XXH3-64; too many
    bytes, too few, and a closed fill are FormatErrors; a fill left unfinished gives its blocks
    back."""
    r = _run(fake_libcuda, FILL_CHUNKS.format(seed=11, extra=[1 << 20, 2 << 20, 1]) + """

        def one(i):
            n, o, x = sizes[i], int(offs[i]), chunks[i]
            third = n // 3  # a third to host memory, the rest (and a gap) to the GPU
            pieces = [(0, 1, o, third), (third + 1, 0, o + third + 1, n - third - 1)] if n > 2 else \
                [(0, 0, o, n)]
            with c.fill(n, pieces) as f:
                pos = 0
                while pos < n:
                    k = int(rng.integers(1, 700 << 10))
                    f.add(memoryview(x)[pos:pos + k])
                    pos += len(memoryview(x)[pos:pos + k])
                assert f.added == n
                return f.finish()

        with ThreadPoolExecutor(6) as ex:
            digests = list(ex.map(one, range(len(chunks))))
        assert digests == [_C.xxh3_64(x) for x in chunks]
        for i, x in enumerate(chunks):
            n, o, third = sizes[i], int(offs[i]), sizes[i] // 3
            if n > 2:
                assert host[o:o + third].tobytes() == x[:third], i
                assert gpu[o + third + 1:o + n].tobytes() == x[third + 1:], i
        # Errors; each fill below leaves its blocks to the next (two blocks in all).
        for extra in (b"", b"x"):
            with c.fill(3, [(0, 0, 0, 3)]) as f:
                f.add(b"ab")
                try:
                    f.add(b"cd") if extra else f.finish()
                    raise SystemExit("no error")
                except FormatError as e:
                    assert ("more bytes" in str(e)) if extra else ("ended after 2 of its 3" in str(e)), e
        try:
            with c.fill(4 << 20, [(0, 0, 0, 4 << 20)]) as f:
                f.add(bytes(3 << 20))  # three blocks' worth: two sent, one filling
                raise KeyError("the GET failed")
        except KeyError:
            pass
        try:
            f.add(b"x")
            raise SystemExit("a closed fill took bytes")
        except FormatError as e:
            assert "closed" in str(e), e
        with c.fill(2 << 20, [(0, 0, 0, 2 << 20)]) as f:  # both blocks are free again
            f.add(bytes(2 << 20))
            assert f.finish() == _C.xxh3_64(bytes(2 << 20))
        print("OK", c.buffers, c.wait_seconds > 0)
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["OK", "2", "True"], r.stdout


def test_staged_copier_without_page_locked_memory(fake_libcuda) -> None:
    """When page-locked memory cannot be had, the staged copier copies from the chunk itself
    (the driver's pageable path): still every byte in place and the right checksum."""
    r = _run(fake_libcuda, """
        import numpy as np
        from sllm_store.native import _C
        src = np.random.default_rng(8).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
        gpu = np.zeros(3 << 20, np.uint8)
        c = _C.StagedCopier([("cuda:0", gpu.ctypes.data, gpu.nbytes)], 4 << 20, 2)
        for _ in range(3):
            assert c.copy(src, [(0, 0, 0, len(src))]) == _C.xxh3_64(src)
        assert gpu.tobytes() == src
        gpu[:] = 0
        with c.fill(len(src), [(0, 0, 0, len(src))]) as f:  # pieces, each straight from its bytes
            for pos in range(0, len(src), 300 << 10):
                f.add(src[pos:pos + (300 << 10)])
            assert f.finish() == _C.xxh3_64(src)
        assert gpu.tobytes() == src
        print("OK", c.staged, c.buffers, "cuMemHostRegister" in c.pin_error)
    """, FAKE_CUDA_NO_HOST_ALLOC="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["OK", "False", "0", "True"], r.stdout


def test_copy_threads_sleep_while_they_wait(fake_libcuda) -> None:
    """The events that copy threads wait on are blocking-sync ones (a waiting thread sleeps
    instead of spinning on a core the reads need)."""
    script = """
        import ctypes, os, numpy as np
        from sllm_store.native import _C
        lib = ctypes.CDLL(os.environ["SLLM_STORE_LIBCUDA"])
        lib.fake_last_event_flags.restype = ctypes.c_uint
        gpu = np.zeros(1 << 20, np.uint8)
        c = _C.StagedCopier([("cuda:0", gpu.ctypes.data, gpu.nbytes)], 1 << 20, 2)
        src = bytes(range(256)) * 4096
        assert c.copy(src, [(0, 0, 0, len(src))]) == _C.xxh3_64(src) and gpu.tobytes() == src
        print("flags", lib.fake_last_event_flags(), c.buffers >= 1, c.alloc_seconds >= 0, c.wait_seconds >= 0)
    """
    r = _run(fake_libcuda, script)
    # 3 = CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC
    assert r.returncode == 0 and r.stdout.strip() == "flags 3 True True True", r.stdout + r.stderr


def test_staged_copier_reads_chunks_back(fake_libcuda) -> None:
    """_C.StagedCopier.read_back (the remote tier's cache written from the device): a chunk's
    pieces come back from cuda:0 and host memory into a 4 KiB-aligned reader buffer, with zeros
    where no piece is, and its XXH3-64; from many threads at once, through `readers` buffers;
    an exception of the callback reaches the caller and frees the reader; bad pieces are
    FormatErrors; a failing copy back is a DeviceError."""
    script = """
        import numpy as np
        from concurrent.futures import ThreadPoolExecutor
        from sllm_store.native import _C
        from sllm_store.errors import DeviceError, FormatError
        rng = np.random.default_rng(9)
        gpu = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
        host = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
        c = _C.StagedCopier([("cuda:0", gpu.ctypes.data, gpu.nbytes), ("cpu", host.ctypes.data, host.nbytes)],
                            64 << 10, 2, 2)
        assert c.to_device

        def case(k):
            n = 60000 + k
            pieces = [(100 + k, 0, 5000 * k, 3000), (4000, 1, 77 * k, 1000 + k), (20000, 0, 9, 40000)]
            want = np.zeros(n, np.uint8)
            for coff, dest, doff, m in pieces:
                want[coff:coff + m] = (gpu, host)[dest][doff:doff + m]
            got = c.read_back(pieces, n, lambda mv, digest: (bytes(mv), digest,
                                                             np.frombuffer(mv, np.uint8).ctypes.data % 4096))
            return got == (want.tobytes(), _C.xxh3_64(want), 0)

        with ThreadPoolExecutor(8) as ex:
            assert all(ex.map(case, range(40)))
        for _ in range(3):  # more than the readers: each failed call gave its reader back
            try:
                c.read_back([(0, 0, 0, 10)], 10, lambda mv, d: 1 / 0)
                raise SystemExit("no error from the callback")
            except ZeroDivisionError:
                pass
        assert case(3)
        big = c.read_back([(0, 0, 0, 100 << 10)], 100 << 10, lambda mv, d: bytes(mv))  # over a reader
        assert big == gpu[:100 << 10].tobytes()
        for bad in ([(0, 0, (1 << 20) - 1, 2)], [(5, 0, 0, 10)], [(0, 2, 0, 1)]):
            try:
                c.read_back(bad, 10, lambda mv, d: None)
                raise SystemExit(f"no error for {bad}")
            except FormatError:
                pass
        try:
            c.read_back([(0, 0, 0, 10)], 10, lambda mv, d: None)
            print("OK")
        except DeviceError as e:
            print("DeviceError", e)
    """
    r = _run(fake_libcuda, script)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr
    r = _run(fake_libcuda, """
        import numpy as np
        from sllm_store.native import _C
        from sllm_store.errors import DeviceError
        gpu = np.zeros(4096, np.uint8)
        c = _C.StagedCopier([("cuda:0", gpu.ctypes.data, gpu.nbytes)], 4096, 1, 1)
        for _ in range(2):  # the reader is given back after the failure
            try:
                c.read_back([(0, 0, 0, 10)], 10, lambda mv, d: None)
            except DeviceError as e:
                print(type(e).__name__, e)
    """, FAKE_CUDA_FAIL_COPY_BACK="1")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stdout + r.stderr
    assert all(x.startswith("DeviceError") and "illegal memory access" in x for x in lines), r.stdout
