"""The CUDA path: run with `python -m pytest tests -m gpu` on a machine with a GPU."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sllm_store
from sllm_store.native import _C

pytestmark = pytest.mark.gpu


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.w": torch.randn(256 + i, 384, generator=g).to(torch.bfloat16) for i in range(12)}
    sd["emb"] = torch.randn(1000, 64, generator=g)
    sd["ids"] = torch.arange(77, dtype=torch.int64)
    sd["mask"] = torch.rand(33, generator=g) > 0.5
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float16)
    sd["empty"] = torch.zeros(0, 7)
    sd["fp8"] = torch.randn(64, 64, generator=g).to(torch.float8_e4m3fn)
    sd["tied"] = sd["emb"]
    return sd


def _assert_same(loaded: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(ref)
    for k, v in ref.items():
        got = loaded[k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        if v.numel():
            assert torch.equal(got.cpu().reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = _state_dict()
    path = tmp_path_factory.mktemp("gpu") / "m"
    # Small chunks so the pipeline has many chunks in flight.
    sllm_store.save_state_dict(sd, path, chunk_size=64 * 1024, num_files=3, quiet=True)
    return path, sd


def test_driver_found() -> None:
    assert _C.cuda_device_count() == torch.cuda.device_count()
    assert _C.cuda_unavailable_reason() == ""


@pytest.mark.parametrize("threads", [1, 4, 16])
@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_load_to_gpu(ckpt, threads, io_mode) -> None:
    path, sd = ckpt
    loaded = sllm_store.load_state_dict(
        path, device="cuda:0", num_threads=threads, io_mode=io_mode, verify=True
    )
    for t in loaded.values():
        assert t.device == torch.device("cuda", 0)
    _assert_same(loaded, sd)
    assert loaded["tied"].data_ptr() == loaded["emb"].data_ptr()
    ptrs = {t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}
    assert len(ptrs) == 1, "one allocation per device"


def test_load_to_gpu_is_usable_on_torch_stream(ckpt) -> None:
    path, sd = ckpt
    loaded = sllm_store.load_state_dict(path, device="cuda")
    # Kernels on torch's current stream see the complete data.
    assert torch.equal(loaded["ids"].sum().cpu(), sd["ids"].sum())


def test_per_tensor_device_map_mixed_cpu_gpu(ckpt) -> None:
    path, sd = ckpt
    names = list(sd)
    devices = {n: ("cuda:0" if i % 2 else "cpu") for i, n in enumerate(names)}
    devices["tied"] = devices["emb"]
    loaded = sllm_store.load_state_dict(path, device=devices, verify=True)
    for n, t in loaded.items():
        assert t.device.type == torch.device(devices[n]).type, n
    _assert_same(loaded, sd)


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_load_into_gpu_and_host_tensors(ckpt, io_mode) -> None:
    """``load_into`` fills existing tensors in place, on the GPU and on the host in one load."""
    path, sd = ckpt
    devices = ["cpu", "cuda:0"]
    targets = {n: torch.full_like(t, 3, device=devices[i % 2]) for i, (n, t) in enumerate(sd.items())}
    ptrs = {n: t.data_ptr() for n, t in targets.items()}
    sllm_store.load_into(path, targets, io_mode=io_mode, verify=True)
    assert {n: t.data_ptr() for n, t in targets.items()} == ptrs
    _assert_same(targets, sd)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus(ckpt) -> None:
    path, sd = ckpt
    devices = {n: f"cuda:{i % 2}" for i, n in enumerate(sd)}
    devices["tied"] = devices["emb"]
    loaded = sllm_store.load_state_dict(path, device=devices, verify=True)
    _assert_same(loaded, sd)
    for n, t in loaded.items():
        assert t.device == torch.device(devices[n]), n


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_load_model_split_over_two_gpus(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    sllm_store.convert(tmp_path / "hf", tmp_path / "sllm", quiet=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, device_map="cuda:0").eval()
    budget = {0: "3MiB", 1: "64MiB"}  # the model is ~4.7 MB: it cannot fit on GPU 0 alone
    ours = sllm_store.load_model(tmp_path / "sllm", device_map="auto", max_memory=budget,
                                 torch_dtype=torch.float32)
    assert {p.device.index for p in ours.parameters()} == {0, 1}
    ids = torch.randint(0, 512, (2, 16), device="cuda:0")
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits.to("cuda:0"), rtol=0, atol=0)


def test_plain_safetensors_to_gpu(tmp_path) -> None:
    from safetensors.torch import save_file

    sd = {k: v for k, v in _state_dict().items() if k != "tied"}
    save_file(sd, tmp_path / "x.safetensors")
    _assert_same(sllm_store.load_state_dict(tmp_path / "x.safetensors", device="cuda:0"), sd)


def test_checksum_error_on_gpu_load(tmp_path) -> None:
    sd = _state_dict()
    path = tmp_path / "m"
    sllm_store.save_state_dict(sd, path, chunk_size=64 * 1024, quiet=True)
    data = path / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[100_000] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(sllm_store.ChecksumError, match="data-00000.bin"):
        sllm_store.load_state_dict(path, device="cuda:0", verify=True)
    # The process stays usable after a failed load.
    assert torch.ones(4, device="cuda:0").sum().item() == 4


def test_bad_ordinal() -> None:
    with pytest.raises(sllm_store.DeviceError):
        _C.check_device(f"cuda:{torch.cuda.device_count() + 3}")


def test_out_of_memory_is_clear(tmp_path) -> None:
    # A checkpoint whose index claims more than the GPU has (the file is sparse).
    path = tmp_path / "huge"
    sllm_store.save_state_dict({"w": torch.zeros(1024, dtype=torch.uint8)}, path, quiet=True)
    import json

    free, total = torch.cuda.mem_get_info(0)
    n = (total // 4096 + 1) * 4096 * 2
    idx = json.loads((path / "sllm_index.json").read_text())
    idx["files"][0]["size"] = n
    idx["files"][0]["checksums"] = ["0" * 16] * -(-n // idx["chunk_size"])
    idx["tensors"]["w"]["shape"] = [n]
    idx["tensors"]["w"]["nbytes"] = n
    (path / "sllm_index.json").write_text(json.dumps(idx))
    with open(path / "data-00000.bin", "r+b") as f:
        f.truncate(n)
    with pytest.raises(sllm_store.OutOfMemoryError):
        sllm_store.load_state_dict(path, device="cuda:0")


def test_load_model_on_gpu_matches_from_pretrained(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    sllm_store.convert(tmp_path / "hf", tmp_path / "sllm", quiet=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.bfloat16, device_map="cuda:0"
    ).eval()
    for device_map in ("cuda:0", "auto", {"": 0}):
        ours = sllm_store.load_model(tmp_path / "sllm", device_map=device_map, torch_dtype=torch.bfloat16)
        devices = {p.device for p in ours.parameters()}
        if device_map == "auto":  # balanced over the visible GPUs, as from_pretrained does
            assert {d.type for d in devices} == {"cuda"}
        else:
            assert devices == {torch.device("cuda", 0)}
        ids = torch.randint(0, 512, (2, 16), device="cuda:0")
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, ours(ids).logits.to("cuda:0")), device_map


def test_ctrl_c_during_gpu_load(tmp_path) -> None:
    path = tmp_path / "big"
    sd = {f"w{i}": torch.empty(64 * 2**20, dtype=torch.uint8) for i in range(16)}  # 1 GiB
    sllm_store.save_state_dict(sd, path, chunk_size=4 * 2**20, quiet=True)
    code = textwrap.dedent(f"""
        import sys, sllm_store, torch
        torch.zeros(1, device="cuda:0")
        print("ready", flush=True)
        try:
            for _ in range(1000):
                sllm_store.load_state_dict({str(path)!r}, device="cuda:0", num_threads=1)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            torch.cuda.synchronize()
            sys.exit(0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    import time

    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert "interrupted" in out
    assert proc.returncode == 0


def _current_context() -> int:
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    assert lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0
    return ctx.value or 0


def test_loads_leave_the_callers_context_alone(ckpt) -> None:
    """The native load, run on a thread with no current context, leaves it with none; a load on
    the main thread keeps its context."""
    import threading

    from sllm_store.config import LoadConfig
    from sllm_store.plan import assign_devices, make_plan

    path, sd = ckpt
    torch.empty(1, device="cuda:0")
    before = _current_context()
    index = sllm_store.read_index(path)
    plan = make_plan(index, assign_devices(index, "cuda:0"), LoadConfig.resolve(verify=True))
    bufs = [torch.empty(size, dtype=torch.uint8, device="cuda:0") for size in plan.sizes]
    dests = [("cuda:0", b.data_ptr(), size) for b, size in zip(bufs, plan.sizes)]
    files = [str(index.file_path(i)) for i in range(len(index.files))]
    seen: dict[str, int] = {}

    def fresh_thread() -> None:
        seen["before"] = _current_context()
        _C.run_load(files, plan.units, plan.segments, dests, num_threads=4, io_mode="buffered", verify=True,
                    buffers_per_thread=2)
        seen["after"] = _current_context()

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert seen == {"before": 0, "after": 0}
    torch.cuda.synchronize()
    _assert_same(sllm_store.load_state_dict(path, "cuda:0", num_threads=4), sd)
    assert _current_context() == before


def test_more_staging_buffers_than_events(ckpt, monkeypatch) -> None:
    """Twelve staging buffers per thread (more than the events each worker keeps) load intact."""
    path, sd = ckpt
    monkeypatch.setenv("SLLM_STORE_STAGING_BUFFERS", "12")
    for _ in range(3):
        _assert_same(sllm_store.load_state_dict(path, "cuda:0", num_threads=2, io_mode="buffered"), sd)


def test_streaming_load_waits_on_the_device(tmp_path) -> None:
    """``wait_on_device`` hands each tensor to torch's current stream once its copies are queued:
    kernels queued after it see every byte (each tensor equals the saved one, compared on the
    device without a host wait), and the first tensors are in use before the load has ended."""
    g = torch.Generator().manual_seed(5)
    sd = {f"layer{i}.w": torch.randn(1024, 1024, generator=g) for i in range(48)}  # 192 MiB
    path = sllm_store.save_state_dict(sd, tmp_path / "m", chunk_size="1MiB", quiet=True)
    want = {name: t.to("cuda:0") for name, t in sd.items()}
    torch.cuda.synchronize()
    pending = sllm_store.load_state_dict(path, device="cuda:0", wait=False, verify=True)
    equal, early = [], 0
    for name in sd:
        assert pending.wait_on_device(name, timeout=120)
        early += not pending.ready(name)
        equal.append(torch.eq(pending.tensors[name], want[name]).all())
    pending.result()
    assert [bool(e) for e in equal] == [True] * len(sd)
    assert pending.wait_on_device()  # the whole load, once complete: no wait left
    print(f"{early} of {len(sd)} tensors handed to the stream before their copies completed")


def test_streaming_model_on_the_gpu_equals_a_blocking_load(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    sllm_store.convert(tmp_path / "hf", tmp_path / "sllm", chunk_size="16KiB", quiet=True)
    ids = torch.arange(1, 17, device="cuda:0").unsqueeze(0)
    with torch.no_grad():
        blocking = sllm_store.load_model(tmp_path / "sllm", device_map="cuda:0")(ids).logits
        streamed_model = sllm_store.load_model(tmp_path / "sllm", device_map="cuda:0", stream=True)
        streamed = streamed_model(ids).logits
    streamed_model.sllm_load.result()
    assert torch.equal(blocking, streamed)
