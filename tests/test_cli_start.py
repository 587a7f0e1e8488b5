"""``sllm-store start``: ServerlessLLM's server flags, mapped onto ``serve`` (sllm_store.server.compat).

The mapping is tested on the parsed flags directly; one real ``sllm-store start`` process on a free
TCP port serves a load and stops on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import assert_state_dict_identical, random_tensor, subprocess_env

import sllm_store

pytest.importorskip("grpc")
pytest.importorskip("google.protobuf")

from sllm_store.cli import build_parser, main  # noqa: E402
from sllm_store.errors import InvalidArgumentError, SllmStoreError  # noqa: E402
from sllm_store.server.compat import parse_serverlessllm_size, start_settings  # noqa: E402
from sllm_store.server.service import make_server  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def settings(*flags: str) -> tuple[dict[str, Any], list[str]]:
    return start_settings(build_parser().parse_args(["start", *flags]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``main(["start", ...])`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        rc = main(["start", *args])
    except SystemExit as e:  # argparse usage errors
        rc = e.code if isinstance(e.code, int) else 1
    return rc, capsys.readouterr().err


def test_defaults_are_loopback_8073() -> None:
    kwargs, warnings = settings()
    assert kwargs == {"storage_path": "./models", "mem_pool_size": 4 * GiB, "listen": "127.0.0.1:8073",
                      "num_threads": None, "block_size": 32 * MiB}
    assert warnings == []


def test_every_flag_maps_to_serve() -> None:
    kwargs, warnings = settings("--host", "127.0.0.2", "--port", "9001", "--storage-path", "/data/models",
                                "--num-thread", "7", "--chunk-size", "16MB", "--mem-pool-size", "2GB",
                                "--disk-size", "64GB", "--registration-required", "false")
    assert kwargs == {"storage_path": "/data/models", "mem_pool_size": 2 * GiB, "listen": "127.0.0.2:9001",
                      "num_threads": 7, "block_size": 16 * MiB}
    assert len(warnings) == 1 and "--disk-size 64GB" in warnings[0] and "no effect" in warnings[0]


@pytest.mark.parametrize("value,expected", [
    ("32MB", 32 * MiB), ("32mb", 32 * MiB), ("32M", 32 * MiB), ("4GB", 4 * GiB), ("1.5GB", 3 * GiB // 2),
    ("4096KB", 4 * GiB // 1024), ("64MiB", 64 * MiB), ("1GiB", GiB), ("4096", 4096),
])
def test_sizes_as_serverlessllm_reads_them(value: str, expected: int) -> None:
    assert parse_serverlessllm_size(value, "--chunk-size") == expected


@pytest.mark.parametrize("value", ["lots", "32XB", "-1MB", "0", "100", "32", "1.0001MB"])
def test_bad_sizes(value: str) -> None:
    with pytest.raises(InvalidArgumentError, match="--chunk-size"):
        parse_serverlessllm_size(value, "--chunk-size")


@pytest.mark.parametrize("host,listen,warns", [
    ("0.0.0.0", "0.0.0.0:8073", True), ("::", "[::]:8073", True), ("10.1.2.3", "10.1.2.3:8073", True),
    ("localhost", "localhost:8073", False), ("::1", "[::1]:8073", False), ("[::1]", "[::1]:8073", False),
])
def test_hosts(host: str, listen: str, warns: bool) -> None:
    kwargs, warnings = settings("--host", host)
    assert kwargs["listen"] == listen
    assert any("reachable from the network" in w for w in warnings) == warns


@pytest.mark.parametrize("value,ignored", [("true", True), ("True", True), ("1", True), ("yes", True),
                                           ("false", False), ("False", False), ("0", False), ("no", False)])
def test_registration_required(value: str, ignored: bool) -> None:
    _, warnings = settings("--registration-required", value)
    assert any("--registration-required true is ignored" in w for w in warnings) == ignored


@pytest.mark.parametrize("flags,named", [
    (["--chunk-size", "32XB"], "--chunk-size"), (["--mem-pool-size", "4 gigs"], "--mem-pool-size"),
    (["--disk-size", "big"], "--disk-size"),
    (["--registration-required", "maybe"], "--registration-required"),
    (["--port", "0"], "--port"), (["--port", "70000"], "--port"), (["--num-thread", "0"], "--num-thread"),
    (["--host", "unix:///tmp/x.sock"], "--host"), (["--host", "a b"], "--host"),
    (["--storage-path", "/nonexistent/sllm-start"], "storage path"),
])
def test_bad_values_are_one_line_errors(capsys: pytest.CaptureFixture, flags: list[str], named: str) -> None:
    rc, err = run_main(capsys, "--port", str(free_port()), *flags)
    assert rc == 1, err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err


@pytest.mark.parametrize("flags", [["--server-port", "8073"], ["--num-threads", "4"], ["--num", "4"],
                                   ["--listen", "8073"], ["--port", "http"], ["--registration-required"]])
def test_unknown_flags_are_usage_errors(capsys: pytest.CaptureFixture, flags: list[str]) -> None:
    rc, err = run_main(capsys, *flags)
    assert rc == 2 and "usage:" in err and "Traceback" not in err, err


def test_all_interfaces_warns(capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """The warning is logged before anything is checked (here the storage path fails)."""
    with caplog.at_level(logging.WARNING, logger="sllm_store"):
        rc, err = run_main(capsys, "--host", "0.0.0.0", "--storage-path", "/nonexistent/sllm-start")
    assert rc == 1 and "storage path" in err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("0.0.0.0:8073" in w and "reachable from the network" in w for w in warnings), warnings


def _bind(address: str) -> None:
    """Bind the server's socket as ``serve`` does first, then let it go."""
    server, _ = make_server(address, 1)
    server.stop(None)


def test_port_in_use_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(SllmStoreError, match="in use"):
            _bind(f"127.0.0.1:{s.getsockname()[1]}")
    _bind(f"127.0.0.1:{free_port()}")


def test_a_port_in_use_is_refused_before_the_pool_is_allocated(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "sllm_store", "serve", "--listen", f"127.0.0.1:{s.getsockname()[1]}",
               "--storage-path", str(tmp_path / "models"), "--mem-pool-size", "512GiB", "--allow-large-pool"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert r.returncode == 1 and "in use" in r.stderr, r.stderr[-2000:]
    assert "allocating" not in r.stderr and time.monotonic() - t0 < 60


def test_start_serves_a_load_and_stops_on_sigterm(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(8073)
    saved = {"embed.weight": random_tensor(torch.bfloat16, (64, 48), g),
             "layer.0.bias": random_tensor(torch.float32, (300,), g),
             "steps": torch.arange(11, dtype=torch.int64)}
    storage = tmp_path / "models"
    storage.mkdir()
    sllm_store.save_state_dict(saved, storage / "tiny", quiet=True)
    port = free_port()
    log_path = tmp_path / "start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sllm_store", "start", "--port", str(port), "--storage-path", str(storage),
             "--mem-pool-size", "16MB", "--chunk-size", "1MB", "--num-thread", "2"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=subprocess_env(),
        )
    try:
        deadline = time.monotonic() + 30
        while " serving " not in log_path.read_text():
            assert proc.poll() is None, f"start exited with {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"start did not serve within 30 s:\n{log_path.read_text()}"
            time.sleep(0.05)
        assert f"127.0.0.1:{port}" in log_path.read_text()
        if Path("/dev/shm").is_dir():  # CPU destinations are shared memory
            loaded = sllm_store.load_state_dict("tiny", store=f"127.0.0.1:{port}")
            assert_state_dict_identical(loaded, saved)
        with pytest.raises(SllmStoreError, match="in use"):  # a second server on the port is refused
            _bind(f"127.0.0.1:{port}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert "sllm-store server stopped" in log_path.read_text()


def test_serve_refuses_a_tcp_port_in_use(tmp_path: Path) -> None:
    """gRPC would share a port (SO_REUSEPORT); the server turns that off: a second one fails."""
    from _helpers import subprocess_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sllm_store", "serve", "--storage-path", str(tmp_path), "--mem-pool-size",
           "8MiB", "--chunk-size", "1MiB", "--listen", f"127.0.0.1:{port}"]
    first = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as c:
                if c.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert first.poll() is None and time.monotonic() < deadline, "the first server did not start"
            time.sleep(0.1)
        second = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and "cannot listen" in second.stderr, second.stderr
    finally:
        first.terminate()
        first.wait(30)
