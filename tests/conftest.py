"""Fixtures for the sllm-store test suite (CPU only unless marked ``gpu``)."""

from __future__ import annotations

import json
import os
import shutil
import types
from collections import OrderedDict
from pathlib import Path

# Never touch the Hugging Face hub: everything is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from _helpers import DTYPES, EXTRA_FILES, StateDict, random_tensor  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(1234)
    return g


def _make_state_dict(
    dtypes=None,
    shapes=((7, 13),),
    seed: int = 0,
    prefix: str = "t",
) -> OrderedDict:
    """One random tensor per (dtype, shape), named ``{prefix}.{dtype}.{i}``, in a stable order."""
    g = torch.Generator()
    g.manual_seed(seed)
    out: OrderedDict = StateDict()
    for dtype in DTYPES if dtypes is None else dtypes:
        for i, shape in enumerate(shapes):
            name = f"{prefix}.{str(dtype).replace('torch.', '')}.{i}"
            out[name] = random_tensor(dtype, shape, g)
    return out


@pytest.fixture
def make_state_dict():
    """Factory: ``make_state_dict(dtypes=None, shapes=((7, 13),), seed=0, prefix='t')``."""
    return _make_state_dict


@pytest.fixture
def mixed_state_dict() -> OrderedDict:
    """Every dtype, with a matrix, a scalar, a zero-size tensor and a 1-D tensor each."""
    return _make_state_dict(shapes=((5, 33), (), (3, 0, 2), (1000,)), seed=7)


@pytest.fixture
def saved_checkpoint(tmp_path, mixed_state_dict):
    """A freshly saved checkpoint with several chunks and 2 data files: (path, state_dict)."""
    import sllm_store

    sd = StateDict(mixed_state_dict)
    g = torch.Generator()
    g.manual_seed(99)
    sd["big.a"] = random_tensor(torch.float32, (64, 400), g)  # 100 KiB, several 16 KiB chunks
    sd["big.b"] = random_tensor(torch.bfloat16, (50_000,), g)
    path = tmp_path / "ckpt"
    sllm_store.save_state_dict(sd, path, chunk_size=4 * 4096, num_files=2, quiet=True)
    return path, sd


@pytest.fixture
def tmpfs_dir():
    """A fresh directory on tmpfs (/dev/shm), where O_DIRECT is usually not supported."""
    base = Path("/dev/shm")
    if not base.is_dir() or not os.access(base, os.W_OK):
        pytest.skip("/dev/shm is not available")
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="sllm-test-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# A tiny Llama built locally and saved in the layouts that convert() must understand.
# --------------------------------------------------------------------------------------------

TINY_LLAMA_KWARGS = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _write_extras(d: Path) -> None:
    for name, text in EXTRA_FILES.items():
        (d / name).write_text(text)


def _save_torch_bin(model, d: Path, state_dict: dict, shards: int) -> None:
    """Save config files with save_pretrained and weights as pytorch_model*.bin.

    ``save_pretrained(safe_serialization=False)`` is tried first; recent transformers ignore it
    and write safetensors, in which case the .bin files are written by hand in the same layout.
    """
    if shards == 1:
        try:
            model.save_pretrained(d, safe_serialization=False)
        except TypeError:
            model.save_pretrained(d)
        if (d / "pytorch_model.bin").is_file() and not list(d.glob("*.safetensors")):
            return
    else:
        model.save_pretrained(d)
    for p in list(d.glob("*.safetensors")) + list(d.glob("*.safetensors.index.json")):
        p.unlink()
    for p in list(d.glob("pytorch_model*.bin")) + list(d.glob("pytorch_model.bin.index.json")):
        p.unlink()
    if shards == 1:
        torch.save(state_dict, d / "pytorch_model.bin")
        return
    names = list(state_dict)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state_dict[n] for n in names[i * per : (i + 1) * per]}
        torch.save(part, d / fname)
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random LlamaForCausalLM saved as:

    - ``dirs["sharded"]``: sharded safetensors (model-0000x-of-0000n + model.safetensors.index.json)
    - ``dirs["single"]``: one model.safetensors
    - ``dirs["bin"]``: one pytorch_model.bin
    - ``dirs["bin_sharded"]``: pytorch_model-0000x-of-00003.bin + pytorch_model.bin.index.json

    plus config.json, generation_config.json and a few tokenizer-ish files in each.
    """
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older/newer transformers
        pass

    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA_KWARGS)
    model = LlamaForCausalLM(config).eval()
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}

    g = torch.Generator()
    g.manual_seed(5)
    input_ids = torch.randint(0, config.vocab_size, (2, 11), generator=g)
    with torch.no_grad():
        logits = model(input_ids).logits.clone()

    root = tmp_path_factory.mktemp("tiny_llama")
    dirs = {}

    d = root / "sharded"
    model.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("model-*.safetensors"))) > 1
    dirs["sharded"] = d

    d = root / "single"
    model.save_pretrained(d)
    assert (d / "model.safetensors").is_file()
    dirs["single"] = d

    d = root / "bin"
    _save_torch_bin(model, d, state_dict, shards=1)
    dirs["bin"] = d

    d = root / "bin_sharded"
    _save_torch_bin(model, d, state_dict, shards=3)
    dirs["bin_sharded"] = d

    for d in dirs.values():
        _write_extras(d)
        assert (d / "config.json").is_file()
        assert (d / "generation_config.json").is_file()

    return types.SimpleNamespace(
        config=config,
        model=model,
        state_dict=state_dict,
        input_ids=input_ids,
        logits=logits,
        dirs=dirs,
        root=root,
    )


@pytest.fixture(scope="session")
def fake_libcuda(tmp_path_factory) -> Path:
    """A CPU stand-in for the CUDA driver (tests/fake_cuda.cpp), built once; point
    ``SLLM_STORE_LIBCUDA`` at it in a fresh process (see tests/test_fake_cuda.py)."""
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the fake CUDA driver")
    out = tmp_path_factory.mktemp("fakecuda") / "libfakecuda.so"
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread",
                    str(Path(__file__).resolve().parent / "fake_cuda.cpp"), "-o", str(out)], check=True)
    return out
