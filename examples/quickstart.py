"""Convert a small Hugging Face model into the sllm-store format and load it back.

Builds a tiny random Llama locally (no hub access), saves it with ``save_pretrained``, converts
it with ``sllm_store.convert``, loads it with ``sllm_store.load_state_dict`` and checks that the
model computes the same logits with the loaded weights.

Run: ``python examples/quickstart.py [WORKDIR]``
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

import sllm_store


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(sys.argv) > 1:  # keep the files there
        return run(Path(sys.argv[1]))
    with tempfile.TemporaryDirectory(prefix="sllm-") as work:  # removed afterwards
        return run(Path(work))


def run(work: Path) -> int:
    log = logging.getLogger("quickstart")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=4096,
    )
    model = LlamaForCausalLM(config).eval()
    hf_dir, sllm_dir = work / "tiny-llama", work / "tiny-llama.sllm"
    model.save_pretrained(hf_dir)
    log.info("saved a tiny Llama to %s", hf_dir)

    sllm_store.convert(hf_dir, sllm_dir, overwrite=True, quiet=True)
    log.info("converted it to %s", sllm_dir)

    t0 = time.perf_counter()
    state_dict = sllm_store.load_state_dict(sllm_dir, device="cpu", verify=True)
    log.info("loaded %d tensors in %.1f ms", len(state_dict), (time.perf_counter() - t0) * 1e3)

    fresh = LlamaForCausalLM(config).eval()
    fresh.load_state_dict(state_dict, strict=False)
    fresh.tie_weights()
    ids = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        same = torch.equal(model(ids).logits, fresh(ids).logits)
    log.info("logits identical to the original model: %s", same)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
