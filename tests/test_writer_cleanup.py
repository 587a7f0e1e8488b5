"""A convert stopped by SIGTERM removes its temporary directory; one killed outright (SIGKILL)
leaves it, and the next write into the same directory removes it (its writer's lock is free)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _helpers import subprocess_env

import sllm_store

# `sllm-store convert SRC DST`, each data file's write delayed, so that a test can stop it midway
SLOW_CONVERT = """
    import sys, time
    from sllm_store import writer
    from sllm_store.cli import main
    write_file = writer.CheckpointWriter._write_file
    def slow(*args, **kwargs):
        time.sleep(60)
        return write_file(*args, **kwargs)
    writer.CheckpointWriter._write_file = slow
    sys.exit(main(["convert", sys.argv[1], sys.argv[2], "-q", "--overwrite"]))
"""


def _start(src: Path, dst: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_CONVERT), str(src), str(dst)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(dst.parent.glob(".sllm-tmp-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the convert never started writing"
        time.sleep(0.05)
    return proc


@pytest.fixture
def source(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 64)}, tmp_path / "src.safetensors")
    return tmp_path / "src.safetensors"


def test_sigterm_removes_the_temporary_directory(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(source, out / "m.sllm")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []


def test_a_killed_writers_temporaries_go_with_the_next_write(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    sllm_store.save_state_dict({"old": torch.ones(3)}, out / "m.sllm", quiet=True)
    proc = _start(source, out / "m.sllm")
    proc.kill()
    proc.wait(30)
    assert list(out.glob(".sllm-tmp-*"))  # left behind
    sllm_store.save_state_dict({"v": torch.ones(2)}, out / "other.sllm", quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["m.sllm", "other.sllm"]
    assert set(sllm_store.load_state_dict(out / "m.sllm")) == {"old"}  # untouched


def test_a_live_writers_temporaries_stay(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(source, out / "m.sllm")
    try:
        sllm_store.save_state_dict({"v": torch.ones(2)}, out / "other.sllm", quiet=True)
        assert list(out.glob(".sllm-tmp-m.sllm-*"))
    finally:
        proc.kill()
        proc.wait(30)


def test_an_overwrite_killed_between_its_renames_is_undone(tmp_path: Path) -> None:
    """Killed after moving the old checkpoint aside and before moving the new one in: the next
    write puts the old one back and removes the new one's temporary directory."""
    from sllm_store.writer import remove_stale_temporaries

    old = sllm_store.save_state_dict({"old": torch.ones(3)}, tmp_path / "m.sllm", quiet=True)
    tmp = tmp_path / ".sllm-tmp-m.sllm-0123abcd"
    old.rename(tmp.with_name(tmp.name + "-old"))
    sllm_store.save_state_dict({"new": torch.ones(3)}, tmp, quiet=True)
    tmp.with_name(tmp.name + ".lock").touch()  # its writer died: nobody holds the lock
    assert remove_stale_temporaries(tmp_path) == [tmp.name]
    assert [p.name for p in tmp_path.iterdir()] == ["m.sllm"]
    assert set(sllm_store.load_state_dict(tmp_path / "m.sllm")) == {"old"}


@pytest.mark.parametrize("how", ["save_state_dict", "convert"])
def test_a_failed_write_is_a_write_error_and_leaves_nothing(tmp_path: Path, source: Path, how: str) -> None:
    """A write that fails for the file system (here a 1 MiB file size limit, as a full disk would)
    is a WriteError (an SllmStoreError and an OSError) from the Python API, with nothing left."""
    script = textwrap.dedent("""
        import resource, signal, sys, torch, sllm_store
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            if sys.argv[1] == "convert":
                sllm_store.convert(sys.argv[2], sys.argv[3], quiet=True)
            else:
                sllm_store.save_state_dict({"w": torch.randn(1024, 1024)}, sys.argv[3], quiet=True)
        except sllm_store.WriteError as e:
            assert isinstance(e, OSError)
            print("WriteError", e)
    """)
    from safetensors.torch import save_file

    save_file({"w": torch.randn(1024, 1024)}, source)  # 4 MiB
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", script, how, str(source), str(out / "m.sllm")],
                       capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert r.returncode == 0 and r.stdout.startswith("WriteError"), r.stdout + r.stderr
    assert list(out.iterdir()) == []
