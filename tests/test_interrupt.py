"""Ctrl-C during a load: the process stops promptly with KeyboardInterrupt, and can load again."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from _helpers import subprocess_env

import sllm_store

N_TENSORS = 50
NUMEL = 1_000_000  # 4 MB of float32 each: ~200 MB in all

CHILD = textwrap.dedent(
    """
    import signal, sys
    import sllm_store

    # A shell that starts jobs in the background without job control (nohup, CI runners) has
    # them ignore SIGINT, and Python then installs no KeyboardInterrupt handler: restore it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    path, mode, io_mode = sys.argv[1], sys.argv[2], sys.argv[3]
    kw = dict(num_threads=1, io_mode=io_mode, chunk_size=1 << 20)
    sllm_store.load_state_dict(path, **kw)
    print("READY", flush=True)
    if mode == "uncaught":
        while True:
            sllm_store.load_state_dict(path, **kw)
    loops = 0
    try:
        while True:
            sllm_store.load_state_dict(path, **kw)
            loops += 1
    except KeyboardInterrupt:
        print("INTERRUPTED", loops, flush=True)
    sd = sllm_store.load_state_dict(path, num_threads=2, verify=True)
    bad = [k for i, (k, t) in enumerate(sd.items()) if not bool((t == i).all())]
    print("RECOVERED" if not bad else f"BAD {bad}", flush=True)
    """
)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("interrupt") / "big.sllm"
    sd = {f"w{i}": torch.full((NUMEL,), float(i)) for i in range(N_TENSORS)}
    sllm_store.save_state_dict(sd, path, chunk_size="4MiB", quiet=True)
    return path


def _run_and_interrupt(path, mode, io_mode, timeout=30.0):
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode, io_mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", (line, proc.stderr.read() if proc.poll() else "")
        time.sleep(0.3)  # a few loads in: the signal lands during one of them
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no exit within {timeout}s of SIGINT (hang?); stderr: {err[-2000:]}")
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err, elapsed


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_sigint_uncaught_exits_promptly(big_checkpoint, io_mode):
    rc, out, err, elapsed = _run_and_interrupt(big_checkpoint, "uncaught", io_mode)
    assert rc != 0
    assert "KeyboardInterrupt" in err, err[-2000:]
    assert elapsed < 10, f"took {elapsed:.1f}s to stop after SIGINT"


def test_sigint_caught_then_load_again(big_checkpoint):
    rc, out, err, elapsed = _run_and_interrupt(big_checkpoint, "caught", "buffered")
    assert rc == 0, err[-2000:]
    assert "INTERRUPTED" in out, (out, err[-2000:])
    assert "RECOVERED" in out, (out, err[-2000:])
    assert elapsed < 15


def test_interrupt_between_the_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch) -> None:
    import os

    dst = sllm_store.save_state_dict({"old": torch.ones(3)}, tmp_path / "m")
    real, calls = os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # dst has moved aside; the new one is not in place yet
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        sllm_store.save_state_dict({"new": torch.zeros(3)}, dst, overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    assert set(sllm_store.load_state_dict(dst)) == {"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary or trash directory left
