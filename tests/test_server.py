"""The store server (``sllm-store serve``) and its clients, end to end on the CPU.

Every test starts real server processes on a unix socket (``python -m sllm_store serve``) and
loads through them with ``load_state_dict(..., store=ADDRESS)`` or ``StoreClient``. Pools are small
(a few MiB, blocks of 1 MiB) so that streaming, eviction and exhaustion are easy to reach, and
``serve_command(copy_delay=...)`` makes loads slow where a test kills something mid-load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import queue
import shutil
import signal
import stat
import subprocess
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from _helpers import (
    DTYPES,
    StateDict,
    assert_state_dict_identical,
    assert_tensor_identical,
    random_tensor,
    read_index_json,
    run_cli,
    serve_command,
    subprocess_env,
    to_bytes,
    tree_digests,
)

import sllm_store
from sllm_store.errors import (
    ChecksumError,
    ModelNotFoundError,
    ModelTooLargeError,
    PathEscapeError,
    PoolExhaustedError,
    StoreUnavailableError,
)

pytest.importorskip("grpc")
pytest.importorskip("google.protobuf")
pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="store loads to the CPU need /dev/shm")

from sllm_store.loader import load_state_dict_with_report  # noqa: E402
from sllm_store.server.client import StoreClient  # noqa: E402

MiB = 1 << 20
BLOCK = MiB  # pool block size of every server here (--chunk-size), and the models' chunk size
SHM_DIR = Path("/dev/shm")
START_TIMEOUT = 30.0
CHILD_READY_TIMEOUT = 120.0  # for client processes to start (and import what they need)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass
class Store:
    root: Path  # the server's storage path
    models: dict[str, StateDict]  # name -> what was saved (tied names included)
    tied: dict[str, list[tuple[str, str]]]  # name -> (alias, tensor it shares storage with)
    outside: Path  # a converted checkpoint outside the storage path

    def blocks(self, name: str) -> int:
        """Pool blocks the model occupies when cached (whole blocks per data file)."""
        return sum(math.ceil(f["size"] / BLOCK) for f in read_index_json(self.root / name)["files"])

    def file_bytes(self, name: str) -> int:
        return sum(f["size"] for f in read_index_json(self.root / name)["files"])

    def check(self, name: str, loaded: dict[str, torch.Tensor]) -> None:
        """Bit-identical to what was saved (dtype, shape, bytes); tied names share storage."""
        assert_state_dict_identical(loaded, self.models[name], check_order=False)
        for alias, target in self.tied[name]:
            assert loaded[alias].data_ptr() == loaded[target].data_ptr(), (name, alias)


def _mixed_model() -> StateDict:
    """Every dtype torch can carry (bfloat16 included), odd shapes, a tied weight; ~1.7 MiB."""
    g = torch.Generator()
    g.manual_seed(11)
    sd = StateDict()
    for dtype in DTYPES:
        for i, shape in enumerate(((5, 33), (), (3, 0, 2), (1000,))):
            sd[f"t.{str(dtype).replace('torch.', '')}.{i}"] = random_tensor(dtype, shape, g)
    sd["big.f32"] = random_tensor(torch.float32, (256, 1024), g)  # 1 MiB: crosses a chunk boundary
    sd["big.bf16"] = random_tensor(torch.bfloat16, (300_000,), g)
    sd["tied.alias"] = sd["big.f32"]
    return sd


def _sized_model(seed: int) -> StateDict:
    """~4.4 MiB in three dtypes: 5 pool blocks of 1 MiB."""
    g = torch.Generator()
    g.manual_seed(seed)
    return StateDict(
        w0=random_tensor(torch.float32, (600_000,), g),
        w1=random_tensor(torch.bfloat16, (700_000,), g),
        w2=random_tensor(torch.int32, (200_000,), g),
    )


def _small_model(seed: int) -> StateDict:
    """~2.3 MiB: 3 pool blocks of 1 MiB."""
    g = torch.Generator()
    g.manual_seed(seed)
    return StateDict(
        w0=random_tensor(torch.float16, (700_000,), g),
        w1=random_tensor(torch.uint8, (1_000_000,), g),
    )


def _big_model() -> StateDict:
    """~11.5 MiB in two data files: larger than the small pools, so it is streamed."""
    g = torch.Generator()
    g.manual_seed(21)
    sd = StateDict((f"w{i}", random_tensor(torch.float32, (1_000_000,), g)) for i in range(3))
    sd["b"] = random_tensor(torch.bfloat16, (1000,), g)
    sd["head"] = sd["w0"]
    return sd


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    base = tmp_path_factory.mktemp("server")
    root = base / "storage"
    root.mkdir()
    models = {
        "mixed": _mixed_model(),
        "a": _sized_model(1),
        "b": _sized_model(2),
        "c": _sized_model(3),
        "big": _big_model(),
        "sub/nested": StateDict(x=torch.arange(1000, dtype=torch.int64), y=torch.ones(3, 3)),
        "x": _small_model(4),
        "y": _small_model(5),
        "z": _small_model(6),
    }
    tied = {"mixed": [("tied.alias", "big.f32")], "big": [("head", "w0")]}
    for name, sd in models.items():
        sllm_store.save_state_dict(sd, root / name, chunk_size=BLOCK, num_files=2 if name == "big" else 1,
                                   quiet=True)
    outside = base / "outside"
    sllm_store.save_state_dict({"secret": torch.zeros(10)}, outside, quiet=True)
    (root / "escape").symlink_to(outside, target_is_directory=True)  # points outside the storage
    (root / "notamodel").mkdir()
    (root / "notamodel" / "readme.txt").write_text("not a checkpoint\n")
    # corrupted copies: one byte flipped in a tensor, after conversion
    for name, source, tensor in (("corrupt/bad", "mixed", "big.f32"), ("corrupt/bad2", "mixed", "big.bf16"),
                                 ("corrupt/bigbad", "big", "w2")):
        shutil.copytree(root / source, root / name)
        entry = read_index_json(root / name)["tensors"][tensor]
        path = root / name / f"data-{entry['file']:05d}.bin"
        data = bytearray(path.read_bytes())
        data[entry["offset"] + 100] ^= 0xFF
        path.write_bytes(bytes(data))
    assert read_index_json(root / "corrupt/bigbad")["tensors"]["w2"]["file"] == 1  # the 2nd file
    s = Store(root, models, {n: tied.get(n, []) for n in models}, outside)
    assert s.blocks("a") == s.blocks("b") == s.blocks("c") == 5
    assert s.blocks("x") == s.blocks("y") == s.blocks("z") == 3
    assert s.blocks("mixed") == 2
    assert s.blocks("big") >= 12 and s.blocks("big") // 2 > 4
    return s


# --------------------------------------------------------------------------------------------
# Servers and child processes
# --------------------------------------------------------------------------------------------


def shm_files() -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith("sllm-store-")}


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def short_tmpdir() -> str:
    """A fresh directory with a short path (unix socket paths are limited to ~107 bytes)."""
    return tempfile.mkdtemp(prefix="sllm-t-", dir="/tmp" if os.path.isdir("/tmp") else None)


class Server:
    """One ``sllm-store serve`` process on ``unix://DIR/NAME``, its output in DIR/NAME.log."""

    def __init__(self, storage: Path, sock_dir: str, *, pool: str = "32MiB", delay: float = 0.0,
                 name: str = "s.sock", args: tuple[str, ...] = ()) -> None:
        self.args = args
        self.storage = storage
        self.sock = os.path.join(sock_dir, name)
        self.address = "unix://" + self.sock
        self.pool = pool
        self.delay = delay
        self.log_path = self.sock + f".{time.monotonic_ns()}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> Server:
        env = subprocess_env()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                serve_command("--storage-path", str(self.storage), "--mem-pool-size", self.pool,
                              "--chunk-size", str(BLOCK), "--num-threads", "2", "--listen", self.address,
                              *self.args, copy_delay=self.delay),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} at start:\n{self.log()}")
            # "serving ... on ADDRESS" is logged once it listens (a stale socket file may exist
            # before): from then on health() must answer
            if " serving " in self.log() and os.path.exists(self.sock):
                client = StoreClient(self.address)
                try:
                    client.health(timeout=2.0)
                    return self
                except StoreUnavailableError:
                    pass
                finally:
                    client.close()
            if time.monotonic() > deadline:
                pytest.fail(f"server did not answer within {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.02)

    def client(self) -> StoreClient:
        return StoreClient.get(self.address)

    def status(self) -> Any:
        return self.client().status()

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()[-6000:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM; its exit status, or None if it had to be killed."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def sock_dir():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_server(store, sock_dir):
    """Factory: ``start_server(storage=None, pool="32MiB", delay=0, name="s.sock")`` -> Server,
    started and answering; every server is stopped at teardown (SIGTERM, then SIGKILL)."""
    servers: list[Server] = []

    def start(storage: Optional[Path] = None, **kwargs: Any) -> Server:
        s = Server(storage or store.root, sock_dir, **kwargs)
        servers.append(s)
        return s.start()

    yield start
    for s in servers:
        if s.proc is not None:
            s.terminate(timeout=10)


def _module_server(store: Store, **kwargs: Any):
    d = short_tmpdir()
    s = Server(store.root, d, **kwargs)
    try:
        yield s.start()
    finally:
        if s.proc is not None:
            s.terminate(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


# Servers shared by the tests of this module (each server pays for importing torch on its first
# request): every test that uses one starts with reset(), which empties the cache.
@pytest.fixture(scope="module")
def shared_server(store):
    """8 MiB pool: a, b, c take 5 blocks, x, y, z 3, mixed 2; "big" is larger than the pool."""
    yield from _module_server(store, pool="8MiB")


@pytest.fixture(scope="module")
def slow_server(store):
    """4 MiB pool, 0.3 s before each copy window: "big" streams through it in 4 windows."""
    yield from _module_server(store, pool="4MiB", delay=0.3)


def reset(server: Server) -> Any:
    """Evict every model (none may be in use); returns the status after."""
    server.client().evict()
    s = assert_consistent(server)
    assert not s.models and s.pool_used == 0, s
    return s


@pytest.fixture(autouse=True)
def _guard(monkeypatch):
    """Loads give up after 60 s instead of 10 minutes; no shared-memory file is left behind."""
    monkeypatch.setenv("SLLM_STORE_TIMEOUT", "60")
    monkeypatch.delenv("SLLM_STORE_ADDRESS", raising=False)
    before = shm_files()
    yield
    leaked = wait_until_or_value(lambda: shm_files() - before, 5.0)
    assert not leaked, f"shared-memory files left in /dev/shm: {sorted(leaked)}"


def wait_until_or_value(fn: Callable[[], set], timeout: float) -> set:
    """``fn()`` once it is empty, else its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    value = fn()
    while value and time.monotonic() < deadline:
        time.sleep(0.05)
        value = fn()
    return value


# A client process. It signals ``ready``, waits for ``go``, loads ``names`` through the store at
# ``address`` and puts (key, pid, what it got) on ``results`` (or the traceback of its error).
# The processes come from multiprocessing's "forkserver": forked from a helper process that has
# imported torch once (eight children start in a second or two on a 2-core machine instead of
# importing torch eight times), and none inherits this process's gRPC channels or threads.
CHILD = textwrap.dedent(
    """
    import hashlib, os, traceback, warnings
    try:
        import torch
        import sllm_store
        import sllm_store.loader, sllm_store.server.client  # noqa: F401 - before "ready"

        def digest(t):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
            return hashlib.sha256(raw.numpy()).hexdigest()

        ready.set()
        if not go.wait(300):
            raise TimeoutError("no start signal")
        out = {}
        for name in names:
            sd = sllm_store.load_state_dict(name, "cpu", store=address)
            out[name] = {k: [str(v.dtype), list(v.shape), digest(v), v.data_ptr()] for k, v in sd.items()}
        results.put((key, os.getpid(), out))
    except BaseException:
        results.put((key, os.getpid(), traceback.format_exc()))
        raise SystemExit(1)
    """
)

_mp = multiprocessing.get_context("forkserver")
_mp.set_forkserver_preload(["torch", "sllm_store.loader"])


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(to_bytes(t).numpy()).hexdigest()


class Children:
    """Client processes running CHILD; all start loading when ``go()`` is called."""

    def __init__(self) -> None:
        self._go = _mp.Event()
        self.results = _mp.Queue()
        self.procs: list[Any] = []
        self._ready: list[Any] = []

    def start(self, address: str, *names: str) -> Any:
        ready = _mp.Event()
        env = {"ready": ready, "go": self._go, "results": self.results, "names": list(names),
               "address": address, "key": len(self.procs)}
        proc = _mp.Process(target=exec, args=(CHILD, env), daemon=True)
        proc.start()
        self.procs.append(proc)
        self._ready.append(ready)
        return proc

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc, ready in zip(self.procs, self._ready):
            while not ready.wait(0.1):
                if not proc.is_alive() or time.monotonic() > deadline:
                    pytest.fail(f"client process not ready (exit code {proc.exitcode}): {self._errors()}")

    def go(self) -> None:
        self._go.set()

    def collect(self, timeout: float) -> list[dict[str, Any]]:
        """Every child's result, in start order."""
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(out) < len(self.procs):
            try:
                key, _pid, value = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                missing = len(self.procs) - len(out)
                pytest.fail(f"{missing} client process(es) gave no result in {timeout:g} s")
            assert not isinstance(value, str), f"client process {key} failed:\n{value}"
            out[key] = value
        for proc in self.procs:
            proc.join(30)
            assert proc.exitcode == 0, proc.exitcode
        return [out[k] for k in range(len(self.procs))]

    def _errors(self) -> str:
        errors = []
        with contextlib.suppress(queue.Empty):
            while True:
                errors.append(str(self.results.get(timeout=0.2)))
        return "\n".join(errors)

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
        self.results.close()


@pytest.fixture
def children():
    c = Children()
    yield c
    c.close()


def load(name: Any, server: Server, **kwargs: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd, report = load_state_dict_with_report(name, "cpu", store=server.address, **kwargs)
    return sd, report.stats


def assert_consistent(server: Server, in_progress: int = 0) -> Any:
    """The pool accounts for exactly the cached models; nothing is in use."""
    s = server.status()
    assert s.loads_in_progress == in_progress, s
    assert s.pool_used == sum(m.pool_bytes for m in s.models), s
    assert s.pool_used <= s.pool_size
    if in_progress == 0:
        assert all(m.in_use == 0 for m in s.models), s
        assert all(m.tier == "dram" for m in s.models), s
    return s


def names(status: Any) -> set[str]:
    return {m.name for m in status.models}


class Background:
    """Runs ``fn`` on a thread: ``value`` or ``error`` once ``join()`` returned."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.finished_at: Optional[float] = None

        def run() -> None:
            try:
                self.value = fn()
            except BaseException as e:  # noqa: B036 - handed to the test
                self.error = e
            self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running after {timeout:g} s (hang?)"


# --------------------------------------------------------------------------------------------
# 1. Round trip
# --------------------------------------------------------------------------------------------


def test_round_trip_bit_identical_tied_and_hit(store, shared_server):
    srv = shared_server
    s0 = reset(srv)
    sd, stats = load("mixed", srv)
    store.check("mixed", sd)
    assert {t.dtype for t in sd.values()} >= {torch.bfloat16, torch.float32, torch.int64, torch.bool}
    assert stats["io_mode"] == "store" and stats["hit"] is False and stats["streamed"] is False
    assert stats["bytes_copied"] == store.file_bytes("mixed")
    # the load's timeline: opening is reaching the server and the Describe, filling the Load
    assert stats["open_seconds"] >= stats["client_seconds"] + stats["describe_seconds"]
    assert stats["fill_seconds"] >= stats["rpc_seconds"]

    sd2, stats2 = load("mixed", srv)
    assert stats2["hit"] is True and stats2["streamed"] is False
    store.check("mixed", sd2)
    assert sd2["big.f32"].data_ptr() != sd["big.f32"].data_ptr()  # a separate copy per load
    sd2["big.f32"].add_(1)  # writable, and not the memory of the first load
    assert_tensor_identical(sd["big.f32"], store.models["mixed"]["big.f32"])

    s = assert_consistent(srv)
    assert (s.hits - s0.hits, s.misses - s0.misses) == (1, 1)
    assert names(s) == {"mixed"}
    assert s.models[0].hits == 1 and s.models[0].size == store.file_bytes("mixed")
    assert s.pool_used == store.blocks("mixed") * BLOCK
    assert s.bytes_served - s0.bytes_served == 2 * store.file_bytes("mixed")


def test_non_blocking_load_through_the_server(store, shared_server):
    """``wait=False`` through the store server: the tensors come at once, ready once the server's
    copy has answered, bit-identical to a blocking load."""
    pending = sllm_store.load_state_dict("mixed", "cpu", store=shared_server.address, wait=False)
    assert isinstance(pending, sllm_store.PendingLoad)
    assert pending.wait_on_device("big.f32", timeout=60)  # host memory: waits on the host
    store.check("mixed", pending.result(timeout=60))
    assert pending.report.stats["io_mode"] == "store" and pending.progress[0] == pending.progress[1]


def test_load_into_existing_tensors(store, shared_server):
    """``load_into`` through the server: host tensors are filled in place (through shared
    memory), tied names included."""
    srv = shared_server
    reset(srv)
    sd, _ = load("mixed", srv)
    targets = {n: torch.empty_like(t) for n, t in sd.items()}
    ptrs = {n: t.data_ptr() for n, t in targets.items()}
    report = sllm_store.load_into("mixed", targets, store=srv.address)
    assert report.stats["tier"] == "store" and report.stats["hit"] is True
    for n, t in sd.items():
        assert_tensor_identical(targets[n], t, n)
        assert targets[n].data_ptr() == ptrs[n]
    with pytest.raises(sllm_store.CheckpointMismatchError, match="nowhere to go"):
        sllm_store.load_into("mixed", {"big.f32": targets["big.f32"]}, store=srv.address)
    assert_consistent(srv)


def test_store_load_reports_its_steps(shared_server):
    """A load through the server reports the time of each of its steps, and they fall within
    the load's own time."""
    srv = shared_server
    reset(srv)
    _, report = load_state_dict_with_report("mixed", "cpu", store=srv.address)
    steps = ("client_seconds", "describe_seconds", "allocate_seconds", "rpc_seconds")
    assert all(report.stats[k] >= 0 for k in steps)
    assert 0 <= report.stats["copy_seconds"] <= report.stats["server_seconds"]
    assert sum(report.stats[k] for k in steps) <= report.seconds
    assert_consistent(srv)


def test_a_client_made_before_the_load_is_the_one_the_load_uses(shared_server, monkeypatch):
    """A worker that makes its store client (and reaches the server) before its request comes
    leaves the load nothing of that to do: the load takes the process's shared client."""
    srv = shared_server
    reset(srv)
    monkeypatch.setenv("SLLM_STORE_ADDRESS", srv.address)
    ahead = sllm_store.StoreClient.get()
    assert ahead.health().pid == srv.proc.pid
    made = []
    init = StoreClient.__init__

    def counting(self, *args: Any, **kwargs: Any) -> None:
        made.append(args)
        init(self, *args, **kwargs)

    monkeypatch.setattr(StoreClient, "__init__", counting)
    out, report = load_state_dict_with_report("mixed", "cpu")
    assert report.stats["tier"] == "store" and out
    assert made == []  # no second client
    assert sllm_store.StoreClient.get(srv.address) is ahead
    assert_consistent(srv)


def test_partial_load_by_device_map(store, shared_server):
    srv = shared_server
    reset(srv)
    ref = store.models["mixed"]
    subset = {"t.bfloat16.0": "cpu", "big.bf16": "cpu", "t.bool.3": "cpu"}
    sd, report = load_state_dict_with_report("mixed", subset, store=srv.address)
    assert sorted(sd) == sorted(subset)
    for k in subset:
        assert_tensor_identical(sd[k], ref[k], k)
    assert report.stats["bytes_copied"] == sum(ref[k].numel() * ref[k].element_size() for k in subset)

    # an alias alone loads the tensor it names
    sd = sllm_store.load_state_dict("mixed", {"tied.alias": "cpu"}, store=srv.address)
    assert list(sd) == ["tied.alias"]
    assert_tensor_identical(sd["tied.alias"], ref["big.f32"])

    with pytest.raises(KeyError):
        sllm_store.load_state_dict("mixed", {"no.such.tensor": "cpu"}, store=srv.address)
    assert names(assert_consistent(srv)) == {"mixed"}


def test_names_absolute_local_path_and_nested(store, shared_server):
    srv = shared_server
    reset(srv)
    store.check("mixed", sllm_store.load_state_dict(str(store.root / "mixed"), store=srv.address))
    store.check("mixed", sllm_store.load_state_dict(store.root / "mixed", store=srv.address))
    store.check("sub/nested", sllm_store.load_state_dict("sub/nested", store=srv.address))
    sd, stats = load(str(store.root / "sub" / "nested"), srv)
    store.check("sub/nested", sd)
    assert stats["hit"] is True  # the same cache entry as "sub/nested"
    assert names(assert_consistent(srv)) == {"mixed", "sub/nested"}


def test_verify_through_server_and_corruption(store, shared_server):
    srv = shared_server
    reset(srv)
    sd, stats = load("mixed", srv, verify=True)
    store.check("mixed", sd)
    assert stats["hit"] is False
    sd, stats = load("mixed", srv, verify=True)
    store.check("mixed", sd)
    assert stats["hit"] is True
    assert srv.client().prefetch("mixed", verify=True).hit is True

    # a miss with verify: the bad chunk is found while reading it into the cache; nothing is kept
    with pytest.raises(ChecksumError):
        sllm_store.load_state_dict("corrupt/bad", store=srv.address, verify=True)
    assert names(assert_consistent(srv)) == {"mixed"}
    with pytest.raises(ChecksumError):  # loads through the server verify by default
        sllm_store.load_state_dict("corrupt/bad", store=srv.address)
    assert names(assert_consistent(srv)) == {"mixed"}
    # with verify=False the corrupted bytes are served (and cached unverified) ...
    sd = sllm_store.load_state_dict("corrupt/bad", store=srv.address, verify=False)
    assert not torch.equal(to_bytes(sd["big.f32"]), to_bytes(store.models["mixed"]["big.f32"]))
    assert_tensor_identical(sd["big.bf16"], store.models["mixed"]["big.bf16"])
    # ... and a later load with verify checks the cached copy
    with pytest.raises(ChecksumError):
        sllm_store.load_state_dict("corrupt/bad", store=srv.address, verify=True)
    with pytest.raises(ChecksumError):
        srv.client().prefetch("corrupt/bad2", verify=True)
    # a streamed model (larger than the pool) is verified window by window
    with pytest.raises(ChecksumError):
        sllm_store.load_state_dict("corrupt/bigbad", store=srv.address, verify=True)

    s = assert_consistent(srv)
    assert names(s) == {"mixed", "corrupt/bad"}
    sd, _ = load("mixed", srv, verify=True)
    store.check("mixed", sd)
    sd, stats = load("big", srv, verify=True)
    assert stats["streamed"] is True
    store.check("big", sd)


# --------------------------------------------------------------------------------------------
# 2. Concurrent client processes
# --------------------------------------------------------------------------------------------


def test_concurrent_client_processes(store, start_server, children):
    srv = start_server(pool="32MiB", delay=0.2)  # every model fits; slow copies: loads overlap
    shm_before = shm_files()
    plan = [
        ["mixed", "a"], ["mixed", "b"], ["mixed", "c"], ["mixed", "sub/nested"],
        ["a", "mixed"], ["b", "a"], ["c", "b"], ["sub/nested", "c"],
    ]
    for models in plan:
        children.start(srv.address, *models)
    children.wait_ready(CHILD_READY_TIMEOUT)
    children.go()
    results = children.collect(120)
    assert len({p.pid for p in children.procs} | {os.getpid()}) == len(plan) + 1

    expected = {
        name: {k: [str(v.dtype), list(v.shape), tensor_digest(v)] for k, v in sd.items()}
        for name, sd in store.models.items()
    }
    for models, got in zip(plan, results):
        assert sorted(got) == sorted(models)
        for name, tensors in got.items():
            assert {k: v[:3] for k, v in tensors.items()} == expected[name], name
            for alias, target in store.tied[name]:
                assert tensors[alias][3] == tensors[target][3], (name, alias)

    s = assert_consistent(srv)
    loads = [m for models in plan for m in models]
    assert names(s) == set(loads)
    assert s.misses == len(set(loads))  # concurrent misses of one model read it once
    assert s.hits == len(loads) - len(set(loads))
    assert s.bytes_served == sum(store.file_bytes(m) for m in loads)
    assert not shm_files() - shm_before  # every client's shared memory is gone


def test_concurrent_streamed_loads_wait_for_the_pool(store, slow_server):
    """Loads streamed through the same small pool at once all succeed (a later one waits for
    the blocks an earlier one holds)."""
    srv = slow_server
    reset(srv)
    runs = [Background(lambda: load("big", srv)) for _ in range(2)]
    runs.append(Background(lambda: load_state_dict_with_report("big", {"w1": "cpu"}, store=srv.address)))
    for r in runs:
        r.join(60)
    for r in runs[:2]:
        assert r.error is None, repr(r.error)
        sd, stats = r.value
        assert stats["streamed"] is True
        store.check("big", sd)
    assert runs[2].error is None, repr(runs[2].error)
    assert_tensor_identical(runs[2].value[0]["w1"], store.models["big"]["w1"])
    s = assert_consistent(srv)
    assert s.pool_used == 0 and not s.models


# --------------------------------------------------------------------------------------------
# 3. / 4. Killed client, killed server
# --------------------------------------------------------------------------------------------


def test_client_killed_mid_load_leaves_server_healthy(store, slow_server, children):
    srv = slow_server  # "big" streams through its pool in 4 windows, each after a 0.3 s delay
    reset(srv)
    shm_before = shm_files()
    child = children.start(srv.address, "big")
    children.wait_ready(CHILD_READY_TIMEOUT)
    children.go()
    wait_until(lambda: srv.status().loads_in_progress >= 1, 60, "the child's load to start")
    child.kill()
    child.join(10)
    assert child.exitcode == -signal.SIGKILL

    assert srv.client().health(timeout=2.0).pid == srv.proc.pid
    wait_until(lambda: srv.status().loads_in_progress == 0, 30, "the orphaned load to end")
    s = assert_consistent(srv)
    assert s.pool_used == 0

    sd, stats = load("big", srv)
    assert stats["streamed"] is True
    store.check("big", sd)
    sd, stats = load("mixed", srv)
    store.check("mixed", sd)
    s = assert_consistent(srv)
    assert names(s) == {"mixed"}
    assert srv.proc.poll() is None
    assert "Traceback" not in srv.log(), srv.log()
    assert not shm_files() - shm_before  # the server unlinked the killed client's memory


def test_client_timeout_stops_the_server_copying(store, slow_server, monkeypatch):
    """A client that gives up (its deadline passes) ends the server's work on the load at the next
    copy: the server writes nothing more into memory the client may reuse."""
    srv = slow_server  # "big" streams through its pool in windows, each after a 0.3 s delay
    reset(srv)
    monkeypatch.setenv("SLLM_STORE_TIMEOUT", "0.4")
    with pytest.raises(StoreUnavailableError):
        load("big", srv)
    gave_up = time.monotonic()
    monkeypatch.setenv("SLLM_STORE_TIMEOUT", "60")
    wait_until(lambda: srv.status().loads_in_progress == 0, 30, "the cancelled load to end")
    assert time.monotonic() - gave_up < 1.5  # at the next window, not after the whole stream
    wait_until(lambda: "load cancelled: the client went away" in srv.log(), 10, "the server to log it")
    s = assert_consistent(srv)
    assert s.pool_used == 0
    sd, stats = load("big", srv)
    store.check("big", sd)


def test_cancelling_a_non_blocking_load_stops_the_server_copying(store, slow_server):
    """``cancel()`` of a pending load through the server cancels its call: the server ends its work
    at the next copy, and the pending load raises LoadCancelledError."""
    srv = slow_server  # "big" streams through its pool in windows, each after a 0.3 s delay
    reset(srv)
    pending = sllm_store.load_state_dict("big", "cpu", store=srv.address, wait=False)
    wait_until(lambda: srv.status().loads_in_progress >= 1, 30, "the load to start")
    t0 = time.monotonic()
    assert pending.cancel() is True and pending.tensors == {}
    with pytest.raises(sllm_store.LoadCancelledError):
        pending.wait()
    wait_until(lambda: srv.status().loads_in_progress == 0, 30, "the cancelled load to end")
    assert time.monotonic() - t0 < 1.5  # at the next window, not after the whole stream
    assert assert_consistent(srv).pool_used == 0
    sd, _ = load("big", srv)
    store.check("big", sd)


def test_load_limit_keeps_quick_calls_answerable(store, start_server):
    """With --max-loads 1, a second load waits (its client retries while the server says busy)
    and Health answers at once meanwhile."""
    srv = start_server(pool="4MiB", delay=0.3, args=("--max-loads", "1"))
    first = Background(lambda: load("big", srv))  # streams in windows, 0.3 s each
    wait_until(lambda: srv.status().loads_in_progress >= 1, 30, "the first load to start")
    t0 = time.monotonic()
    assert srv.client().health(timeout=2.0).pid == srv.proc.pid
    assert time.monotonic() - t0 < 1.0
    sd, stats = load("mixed", srv)  # refused while "big" runs, retried, then served
    store.check("mixed", sd)
    first.join(60)
    assert first.error is None, repr(first.error)
    assert "StoreBusyError" in srv.log()
    assert_consistent(srv)


def test_server_killed_mid_load_raises_unavailable_quickly(store, start_server):
    srv = start_server(pool="32MiB", delay=60)
    run = Background(lambda: load("mixed", srv))
    wait_until(lambda: srv.status().loads_in_progress >= 1, 30, "the load to start")
    killed = time.monotonic()
    srv.kill()
    run.join(15)
    assert isinstance(run.error, StoreUnavailableError), repr(run.error)
    assert run.finished_at is not None and run.finished_at - killed < 5.0
    assert "store server" in str(run.error)

    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        sllm_store.load_state_dict("mixed", store=srv.address)
    assert time.monotonic() - t0 < 5.0

    # the socket file left by the killed server does not stop a new one on the same path
    assert os.path.exists(srv.sock)
    srv2 = start_server(pool="32MiB")
    assert srv2.sock == srv.sock
    sd, stats = load("mixed", srv2)
    store.check("mixed", sd)
    assert stats["hit"] is False


def test_sigterm_during_load_exits_cleanly(store, start_server):
    """SIGTERM while a load outlasts the shutdown grace period (5 s): the client gets
    StoreUnavailableError, the server frees its pool only after the load stopped and exits 0."""
    srv = start_server(pool="32MiB", delay=30)
    run = Background(lambda: load("mixed", srv))
    wait_until(lambda: srv.status().loads_in_progress >= 1, 30, "the load to start")
    t0 = time.monotonic()
    rc = srv.terminate(timeout=25)
    elapsed = time.monotonic() - t0
    assert rc == 0, f"exit status {rc}:\n{srv.log()}"
    assert elapsed < 15, elapsed
    run.join(10)
    assert isinstance(run.error, StoreUnavailableError), repr(run.error)
    assert not os.path.exists(srv.sock)
    assert "Traceback" not in srv.log(), srv.log()


# --------------------------------------------------------------------------------------------
# 5. Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nope", "sub/nope", "notamodel", "sub", "corrupt"])
def test_unknown_model(store, shared_server, name):
    client = shared_server.client()
    with pytest.raises(ModelNotFoundError):
        sllm_store.load_state_dict(name, store=shared_server.address)
    with pytest.raises(ModelNotFoundError):
        client.prefetch(name)
    with pytest.raises(ModelNotFoundError) as info:
        client.describe(name)
    assert name in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("kind", ["dotdot", "dotdot-inside", "absolute", "symlink"])
def test_path_escape(store, shared_server, kind):
    name = {
        "dotdot": "../outside",
        "dotdot-inside": "sub/../../outside",
        "absolute": str(store.outside),  # a real checkpoint, outside the storage path
        "symlink": "escape",  # storage/escape -> ../outside
    }[kind]
    client = shared_server.client()
    with pytest.raises(PathEscapeError):
        client.describe(name)
    with pytest.raises(PathEscapeError):
        client.prefetch(name)
    with pytest.raises(PathEscapeError):
        sllm_store.load_state_dict(name, store=shared_server.address)
    assert isinstance(PathEscapeError(), PermissionError)
    assert shared_server.client().health().pid == shared_server.proc.pid


def test_model_larger_than_pool_streams(store, shared_server):
    srv = shared_server  # 8 MiB pool
    reset(srv)
    with pytest.raises(ModelTooLargeError, match="larger than the whole memory pool"):
        srv.client().prefetch("big")
    sd, stats = load("big", srv)
    assert stats["streamed"] is True and stats["hit"] is False
    store.check("big", sd)
    # a partial load streams only what it needs
    sd, report = load_state_dict_with_report("big", {"w2": "cpu", "b": "cpu"}, store=srv.address)
    assert report.stats["streamed"] is True
    for k in ("w2", "b"):
        assert_tensor_identical(sd[k], store.models["big"][k], k)
    s = assert_consistent(srv)
    assert not s.models and s.pool_used == 0


def test_streamed_load_evicts_idle_models(store, shared_server):
    """A pool full of idle models does not stop a load of a model larger than the pool."""
    srv = shared_server
    reset(srv)
    srv.client().prefetch("a")
    srv.client().prefetch("x")
    s = srv.status()
    assert s.pool_used == s.pool_size == (store.blocks("a") + store.blocks("x")) * BLOCK
    sd, stats = load("big", srv)
    assert stats["streamed"] is True
    store.check("big", sd)
    s = assert_consistent(srv)
    assert names(s) == {"x"}  # the least recently used one made room


def test_no_server_at_address(tmp_path):
    for address in (f"unix://{tmp_path}/none.sock", str(tmp_path / "none.sock")):
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            sllm_store.load_state_dict("mixed", store=address)
        with pytest.raises(StoreUnavailableError):
            StoreClient(address).health(timeout=2.0)
        assert time.monotonic() - t0 < 10


def test_pool_exhausted_while_models_in_use(store, start_server):
    # the pool holds "a" (5 blocks) and 3 free blocks; "b" needs 5
    srv = start_server(pool="8MiB", delay=2.0)
    run = Background(lambda: load("a", srv))

    def a_in_use() -> bool:
        return any(m.name == "a" and m.in_use and m.tier == "dram" for m in srv.status().models)

    wait_until(a_in_use, 30, "'a' to be cached and in use")
    with pytest.raises(PoolExhaustedError, match="in use"):
        srv.client().prefetch("b")
    with pytest.raises(PoolExhaustedError):
        srv.client().evict("a")
    assert srv.client().prefetch("x").hit is False  # what fits the free blocks is cached
    run.join(30)
    assert run.error is None, repr(run.error)
    store.check("a", run.value[0])

    # once the load is over "a" is idle: "x" (least recently used) and then "a" give way
    assert srv.client().prefetch("b").hit is False
    s = assert_consistent(srv)
    assert names(s) == {"b"} and s.evictions == 2


# --------------------------------------------------------------------------------------------
# 6. LRU and evict
# --------------------------------------------------------------------------------------------


def test_lru_eviction_and_evict(store, shared_server, capsys):
    from sllm_store.cli import main

    srv = shared_server  # 8 MiB: two of x, y, z (3 blocks each) fit, not three
    s0 = reset(srv)
    client = srv.client()
    assert client.prefetch("x").hit is False
    assert client.prefetch("x").hit is True
    assert client.prefetch("y").hit is False
    sd, stats = load("x", srv)  # "x" is now the most recently used
    assert stats["hit"] is True
    store.check("x", sd)
    assert client.prefetch("z").hit is False

    s = assert_consistent(srv)
    assert names(s) == {"x", "z"}
    assert [m.name for m in s.models] == ["z", "x"]  # most recently used first
    assert s.evictions - s0.evictions == 1
    assert s.pool_used == (store.blocks("x") + store.blocks("z")) * BLOCK

    assert client.evict("x") == ["x"]
    assert client.evict("x") == []
    assert names(assert_consistent(srv)) == {"z"}

    capsys.readouterr()
    assert main(["evict", "z", "--store", srv.address]) == 0
    assert "evicted: z" in capsys.readouterr().out
    assert main(["evict", "--store", srv.address]) == 0
    assert "nothing evicted" in capsys.readouterr().out
    s = assert_consistent(srv)
    assert not s.models and s.pool_used == 0 and s.evictions - s0.evictions == 3

    sd, stats = load("y", srv)
    assert stats["hit"] is False
    store.check("y", sd)


# --------------------------------------------------------------------------------------------
# 7. Stop and restart
# --------------------------------------------------------------------------------------------


def test_sigterm_restart_same_socket(store, start_server):
    before = tree_digests(store.root)
    srv = start_server(pool="16MiB")
    assert stat.S_ISSOCK(os.stat(srv.sock).st_mode)
    assert stat.S_IMODE(os.stat(srv.sock).st_mode) == 0o600
    store.check("mixed", sllm_store.load_state_dict("mixed", store=srv.address))
    srv.client().prefetch("a")
    assert names(srv.status()) == {"mixed", "a"}

    t0 = time.monotonic()
    rc = srv.terminate(timeout=20)
    assert rc == 0, f"exit status {rc}:\n{srv.log()}"
    assert time.monotonic() - t0 < 5
    assert not os.path.exists(srv.sock)
    assert tree_digests(store.root) == before

    srv2 = start_server(pool="16MiB")  # same socket path
    assert srv2.sock == srv.sock
    assert stat.S_IMODE(os.stat(srv2.sock).st_mode) == 0o600
    sd, stats = load("mixed", srv2)  # through the client channel of the first server
    store.check("mixed", sd)
    assert stats["hit"] is False  # a new, empty cache
    assert names(srv2.status()) == {"mixed"}
    assert srv2.terminate() == 0
    assert tree_digests(store.root) == before


# --------------------------------------------------------------------------------------------
# 8. Command line
# --------------------------------------------------------------------------------------------


def test_cli_status_prefetch_load_evict(store, shared_server, capsys):
    from sllm_store.cli import main

    srv = shared_server
    reset(srv)

    def cli(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, err = cli("status", "--store", srv.address)
    assert rc == 0, err
    assert "no models in the pool" in out and "pool:" in out and str(store.root) in out
    rc, out, err = cli("prefetch", "mixed", "sub/nested", "--store", srv.address)
    assert rc == 0, err
    assert "mixed: cached" in out and "sub/nested: cached" in out
    rc, out, err = cli("prefetch", "mixed", "--store", srv.address)
    assert rc == 0 and "mixed: already cached" in out
    rc, out, err = cli("status", "--store", srv.address)
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("mixed ")]
    assert len(lines) == 1 and "dram" in lines[0], out
    assert "sub/nested" in out
    rc, out, err = cli("status", "--json", "--store", srv.address)
    assert rc == 0, err
    assert {m["name"] for m in json.loads(out)["status"]["models"]} == {"mixed", "sub/nested"}

    rc, out, err = cli("load", "mixed", "--store", srv.address)
    assert rc == 0, err
    assert f"store {srv.address}: hit" in out
    rc, out, err = cli("evict", "mixed", "--store", srv.address)
    assert rc == 0 and "evicted: mixed" in out
    rc, out, err = cli("load", "mixed", "--store", srv.address, "--verify")
    assert rc == 0, err
    assert f"store {srv.address}: miss" in out
    rc, out, err = cli("load", "big", "--store", srv.address)
    assert rc == 0, err
    assert "miss (streamed)" in out

    # the real entry point, in its own process
    proc = run_cli("load", "mixed", "--store", srv.address, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "loaded" in proc.stdout and f"store {srv.address}: hit" in proc.stdout

    dead = f"unix://{srv.sock}.none"
    for args in (
        ("load", "nope", "--store", srv.address),
        ("prefetch", "../outside", "--store", srv.address),
        ("prefetch", "big", "--store", srv.address),
        ("load", "corrupt/bad2", "--verify", "--store", srv.address),
        ("evict", "--store", dead),
        ("status", "--store", dead),
    ):
        rc, out, err = cli(*args)
        assert rc == 1, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert "Traceback" not in err
    # and one error from a separate process: nothing but the one line on stderr
    proc = run_cli("status", "--store", dead, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("error: ") and "not reachable" in proc.stderr


def test_load_waits_for_blocks_held_by_loads_in_progress(store, start_server):
    # "a" (5 blocks) and "x" (3 blocks) fill the 8-block pool and are both in use by slow loads:
    # a load of "b" finds no free block at all, waits for one of them to finish, then streams.
    srv = start_server(pool="8MiB", delay=1.5)
    srv.client().prefetch("a")
    srv.client().prefetch("x")
    runs = [Background(lambda n=n: load(n, srv)) for n in ("a", "x")]

    def both_in_use() -> bool:
        return {m.name for m in srv.status().models if m.in_use} == {"a", "x"}

    wait_until(both_in_use, 30, "'a' and 'x' in use")
    t0 = time.monotonic()
    sd, report = load("b", srv)
    assert time.monotonic() - t0 > 0.5  # it waited
    store.check("b", sd)
    for run in runs:
        run.join(30)
        assert run.error is None, repr(run.error)
    assert_consistent(srv)


def test_host_destinations_must_be_sealed_memfds(store, start_server, monkeypatch):
    """The server maps a client's host memory only as a memfd sealed against shrinking: the
    client cannot truncate it under the server's copy (SIGBUS), and an unsealed one is refused."""
    import fcntl

    from sllm_store.server import client as client_module

    srv = start_server()
    name = next(iter(store.models))
    before = shm_files()
    shm = client_module.SharedMemory(1 << 20)
    with pytest.raises(PermissionError):  # sealed: the client cannot shrink it
        os.ftruncate(shm.fd, 4096)
    shm.unlink()

    class Unsealed(client_module.SharedMemory):
        def __init__(self, size: int) -> None:
            real = fcntl.fcntl
            monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, *a: 0 if cmd == fcntl.F_ADD_SEALS
                                else real(fd, cmd, *a))
            try:
                super().__init__(size)
            finally:
                monkeypatch.setattr(fcntl, "fcntl", real)

    monkeypatch.setattr(client_module, "SharedMemory", Unsealed)
    with pytest.raises(sllm_store.FormatError, match="not a memfd sealed"):
        load(name, srv)
    monkeypatch.undo()
    out, _ = load(name, srv)
    store.check(name, out)
    assert shm_files() == before  # memfds have no path: nothing in /dev/shm, ever


def test_plain_safetensors_model_directory_is_served(start_server, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    sd = {"a": torch.randn(33, 17, generator=g), "b": torch.randn(1000, generator=g).to(torch.bfloat16),
          "c": torch.arange(7, dtype=torch.int8)}
    root = tmp_path / "st-models"
    (root / "plain").mkdir(parents=True)
    save_file(sd, root / "plain" / "model.safetensors")  # unaligned offsets, no checksums
    (root / "plain" / "config.json").write_text("{}")
    srv = start_server(storage=root, pool="8MiB")
    for expect_hit in (False, True):
        out, report = load("plain", srv)
        assert report["hit"] is expect_hit
        assert_state_dict_identical(out, sd, check_order=False)


def test_streaming_model_through_the_server(start_server, tmp_path):
    """``load_model(stream=True)`` of a model the server holds: the logits equal a blocking load's."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    sllm_store.convert(tmp_path / "hf", tmp_path / "models" / "llama", quiet=True)
    srv = start_server(storage=tmp_path / "models", pool="8MiB")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        blocking = sllm_store.load_model("llama", device_map="cpu", store=srv.address)(ids).logits
        streamed = sllm_store.load_model("llama", device_map="cpu", store=srv.address, stream=True)
        assert torch.equal(streamed(ids).logits, blocking)
    assert streamed.sllm_load.result_report(timeout=60).stats["io_mode"] == "store"


def test_fifo_in_the_storage_path_is_an_error_not_a_hang(start_server, tmp_path):
    """A FIFO where a data file should be: each load fails at once with FormatError, and the
    server keeps serving (no load slot is held by a hung open)."""
    root = tmp_path / "fifo-models"
    sllm_store.save_state_dict({"w": torch.randn(64, 64)}, root / "good", quiet=True)
    bad = sllm_store.save_state_dict({"w": torch.randn(64, 64)}, root / "bad", quiet=True)
    data = next(bad.glob("*.bin"))
    data.unlink()
    os.mkfifo(data)
    srv = start_server(storage=root, pool="8MiB", args=("--max-loads", "2"))
    for _ in range(4):  # more than the server's load slots
        t0 = time.monotonic()
        with pytest.raises(sllm_store.FormatError, match="not a regular file"):
            load("bad", srv)
        assert time.monotonic() - t0 < 10
    out, _ = load("good", srv)
    assert set(out) == {"w"}
    assert_consistent(srv)


@pytest.mark.parametrize("kind", ["data_file", "safetensors"])
def test_data_files_linked_out_of_the_storage_path_are_not_served(start_server, tmp_path, kind):
    """A symlink inside the storage path to a file outside it is refused (PathEscapeError), for
    a converted checkpoint's data file and a safetensors model alike."""
    from safetensors.torch import save_file

    root, outside = tmp_path / "linked-models", tmp_path / "outside"
    outside.mkdir()
    if kind == "data_file":
        sllm_store.save_state_dict({"w": torch.randn(64, 64)}, root / "m", quiet=True)
        data = next((root / "m").glob("*.bin"))
        secret = outside / "secret.bin"
        data.rename(secret)
        data.symlink_to(secret)
    else:
        (root / "m").mkdir(parents=True)
        save_file({"w": torch.randn(8, 8)}, outside / "model.safetensors")
        (root / "m" / "model.safetensors").symlink_to(outside / "model.safetensors")
    srv = start_server(storage=root, pool="8MiB")
    with pytest.raises(sllm_store.PathEscapeError, match="link out of the storage path"):
        load("m", srv)
    assert_consistent(srv)


# --------------------------------------------------------------------------------------------
# PooledModels in-process: change detection, Describe consistency, links out of the storage path
# --------------------------------------------------------------------------------------------


def _cache(root: Path) -> Any:
    from sllm_store.server.models import PooledModels
    from sllm_store.server.pool import BlockPool

    return PooledModels(root, BlockPool(8 << 20, 1 << 20, pin=False), num_threads=2)


def test_in_place_rewrite_with_restored_mtime_is_not_served_stale(tmp_path) -> None:
    import ctypes

    sllm_store.save_state_dict({"w": torch.zeros(1 << 18)}, tmp_path / "m", chunk_size=1 << 20, quiet=True)
    cache = _cache(tmp_path)
    buf = (ctypes.c_char * 16)()
    dests, copies = [("cpu", ctypes.addressof(buf), 16)], [(0, 0, 0, 0, 16)]
    _json, fp, _ = cache.describe("m")
    cache.load("m", fp, copies, dests)
    assert bytes(buf) == bytes(16)
    data = tmp_path / "m" / "data-00000.bin"
    st = os.stat(data)
    time.sleep(0.01)
    with open(data, "r+b") as f:  # as `cp -p` or `rsync --inplace -t` would: same size and mtime
        f.write(b"\xff" * 16)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    _json, fp2, _ = cache.describe("m")
    assert fp2 != fp
    out = cache.load("m", fp2, copies, dests)
    assert out["hit"] is False and bytes(buf) == b"\xff" * 16


def test_describe_sends_the_index_it_fingerprinted_and_no_links_out(tmp_path) -> None:
    from safetensors.torch import save_file

    from sllm_store.server.client import index_of
    from sllm_store.server.store_pb2 import DescribeReply

    (tmp_path / "st").mkdir()
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(tmp_path / "st" / "model.safetensors"))
    outside = tmp_path.parent / f"{tmp_path.name}-secret.json"
    outside.write_text('{"secret": 1}')
    (tmp_path / "st" / "config.json").symlink_to(outside)
    (tmp_path / "st" / "generation_config.json").write_text("{}")
    cache = _cache(tmp_path)
    text, fp, small = cache.describe("st")
    assert json.loads(text)["synthesized"] == "safetensors"
    assert set(small) == {"generation_config.json"}  # the link out of the storage path is not sent
    save_file({"w": torch.arange(1000, dtype=torch.float32) + 1}, str(tmp_path / "st" / "model.safetensors"))
    text2, fp2, _ = cache.describe("st")
    assert fp2 != fp and json.loads(text2)["synthesized"] == "safetensors"
    index_of(DescribeReply(index_json=text2, fingerprint=fp2), "st")  # parses as a safetensors model


def test_serve_checks_its_arguments_before_allocating(tmp_path):
    """A missing storage path or a pool larger than the memory available fails at once, with one
    clear line, before any memory is allocated."""
    t0 = time.monotonic()
    r = run_cli("serve", "--storage-path", tmp_path / "nope", "--mem-pool-size", "1TiB", timeout=60)
    assert r.returncode == 1 and "is not a directory" in r.stderr, r.stderr
    r = run_cli("serve", "--storage-path", tmp_path, "--mem-pool-size", "64TiB", "--listen",
                f"unix://{short_tmpdir()}/x.sock", timeout=60)
    assert r.returncode == 1 and "memory available" in r.stderr and "--allow-large-pool" in r.stderr, r.stderr
    assert "allocating" not in r.stderr
    assert time.monotonic() - t0 < 30


def test_default_socket_lives_in_a_private_directory(store, tmp_path, monkeypatch):
    """The default socket is in a directory of this user that nobody else may enter; a directory
    of that name that is open to others (as another user could make it first) is refused by the
    server and by the client."""
    runtime = Path(short_tmpdir())
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    private = runtime / f"sllm-store-{os.getuid()}"
    env = {**subprocess_env(), "XDG_RUNTIME_DIR": str(runtime)}
    proc = subprocess.Popen(serve_command("--storage-path", str(store.root), "--mem-pool-size", "8MiB",
                                          "--chunk-size", str(BLOCK)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (private / "store.sock").exists(), START_TIMEOUT, "the default socket")
        assert private.stat().st_mode & 0o777 == 0o700
        client = StoreClient()
        wait_until(lambda: client.health(timeout=2.0), 30, "the server's answer")
        client.close()
    finally:
        proc.terminate()
        proc.wait(20)
    private.chmod(0o777)  # as a directory another user made would be
    r = run_cli("status")  # XDG_RUNTIME_DIR set above
    assert r.returncode == 1 and "not a private directory" in r.stderr, r.stderr
    r = subprocess.run(serve_command("--storage-path", str(store.root), "--mem-pool-size", "8MiB",
                                     "--chunk-size", str(BLOCK)), env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "not a private directory" in r.stderr, r.stderr
    shutil.rmtree(runtime, ignore_errors=True)


def test_client_refuses_a_server_of_another_user(start_server):
    """SO_PEERCRED: a server that does not run as the uid the client trusts is refused."""
    srv = start_server()
    client = StoreClient(srv.address, server_uid=os.getuid() + 4242)
    try:
        with pytest.raises(sllm_store.UntrustedStoreError, match="runs as uid"):
            client.health()
    finally:
        client.close()
    assert StoreClient.get(srv.address).health().pid == srv.proc.pid
