"""The GPU paths against a driver that behaves like a GPU (tests/fake_cuda.cpp): copies run later,
on a thread per stream, and read their source when they run; contexts are per device and current
per thread; failures arrive late; misuse (freeing memory a queued copy uses, memory of a destroyed
context) aborts the process. Each case runs in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _helpers import subprocess_env

import sllm_store

# Loads PATH into "cuda:0" (numpy memory) with _C.run_load and checks every tensor's bytes.
PRELUDE = """
    import ctypes, os, sys, threading, numpy as np, torch, sllm_store
    from sllm_store.native import _C
    from sllm_store.config import LoadConfig
    from sllm_store.plan import assign_devices, make_plan
    from sllm_store.errors import SllmStoreError

    fake = ctypes.CDLL(os.environ["SLLM_STORE_LIBCUDA"])
    fake.fake_current_context.restype = ctypes.c_void_p
    path = sys.argv[1]
    index = sllm_store.read_index(path)
    files = [str(index.file_path(i)) for i in range(len(index.files))]
    ref = sllm_store.load_state_dict(path)

    def load(threads=4, buffers=2, verify=False):
        plan = make_plan(index, assign_devices(index, "cuda:0"), LoadConfig.resolve(verify=verify))
        bufs = [np.zeros(size + 4096, np.uint8) for size in plan.sizes]
        dests = [("cuda:0", b.ctypes.data + (-b.ctypes.data % 4096), size)
                 for b, size in zip(bufs, plan.sizes)]
        stats = _C.run_load(files, plan.units, plan.segments, dests, num_threads=threads,
                            io_mode="buffered", verify=verify, buffers_per_thread=buffers)
        for name, (slot, off) in plan.placement.items():
            base = dests[slot][1] - bufs[slot].ctypes.data
            got = bufs[slot][base + off: base + off + index.tensors[name].nbytes].tobytes()
            want = ref[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            assert got == want, f"{name} differs"
        return stats
"""


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    g = torch.Generator().manual_seed(5)
    sd = {f"w{i}": torch.randn(200, 300 + i, generator=g).to(torch.bfloat16) for i in range(8)}
    return sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="32KiB")


def _run(lib: Path, ck: Path, body: str, **env: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, str(ck)], capture_output=True, text=True,
                          timeout=180, env={**subprocess_env(), "SLLM_STORE_LIBCUDA": str(lib), **env})


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0 and "MISUSE" not in r.stderr, r.stdout + r.stderr
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr


def test_more_buffers_in_flight_than_events(fake_libcuda, checkpoint) -> None:
    """Twelve staging buffers per worker, copies slower than reads: no buffer is reused before
    its copy ran."""
    _ok(_run(fake_libcuda, checkpoint, """
        for _ in range(3):
            load(threads=2, buffers=12)
        print("OK")
    """, FAKE_CUDA_COPY_MS="2"))


def test_staging_buffers_are_page_locked_once_per_process(fake_libcuda, checkpoint) -> None:
    """The first load makes its page-locked staging buffers (registered with the driver) and says
    how long that took; a later load of the same shape reuses them and spends no time on it."""
    _ok(_run(fake_libcuda, checkpoint, """
        first, second = load(threads=4, buffers=2), load(threads=4, buffers=2)
        assert first["staging_alloc_s"] > 0 and second["staging_alloc_s"] == 0, (first, second)
        print("OK")
    """))


def test_a_failed_pinned_allocation_leaves_later_loads_intact(fake_libcuda, checkpoint) -> None:
    """The third page-locked allocation fails while others are made: that load fails cleanly, and
    the loads after it (which may not reuse that pool) load every byte."""
    _ok(_run(fake_libcuda, checkpoint, """
        try:
            load(threads=4, buffers=2)
            print("no error")
        except SllmStoreError as e:
            print("failed:", type(e).__name__)
        for threads in (4, 4, 2):
            load(threads=threads, buffers=2)
        print("OK")
    """, FAKE_CUDA_FAIL_HOST_ALLOC="3"))


def test_a_failing_copy_waits_for_the_copies_before_it(fake_libcuda, checkpoint) -> None:
    """A copy fails late (at the next synchronize): the load raises DeviceError, and no staging
    buffer is freed or reused while copies queued before the failure still read it."""
    r = _run(fake_libcuda, checkpoint, """
        try:
            load(threads=4, buffers=4)
        except SllmStoreError as e:
            print(type(e).__name__, e)
        print("OK")
    """, FAKE_CUDA_FAIL_COPY="5", FAKE_CUDA_COPY_MS="2")
    _ok(r)
    assert "DeviceError" in r.stdout and "illegal memory access" in r.stdout


def test_the_callers_context_is_left_as_it_was(fake_libcuda, checkpoint) -> None:
    """Loads into cuda:0 from a thread working on cuda:1 leave it on cuda:1, and a thread with no
    context keeps none: run_load, run_copies and StagedCopier alike."""
    _ok(_run(fake_libcuda, checkpoint, """
        ctx1 = ctypes.c_void_p()
        assert fake.cuDevicePrimaryCtxRetain(ctypes.byref(ctx1), 1) == 0
        src = np.arange(1 << 20, dtype=np.uint8)
        dst = np.zeros(1 << 20, np.uint8)
        dests = [("cuda:0", dst.ctypes.data, dst.nbytes)]

        def every_entry_point():
            load(threads=3)
            _C.run_copies([(src.ctypes.data, 0, 0, src.nbytes)], dests, num_threads=2, piece_size=1 << 18)
            c = _C.StagedCopier(dests, 1 << 18, 2)
            c.copy(src[: 1 << 18].tobytes(), [(0, 0, 0, 1 << 18)])
            del c

        assert fake.cuCtxSetCurrent(ctx1) == 0
        every_entry_point()
        assert fake.fake_current_context() == ctx1.value, "the thread's context changed"
        seen = []
        t = threading.Thread(target=lambda: (every_entry_point(), seen.append(fake.fake_current_context())))
        t.start(); t.join()
        assert seen == [None], seen
        assert (dst == src).all()
        print("OK")
    """, FAKE_CUDA_DEVICES="2"))


def test_cached_staging_pools_keep_their_context(fake_libcuda, checkpoint) -> None:
    """Loads with different thread counts (pools of different sizes, cached between loads) and
    again the first: the cached pinned buffers stay valid although every device object is gone."""
    _ok(_run(fake_libcuda, checkpoint, """
        for threads in (4, 2, 3, 4, 2):
            load(threads=threads)
            assert fake.fake_live_contexts() == 1  # held by the cached pools' buffers
        print("OK")
    """))


def test_ipc_mappings_of_unknown_size_are_refused(fake_libcuda, checkpoint) -> None:
    """The store server's import of a client's GPU memory: sized by the driver, and refused with
    DeviceError when the driver cannot tell the size."""
    _ok(_run(fake_libcuda, checkpoint, """
        from sllm_store.errors import DeviceError
        mem = np.zeros(1 << 20, np.uint8)
        fake.fake_add_device_range(ctypes.c_ulonglong(mem.ctypes.data), ctypes.c_size_t(mem.nbytes))
        handle, offset, size, bus = _C.cuda_ipc_export(mem.ctypes.data + 4096)
        assert (offset, size) == (4096, mem.nbytes)
        m = _C.CudaIpcMapping(bus, handle)
        assert (m.base, m.size) == (mem.ctypes.data, mem.nbytes)
        m.close()
        os.environ["FAKE_CUDA_FAIL_ADDRESS_RANGE"] = "1"
        try:
            _C.CudaIpcMapping(bus, handle)
            raise SystemExit("a mapping of unknown size was accepted")
        except DeviceError as e:
            assert "size" in str(e), e
        print("OK")
    """))
