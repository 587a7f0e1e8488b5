"""The store server's GPU tier on the CPU stand-in for the CUDA driver (tests/fake_cuda.cpp).

The fake driver's VMM calls make "device memory" from memfds, so a server process and client
processes really share it: a client attaches (the descriptors pass over the attach socket) and
reads the bytes the server copied, as a GPU client would map them. Covered: attach and its
bytes, tensors shared between models held once, eviction under the budget (never of an attached
model), a client killed while attached, the server killed while a client is attached, refusals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import subprocess_env
from test_server import Server, short_tmpdir

import sllm_store
from sllm_store.errors import InvalidArgumentError, ModelTooLargeError, PoolExhaustedError

MiB = 1 << 20

CLIENT = """
    import ctypes, hashlib, json, sys
    from sllm_store.server.attach import attach
    from sllm_store.server.client import StoreClient, index_of

    address, model, bus_id, hold = sys.argv[1:5]
    client = StoreClient(address)
    reply = client.describe(model)
    index = index_of(reply, model)
    a = attach(reply.attach_socket, model, reply.fingerprint, bus_id)
    out = {"read_only": a.read_only, "digests": {}, "placement": a.placement}
    for name, t in index.tensors.items():
        block, off = a.placement[t.name]
        m = a.mappings[block]
        out["digests"][name] = hashlib.sha256(ctypes.string_at(m.address + off, t.nbytes)).hexdigest()
    print(json.dumps(out), flush=True)
    if hold == "hold":  # keep the attachment until told, then read again (the server may be gone)
        sys.stdin.readline()
        again = {n: hashlib.sha256(ctypes.string_at(a.mappings[a.placement[t.name][0]].address
                                                   + a.placement[t.name][1], t.nbytes)).hexdigest()
                 for n, t in index.tensors.items()}
        print(json.dumps(again), flush=True)
    a.close()
"""


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """Three models: a and b share their embedding (2 MiB), c shares nothing; a and b also have
    identical layer norms (ones) within each model."""
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(512, 1024, generator=g)  # 2 MiB
    sds = {
        "a": {"embed": embed, "w": torch.randn(256, 1024, generator=g), "ln1": torch.ones(1024),
              "ln2": torch.ones(1024)},
        "b": {"embed": embed.clone(), "w": torch.randn(256, 1024, generator=g), "ln1": torch.ones(1024),
              "ln2": torch.ones(1024)},
        "c": {"embed": torch.randn(512, 1024, generator=g), "w": torch.randn(256, 1024, generator=g)},
    }
    root = tmp_path / "models"
    for name, sd in sds.items():
        sllm_store.save_state_dict(sd, root / name)
    return root, sds


@pytest.fixture
def gpu_server(fake_libcuda, models, monkeypatch):
    """Factory: a server with a GPU pool of ``budget`` on the fake cuda:0."""
    root, _ = models
    servers: list[Server] = []
    sock_dir = short_tmpdir()
    monkeypatch.setenv("SLLM_STORE_LIBCUDA", str(fake_libcuda))  # for the processes started here

    def start(budget: str = "16MiB") -> Server:
        s = Server(root, sock_dir, pool="16MiB", args=("--gpu-pool", f"cuda:0={budget}"))
        servers.append(s)
        return s.start()

    yield start
    for s in servers:
        if s.proc is not None and s.proc.poll() is None:
            s.terminate(timeout=10)
    shutil.rmtree(sock_dir, ignore_errors=True)


def _client(server: Server, model: str, hold: bool = False) -> subprocess.Popen:
    bus_id = server.status().gpu_pools[0].pci_bus_id
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(CLIENT), server.address, model, bus_id,
                             "hold" if hold else "once"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())


def _first_line(p: subprocess.Popen, timeout: float = 60) -> dict[str, Any]:
    line = p.stdout.readline() if p.stdout else ""
    if not line:
        p.wait(timeout)
        pytest.fail(f"client failed ({p.returncode}): {p.stderr.read() if p.stderr else ''}")
    return json.loads(line)


def _residency(server: Server) -> dict[str, Any]:
    s = server.status()
    return {"pools": {g.device: (g.used, g.budget) for g in s.gpu_pools},
            "models": {m.name: {r.device: r for r in m.gpu} for m in s.models if m.gpu}}


def _wait(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_attach_maps_the_bytes_the_server_holds(gpu_server, models) -> None:
    _, sds = models
    server = gpu_server()
    p = _client(server, "a")
    out = _first_line(p)
    assert p.wait(30) == 0, p.stderr.read() if p.stderr else ""
    assert out["digests"] == {n: _digest(t) for n, t in sds["a"].items()}
    assert out["read_only"] is True
    assert out["placement"]["ln1"] != out["placement"]["ln2"]  # equal bytes, separate copies in a model
    r = _residency(server)["models"]["a"]["cuda:0"]
    assert r.state == "ready" and r.bytes == sum(t.nbytes for t in sds["a"].values()) and r.shared_bytes == 0
    _wait(lambda: _residency(server)["models"]["a"]["cuda:0"].attached == 0, "the client's detach")


def test_shared_tensors_are_held_once(gpu_server, models) -> None:
    _, sds = models
    server = gpu_server()
    client = server.client()
    client.prefetch("a", to="cuda:0")
    used_a = _residency(server)["pools"]["cuda:0"][0]
    reply = client.prefetch("b", to="cuda:0")
    assert reply.bytes == sum(t.nbytes for t in sds["b"].values())
    res = _residency(server)
    b = res["models"]["b"]["cuda:0"]
    # the embedding and both layer norms come from a's memory (a holds its two identical layer
    # norms apart: no two tensors of one model share storage)
    assert b.shared_bytes == sds["b"]["embed"].nbytes + sds["b"]["ln1"].nbytes * 2
    assert b.bytes - b.shared_bytes == sds["b"]["w"].nbytes  # only its own tensor crossed PCIe
    assert res["pools"]["cuda:0"][0] - used_a < sds["b"]["embed"].nbytes + sds["b"]["w"].nbytes
    p = _client(server, "b")
    out = _first_line(p)
    p.wait(30)
    assert out["digests"] == {n: _digest(t) for n, t in sds["b"].items()}


def test_eviction_spares_attached_and_pinned_models(gpu_server, models) -> None:
    server = gpu_server(budget="8MiB")
    client = server.client()
    holder = _client(server, "a", hold=True)  # a attached (4 MiB block)
    _first_line(holder)
    client.prefetch("b", to="cuda:0")  # its own 2 MiB block; shares a's embedding
    client.prefetch("c", to="cuda:0")  # 4 MiB: b (idle) goes, a (attached) stays
    res = _residency(server)["models"]
    assert "cuda:0" in res["a"] and "cuda:0" in res["c"] and "b" not in res
    with pytest.raises(PoolExhaustedError):
        client.evict("a", tier="cuda:0")  # attached: refused by name
    holder.stdin.write("go\n")
    holder.stdin.flush()
    _first_line(holder)
    holder.wait(30)
    _wait(lambda: _residency(server)["models"]["a"]["cuda:0"].attached == 0, "the detach")
    client.prefetch("a", to="cuda:0", pin=True)
    client.prefetch("b", to="cuda:0")  # 2 MiB: c is idle and unpinned -> evicted, a pinned stays
    res = _residency(server)["models"]
    assert "cuda:0" in res["a"] and "cuda:0" in res["b"] and "c" not in res
    assert client.evict("", tier="gpu")  # everything idle goes, pinned or not
    assert _residency(server)["pools"]["cuda:0"][0] == 0


def test_refusals_are_library_errors(gpu_server, models) -> None:
    server = gpu_server(budget="2MiB")
    client = server.client()
    with pytest.raises(ModelTooLargeError):
        client.prefetch("a", to="cuda:0")
    with pytest.raises(InvalidArgumentError):
        client.prefetch("a", to="cuda:1")
    assert _residency(server)["pools"]["cuda:0"][0] == 0
    p = _client(server, "a")  # the attach refused: the client sees the server's error class
    p.wait(30)
    assert p.returncode != 0 and "ModelTooLargeError" in (p.stderr.read() if p.stderr else "")


def test_client_killed_while_attached_is_detached(gpu_server, models) -> None:
    server = gpu_server()
    holder = _client(server, "a", hold=True)
    _first_line(holder)
    assert _residency(server)["models"]["a"]["cuda:0"].attached == 1
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    _wait(lambda: _residency(server)["models"]["a"]["cuda:0"].attached == 0, "the dead client's detach")
    assert server.client().evict("a", tier="cuda:0") == ["a@cuda:0"]


def test_server_killed_while_attached_leaves_the_mapping_valid(gpu_server, models) -> None:
    _, sds = models
    server = gpu_server()
    holder = _client(server, "a", hold=True)
    first = _first_line(holder)
    server.kill()
    holder.stdin.write("go\n")
    holder.stdin.flush()
    again = _first_line(holder)
    assert holder.wait(30) == 0
    assert again == first["digests"] == {n: _digest(t) for n, t in sds["a"].items()}
    restarted = gpu_server()  # a new server starts clean, on the same socket
    assert _residency(restarted)["pools"]["cuda:0"][0] == 0


def test_gpu_pool_needs_vmm(fake_libcuda, models, monkeypatch) -> None:
    root, _ = models
    env = subprocess_env()
    env.update(SLLM_STORE_LIBCUDA=str(fake_libcuda), FAKE_CUDA_NO_VMM="1")
    d = short_tmpdir()
    try:
        r = subprocess.run([sys.executable, "-m", "sllm_store", "serve", "--storage-path", str(root),
                            "--mem-pool-size", "8MiB", "--chunk-size", "1MiB", "--listen", f"unix://{d}/s.sock",
                            "--gpu-pool", "cuda:0=8MiB"], env=env, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode != 0 and "cannot be shared" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(f"{d}/s.sock")


def test_gpu_pool_argument_is_checked() -> None:
    from sllm_store.server.gpu import parse_gpu_pools

    assert parse_gpu_pools(["cuda:0=1GiB", "cuda:3=512MiB"]) == {"cuda:0": 1 << 30, "cuda:3": 512 * MiB}
    for bad in ("cuda:0", "gpu:0=1GiB", "cuda:x=1GiB", "cuda:0=-1", "cuda:0=lots"):
        with pytest.raises(InvalidArgumentError):
            parse_gpu_pools([bad])


def test_bus_ids_compare_as_numbers() -> None:
    from sllm_store.server.gpu import bus_key

    assert bus_key("0000:17:00.0") == bus_key("00000000:17:00.0") == bus_key("0000:17:00.0".upper())
    assert bus_key("0000:17:00.0") != bus_key("0000:18:00.0")
    assert bus_key("not a bus id") is None


# --- on a GPU ------------------------------------------------------------------------------------

GPU_CLIENT = """
    import hashlib, json, sys, torch, sllm_store
    address, model, mode = sys.argv[1:4]
    sd = sllm_store.load_state_dict(model, "cuda:0", store=address, copy=mode == "copy")
    x = torch.ones(4, 1024, device="cuda:0")
    y = (x @ sd["w"].t()).sum().item()  # a forward pass on the weights
    digests = {n: hashlib.sha256(t.cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
               for n, t in sd.items()}
    print(json.dumps({"y": y, "digests": digests}), flush=True)
    if mode == "hold":
        sys.stdin.readline()
"""


@pytest.fixture
def cuda_server(models):
    root, _ = models
    sock_dir = short_tmpdir()
    s = Server(root, sock_dir, pool="16MiB", args=("--gpu-pool", "cuda:0=64MiB")).start()
    yield s
    s.terminate(timeout=10)
    shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.gpu
def test_two_processes_compute_on_the_same_attached_weights(cuda_server, models) -> None:
    _, sds = models
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(GPU_CLIENT), cuda_server.address, "a",
                               "hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=subprocess_env()) for _ in range(2)]
    outs = [_first_line(p, 120) for p in procs]
    expected = {n: _digest(t) for n, t in sds["a"].items()}
    assert outs[0] == outs[1] and outs[0]["digests"] == expected
    r = _residency(cuda_server)["models"]["a"]["cuda:0"]
    assert r.attached == 2 and r.bytes == sum(t.nbytes for t in sds["a"].values())
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.wait(60) == 0
    _wait(lambda: _residency(cuda_server)["models"]["a"]["cuda:0"].attached == 0, "the detach")


@pytest.mark.gpu
def test_attached_tensors_in_this_process(cuda_server, models) -> None:
    _, sds = models
    sd = sllm_store.load_state_dict("a", "cuda:0", store=cuda_server.address)
    for n, t in sds["a"].items():
        assert torch.equal(sd[n].cpu(), t), n
    assert _residency(cuda_server)["models"]["a"]["cuda:0"].attached == 1
    private = sllm_store.load_state_dict("a", "cuda:0", store=cuda_server.address, copy=True)
    private["w"].mul_(2)  # a private copy may be written
    assert torch.equal(private["w"].cpu(), sds["a"]["w"] * 2)
    assert torch.equal(sd["w"].cpu(), sds["a"]["w"])  # the shared copy is unchanged
    targets = {n: torch.empty_like(t, device="cuda:0") for n, t in sds["a"].items()}
    sllm_store.load_into("a", targets, store=cuda_server.address)
    for n, t in sds["a"].items():
        assert torch.equal(targets[n].cpu(), t), n
    del sd
    import gc

    gc.collect()
    _wait(lambda: _residency(cuda_server)["models"]["a"]["cuda:0"].attached == 0, "the detach")


def test_hostile_attach_requests_are_refused(gpu_server, models) -> None:
    import socket
    import struct

    server = gpu_server()
    path = server.status().attach_socket
    replies = []
    for payload in (struct.pack(">I", 1 << 30),  # a length beyond the limit
                    struct.pack(">I", 5) + b"nojso",  # not JSON
                    struct.pack(">I", 2) + b"[]",  # not an object
                    _request({"model": "../../etc", "fingerprint": "", "pci_bus_id": "0000:00:00.0"}),
                    _request({"model": "a", "fingerprint": "", "pci_bus_id": "0000:99:00.0"}),
                    _request({"model": "a", "fingerprint": "stale", "pci_bus_id": "0000:00:00.0"})):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(20)
            s.connect(path)
            s.sendall(payload)
            n = struct.unpack(">I", s.recv(4))[0]
            replies.append(json.loads(s.recv(n)))
    assert all(r["ok"] is False for r in replies), replies
    errors = [r["error"] for r in replies[3:]]
    assert errors == ["PathEscapeError", "InvalidArgumentError", "ModelChangedError"]
    assert server.client().health(timeout=5).pid  # still serving
    assert "a" not in _residency(server)["models"]


def _request(obj: dict) -> bytes:
    import struct

    data = json.dumps(obj).encode()
    return struct.pack(">I", len(data)) + data


def test_residency_and_estimates(gpu_server, models) -> None:
    _, sds = models
    server = gpu_server()
    client = server.client()
    where = sllm_store.residency("a", store=server.address)
    assert (where.gpu, where.dram, where.bytes) == ([], False, sum(t.nbytes for t in sds["a"].values()))
    e = sllm_store.estimate_load_time("a", "cpu", store=server.address)
    assert e.tier == "disk" and e.seconds is None and "not measured" in e.basis  # nothing measured yet
    client.prefetch("a", to="cuda:0")
    where = sllm_store.residency("a", store=server.address)
    assert where.dram and [g["device"] for g in where.gpu] == ["cuda:0"]
    assert where.gpu[0]["bytes"] == where.bytes
    assert sllm_store.estimate_load_time("a", "cpu", store=server.address).tier == "dram"
    with pytest.raises(InvalidArgumentError):
        sllm_store.estimate_load_time("a", "cpu", store=None)


WRITER = """
    import sys, torch, sllm_store
    sd = sllm_store.load_state_dict("a", "cuda:0", store=sys.argv[1])
    try:
        sd["w"].fill_(7)
        torch.cuda.synchronize()
    except Exception as e:  # the illegal address, reported by the synchronize (or the launch)
        print("refused:", type(e).__name__, flush=True)
        sys.exit(3)
    print("written", flush=True)
"""


@pytest.mark.gpu
def test_a_client_cannot_write_the_shared_weights(cuda_server, models) -> None:
    _, sds = models
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(WRITER), cuda_server.address],
                       capture_output=True, text=True, timeout=120, env=subprocess_env())
    if "written" in r.stdout:  # the driver refused read-only access: the load must have said so
        assert "read-write" in r.stderr, r.stderr[-2000:]
        return
    assert r.returncode != 0, r.stderr[-2000:]
    reader = [sys.executable, "-c", textwrap.dedent(GPU_CLIENT), cuda_server.address, "a", "once"]
    p = subprocess.Popen(reader, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=subprocess_env())
    assert _first_line(p, 120)["digests"] == {n: _digest(t) for n, t in sds["a"].items()}  # intact
    p.wait(60)


def test_a_recorded_content_hash_is_checked_not_trusted(gpu_server, models) -> None:
    from _helpers import read_index_json, write_index_json

    from sllm_store.errors import ChecksumError

    root, _ = models
    raw = read_index_json(root / "c")
    raw["tensors"]["w"]["content_hash"] = raw["tensors"]["embed"]["content_hash"]  # well formed, wrong
    write_index_json(root / "c", raw)
    server = gpu_server()
    with pytest.raises(ChecksumError, match="content_hash|records"):
        server.client().prefetch("c", to="cuda:0")
    assert "c" not in _residency(server)["models"] and _residency(server)["pools"]["cuda:0"][0] == 0


def test_cli_prefetch_status_evict_with_a_gpu_pool(gpu_server, models) -> None:
    from _helpers import run_cli

    server = gpu_server()
    r = run_cli("prefetch", "--store", server.address, "--to", "cuda:0", "--pin", "a", "b")
    assert r.returncode == 0, r.stderr
    assert "a: resident on cuda:0" in r.stdout and "b: resident on cuda:0" in r.stdout
    r = run_cli("status", "--store", server.address)
    assert r.returncode == 0, r.stderr
    pool = next(line for line in r.stdout.splitlines() if line.startswith("GPU pool:"))
    assert "cuda:0 (0000:00:00.0)" in pool and "of 16.0 MiB used" in pool
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if " cuda:0 " in line and "ready" in line}
    assert set(rows) == {"a", "b"} and "pinned" in rows["b"] and "shared" in rows["b"]
    assert "attach:" in r.stdout
    r = run_cli("evict", "--store", server.address, "--tier", "gpu", "a")
    assert r.returncode == 0 and "a@cuda:0" in r.stdout, r.stdout + r.stderr
    r = run_cli("evict", "--store", server.address, "--tier", "tape")
    assert r.returncode != 0 and "unknown tier" in r.stderr
    r = run_cli("prefetch", "--store", server.address, "--to", "cuda:7", "a")
    assert r.returncode != 0 and "no GPU pool on cuda:7" in r.stderr


def test_a_new_version_beside_an_attached_one_is_refused_not_mixed(gpu_server, models) -> None:
    root, sds = models
    server = gpu_server()
    holder = _client(server, "a", hold=True)
    first = _first_line(holder)
    changed = {n: t + 1 if t.is_floating_point() else t for n, t in sds["a"].items()}
    sllm_store.save_state_dict(changed, root / "a", overwrite=True)
    with pytest.raises(PoolExhaustedError, match="changed on disk"):
        server.client().prefetch("a", to="cuda:0")
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert _first_line(holder) == first["digests"]  # the attached client still reads its version
    holder.wait(30)
    _wait(lambda: _residency(server)["models"]["a"]["cuda:0"].attached == 0, "the detach")
    p = _client(server, "a")  # now the new version replaces the old
    assert _first_line(p)["digests"] == {n: _digest(t) for n, t in changed.items()}
    p.wait(30)


def test_a_recorded_hash_claiming_resident_bytes_is_caught(gpu_server, models) -> None:
    from _helpers import read_index_json, write_index_json

    from sllm_store.errors import ChecksumError

    root, sds = models
    sllm_store.save_state_dict({"x": torch.zeros(512, 1024)}, root / "d")  # the embedding's size
    raw = read_index_json(root / "d")
    raw["tensors"]["x"]["content_hash"] = read_index_json(root / "a")["tensors"]["embed"]["content_hash"]
    write_index_json(root / "d", raw)
    server = gpu_server()
    client = server.client()
    client.prefetch("a", to="cuda:0")
    used = _residency(server)["pools"]["cuda:0"][0]
    with pytest.raises(ChecksumError):
        client.prefetch("d", to="cuda:0")  # placed on a's embedding by its word, then checked
    assert "d" not in _residency(server)["models"] and _residency(server)["pools"]["cuda:0"][0] == used
    p = _client(server, "a")
    assert _first_line(p)["digests"] == {n: _digest(t) for n, t in sds["a"].items()}
    p.wait(30)


def test_residency_without_a_server(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SLLM_STORE_ADDRESS", raising=False)
    monkeypatch.setenv("SLLM_STORE_CACHE_DIR", str(tmp_path / "cache"))
    sd = {"w": torch.randn(256, 256)}
    sllm_store.save_state_dict(sd, tmp_path / "m")
    where = sllm_store.residency(tmp_path / "m")
    assert where.bytes == sd["w"].nbytes and where.disk and where.remote is None
    assert where.page_cached is None or 0.0 <= where.page_cached <= 1.0
    url = sllm_store.residency("s3://bucket/not-here")
    assert (url.remote, url.cached, url.bytes, url.disk) == ("s3://bucket/not-here", False, None, False)


def test_corrupted_data_is_never_made_resident(gpu_server, models) -> None:
    from sllm_store.errors import ChecksumError

    root, _ = models
    data = next(p for p in (root / "c").iterdir() if p.name != "sllm_index.json")
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    server = gpu_server()
    with pytest.raises(ChecksumError):
        server.client().prefetch("c", to="cuda:0")
    p = _client(server, "c")  # an attaching client gets the same error, not the bytes
    p.wait(30)
    assert p.returncode != 0 and "ChecksumError" in (p.stderr.read() if p.stderr else "")
    assert "c" not in _residency(server)["models"]


def test_private_copy_runs_merge_only_what_is_contiguous_at_both_ends(tmp_path) -> None:
    from types import SimpleNamespace

    from sllm_store.errors import StoreError
    from sllm_store.plan import Plan
    from sllm_store.tiers.gpu_attach import copy_runs

    sd = {"a": torch.zeros(256, dtype=torch.uint8), "b": torch.zeros(512, dtype=torch.uint8),
          "c": torch.zeros(512, dtype=torch.uint8), "d": torch.zeros(100, dtype=torch.uint8)}
    sllm_store.save_state_dict(sd, tmp_path / "m")
    index = sllm_store.read_index(tmp_path / "m")
    dev = torch.device("cpu")
    # a, b, c back to back at both ends: one run; d follows c in the source but not in the slot.
    placement = {"a": (0, 0), "b": (0, 256), "c": (0, 768), "d": (0, 4096)}
    attachment = SimpleNamespace(sizes=[8192], placement={"a": (0, 512), "b": (0, 768), "c": (0, 1280),
                                                          "d": (0, 1792)})
    plan = Plan({n: dev for n in sd}, [], [], [dev], [8192], placement)
    assert copy_runs(index, plan, attachment) == [(0, 512, 0, 0, 1280), (0, 1792, 0, 4096, 100)]
    # the source order decides the runs, whatever the plan's order
    attachment.placement = {"a": (0, 1024), "b": (0, 0), "c": (0, 512), "d": (0, 1280)}
    placement.update(a=(0, 1024), b=(0, 0), c=(0, 512), d=(0, 1280))
    assert copy_runs(index, plan, attachment) == [(0, 0, 0, 0, 1380)]
    attachment.placement["d"] = (0, 8150)  # past the end of the shared block
    with pytest.raises(StoreError, match="outside the memory it shares"):
        copy_runs(index, plan, attachment)
