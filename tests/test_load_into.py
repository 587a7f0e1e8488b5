"""``load_into``: a checkpoint's tensors copied into tensors that exist already (an engine's
parameters), in place, with names, shapes and dtypes checked before any byte is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import sllm_store
from sllm_store.errors import CheckpointMismatchError, InvalidArgumentError, TruncatedFileError
from tests._helpers import assert_tensor_identical


def _targets(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors shaped like ``sd``'s, filled with a pattern the checkpoint does not hold."""
    out = {}
    for name, t in sd.items():
        z = torch.empty_like(t)
        z.reshape(-1).view(torch.uint8).fill_(0xA5)
        out[name] = z
    return out


@pytest.fixture
def ckpt(tmp_path, make_state_dict) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = make_state_dict()
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.empty(0, 4)
    sd["flags"] = torch.tensor([True, False, True])
    path = sllm_store.save_state_dict(sd, tmp_path / "m.sllm", chunk_size=1 << 16, quiet=True)
    return path, sd


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("io_mode", ["auto", "buffered", "direct"])
def test_fills_the_tensors_in_place(ckpt, io_mode, verify) -> None:
    path, sd = ckpt
    targets = _targets(sd)
    ptrs = {n: t.data_ptr() for n, t in targets.items()}
    report = sllm_store.load_into(path, targets, io_mode=io_mode, verify=verify)
    for name, t in sd.items():
        assert_tensor_identical(targets[name], t, name)
        assert targets[name].data_ptr() == ptrs[name]  # the same memory, not a new tensor
    assert report.bytes == sum(t.nbytes for t in sd.values())
    assert report.stats["tier"] == "local" and report.stats["io_mode"] != "mmap"
    timeline = [report.stats[f"{k}_seconds"] for k in ("open", "prepare", "fill", "finish")]
    assert min(timeline) >= 0 and sum(timeline) <= report.seconds
    if io_mode == "buffered" and not verify:  # each tensor's bytes read straight into it
        assert report.stats["chunks_staged"] == 0 and report.stats["chunks_direct"] > 0


def test_some_tensors_read_straight_into_place(ckpt) -> None:
    """Filling a few of the checkpoint's tensors reads their bytes only, into their memory."""
    path, sd = ckpt
    names = sorted(sd)[::3]
    targets = _targets({n: sd[n] for n in names})
    report = sllm_store.load_into(path, targets, strict=False, io_mode="buffered", verify=False)
    for name in names:
        assert_tensor_identical(targets[name], sd[name], name)
    assert report.stats["chunks_staged"] == 0
    assert report.stats["bytes_read"] == sum(sd[n].nbytes for n in names)


def test_parameters_of_a_module(tmp_path) -> None:
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    path = sllm_store.save_state_dict(src.state_dict(), tmp_path / "mlp.sllm", quiet=True)
    dst = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    sllm_store.load_into(path, dict(dst.named_parameters()))
    x = torch.randn(4, 64)
    assert torch.equal(src(x), dst(x))


def test_tied_names_and_compressed(tmp_path, make_state_dict) -> None:
    pytest.importorskip("zstandard")
    sd = make_state_dict()
    first = next(iter(sd))
    sd["tied"] = sd[first]  # stored once, an alias in the index
    path = sllm_store.save_state_dict(sd, tmp_path / "z.sllm", compress="zstd", quiet=True)
    targets = _targets(sd)  # the alias given a tensor of its own: it is filled too
    sllm_store.load_into(path, targets)
    for name, t in sd.items():
        assert_tensor_identical(targets[name], t, name)
    shared = _targets({n: t for n, t in sd.items() if n != "tied"})
    shared["tied"] = shared[first]  # or sharing the memory of its target, as a tied model does
    sllm_store.load_into(path, shared)
    assert_tensor_identical(shared["tied"], sd[first])
    only_alias = _targets({"tied": sd["tied"]})  # an alias alone loads its stored tensor
    sllm_store.load_into(path, only_alias, strict=False)
    assert_tensor_identical(only_alias["tied"], sd[first])


def test_mismatches_are_named_before_any_read(ckpt) -> None:
    path, sd = ckpt
    names = list(sd)
    targets = _targets(sd)
    before = {n: t.reshape(-1).view(torch.uint8).clone() for n, t in targets.items()}
    bad = dict(targets)
    bad["not.there"] = torch.zeros(2)
    del bad[names[0]]
    bad[names[1]] = torch.zeros(7, dtype=sd[names[1]].dtype)
    bad[names[2]] = torch.zeros(sd[names[2]].shape, dtype=torch.float64)
    with pytest.raises(CheckpointMismatchError) as e:
        sllm_store.load_into(path, bad)
    msg = str(e.value)
    assert "not.there" in msg and "missing from the checkpoint" in msg
    assert names[0] in msg and "nowhere to go" in msg
    assert names[1] in msg and "target [7]" in msg
    assert names[2] in msg and "float64" in msg
    assert isinstance(e.value, sllm_store.FormatError)
    for n, t in targets.items():  # nothing was written
        assert torch.equal(t.reshape(-1).view(torch.uint8), before[n]), n
    # A subset loads with strict=False; a non-contiguous target is refused.
    part = {names[0]: targets[names[0]]}
    sllm_store.load_into(path, part, strict=False)
    assert_tensor_identical(part[names[0]], sd[names[0]])
    big = next(n for n, t in sd.items() if t.dim() == 2 and min(t.shape) > 1)
    strided = torch.empty(tuple(reversed(sd[big].shape)), dtype=sd[big].dtype).t()
    with pytest.raises(CheckpointMismatchError, match="not contiguous"):
        sllm_store.load_into(path, {big: strided}, strict=False)


def test_bad_files_and_mmap(ckpt) -> None:
    path, sd = ckpt
    with pytest.raises(InvalidArgumentError, match="mmap"):
        sllm_store.load_into(path, _targets(sd), io_mode="mmap")
    data = next(path.glob("data-*.bin"))
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(TruncatedFileError):
        sllm_store.load_into(path, _targets(sd))


def test_plain_safetensors(tmp_path, make_state_dict) -> None:
    from safetensors.torch import save_file

    sd = {n: t.contiguous() for n, t in make_state_dict().items()
          if t.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8)}
    save_file(sd, tmp_path / "model.safetensors")
    targets = _targets(sd)
    sllm_store.load_into(tmp_path, targets)
    for name, t in sd.items():
        assert_tensor_identical(targets[name], t, name)
