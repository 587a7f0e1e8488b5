"""Streaming loads: ``load_state_dict(wait=False)``, ``load_model(stream=True)`` and the access
order that checkpoints record.

Slow loads come from a tier registered here (the seam any tier plugs into) that fills one read
unit at a time through the C++ pipeline with a pause before each, or from the CPU stand-in for
the CUDA driver with slow asynchronous copies (tests/fake_cuda.cpp).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import subprocess_env

import sllm_store
from sllm_store import tiers
from sllm_store.errors import ChecksumError, FormatError, InvalidArgumentError, LoadCancelledError
from sllm_store.index import read_index
from sllm_store.plan import Plan, destinations, encodings
from sllm_store.tiers.local import LocalCheckpoint, LocalTier

transformers = pytest.importorskip("transformers")


class SlowCheckpoint(LocalCheckpoint):
    """The local tier, one read unit at a time with ``delay`` seconds before each; notes when
    each unit landed."""

    delay = 0.05
    landed: list[float] = []

    def fill(self, plan: Plan, buffers: list, progress: Any = None) -> dict[str, Any]:
        from sllm_store.native import _C

        dests = destinations(plan, buffers)
        codes = encodings(self.index, plan.units)
        by_unit = plan.segments_by_unit()
        for u, unit in enumerate(plan.units):
            if progress is not None and progress.cancelled:
                raise LoadCancelledError("cancelled")
            time.sleep(self.delay)
            segs = [(0, *rest) for _, *rest in by_unit.get(u, [])]
            _C.run_load(self.files, [unit], segs, dests, num_threads=1, io_mode="buffered",
                        verify=self.config.verify, encodings=[codes[u]] if codes else [])
            SlowCheckpoint.landed.append(time.perf_counter())
            if progress is not None:
                progress.mark(u, unit[2])
        return {"io_mode": "buffered", "threads": 1}


class SlowTier(LocalTier):
    name = "slow"

    def accepts(self, path: Any, config: Any) -> bool:
        return str(path).startswith("slow:")

    def open(self, path: Any, config: Any) -> SlowCheckpoint:
        local = super().open(str(path)[len("slow:"):], config)
        return SlowCheckpoint(local.path, local.index, config)


@pytest.fixture
def slow(monkeypatch):
    monkeypatch.setattr(tiers, "TIERS", [SlowTier(), *tiers.TIERS])
    SlowCheckpoint.landed = []
    SlowCheckpoint.delay = 0.05
    return SlowCheckpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """A small Llama in Hugging Face layout and its conversion (16 KiB chunks: many units)."""
    root = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(root / "hf")
    sllm_store.convert(root / "hf", root / "sllm", chunk_size="16KiB", quiet=True)
    return root / "hf", root / "sllm"


def _state(n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"layers.{i}.w": torch.randn(64, 200 + i, generator=g) for i in range(n)}


# -- the access order -----------------------------------------------------------------------------

def test_convert_records_the_traced_order_and_lays_the_data_out_in_it(llama) -> None:
    _, conv = llama
    index = read_index(conv)
    order = index.access_order
    assert order[:3] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                         "model.layers.0.self_attn.q_proj.weight"]
    assert order[-2:] == ["model.norm.weight", "lm_head.weight"]
    offsets = [index.tensors[n].offset for n in order]
    assert offsets == sorted(offsets)  # laid out in that order
    assert set(order) == {n for n, t in index.tensors.items() if t.alias_of is None}


def test_the_order_survives_load_and_save(llama, tmp_path) -> None:
    _, conv = llama
    model = sllm_store.load_model(conv, device_map="cpu")
    sllm_store.save_model(model, tmp_path / "again", quiet=True)
    assert read_index(tmp_path / "again").access_order == read_index(conv).access_order


def test_explicit_and_no_order(tmp_path) -> None:
    sd = _state(4)
    sd["tied"] = sd["layers.0.w"]
    p = sllm_store.save_state_dict(sd, tmp_path / "a", access_order=["layers.3.w", "tied"], quiet=True)
    index = read_index(p)
    assert index.access_order == ["layers.3.w", "layers.0.w", "layers.1.w", "layers.2.w"]
    assert index.tensors["layers.3.w"].offset == 0
    assert list(index.tensors) == list(sd)  # the index keeps the caller's order
    loaded = sllm_store.load_state_dict(p)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert read_index(sllm_store.save_state_dict(sd, tmp_path / "b", quiet=True)).access_order is None
    with pytest.raises(InvalidArgumentError, match="does not store"):
        sllm_store.save_state_dict(sd, tmp_path / "c", access_order=["nope"], quiet=True)


def test_a_bad_recorded_order_is_a_format_error(tmp_path) -> None:
    p = sllm_store.save_state_dict(_state(2), tmp_path / "m", access_order="auto", quiet=True)
    raw = json.loads((p / "sllm_index.json").read_text())
    for bad in (["layers.0.w", "layers.0.w"], ["missing"], "layers.0.w", [3]):
        raw["access_order"] = bad
        (p / "sllm_index.json").write_text(json.dumps(raw))
        with pytest.raises(FormatError, match="access_order"):
            read_index(p)


def test_the_pipeline_reads_units_in_access_order(tmp_path) -> None:
    from sllm_store.config import LoadConfig
    from sllm_store.plan import assign_devices, make_plan

    sd = _state(6)
    order = [f"layers.{i}.w" for i in (5, 4, 3, 2, 1, 0)]
    p = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="16KiB", num_files=3, access_order=order,
                                   quiet=True)
    index = read_index(p)
    plan = make_plan(index, assign_devices(index, "cpu"), LoadConfig.resolve())
    firsts = []
    for f, off, length, _ in plan.units:
        holders = [n for n, t in index.tensors.items() if t.file == f and t.offset < off + length
                   and off < t.offset + t.nbytes]
        firsts.append(min(order.index(n) for n in holders))
    assert firsts == sorted(firsts)


# -- non-blocking loads ---------------------------------------------------------------------------

def test_pending_load_hands_out_tensors_before_the_last_byte(slow, tmp_path) -> None:
    sd = _state()
    p = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="16KiB", quiet=True)
    t0 = time.perf_counter()
    pending = sllm_store.load_state_dict(f"slow:{p}", wait=False)
    assert isinstance(pending, sllm_store.PendingLoad)
    assert set(pending.tensors) == set(sd) and not pending.ready() and not pending.done
    assert pending.wait("layers.0.w")
    assert pending.ready("layers.0.w") and not pending.ready("layers.11.w")
    assert torch.equal(pending.tensors["layers.0.w"], sd["layers.0.w"])
    done, total = pending.progress
    assert 0 < done < total
    assert pending.wait("layers.11.w", timeout=0.01) is False  # not yet
    result = pending.result()
    assert all(torch.equal(result[k], v) for k, v in sd.items())
    assert pending.progress == (total, total) and pending.report.bytes == sum(t.nbytes for t in sd.values())
    assert time.perf_counter() - t0 >= 0.05 * len(slow.landed)


def test_wait_on_device_waits_on_the_host_for_host_tensors(slow, tmp_path) -> None:
    sd = _state()
    p = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="16KiB", quiet=True)
    pending = sllm_store.load_state_dict(f"slow:{p}", wait=False)
    assert pending.wait_on_device("layers.0.w")
    assert pending.ready("layers.0.w") and torch.equal(pending.tensors["layers.0.w"], sd["layers.0.w"])
    assert pending.wait_on_device(["layers.11.w"], timeout=0.01) is False  # not yet
    with pytest.raises(KeyError, match="nope"):
        pending.wait_on_device("nope")
    assert pending.wait_on_device(timeout=60) and pending.ready()
    cancelled = sllm_store.load_state_dict(f"slow:{p}", wait=False)
    assert cancelled.cancel()
    with pytest.raises(LoadCancelledError):
        cancelled.wait_on_device("layers.0.w")


def test_no_tensor_is_ready_before_its_bytes(slow, tmp_path) -> None:
    """Every tensor that ready() reports, polled from another thread all along, holds its bytes."""
    sd = _state()
    p = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="16KiB", quiet=True)
    slow.delay = 0.01
    pending = sllm_store.load_state_dict(f"slow:{p}", wait=False)
    checked: set[str] = set()
    while len(checked) < len(sd):
        for name in sd:
            if name not in checked and pending.ready(name):
                assert torch.equal(pending.tensors[name], sd[name]), name
                checked.add(name)
    pending.wait()


def test_a_late_error_surfaces_from_wait(tmp_path, slow) -> None:
    sd = _state()
    p = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="16KiB", quiet=True)
    data = p / read_index(p).files[0].name
    raw = bytearray(data.read_bytes())
    raw[-5000] ^= 0xFF  # in the last chunk
    data.write_bytes(bytes(raw))
    pending = sllm_store.load_state_dict(f"slow:{p}", wait=False, verify=True)
    assert pending.wait("layers.0.w")  # early tensors are fine
    with pytest.raises(ChecksumError):
        pending.wait()
    with pytest.raises(ChecksumError):  # and on every later wait
        pending.wait("layers.11.w")
    assert not pending.ready("layers.11.w") and pending.done and pending.report is None


def test_a_real_pipeline_error_surfaces_from_wait(tmp_path) -> None:
    sd = _state()
    p = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="16KiB", quiet=True)
    data = p / read_index(p).files[0].name
    raw = bytearray(data.read_bytes())
    raw[-5000] ^= 0xFF
    data.write_bytes(bytes(raw))
    pending = sllm_store.load_state_dict(p, wait=False, verify=True, num_threads=2)
    with pytest.raises(ChecksumError):
        pending.result()


def test_cancel_stops_the_load_and_frees_its_memory(tmp_path, slow) -> None:
    sd = _state()
    p = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="16KiB", quiet=True)
    pending = sllm_store.load_state_dict(f"slow:{p}", wait=False)
    pending.wait("layers.0.w")
    storage = weakref.ref(pending.tensors["layers.0.w"].untyped_storage())
    assert pending.cancel() is True
    landed = len(slow.landed)
    time.sleep(0.2)
    assert len(slow.landed) == landed  # the workers stopped
    assert pending.tensors == {}
    gc.collect()
    assert storage() is None  # the load's memory is freed
    with pytest.raises(LoadCancelledError):
        pending.wait()
    assert pending.cancel() is False


def test_a_process_exiting_during_a_load_exits_cleanly(tmp_path) -> None:
    """A process that ends while non-blocking loads still run exits with its own status: the
    loads are cancelled at exit (their core threads never outlive the interpreter, which aborted
    the process)."""
    sd = {f"w{i}": torch.ones(8 << 20, dtype=torch.uint8) for i in range(32)}  # 256 MiB
    path = sllm_store.save_state_dict(sd, tmp_path / "big", chunk_size="1MiB", quiet=True)
    script = textwrap.dedent("""
        import sys, sllm_store
        loads = [sllm_store.load_state_dict(sys.argv[1], "cpu", wait=False, num_threads=1,
                                            io_mode="buffered", verify=True) for _ in range(2)]
        print("done" if all(p.done for p in loads) else "running")
    """)
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", script, str(path)], env=subprocess_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "terminate" not in r.stderr, r.stdout + r.stderr
        assert r.stdout.strip() in ("running", "done"), r.stdout


def test_errors_before_allocation_raise_at_once(tmp_path) -> None:
    with pytest.raises(sllm_store.MissingFileError):
        sllm_store.load_state_dict(tmp_path / "nothing", wait=False)
    p = sllm_store.save_state_dict(_state(2), tmp_path / "m", quiet=True)
    with pytest.raises(KeyError):
        sllm_store.load_state_dict(p, wait=False).wait("nope")


def test_pending_load_on_the_real_pipeline(tmp_path) -> None:
    sd = _state()
    sd["tied"] = sd["layers.1.w"]
    sd["empty"] = torch.empty(0, 3)
    p = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="16KiB", num_files=2, quiet=True)
    for io_mode in ("buffered", "direct", "mmap"):
        pending = sllm_store.load_state_dict(p, wait=False, io_mode=io_mode, num_threads=3)
        assert pending.ready("empty") or pending.wait("empty")
        got = pending.result()
        assert all(torch.equal(got[k], v) for k, v in sd.items()), io_mode
        assert got["tied"].data_ptr() == got["layers.1.w"].data_ptr()


# -- load_model(stream=True) ----------------------------------------------------------------------

def _first_layer_done(model: torch.nn.Module, at: list[float]) -> Any:
    layer = model.model.layers[0]
    return layer.register_forward_hook(lambda *_: at.append(time.perf_counter()))


def test_stream_model_computes_before_the_last_byte(llama, slow) -> None:
    _, conv = llama
    ref = sllm_store.load_model(conv, device_map="cpu")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    slow.delay = 0.01
    model = sllm_store.load_model(f"slow:{conv}", device_map="cpu", stream=True)
    assert not model.sllm_load.done
    at: list[float] = []
    _first_layer_done(model, at)
    with torch.no_grad():
        got = model(ids).logits
    assert torch.equal(got, want)  # bit-identical to the blocking load
    assert at[0] < slow.landed[-1]  # the first layer ran before the last unit landed
    assert model.sllm_load.wait() and model.sllm_load.report is not None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the hooks removed themselves


def test_stream_model_with_a_cast(llama, slow) -> None:
    _, conv = llama
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    ref = sllm_store.load_model(conv, device_map="cpu", torch_dtype=torch.float32)
    slow.delay = 0.002
    model = sllm_store.load_model(f"slow:{conv}", device_map="cpu", torch_dtype=torch.float32, stream=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_stream_model_error_surfaces_from_forward(llama, slow, tmp_path) -> None:
    import shutil

    _, conv = llama
    bad = tmp_path / "bad"
    shutil.copytree(conv, bad)
    data = bad / read_index(bad).files[0].name
    raw = bytearray(data.read_bytes())
    raw[-3000] ^= 0xFF  # lm_head's bytes, the last in the access order
    data.write_bytes(bytes(raw))
    slow.delay = 0.005
    model = sllm_store.load_model(f"slow:{bad}", device_map="cpu", stream=True, verify=True)
    with pytest.raises(ChecksumError), torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))


def test_stream_model_through_the_plain_local_tier(llama) -> None:
    hf, conv = llama
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(2))
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16)
    for src in (conv, hf):
        model = sllm_store.load_model(src, device_map="cpu", stream=True)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        model.sllm_load.wait()


def test_stream_model_build_error_cancels_the_load(llama, slow, tmp_path) -> None:
    _, conv = llama
    with pytest.raises(sllm_store.SllmStoreError):
        sllm_store.load_model(f"slow:{conv}", device_map="cpu", stream=True, hf_model_class="BertForMaskedLM")
    deadline = time.monotonic() + 5
    while any(t.name == "sllm-stream" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "sllm-stream" for t in threading.enumerate())  # the load stopped


# -- the pipeline's marks on a GPU (the fake driver: asynchronous, slow copies) -----------------

# A load onto "cuda:0" (host memory that the fake driver copies into) run by a thread of its own,
# with a LoadProgress; `path` and `mode` come last on the command line.
FAKE_LOAD = """
    import ctypes, os, sys, threading, time, numpy as np, sllm_store
    from sllm_store.native import _C
    from sllm_store.config import LoadConfig
    from sllm_store.plan import assign_devices, make_plan
    from sllm_store.errors import SllmStoreError

    path, mode = sys.argv[-2], sys.argv[-1]
    index = sllm_store.read_index(path)
    plan = make_plan(index, assign_devices(index, "cuda:0"), LoadConfig.resolve(verify=True))
    bufs = [np.zeros(size + 4096, np.uint8) for size in plan.sizes]
    dests = [("cuda:0", b.ctypes.data + (-b.ctypes.data % 4096), size) for b, size in zip(bufs, plan.sizes)]
    files = [str(index.file_path(i)) for i in range(len(index.files))]
    progress = _C.LoadProgress(len(plan.units))
    out = {}

    def run():
        try:
            out["stats"] = _C.run_load(files, plan.units, plan.segments, dests, num_threads=2,
                                       io_mode="buffered", verify=True, progress=progress)
        except SllmStoreError as e:
            out["error"] = e
        finally:
            progress.close()
"""

FAKE_PROGRESS = FAKE_LOAD + """
    t = threading.Thread(target=run)
    t0 = time.perf_counter()
    t.start()
    checked = 0
    while not progress.closed or checked < progress.marked:
        for u, (f, off, length, _) in enumerate(plan.units):
            if progress.all_marked([u]):  # its bytes must be there, copies being asynchronous
                for seg in plan.segments:
                    if seg[0] == u:
                        _, coff, slot, doff, n = seg
                        base = dests[slot][1] - bufs[slot].ctypes.data
                        got = bufs[slot][base + doff: base + doff + n].tobytes()
                        with open(files[f], "rb") as fh:
                            fh.seek(off + coff)
                            assert got == fh.read(n), u
                checked = max(checked, progress.marked)
        if mode == "cancel" and progress.marked >= 2:
            progress.cancel()
        if progress.closed:
            break
        time.sleep(0.005)
    t.join()
    error = type(out.get("error")).__name__
    print(mode, progress.marked, len(plan.units), error, round(time.perf_counter() - t0, 2))
"""


def _run_fake_load(script: str, fake_libcuda: Path, tmp_path: Path, mode: str, fail_copy: int) -> list[str]:
    """``script`` on a small checkpoint in a fresh process with the fake driver (40 ms copies;
    mode "fail": the ``fail_copy``-th copy fails); the words it printed."""
    g = torch.Generator().manual_seed(3)
    sd = {f"w{i}": torch.randn(100, 300, generator=g) for i in range(8)}
    path = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="64KiB", quiet=True)
    env = {**subprocess_env(), "SLLM_STORE_LIBCUDA": str(fake_libcuda), "FAKE_CUDA_COPY_MS": "40"}
    if mode == "fail":
        env["FAKE_CUDA_FAIL_COPY"] = str(fail_copy)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(path), mode], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split()


@pytest.mark.parametrize("mode", ["full", "cancel", "fail"])
def test_fake_gpu_marks_chunks_only_once_copied(fake_libcuda, tmp_path, mode) -> None:
    _, marked, units, error, seconds = _run_fake_load(FAKE_PROGRESS, fake_libcuda, tmp_path, mode, 10)
    if mode == "full":
        assert int(marked) == int(units) and error == "NoneType"
    elif mode == "cancel":
        assert error == "LoadCancelledError" and int(marked) < int(units)
    else:
        assert error == "DeviceError" and int(marked) < int(units)


# -- waiting on the device: a consumer's stream waits for the copies, the host does not ----------

FAKE_STREAM_WAIT = FAKE_LOAD + """
    cu = ctypes.CDLL(os.environ["SLLM_STORE_LIBCUDA"])  # the driver the pipeline loaded
    ctx, stream = ctypes.c_void_p(), ctypes.c_void_p()
    assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
    assert cu.cuCtxSetCurrent(ctx) == 0
    assert cu.cuStreamCreate(ctypes.byref(stream), 0) == 0
    cu.cuMemcpyDtoHAsync_v2.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_size_t, ctypes.c_void_p]
    t = threading.Thread(target=run)
    t.start()
    before_done = waited = refused = faulted = 0
    for u, (f, off, length, _) in enumerate(plan.units):
        if not progress.wait([u], 60, True):  # the load ended before this unit was queued
            refused += not progress.stream_wait([u], stream.value, "cuda:0")
            continue
        if faulted:
            continue
        before_done += not progress.all_marked([u])
        assert progress.stream_wait([u], stream.value, "cuda:0")
        waited += 1
        for seg in plan.segments:
            if seg[0] != u:
                continue
            _, coff, slot, doff, n = seg
            got = np.zeros(n, np.uint8)  # pageable: the copy has run when the call returns
            result = cu.cuMemcpyDtoHAsync_v2(got.ctypes.data, dests[slot][1] + doff, n, stream)
            if mode == "fail" and result == 700:  # a copy failed: the context is in error, as on a GPU
                faulted = 1
                break
            assert result == 0, result
            with open(files[f], "rb") as fh:
                fh.seek(off + coff)
                assert got.tobytes() == fh.read(n), f"unit {u}: read on the stream before its bytes landed"
    t.join()
    print(mode, waited, before_done, refused, faulted, len(plan.units), type(out.get("error")).__name__)
"""


@pytest.mark.parametrize("mode", ["full", "fail"])
def test_fake_gpu_stream_waits_on_the_device(fake_libcuda, tmp_path, mode) -> None:
    """A stream that waits for a unit through stream_wait() sees its bytes, although the host
    hands it over before the (slow) copies complete; a unit never queued is refused."""
    words = _run_fake_load(FAKE_STREAM_WAIT, fake_libcuda, tmp_path, mode, 6)
    _, waited, before_done, refused, faulted, units, error = words
    assert int(before_done) > 0  # handed over on the device, not after a wait on the host
    if mode == "full":
        assert int(waited) == int(units) and int(refused) == 0 and error == "NoneType" and faulted == "0"
    else:  # the failed copy faults the stream's later work; units never queued are refused
        assert error == "DeviceError" and faulted == "1" and 0 < int(refused) < int(units)
