"""A FIFO (or any file that is not a regular one) where a data file, an index or a safetensors
file should be is a clean error, at once: never a load that hangs in open() or read()."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _helpers import subprocess_env

import sllm_store


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    sd = {"w": torch.randn(256, 64), "b": torch.arange(10)}
    return sllm_store.save_state_dict(sd, tmp_path / "m.sllm", chunk_size="16KiB", quiet=True)


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _run(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh process, so that a hang fails the test instead of the suite."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env())


LOAD = """
    import sys, sllm_store
    try:
        if sys.argv[2] == "verify":
            sllm_store.verify(sys.argv[1])
        else:
            sllm_store.load_state_dict(sys.argv[1], io_mode=sys.argv[2])
    except sllm_store.SllmStoreError as e:
        print(type(e).__name__, e)
"""


@pytest.mark.parametrize("how", ["auto", "buffered", "direct", "mmap", "verify"])
def test_fifo_data_file_is_a_format_error(checkpoint: Path, how: str) -> None:
    data = next(checkpoint.glob("*.bin"))
    _replace_with_fifo(data)
    r = _run(LOAD, str(checkpoint), how)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("FormatError") and "not a regular file" in r.stdout, r.stdout


def test_fifo_index_is_not_read(checkpoint: Path) -> None:
    _replace_with_fifo(checkpoint / "sllm_index.json")
    r = _run(LOAD, str(checkpoint), "auto")
    assert r.returncode == 0 and r.stdout.startswith("MissingFileError"), r.stdout + r.stderr


def test_fifo_safetensors_file_is_a_format_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.randn(4, 4)}, model / "model-00001-of-00002.safetensors")
    save_file({"v": torch.randn(4)}, model / "model-00002-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}')
    _replace_with_fifo(model / "model-00002-of-00002.safetensors")
    r = _run(LOAD, str(model), "auto")
    assert r.returncode == 0, r.stderr
    assert "Error" in r.stdout and "not a regular file" in r.stdout, r.stdout


def test_directory_as_data_file_is_a_format_error(checkpoint: Path) -> None:
    data = next(checkpoint.glob("*.bin"))
    data.unlink()
    data.mkdir()
    with pytest.raises(sllm_store.FormatError, match="not a regular file"):
        sllm_store.load_state_dict(checkpoint)


def test_data_file_linked_out_of_the_checkpoint_is_refused(checkpoint: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    """A converted checkpoint's data file that is a link to a file elsewhere is a FormatError,
    unless SLLM_STORE_FOLLOW_LINKS=1 says to follow it."""
    data = next(checkpoint.glob("*.bin"))
    elsewhere = tmp_path / "elsewhere.bin"
    data.rename(elsewhere)
    data.symlink_to(elsewhere)
    with pytest.raises(sllm_store.FormatError, match="outside the checkpoint directory"):
        sllm_store.load_state_dict(checkpoint)
    monkeypatch.setenv("SLLM_STORE_FOLLOW_LINKS", "1")
    assert set(sllm_store.load_state_dict(checkpoint, verify=True)) == {"w", "b"}
