"""The store server with GPU destinations (CUDA IPC): run with `python -m pytest tests -m gpu`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _helpers import assert_state_dict_identical, serve_command, subprocess_env

import sllm_store
from sllm_store.loader import load_state_dict_with_report

pytestmark = pytest.mark.gpu


def _state_dict(seed: int = 0, rows: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.w": torch.randn(rows + i, 384, generator=g).to(torch.bfloat16) for i in range(12)}
    sd["emb"] = torch.randn(1000, 64, generator=g)
    sd["ids"] = torch.arange(77, dtype=torch.int64)
    sd["mask"] = torch.rand(33, generator=g) > 0.5
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float16)
    sd["empty"] = torch.zeros(0, 7)
    sd["tied"] = sd["emb"]
    return sd


def _assert_same(loaded: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert_state_dict_identical(loaded, ref, check_order=False)


class Server:
    def __init__(self, storage: Path, sock: Path, pool: str, chunk: str = "1MiB",
                 copy_delay: float = 0.0) -> None:
        self.address = f"unix://{sock}"
        self.proc = subprocess.Popen(
            serve_command("--storage-path", str(storage), "--mem-pool-size", pool, "--chunk-size", chunk,
                          "--listen", self.address, "--num-threads", "4", copy_delay=copy_delay),
            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        from sllm_store.server.client import StoreClient

        self.client = StoreClient(self.address)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.health(timeout=1)
                return
            except sllm_store.SllmStoreError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server did not start: {self.proc.stdout.read()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        print(self.proc.stdout.read())  # the server's log, shown by pytest when a test fails


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    sllm_store.save_state_dict(_state_dict(0), root / "a", chunk_size=1 << 20)
    sllm_store.save_state_dict(_state_dict(1, rows=2048), root / "big", chunk_size=1 << 20)
    return root


@pytest.fixture
def server(storage: Path, tmp_path: Path) -> Iterator[Server]:
    s = Server(storage, tmp_path / "s.sock", "64MiB")
    yield s
    s.stop()


def test_load_into_gpu_through_store(server: Server) -> None:
    ref = _state_dict(0)
    sd, report = load_state_dict_with_report("a", "cuda:0", store=server.address)
    assert not report.stats["hit"]
    assert {t.device for t in sd.values()} == {torch.device("cuda", 0)}
    _assert_same(sd, ref)
    assert sd["tied"].data_ptr() == sd["emb"].data_ptr()
    sd2, report2 = load_state_dict_with_report("a", "cuda:0", store=server.address)
    assert report2.stats["hit"]
    _assert_same(sd2, ref)


def test_load_into_gpu_parameters_through_store(server: Server) -> None:
    """``load_into`` through the server fills existing GPU tensors in place (CUDA IPC of each
    tensor's allocation), several tensors sharing one caching-allocator block."""
    ref = _state_dict(0)
    targets = {n: torch.full_like(t, 7, device="cuda:0") for n, t in ref.items()}
    ptrs = {n: t.data_ptr() for n, t in targets.items()}
    report = sllm_store.load_into("a", targets, store=server.address)
    assert report.stats["tier"] == "store"
    assert {n: t.data_ptr() for n, t in targets.items()} == ptrs
    _assert_same(targets, ref)


def test_mixed_gpu_and_cpu_destinations(server: Server) -> None:
    ref = _state_dict(0)
    device = {k: ("cuda:0" if i % 2 else "cpu") for i, k in enumerate(ref)}
    sd = sllm_store.load_state_dict("a", device, store=server.address)
    for k in ref:
        assert sd[k].device.type == ("cuda" if device[k] == "cuda:0" else "cpu")
    _assert_same(sd, ref)


def test_gpu_destination_larger_than_the_allocation_is_refused(server: Server) -> None:
    """A (faulty) client naming more GPU bytes than it shared gets a FormatError, and the server
    writes nothing past the allocation."""
    from sllm_store import _C
    from sllm_store.server import store_pb2 as pb

    buf = torch.empty(4 << 20, dtype=torch.uint8, device="cuda:0")  # a whole caching-allocator block
    handle, offset, alloc_size, bus_id = _C.cuda_ipc_export(buf.data_ptr())
    torch.cuda.synchronize()
    described = server.client.describe("a")
    request = pb.LoadRequest(
        model="a", fingerprint=described.fingerprint,
        dests=[pb.Destination(cuda=pb.CudaIpcMemory(handle=handle, offset=offset, pci_bus_id=bus_id),
                              size=alloc_size - offset + 4096)],
        copies=[pb.Copy(file=0, offset=0, dest=0, dest_offset=alloc_size - offset, length=4096)])
    with pytest.raises(sllm_store.FormatError, match="overruns"):
        server.client.call("Load", request, 30)


def test_model_larger_than_pool_streams_to_gpu(storage: Path, tmp_path: Path) -> None:
    s = Server(storage, tmp_path / "s.sock", "8MiB")  # "big" is 19 MB
    try:
        sd, report = load_state_dict_with_report("big", "cuda:0", store=s.address)
        assert report.stats["streamed"]
        _assert_same(sd, _state_dict(1, rows=2048))
    finally:
        s.stop()


def test_load_model_through_store_matches_from_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    (tmp_path / "models").mkdir()
    sllm_store.convert(tmp_path / "hf", tmp_path / "models" / "llama", quiet=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.bfloat16, device_map="cuda:0").eval()
    s = Server(tmp_path / "models", tmp_path / "s.sock", "64MiB")
    try:
        ours = sllm_store.load_model("llama", device_map="cuda:0", torch_dtype=torch.bfloat16,
                                     store=s.address)
        streamed = sllm_store.load_model("llama", device_map="cuda:0", torch_dtype=torch.bfloat16,
                                         store=s.address, stream=True)
        ids = torch.randint(0, 512, (2, 16), device="cuda:0")
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, ours(ids).logits)
            assert torch.equal(ref(ids).logits, streamed(ids).logits)
    finally:
        s.stop()


def test_client_killed_mid_gpu_load_leaves_server_healthy(storage: Path, tmp_path: Path) -> None:
    # Slow copies: each window of the model passing through the pool waits 0.5 s before its copy.
    s = Server(storage, tmp_path / "s.sock", "8MiB", copy_delay=0.5)
    try:
        code = textwrap.dedent(f"""
            import sllm_store, torch
            print("start", flush=True)
            sllm_store.load_state_dict("big", "cuda:0", store="{s.address}")
        """)
        child = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"start"
        deadline = time.monotonic() + 60
        while s.client.status().loads_in_progress == 0:
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.05)
        time.sleep(0.7)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 60
        while s.client.status().loads_in_progress:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert s.client.health().pid == s.proc.pid
        # The server's CUDA context is still usable: a new GPU load through it is correct.
        _assert_same(sllm_store.load_state_dict("a", "cuda:0", store=s.address), _state_dict(0))
    finally:
        s.stop()
