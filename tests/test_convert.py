"""convert(): Hugging Face model dirs, single safetensors files, torch state-dict files."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from _helpers import (
    DTYPES,
    EXTRA_FILES,
    assert_state_dict_identical,
    assert_tensor_identical,
    check_checksums,
    check_index_invariants,
    dtype_name,
    random_tensor,
    read_index_json,
    subprocess_env,
    tree_digests,
)

import sllm_store

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

LAYOUTS = ["sharded", "single", "bin", "bin_sharded"]
COPIED = ["config.json", "generation_config.json", *EXTRA_FILES]


def read_source_tensors(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model dir / file, read with safetensors or torch.load."""
    from safetensors import safe_open

    files = [src] if src.is_file() else sorted(src.glob("*.safetensors"))
    if not files or (src.is_file() and src.suffix != ".safetensors"):
        files = [src] if src.is_file() else sorted(src.glob("pytorch_model*.bin"))
        out = {}
        for f in files:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def fresh_llama(config, seed=123):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


# --------------------------------------------------------------------------------------------
# Hugging Face model directories
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_convert_hf_dir(tmp_path, tiny_llama, layout):
    src = tiny_llama.dirs[layout]
    before = tree_digests(src)
    dst = tmp_path / "out.sllm"
    ret = sllm_store.convert(src, dst, chunk_size=4 * 4096, quiet=True)
    assert isinstance(ret, Path) and ret.resolve() == dst.resolve()

    source = read_source_tensors(src)
    assert sorted(source) == sorted(tiny_llama.state_dict)
    loaded = sllm_store.load_state_dict(dst, verify=True)
    assert_state_dict_identical(loaded, source, check_order=False)
    assert_state_dict_identical(loaded, tiny_llama.state_dict, check_order=False)

    index = check_index_invariants(dst)
    check_checksums(dst)
    assert index["source"]["format"] == "huggingface"
    assert index["chunk_size"] == 4 * 4096
    sllm_store.verify(dst)

    # Non-weight files are copied verbatim; weight files are not.
    for name in COPIED:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not list(dst.glob("model*.safetensors"))
    assert not list(dst.glob("pytorch_model*.bin"))
    # The source is untouched and nothing was left beside the destination.
    assert tree_digests(src) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.sllm"]


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_converted_llama_gives_same_logits(tmp_path, tiny_llama, layout):
    dst = tmp_path / "out"
    sllm_store.convert(tiny_llama.dirs[layout], dst, quiet=True)
    loaded = sllm_store.load_state_dict(dst)
    model = fresh_llama(tiny_llama.config)
    with torch.no_grad():
        assert not torch.equal(model(tiny_llama.input_ids).logits, tiny_llama.logits)
    result = model.load_state_dict(loaded, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        logits = model(tiny_llama.input_ids).logits
    assert torch.equal(logits, tiny_llama.logits)


def test_converted_llama_bf16(tmp_path, tiny_llama):
    dst = tmp_path / "out"
    sllm_store.convert(tiny_llama.dirs["sharded"], dst, dtype=torch.bfloat16, quiet=True)
    loaded = sllm_store.load_state_dict(dst)
    for name, t in tiny_llama.state_dict.items():
        assert_tensor_identical(loaded[name], t.to(torch.bfloat16), name)
    assert {e["dtype"] for e in read_index_json(dst)["tensors"].values()} == {"bfloat16"}

    reference = copy.deepcopy(tiny_llama.model).to(torch.bfloat16)
    model = fresh_llama(tiny_llama.config).to(torch.bfloat16)
    model.load_state_dict(loaded, strict=True)
    with torch.no_grad():
        expect = reference(tiny_llama.input_ids).logits
        got = model(tiny_llama.input_ids).logits
    assert torch.equal(got, expect)


def test_convert_dtype_as_string(tmp_path, tiny_llama):
    dst = tmp_path / "out"
    sllm_store.convert(tiny_llama.dirs["single"], dst, dtype="float16", quiet=True)
    loaded = sllm_store.load_state_dict(dst)
    for name, t in tiny_llama.state_dict.items():
        assert_tensor_identical(loaded[name], t.to(torch.float16), name)


def test_convert_chunk_size_string_and_num_files(tmp_path, tiny_llama):
    dst = tmp_path / "out"
    sllm_store.convert(tiny_llama.dirs["sharded"], dst, chunk_size="8KiB", num_files=3, quiet=True)
    index = check_index_invariants(dst)
    assert index["chunk_size"] == 8192
    assert len(index["files"]) == 3
    check_checksums(dst)
    loaded = sllm_store.load_state_dict(dst, verify=True, num_threads=4)
    assert_state_dict_identical(loaded, tiny_llama.state_dict, check_order=False)


def test_num_files_splits_by_size(tmp_path):
    """num_files makes runs of about equal size: two near-equal tensors make two files (the
    second slightly larger one used to land in the first file, leaving the second empty)."""
    sd = {"a": torch.zeros(1000, 700), "b": torch.zeros(1000, 701), "c": torch.zeros(10)}
    index = sllm_store.read_index(sllm_store.save_state_dict(sd, tmp_path / "c", num_files=2, quiet=True))
    assert [sorted(t.name for t in index.tensors.values() if t.file == i) for i in range(2)] == \
        [["a"], ["b", "c"]]


def test_convert_is_deterministic(tmp_path, tiny_llama):
    a, b = tmp_path / "a", tmp_path / "b"
    sllm_store.convert(tiny_llama.dirs["sharded"], a, chunk_size="16KiB", quiet=True)
    sllm_store.convert(tiny_llama.dirs["sharded"], b, chunk_size="16KiB", quiet=True)
    assert tree_digests(a) == tree_digests(b)


def test_convert_overwrite_replaces_everything(tmp_path, tiny_llama):
    dst = tmp_path / "out"
    sllm_store.convert(tiny_llama.dirs["sharded"], dst, num_files=3, quiet=True)
    (dst / "stale.txt").write_text("old")
    sllm_store.convert(tiny_llama.dirs["bin"], dst, overwrite=True, quiet=True)
    assert not (dst / "stale.txt").exists()
    assert sorted(p.name for p in dst.glob("data-*.bin")) == ["data-00000.bin"]
    assert_state_dict_identical(sllm_store.load_state_dict(dst), tiny_llama.state_dict, check_order=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --------------------------------------------------------------------------------------------
# single files
# --------------------------------------------------------------------------------------------


SHAPES = [(6, 10), (), (0, 3)]


def _safetensors_dtypes():
    """The dtypes of DTYPES that the installed safetensors can write (in all of SHAPES)."""
    import tempfile

    from safetensors.torch import save_file

    ok = []
    with tempfile.TemporaryDirectory() as d:
        for dt in DTYPES:
            try:
                sd = {f"x{i}": random_tensor(dt, s) for i, s in enumerate(SHAPES)}
                save_file(sd, os.path.join(d, "x.safetensors"))
            except Exception:
                continue
            ok.append(dt)
    return ok


def test_convert_single_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator()
    g.manual_seed(11)
    sd = OrderedDict()
    for dt in _safetensors_dtypes():
        for suffix, shape in zip("msz", SHAPES):
            sd[f"{dtype_name(dt)}.{suffix}"] = random_tensor(dt, shape, g)
    sd["big"] = random_tensor(torch.float32, (30_000,), g)
    assert len(sd) > 20
    src = tmp_path / "weights.safetensors"
    save_file(sd, src, metadata={"format": "pt", "origin": "unit-test"})
    before = tree_digests(tmp_path)

    dst = tmp_path / "out"
    sllm_store.convert(src, dst, chunk_size="16KiB", quiet=True)
    loaded = sllm_store.load_state_dict(dst, verify=True)
    assert_state_dict_identical(loaded, sd, check_order=False)
    index = check_index_invariants(dst)
    assert index["source"]["format"] == "safetensors"
    assert index["source"]["name"] == "weights.safetensors"
    assert index["source"]["metadata"].get("origin") == "unit-test"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "weights.safetensors"]
    assert {k: v for k, v in tree_digests(tmp_path).items() if not k.startswith("out")} == before


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_convert_torch_file(tmp_path, suffix):
    g = torch.Generator()
    g.manual_seed(12)
    sd = OrderedDict()
    for dt in DTYPES:
        sd[f"{dtype_name(dt)}.m"] = random_tensor(dt, (5, 9), g)
        sd[f"{dtype_name(dt)}.s"] = random_tensor(dt, (), g)
    emb = random_tensor(torch.float32, (40, 16), g)
    sd["embed.weight"] = emb
    sd["zero"] = torch.empty((3, 0, 2), dtype=torch.int16)
    sd["lm_head.weight"] = emb  # tied: torch.save keeps the sharing
    src = tmp_path / f"model{suffix}"
    torch.save(sd, src)

    dst = tmp_path / "out"
    sllm_store.convert(src, dst, quiet=True)
    loaded = sllm_store.load_state_dict(dst, verify=True)
    assert_state_dict_identical(loaded, sd)  # torch source: source (dict) order is kept
    index = check_index_invariants(dst)
    assert index["source"]["format"] == "torch"
    assert index["tensors"]["lm_head.weight"] == {"alias_of": "embed.weight"}
    assert loaded["lm_head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()


def test_convert_torch_file_with_non_contiguous_tensors(tmp_path):
    g = torch.Generator()
    g.manual_seed(13)
    base = random_tensor(torch.bfloat16, (32, 24), g)
    sd = OrderedDict(t=base.t(), s=base[::2, 1::3], full=base)
    src = tmp_path / "nc.pt"
    torch.save(sd, src)
    dst = tmp_path / "out"
    sllm_store.convert(src, dst, quiet=True)
    assert_state_dict_identical(sllm_store.load_state_dict(dst), sd)


# --------------------------------------------------------------------------------------------
# interrupted conversion leaves nothing behind
# --------------------------------------------------------------------------------------------


def test_interrupted_convert_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    """KeyboardInterrupt while tensors are being read (after some were written) cleans up."""
    import safetensors

    real_safe_open = safetensors.safe_open
    calls = {"get_tensor": 0}

    class Handle:
        def __init__(self, *args, **kwargs):
            self._h = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._h.__enter__()
            return self

        def __exit__(self, *exc):
            return self._h.__exit__(*exc)

        def get_tensor(self, name):
            calls["get_tensor"] += 1
            if calls["get_tensor"] == 8:
                raise KeyboardInterrupt
            return self._h.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self._h, name)

    monkeypatch.setattr(safetensors, "safe_open", Handle)
    try:
        import safetensors.torch as st_torch

        monkeypatch.setattr(st_torch, "safe_open", Handle)
    except ImportError:  # pragma: no cover
        pass

    src = tiny_llama.dirs["sharded"]
    before = tree_digests(src)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model.sllm"
    with pytest.raises(KeyboardInterrupt):
        sllm_store.convert(src, dst, chunk_size="8KiB", num_files=2, quiet=True)
    assert calls["get_tensor"] >= 8, "the hook was not reached: convert reads safetensors otherwise"
    assert not dst.exists()
    assert list(out.iterdir()) == [], "temporary files left beside the destination"
    assert tree_digests(src) == before

    # An existing destination survives an interrupted overwrite untouched.
    monkeypatch.undo()
    sllm_store.convert(src, dst, quiet=True)
    good = tree_digests(dst)
    monkeypatch.setattr(safetensors, "safe_open", Handle)
    calls["get_tensor"] = 0
    with pytest.raises(KeyboardInterrupt):
        sllm_store.convert(src, dst, overwrite=True, quiet=True)
    assert tree_digests(dst) == good
    assert [p.name for p in out.iterdir()] == ["model.sllm"]


@pytest.fixture(scope="module")
def big_safetensors(tmp_path_factory):
    """~96 MB in 3000 tensors: slow enough to be interrupted while converting."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("big_src")
    g = torch.Generator()
    g.manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(8192, generator=g) for i in range(3000)}
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_text("{}")
    return d


def test_sigint_during_cli_convert(tmp_path, big_safetensors):
    src = big_safetensors
    before = tree_digests(src)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "big.sllm"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sllm_store",
            "convert",
            str(src),
            str(dst),
            "--chunk-size",
            "64KiB",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        # Wait until the conversion has visibly started writing next to the destination.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not any(out.iterdir()):
            time.sleep(0.005)
        time.sleep(0.05)
        if proc.poll() is not None:
            _, err = proc.communicate()
            if proc.returncode == 0:
                pytest.skip("convert finished before it could be interrupted")
            pytest.fail(f"convert failed on its own: {err}")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0 and dst.exists():
        pytest.skip("convert finished before the signal arrived")
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    assert not dst.exists()
    assert list(out.iterdir()) == [], "temporary files left beside the destination"
    assert tree_digests(src) == before


def test_convert_attribute_is_the_function_after_submodule_import():
    """Importing the converter module (done by the CLI and others) must not shadow the function."""
    code = (
        "import sllm_store.converter, sllm_store.cli, sllm_store.model, sllm_store\n"
        "assert callable(sllm_store.convert), type(sllm_store.convert)\n"
        "from sllm_store import convert\n"
        "assert callable(convert), type(convert)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()
    )
    assert proc.returncode == 0, proc.stderr


def test_only_the_model_directorys_top_level_files_are_copied(tmp_path):
    """Subdirectories (training checkpoints, an earlier conversion inside the model directory)
    and hidden files are not copied; config, tokenizer and model card files are."""
    from safetensors.torch import save_file

    src = tmp_path / "model"
    src.mkdir()
    save_file({"w": torch.randn(4, 4)}, src / "model.safetensors")
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    (src / "README.md").write_text("# card\n")
    (src / ".cache").mkdir()
    (src / ".cache" / "x").write_text("x")
    (src / "checkpoint-100").mkdir()
    (src / "checkpoint-100" / "optimizer.pt").write_bytes(b"0" * 1000)
    sllm_store.save_state_dict({"w": torch.ones(2)}, src / "old.sllm", quiet=True)
    dst = sllm_store.convert(src, tmp_path / "out.sllm", quiet=True)
    copied = sorted(p.name for p in dst.iterdir() if not p.name.startswith(("data-", "sllm_index")))
    assert copied == ["README.md", "config.json", "tokenizer.json"]


def test_an_engine_ready_save_copies_the_model_files_and_no_weights(tmp_path):
    """An engine-ready directory made from a converted checkpoint (or a safetensors or
    ServerlessLLM directory) gets the model's config and tokenizer files, never its data files or
    index: the ranks' own checkpoints hold the weights."""
    from safetensors.torch import save_file
    from test_serverlessllm import write_serverlessllm

    from sllm_store.vllm import _copy_model_files

    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"w": torch.randn(4, 4)}, hf / "model.safetensors")
    (hf / "config.json").write_text("{}")
    (hf / "tokenizer.json").write_text("{}")
    converted = sllm_store.convert(hf, tmp_path / "model.sllm", num_files=1, quiet=True)
    serverlessllm = write_serverlessllm({"w": torch.randn(4, 4)}, tmp_path / "sllm-layout")
    for f in ("config.json", "tokenizer.json"):
        (serverlessllm / f).write_text("{}")
    for src in (hf, converted, serverlessllm):
        out = tmp_path / f"ready-{src.name}"
        out.mkdir()
        _copy_model_files(src, out)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json"], src
