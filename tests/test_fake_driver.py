"""The CPU stand-in for the CUDA driver (tests/fake_cuda.cpp) itself, driven through ctypes: streams
that run their copies later (reading the source then), events, per-thread contexts, late and sticky
copy failures, misuse reports, failing host allocations, address ranges and IPC handles, and a
clean exit with work still queued. Each case runs in a fresh process."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from _helpers import subprocess_env

PRELUDE = """
    import ctypes, os, threading, time
    V, U64, SIZE = ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_size_t
    lib = ctypes.CDLL(os.environ["SLLM_STORE_LIBCUDA"])

    class IpcHandle(ctypes.Structure):
        _fields_ = [("reserved", ctypes.c_char * 64)]

    lib.cuMemcpyHtoDAsync_v2.argtypes = [U64, V, SIZE, V]
    lib.cuMemHostAlloc.argtypes = [ctypes.POINTER(V), SIZE, ctypes.c_uint]
    lib.cuMemHostRegister_v2.argtypes = [V, SIZE, ctypes.c_uint]
    for name in ("cuMemFreeHost", "cuMemHostUnregister", "cuCtxSetCurrent", "cuStreamSynchronize",
                 "cuStreamDestroy_v2", "cuEventSynchronize"):
        getattr(lib, name).argtypes = [V]
    lib.cuEventRecord.argtypes = [V, V]
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(U64), ctypes.POINTER(SIZE), U64]
    lib.cuPointerGetAttribute.argtypes = [V, ctypes.c_int, U64]
    lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(IpcHandle), U64]
    lib.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(U64), IpcHandle, ctypes.c_uint]
    lib.cuIpcCloseMemHandle.argtypes = [U64]
    lib.fake_add_device_range.argtypes = [U64, SIZE]
    lib.fake_remove_device_range.argtypes = [U64]
    lib.fake_current_context.restype = V
    for name in ("fake_pending_operations", "fake_misuse_count", "fake_pinned_bytes"):
        getattr(lib, name).restype = ctypes.c_long

    def ok(r):
        assert r == 0, f"CUDA error {r}"

    def make(fn, *args):  # a handle made by fn(&handle, *args)
        h = V()
        ok(fn(ctypes.byref(h), *args))
        return h

    def retain(dev=0):
        return make(lib.cuDevicePrimaryCtxRetain, dev)

    def stream():
        return make(lib.cuStreamCreate, 1)

    def pinned(n):
        return make(lib.cuMemHostAlloc, n, 0).value

    def host(n, fill=0):  # pageable memory: (buffer, address)
        b = ctypes.create_string_buffer(bytes([fill]) * n, n)
        return b, ctypes.addressof(b)

    h2d = lib.cuMemcpyHtoDAsync_v2  # (device pointer, source, bytes, stream)
"""


def _run(lib: Path, body: str, **env: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**subprocess_env(), "SLLM_STORE_LIBCUDA": str(lib), **env})


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


def test_copies_run_later_and_read_their_source_when_they_run(fake_libcuda) -> None:
    """A copy from page-locked memory returns at once and reads its source when the stream's
    worker reaches it (an overwrite before that lands); one from pageable memory returns after its
    source was read; destroying a stream lets its queued copies run."""
    _ok(_run(fake_libcuda, """
        ok(lib.cuCtxSetCurrent(retain()))
        s, e, n = stream(), make(lib.cuEventCreate, 3), 1 << 16
        src = pinned(n)
        ctypes.memset(src, ord("a"), n)
        dst, d = host(n)
        t0 = time.monotonic()
        ok(h2d(d, src, n, s))
        ok(lib.cuEventRecord(e, s))
        assert time.monotonic() - t0 < 0.1 and lib.fake_pending_operations() == 2
        ctypes.memset(src, ord("b"), n)  # before the copy ran: the copy reads this
        ok(lib.cuEventSynchronize(e))
        assert time.monotonic() - t0 >= 0.2 and lib.fake_pending_operations() == 0
        assert dst.raw == b"b" * n and lib.fake_last_event_flags() == 3

        page, p = host(n, ord("c"))
        ok(h2d(d, p, n, s))  # pageable: read before the call returns
        ctypes.memset(p, ord("d"), n)
        ok(lib.cuStreamSynchronize(s))
        assert dst.raw == b"c" * n

        ok(lib.cuMemHostRegister_v2(p, n, 0))  # registered memory is page-locked too
        ok(h2d(d, p, n, s))
        ctypes.memset(p, ord("e"), n)
        ok(lib.cuStreamDestroy_v2(s))  # the queued copy runs first
        assert dst.raw == b"e" * n and lib.fake_pending_operations() == 0
        ok(lib.cuMemHostUnregister(p))
        ok(lib.cuMemFreeHost(src))
        assert lib.fake_pinned_bytes() == 0
        print("OK")
    """, FAKE_CUDA_COPY_MS="200"))


def test_an_event_tracks_its_latest_record(fake_libcuda) -> None:
    _ok(_run(fake_libcuda, """
        ok(lib.cuCtxSetCurrent(retain()))
        slow, idle, e = stream(), stream(), make(lib.cuEventCreate, 0)
        src, (dst, d) = pinned(4096), host(4096)
        ok(h2d(d, src, 4096, slow))
        ok(lib.cuEventRecord(e, slow))
        ok(lib.cuEventRecord(e, idle))  # re-recorded: only this record counts
        t0 = time.monotonic()
        ok(lib.cuEventSynchronize(e))
        assert time.monotonic() - t0 < 0.2 and lib.fake_pending_operations() == 2  # the copy, its marker
        ok(lib.cuEventRecord(e, slow))
        ok(lib.cuEventSynchronize(e))
        assert lib.fake_pending_operations() == 0
        print("OK")
    """, FAKE_CUDA_COPY_MS="400"))


def test_contexts_are_per_device_current_per_thread_and_die_with_their_memory(fake_libcuda) -> None:
    r = _run(fake_libcuda, """
        h = V()
        assert lib.cuStreamCreate(ctypes.byref(h), 0) == 201  # no current context
        assert lib.cuMemHostAlloc(ctypes.byref(h), 64, 0) == 201
        c0, c1 = retain(0), retain(1)
        assert c0.value != c1.value and lib.fake_live_contexts() == 2
        ok(lib.cuCtxSetCurrent(c0))
        seen = []

        def other():
            seen.append(lib.fake_current_context())
            ok(lib.cuCtxSetCurrent(c1))
            seen.append(lib.fake_current_context())

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen == [None, c1.value] and lib.fake_current_context() == c0.value
        s, p = stream(), pinned(4096)
        page, q = host(4096, 7)
        ok(lib.cuMemHostRegister_v2(q, 4096, 0))
        ok(lib.cuCtxSetCurrent(c1))
        assert lib.cuStreamSynchronize(s) == 201  # a stream of another context
        ok(lib.cuCtxSetCurrent(None))
        assert lib.cuStreamSynchronize(s) == 201
        ok(lib.cuCtxSetCurrent(c0))
        assert make(lib.cuCtxGetCurrent).value == c0.value and lib.fake_pinned_bytes() == 4096
        retain(0)
        ok(lib.cuDevicePrimaryCtxRelease_v2(0))  # one reference left
        ok(lib.cuStreamSynchronize(s))
        ok(lib.cuDevicePrimaryCtxRelease_v2(0))  # the last: destroyed with its pinned memory
        assert lib.fake_live_contexts() == 1 and lib.fake_pinned_bytes() == 0
        assert lib.cuEventCreate(ctypes.byref(h), 0) == 201
        assert retain(0).value == c0.value  # a new context behind the same handle
        assert lib.cuStreamSynchronize(s) != 0 and lib.cuMemFreeHost(p) != 0  # the old one's
        dst, d = host(4096)
        ok(h2d(d, q, 4096, stream()))  # registered under the old context: pageable memory now
        assert dst.raw == page.raw and lib.cuMemHostUnregister(q) != 0
        print("OK", lib.fake_misuse_count())
    """, FAKE_CUDA_DEVICES="2", FAKE_CUDA_MISUSE="count")
    assert r.returncode == 0 and r.stdout.split() == ["OK", "3"], r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("FAKE CUDA MISUSE:")]
    assert len(lines) == 3 and all("destroyed" in x for x in lines), r.stderr
    assert "cuMemFreeHost" in lines[1] and "cuMemHostUnregister" in lines[2], r.stderr


def test_a_failing_copy_fails_late_and_its_error_sticks(fake_libcuda) -> None:
    _ok(_run(fake_libcuda, """
        c0 = retain(0)
        ok(lib.cuCtxSetCurrent(c0))
        s, e, src, (dst, d) = stream(), make(lib.cuEventCreate, 0), pinned(4096), host(4096)
        ok(h2d(d, src, 4096, s))
        ok(h2d(d, src, 4096, s))  # the second: queued fine, fails when it runs
        ok(lib.cuEventRecord(e, s))
        assert lib.cuStreamSynchronize(s) == 700
        h = V()
        assert lib.cuEventSynchronize(e) == 700 and lib.cuStreamCreate(ctypes.byref(h), 0) == 700
        assert lib.cuMemHostAlloc(ctypes.byref(h), 64, 0) == 700 and h2d(d, src, 1, s) == 700
        ok(lib.cuCtxSetCurrent(retain(1)))  # other contexts are unaffected
        stream()
        ok(lib.cuCtxSetCurrent(c0))
        ok(lib.cuDevicePrimaryCtxRelease_v2(0))
        retain(0)  # a new context is free of it
        stream()
        print("OK")
    """, FAKE_CUDA_FAIL_COPY="2", FAKE_CUDA_COPY_MS="100", FAKE_CUDA_DEVICES="2"))


MISUSE = """
    ok(lib.cuCtxSetCurrent(retain()))
    s, src, (dst, d) = stream(), pinned(4096), host(4096)
    page, p = host(4096)
    ok(lib.cuMemHostRegister_v2(p, 4096, 0))
    ok(h2d(d, src, 4096, s))
    ok(h2d(d, p, 4096, s))
    assert lib.cuMemFreeHost(src) != 0  # a queued copy still reads it
    assert lib.cuMemHostUnregister(p) != 0
    ok(lib.cuStreamSynchronize(s))
    ok(lib.cuMemFreeHost(src))
    ok(lib.cuMemHostUnregister(p))
    assert lib.cuMemFreeHost(src) != 0  # twice
    print("OK", lib.fake_misuse_count())
"""


def test_freeing_memory_that_a_queued_copy_uses_is_misuse(fake_libcuda) -> None:
    r = _run(fake_libcuda, MISUSE, FAKE_CUDA_COPY_MS="200")
    assert r.returncode == -signal.SIGABRT, r.stdout + r.stderr
    assert r.stderr.splitlines()[-1].startswith("FAKE CUDA MISUSE: cuMemFreeHost("), r.stderr
    r = _run(fake_libcuda, MISUSE, FAKE_CUDA_COPY_MS="200", FAKE_CUDA_MISUSE="count")
    assert r.returncode == 0 and r.stdout.split() == ["OK", "3"], r.stdout + r.stderr
    assert r.stderr.count("FAKE CUDA MISUSE:") == 3 and "cuMemHostUnregister(" in r.stderr, r.stderr


def test_the_nth_host_allocation_fails_after_a_delay(fake_libcuda) -> None:
    _ok(_run(fake_libcuda, """
        c, results = retain(), []

        def alloc():
            ok(lib.cuCtxSetCurrent(c))  # each thread needs the context current
            t0, h = time.monotonic(), V()
            r = lib.cuMemHostAlloc(ctypes.byref(h), 1 << 20, 0)
            results.append((r, time.monotonic() - t0))

        threads = [threading.Thread(target=alloc) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r for r, _ in results) == [0] * 5 + [2], results
        assert all((dt >= 0.3) == (r == 2) for r, dt in results), results
        assert lib.fake_pinned_bytes() == 5 << 20
        os.environ["FAKE_CUDA_NO_HOST_ALLOC"] = "1"
        ok(lib.cuCtxSetCurrent(c))
        assert lib.cuMemHostAlloc(ctypes.byref(V()), 64, 0) == 2
        print("OK")
    """, FAKE_CUDA_FAIL_HOST_ALLOC="3", FAKE_CUDA_ALLOC_DELAY_MS="300"))


def test_address_ranges_ipc_handles_and_bus_ids(fake_libcuda) -> None:
    _ok(_run(fake_libcuda, """
        ok(lib.cuCtxSetCurrent(retain()))
        mem, base = host(1 << 16)
        base_, size = U64(), SIZE()
        assert lib.cuMemGetAddressRange_v2(ctypes.byref(base_), ctypes.byref(size), base) == 500
        lib.fake_add_device_range(base, 1 << 16)
        ok(lib.cuMemGetAddressRange_v2(ctypes.byref(base_), ctypes.byref(size), base + 100))
        assert (base_.value, size.value) == (base, 1 << 16)
        assert lib.cuMemGetAddressRange_v2(ctypes.byref(base_), ctypes.byref(size), base + (1 << 16)) == 500
        dev = ctypes.c_int(7)
        ok(lib.cuPointerGetAttribute(ctypes.byref(dev), 9, base + 5))
        assert dev.value == 0
        h, opened = IpcHandle(), U64()
        ok(lib.cuIpcGetMemHandle(ctypes.byref(h), base))
        ok(lib.cuIpcOpenMemHandle_v2(ctypes.byref(opened), h, 1))
        assert opened.value == base
        ok(lib.cuIpcCloseMemHandle(base))
        assert lib.cuIpcCloseMemHandle(base) != 0 and lib.fake_misuse_count() == 1  # not open
        elsewhere = IpcHandle.from_buffer_copy((1).to_bytes(8, "little") + bytes(h)[8:])  # pid 1
        assert lib.cuIpcOpenMemHandle_v2(ctypes.byref(opened), elsewhere, 1) == 1
        os.environ["FAKE_CUDA_FAIL_ADDRESS_RANGE"] = "1"
        assert lib.cuMemGetAddressRange_v2(ctypes.byref(base_), ctypes.byref(size), base) == 500
        del os.environ["FAKE_CUDA_FAIL_ADDRESS_RANGE"]
        lib.fake_remove_device_range(base)
        assert lib.cuMemGetAddressRange_v2(ctypes.byref(base_), ctypes.byref(size), base) == 500
        bus, d = ctypes.create_string_buffer(32), ctypes.c_int()
        ok(lib.cuDeviceGetPCIBusId(bus, 32, 2))
        ok(lib.cuDeviceGetByPCIBusId(ctypes.byref(d), bus.value))
        assert d.value == 2 and lib.cuDeviceGetByPCIBusId(ctypes.byref(d), b"0000:00:05.0") != 0
        print("OK")
    """, FAKE_CUDA_DEVICES="3", FAKE_CUDA_MISUSE="count"))


def test_stream_workers_end_with_their_streams_and_exit_never_hangs(fake_libcuda) -> None:
    """A stream's worker thread ends when the stream is destroyed; the process exits promptly
    with copies still queued on streams never destroyed."""
    _ok(_run(fake_libcuda, """
        ok(lib.cuCtxSetCurrent(retain()))
        tasks = lambda: len(os.listdir("/proc/self/task"))
        n0 = tasks()
        streams = [stream() for _ in range(3)]
        assert tasks() == n0 + 3
        ok(lib.cuStreamDestroy_v2(streams.pop()))
        assert tasks() == n0 + 2
        src, dst = pinned(1 << 20), pinned(1 << 20)  # never freed: safe to write at exit
        for i in range(20):
            ok(h2d(dst, src, 1 << 20, streams[i % 2]))
        print("OK")
    """, FAKE_CUDA_COPY_MS="50"))
