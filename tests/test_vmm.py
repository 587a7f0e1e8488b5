"""GPU memory shared between processes as a file descriptor (CUDA virtual memory management):
_C.VmmAllocation allocates and exports it, _C.VmmMapping in another process maps it, read-only
where the driver allows.

On the CPU stand-in for the driver (tests/fake_cuda.cpp) the memory is a memfd, so two processes
really share it: the owner and a child that it hands the descriptor to (``pass_fds``). Every case
runs the owner in a fresh process too (the driver is loaded once per process; this one stays
CPU-only). The last case does the same on a real GPU with PyTorch.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _helpers import subprocess_env

MiB = 1 << 20

# The importing process: maps the descriptor given as argv[1] on the GPU argv[2] (PCI bus id), of
# argv[3] bytes, and answers one line per command read from stdin:
#   map ro|rw           -> "mapped <read_only> <address>"   (mapping i = the i-th map)
#   hash I N            -> sha256 of the first N bytes of mapping I
#   write I HEX         -> writes the bytes at the start of mapping I, then "written"
#   close I             -> "closed"
# With argv[4] == "torch" the bytes are read on the GPU through __cuda_array_interface__.
CHILD = '''
import ctypes, hashlib, os, sys
from sllm_store.native import _C

fd, bus, size, mode = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
maps = []

def read(m, n):
    if mode != "torch":
        return ctypes.string_at(m.address, n)
    import torch

    class Memory:  # PyTorch takes no read-only flag; it only reads here
        __cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (m.address, False), "version": 3}

    t = torch.as_tensor(Memory(), device="cuda")
    assert t.data_ptr() == m.address
    return t.cpu().numpy().tobytes()

for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "map":
        maps.append(_C.VmmMapping(bus, fd, size, read_only=args[0] == "ro"))
        out = f"mapped {maps[-1].read_only} {maps[-1].address}"
    elif cmd == "hash":
        out = hashlib.sha256(read(maps[int(args[0])], int(args[1]))).hexdigest()
    elif cmd == "write":
        data = bytes.fromhex(args[1])
        ctypes.memmove(maps[int(args[0])].address, data, len(data))
        out = "written"
    elif cmd == "close":
        maps[int(args[0])].close()
        out = "closed"
    print(out, flush=True)
'''

# The owner's side: `child(alloc)` starts the importing process with the allocation's descriptor,
# `ask(p, line)` sends it one command and returns its answer.
PRELUDE = '''
import ctypes, hashlib, os, subprocess, sys
from sllm_store.native import _C
from sllm_store.errors import DeviceError, OutOfMemoryError

CHILD = sys.argv[1]
fake = ctypes.CDLL(os.environ["SLLM_STORE_LIBCUDA"])
fake.fake_vmm_bytes.restype = ctypes.c_long

def child(alloc, **env):
    fd = alloc.export_fd()
    p = subprocess.Popen([sys.executable, CHILD, str(fd), alloc.pci_bus_id, str(alloc.size), "host"],
                         pass_fds=(fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, **env})
    os.close(fd)  # the child holds its own copy
    return p

def ask(p, line):
    p.stdin.write(line + "\\n")
    p.stdin.flush()
    answer = p.stdout.readline().strip()
    assert answer, f"no answer to {line!r} (exit status {p.poll()})"
    return answer

def finish(p):
    p.stdin.close()
    assert p.wait(timeout=60) == 0, p.returncode

def sha(data):
    return hashlib.sha256(data).hexdigest()
'''


@pytest.fixture
def child_script(tmp_path) -> Path:
    path = tmp_path / "vmm_child.py"
    path.write_text(CHILD)
    return path


def _run(lib: Path, child: Path, body: str, **env: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, str(child)], capture_output=True, text=True,
                          timeout=120, env={**subprocess_env(), "SLLM_STORE_LIBCUDA": str(lib), **env})


def _ok(r: subprocess.CompletedProcess, misuse: int = 0) -> str:
    assert r.returncode == 0 and r.stderr.count("FAKE CUDA MISUSE") == misuse, r.stdout + r.stderr
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    return r.stdout


def test_another_process_maps_the_memory_and_shares_it(fake_libcuda, child_script) -> None:
    """The child's read-only mapping holds the owner's bytes; a read-write mapping made there too
    sees the owner's later writes, and the owner sees the child's: one memory, not a copy."""
    _ok(_run(fake_libcuda, child_script, """
        a = _C.VmmAllocation("cuda:0", 3 * 1024 * 1024 + 5)
        assert (a.size, a.device, a.pci_bus_id) == (4 << 20, "cuda:0", "0000:00:00.0"), (a.size, a.device)
        assert fake.fake_vmm_bytes() == a.size
        first = os.urandom(a.size)
        ctypes.memmove(a.address, first, a.size)
        p = child(a)
        ro, address = ask(p, "map ro").split()[1:]
        assert ro == "True" and int(address) != 0
        assert ask(p, f"hash 0 {a.size}") == sha(first)
        assert ask(p, "map rw").split()[1] == "False"
        second = os.urandom(1 << 20)
        ctypes.memmove(a.address, second, len(second))  # after both mappings were made
        assert ask(p, f"hash 1 {len(second)}") == sha(second)
        assert ask(p, f"hash 0 {a.size}") == sha(second + first[len(second):])
        assert ask(p, "write 1 " + b"from the child".hex()) == "written"
        assert ctypes.string_at(a.address, 14) == b"from the child"
        finish(p)
        a.close()
        assert fake.fake_vmm_bytes() == 0
        print("OK")
    """))


def test_a_write_through_a_read_only_mapping_kills_the_writer(fake_libcuda, child_script) -> None:
    _ok(_run(fake_libcuda, child_script, """
        import signal
        a = _C.VmmAllocation("cuda:0", 2 << 20)
        data = os.urandom(a.size)
        ctypes.memmove(a.address, data, a.size)
        p = child(a)
        assert ask(p, "map ro").split()[1] == "True"
        p.stdin.write("write 0 " + b"overwritten".hex() + "\\n")
        p.stdin.flush()
        assert p.wait(timeout=60) == -signal.SIGSEGV, p.returncode
        assert ctypes.string_at(a.address, a.size) == data
        print("OK")
    """))


def test_a_refused_read_only_mapping_is_read_write_and_says_so(fake_libcuda, child_script) -> None:
    """A driver that refuses read-only access gives a read-write mapping, and read_only says so."""
    _ok(_run(fake_libcuda, child_script, """
        a = _C.VmmAllocation("cuda:0", 2 << 20)
        p = child(a, FAKE_CUDA_NO_READ_ONLY="1")
        assert ask(p, "map ro").split()[1] == "False"
        assert ask(p, "write 0 " + b"written anyway".hex()) == "written"
        assert ctypes.string_at(a.address, 14) == b"written anyway"
        finish(p)
        print("OK")
    """))


def test_the_memory_lives_while_another_process_maps_it(fake_libcuda, child_script) -> None:
    _ok(_run(fake_libcuda, child_script, """
        a = _C.VmmAllocation("cuda:0", 4 << 20)
        data = os.urandom(a.size)
        ctypes.memmove(a.address, data, a.size)
        p = child(a)
        ask(p, "map ro")
        size = a.size
        a.close()  # the owner lets go: unmapped, released, address range freed
        assert fake.fake_vmm_bytes() == 0
        assert ask(p, f"hash 0 {size}") == sha(data)
        assert ask(p, "close 0") == "closed"
        finish(p)
        print("OK")
    """))


def test_too_little_device_memory_is_an_out_of_memory_error(fake_libcuda, child_script) -> None:
    _ok(_run(fake_libcuda, child_script, """
        assert _C.cuda_memory_info("cuda:0") == (8 << 20, 8 << 20)
        a = _C.VmmAllocation("cuda:0", 6 << 20)
        assert _C.cuda_memory_info("cuda:0") == (2 << 20, 8 << 20)
        try:
            _C.VmmAllocation("cuda:0", 3 << 20)
            raise SystemExit("allocated more than the device has")
        except OutOfMemoryError as e:
            assert isinstance(e, MemoryError)
            assert str(4 << 20) in str(e) and "cuda:0" in str(e), e
        a.close()
        b = _C.VmmAllocation("cuda:0", 8 << 20)  # the memory came back
        b.close()
        print("OK")
    """, FAKE_CUDA_DEVICE_MEMORY=str(8 << 20)))


@pytest.mark.parametrize("vmm", [True, False])
def test_vmm_unsupported_says_why(fake_libcuda, child_script, vmm) -> None:
    out = _ok(_run(fake_libcuda, child_script, """
        why = _C.vmm_unsupported("cuda:0")
        print(repr(why))
        assert "does not exist" in _C.vmm_unsupported("cuda:3")
        try:
            _C.VmmAllocation("cuda:0", 2 << 20)
            assert not why
        except DeviceError as e:
            assert why and why in str(e), (why, e)
        print("OK")
    """, **({} if vmm else {"FAKE_CUDA_NO_VMM": "1"})))
    why = out.splitlines()[0]
    if vmm:
        assert why == "''"
    else:
        assert "virtual memory management" in why


def test_copy_device_to_device_waits_for_the_copy(fake_libcuda, child_script) -> None:
    """The fake runs copies late (FAKE_CUDA_LAG_US): the bytes are there when the call returns."""
    _ok(_run(fake_libcuda, child_script, """
        a = _C.VmmAllocation("cuda:0", 4 << 20)
        b = _C.VmmAllocation("cuda:0", 4 << 20)
        data = os.urandom(3 << 20)
        ctypes.memmove(a.address, data, len(data))
        _C.copy_device_to_device("cuda:0", b.address + 4096, a.address + 1, len(data) - 1)
        assert ctypes.string_at(b.address + 4096, len(data) - 1) == data[1:]
        assert ctypes.string_at(b.address, 4096) == bytes(4096)
        _C.copy_device_to_device("cuda:0", b.address, a.address, 0)
        try:
            _C.copy_device_to_device("cuda:1", b.address, a.address, 1)
            raise SystemExit("copied on a device that does not exist")
        except DeviceError as e:
            assert "cuda:1" in str(e), e
        print("OK")
    """, FAKE_CUDA_LAG_US="300000"))


def test_close_is_idempotent_and_use_after_close_raises(fake_libcuda, child_script) -> None:
    _ok(_run(fake_libcuda, child_script, """
        with _C.VmmAllocation("cuda:0", 2 << 20) as a:
            fd = a.export_fd()
            with _C.VmmMapping(a.pci_bus_id, fd, a.size, read_only=True) as m:
                assert m.read_only and m.ordinal == 0 and m.size == a.size and m.address != a.address
            os.close(fd)
            try:
                m.address
                raise SystemExit("a closed mapping was used")
            except DeviceError as e:
                assert "closed" in str(e), e
            m.close()
        a.close()
        assert fake.fake_vmm_bytes() == 0
        for use in (lambda: a.address, a.export_fd):
            try:
                use()
                raise SystemExit("a closed allocation was used")
            except DeviceError as e:
                assert "closed" in str(e), e
        assert a.size == 2 << 20 and a.device == "cuda:0"
        print("OK")
    """))


def test_imports_that_cannot_work_are_device_errors(fake_libcuda, child_script) -> None:
    _ok(_run(fake_libcuda, child_script, """
        a = _C.VmmAllocation("cuda:0", 2 << 20)
        fd = a.export_fd()
        for args, words in [(("0000:00:07.0", fd, a.size), "not visible"),
                            ((a.pci_bus_id, fd, a.size + 4096), "granularity"),
                            ((a.pci_bus_id, fd, 2 * a.size), "cuMemMap"),
                            ((a.pci_bus_id, os.open(os.devnull, os.O_RDONLY), a.size),
                             "cuMemImportFromShareableHandle")]:
            try:
                _C.VmmMapping(*args)
                raise SystemExit(f"{args} was mapped")
            except DeviceError as e:
                assert words in str(e), (words, e)
        assert os.fstat(fd).st_size == a.size  # the caller's descriptor is left open
        for bad in ("cpu", "cuda:x", "cuda:"):
            try:
                _C.VmmAllocation(bad, 2 << 20)
                raise SystemExit(f"allocated on {bad!r}")
            except DeviceError as e:
                assert bad in str(e), e
        print("OK")
    """))


def test_the_fake_reports_vmm_misuse(fake_libcuda, child_script) -> None:
    """The stand-in driver itself: releasing twice, freeing a range with memory still mapped, and
    unmapping what is not mapped are reported."""
    _ok(_run(fake_libcuda, child_script, """
        U64, V, SIZE = ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_size_t
        fake.cuMemRelease.argtypes = [U64]
        fake.cuMemAddressFree.argtypes = [U64, SIZE]
        fake.cuMemUnmap.argtypes = [U64, SIZE]
        fake.fake_misuse_count.restype = ctypes.c_long
        a = _C.VmmAllocation("cuda:0", 2 << 20)
        assert fake.cuMemAddressFree(a.address, a.size) != 0 and fake.fake_misuse_count() == 1
        assert fake.cuMemUnmap(a.address + 4096, a.size) != 0 and fake.fake_misuse_count() == 2
        assert fake.cuMemRelease(0x999999) != 0 and fake.fake_misuse_count() == 3
        a.close()
        assert fake.fake_misuse_count() == 3
        print("OK")
    """, FAKE_CUDA_MISUSE="count"), misuse=3)


@pytest.mark.gpu
def test_another_process_maps_gpu_memory_read_only(tmp_path, child_script) -> None:
    """On a real GPU: 64 MiB filled from a tensor by a device-to-device copy, exported, mapped
    read-only in a child that reads it through PyTorch, and still readable there once the owner
    has closed it."""
    from sllm_store.native import _C

    why = _C.vmm_unsupported("cuda:0")
    if why:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(7)
    src = torch.randint(0, 256, (64 * MiB,), dtype=torch.uint8, device="cuda", generator=g)
    want = hashlib.sha256(src.cpu().numpy().tobytes()).hexdigest()
    free_before = _C.cuda_memory_info("cuda:0")[0]
    alloc = _C.VmmAllocation("cuda:0", src.numel())
    assert alloc.size >= src.numel() and alloc.device == "cuda:0"
    assert _C.cuda_memory_info("cuda:0")[0] <= free_before - alloc.size
    torch.cuda.synchronize()  # the copy runs on a stream of its own
    _C.copy_device_to_device("cuda:0", alloc.address, src.data_ptr(), src.numel())
    fd = alloc.export_fd()
    env = {k: v for k, v in subprocess_env().items() if k != "SLLM_STORE_LIBCUDA"}
    args = [str(child_script), str(fd), alloc.pci_bus_id, str(alloc.size), "torch"]
    p = subprocess.Popen([sys.executable, *args], pass_fds=(fd,), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    os.close(fd)

    def ask(line: str) -> str:
        p.stdin.write(line + "\n")
        p.stdin.flush()
        answer = p.stdout.readline().strip()
        assert answer, p.stderr.read()
        return answer

    try:
        read_only = ask("map ro").split()[1]
        print("read-only mapping granted:", read_only)
        assert ask(f"hash 0 {src.numel()}") == want
        alloc.close()
        assert ask(f"hash 0 {src.numel()}") == want
        assert ask("close 0") == "closed"
        p.stdin.close()
        assert p.wait(timeout=120) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
        alloc.close()
