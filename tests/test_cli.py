"""The ``sllm-store`` command line, run as ``python -m sllm_store`` (and the console script)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from _helpers import (
    INDEX_NAME,
    assert_state_dict_identical,
    assert_tensor_identical,
    random_tensor,
    read_index_json,
    run_cli,
    subprocess_env,
    write_index_json,
)

import sllm_store

SUBCOMMANDS = ["convert", "verify", "info", "load"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run ``sllm_store.cli.main(ARGS)`` in this process (much faster than a subprocess, which
    pays for importing torch every time); returns a Result like subprocess.run's."""
    from sllm_store.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors, --help
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return Result(rc, out, err)

    return run


def assert_clean_error(proc, *names_any: str) -> str:
    """Non-zero exit, exactly one line on stderr naming one of ``names_any``, no traceback."""
    assert proc.returncode not in (0, None), proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {proc.stderr!r}"
    if names_any:
        assert any(n in lines[0] for n in names_any), f"{lines[0]!r} does not name {names_any}"
    return lines[0]


@pytest.fixture
def small_model_dir(tmp_path):
    """A tiny HF-like directory (one model.safetensors + config.json), no transformers needed."""
    from safetensors.torch import save_file

    g = torch.Generator()
    g.manual_seed(21)
    sd = OrderedDict(
        [
            ("embed.weight", random_tensor(torch.float32, (64, 32), g)),
            ("layer.0.weight", random_tensor(torch.float16, (32, 32), g)),
            ("layer.0.bias", (torch.randn(32, generator=g)).to(torch.float32)),
            ("steps", torch.arange(7, dtype=torch.int64)),
            ("mask", random_tensor(torch.bool, (9,), g)),
        ]
    )
    src = tmp_path / "model"
    src.mkdir()
    save_file(sd, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return src, sd


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert f"sllm-store {sllm_store.__version__}" in proc.stdout + proc.stderr
    assert "0.1.0" in proc.stdout + proc.stderr


def test_help():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for sub in SUBCOMMANDS:
        assert sub in proc.stdout


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(sub):
    proc = run_cli(sub, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
    assert sub in proc.stdout


@pytest.mark.parametrize(
    "sub,flags",
    [
        ("convert", ["--dtype", "--chunk-size", "--num-files", "--overwrite", "--quiet"]),
        ("load", ["--device", "--verify", "--num-threads"]),
    ],
)
def test_subcommand_flags_documented(sub, flags):
    out = run_cli(sub, "--help").stdout
    for flag in flags:
        assert flag in out, flag


def test_console_script():
    exe = shutil.which("sllm-store")
    if exe is None:
        pytest.skip("the sllm-store console script is not installed")
    proc = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=60, env=subprocess_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert "0.1.0" in proc.stdout + proc.stderr


def test_convert_verify_info_load_subprocess(tmp_path, small_model_dir, cli):
    src, sd = small_model_dir
    dst = tmp_path / "out.sllm"
    proc = run_cli("convert", src, dst, "--chunk-size", "16KiB", "--num-files", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    index = read_index_json(dst)
    assert index["chunk_size"] == 16384
    assert len(index["files"]) == 2
    assert (dst / "config.json").read_text() == (src / "config.json").read_text()
    assert_state_dict_identical(sllm_store.load_state_dict(dst), sd, check_order=False)

    proc = run_cli("load", dst, "--device", "cpu", "--verify", "--num-threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^  steps: opening [0-9.]+ s, planning and memory [0-9.]+ s, moving the bytes "
                     r"[0-9.]+ s, tensors [0-9.]+ s$", proc.stdout, re.M), proc.stdout

    proc = cli("verify", dst)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""

    proc = cli("info", dst)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()

    proc = cli("load", dst)
    assert proc.returncode == 0, proc.stderr


def test_errors_subprocess(tmp_path):
    """The real process: exit status 1, one line on stderr, no traceback."""
    path = tmp_path / "nope"
    proc = run_cli("verify", path)
    assert_clean_error(proc, "nope")
    assert proc.returncode == 1


def test_convert_dtype_flag(tmp_path, small_model_dir, cli):
    src, sd = small_model_dir
    dst = tmp_path / "out"
    proc = cli("convert", src, dst, "--dtype", "bfloat16", "--quiet")
    assert proc.returncode == 0, proc.stderr
    loaded = sllm_store.load_state_dict(dst)
    for name, t in sd.items():
        expect = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert_tensor_identical(loaded[name], expect, name)


def test_convert_overwrite_flag(tmp_path, small_model_dir, cli):
    src, _ = small_model_dir
    dst = tmp_path / "out"
    assert cli("convert", src, dst, "--quiet").returncode == 0
    proc = cli("convert", src, dst, "--quiet")
    assert_clean_error(proc, str(dst), dst.name)
    proc = cli("convert", src, dst, "--quiet", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    sllm_store.verify(dst)


# --------------------------------------------------------------------------------------------
# errors: non-zero exit, one line on stderr, no traceback
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["verify", "info", "load"])
def test_missing_checkpoint(tmp_path, sub, cli):
    path = tmp_path / "nope"
    assert_clean_error(cli(sub, path), "nope")


@pytest.mark.parametrize("sub", ["verify", "info", "load"])
def test_garbage_index(tmp_path, sub, cli):
    path = tmp_path / "ckpt"
    sllm_store.save_state_dict({"a": torch.ones(3)}, path, quiet=True)
    (path / INDEX_NAME).write_text("garbage{")
    assert_clean_error(cli(sub, path), INDEX_NAME)


@pytest.mark.parametrize("sub", ["verify", "info", "load"])
def test_unsupported_version(tmp_path, sub, cli):
    path = tmp_path / "ckpt"
    sllm_store.save_state_dict({"a": torch.ones(3)}, path, quiet=True)
    index = read_index_json(path)
    index["version"] = 3  # 2 (compression) is supported; 3 is not
    write_index_json(path, index)
    assert_clean_error(cli(sub, path), INDEX_NAME)


def test_truncated_data_file(tmp_path, cli):
    path = tmp_path / "ckpt"
    sllm_store.save_state_dict({"a": torch.ones(3000)}, path, quiet=True)
    with open(path / "data-00000.bin", "r+b") as f:
        f.truncate(100)
    assert_clean_error(cli("load", path), "data-00000.bin")
    assert_clean_error(cli("verify", path), "data-00000.bin")


def test_corrupted_data_file(tmp_path, cli):
    path = tmp_path / "ckpt"
    sllm_store.save_state_dict({"a": torch.ones(3000)}, path, quiet=True)
    with open(path / "data-00000.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\xff")
    line = assert_clean_error(cli("verify", path), "data-00000.bin")
    assert "checksum" in line.lower()
    line = assert_clean_error(cli("load", path, "--verify"), "data-00000.bin")
    assert cli("load", path).returncode == 0  # no verification requested


def test_convert_errors(tmp_path, small_model_dir, cli):
    src, _ = small_model_dir
    assert_clean_error(cli("convert", tmp_path / "missing", tmp_path / "o1"), "missing")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3 + b"garbage")
    assert_clean_error(cli("convert", garbage, tmp_path / "o2"), "garbage.safetensors")
    assert not (tmp_path / "o2").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(cli("convert", empty, tmp_path / "o3"), "empty")
    assert_clean_error(cli("convert", src, tmp_path / "o4", "--dtype", "float128"))
    assert not (tmp_path / "o4").exists()


def test_bad_device(tmp_path, cli):
    path = tmp_path / "ckpt"
    sllm_store.save_state_dict({"a": torch.ones(3)}, path, quiet=True)
    assert_clean_error(cli("load", path, "--device", "banana"), "banana")
    if not torch.cuda.is_available():
        assert_clean_error(cli("load", path, "--device", "cuda:0"), "cuda")


def test_usage_errors():
    for args in ([], ["convert"], ["frobnicate"], ["convert", "a", "b", "--chunk-size", "lots"]):
        proc = run_cli(*args)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "usage" in proc.stderr.lower(), proc.stderr


def test_unexpected_errors_are_one_line(monkeypatch, capsys) -> None:
    from sllm_store import cli

    def boom(args):
        raise RuntimeError("something no check foresaw")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    assert cli.main(["info", "anything"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected RuntimeError: something no check foresaw")
    assert "Traceback" not in err


def test_reading_commands_do_not_import_torch(tmp_path):
    """`info` and `status` read JSON and talk to the server: no torch import (it costs seconds)."""
    from _helpers import subprocess_env

    ckpt = sllm_store.save_state_dict({"w": torch.ones(4)}, tmp_path / "m.sllm", quiet=True)
    for args in (["info", str(ckpt)], ["info", str(ckpt), "--json"],
                 ["status", "--store", f"unix://{tmp_path}/nowhere.sock"]):
        code = f"import sys; from sllm_store.cli import main; main({args!r}); print('torch' in sys.modules)"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env=subprocess_env())
        assert r.stdout.strip().splitlines()[-1] == "False", (args, r.stdout, r.stderr)


def test_verbose_after_the_command(tmp_path):
    ckpt = sllm_store.save_state_dict({"w": torch.ones(4)}, tmp_path / "m.sllm", quiet=True)
    r = run_cli("load", ckpt, "-v")
    assert r.returncode == 0 and "INFO" in r.stderr, r.stderr


def test_every_option_is_documented():
    """docs/cli.md names every command and every option of the parser."""
    import argparse
    from pathlib import Path

    from sllm_store.cli import build_parser

    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, command in sub.choices.items():
        if f"## {name}" not in doc and f", {name}" not in doc:
            missing.append(name)
        for action in command._actions:
            missing += [f"{name} {o}" for o in action.option_strings if o.startswith("--") and o not in doc]
    assert not missing, f"docs/cli.md lacks: {missing}"


def test_convert_access_order_flag(cli, tmp_path) -> None:
    import torch

    import sllm_store

    sd = {f"layers.{i}.w": torch.full((8, 8), float(i)) for i in (0, 1, 2, 10)}
    src = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(sd, src)
    r = cli("convert", src, tmp_path / "auto", "-q")
    assert r.returncode == 0 and "in access order" in r.stdout, r
    # no config.json: the names' natural order
    assert sllm_store.read_index(tmp_path / "auto").access_order == [f"layers.{i}.w" for i in (0, 1, 2, 10)]
    order = tmp_path / "order.txt"
    order.write_text("layers.10.w\n\nlayers.2.w\n")
    assert cli("convert", src, tmp_path / "file", "-q", "--access-order", order).returncode == 0
    assert sllm_store.read_index(tmp_path / "file").access_order[:2] == ["layers.10.w", "layers.2.w"]
    assert cli("convert", src, tmp_path / "none", "-q", "--access-order", "none").returncode == 0
    assert sllm_store.read_index(tmp_path / "none").access_order is None
    assert_clean_error(cli("convert", src, tmp_path / "x", "--access-order", tmp_path / "missing.txt"),
                       "InvalidArgumentError", "access-order")
    order.write_text("nope\n")
    assert_clean_error(cli("convert", src, tmp_path / "y", "--access-order", order), "InvalidArgumentError",
                       "does not store")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
