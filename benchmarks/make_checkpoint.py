#!/usr/bin/env python3
"""Generate a synthetic Llama-shaped checkpoint in Hugging Face layout, for benchmarks.

The output directory looks like what ``LlamaForCausalLM.save_pretrained`` writes:

* ``config.json``: a ``LlamaConfig`` as plain JSON (loadable by ``transformers.LlamaConfig``,
  written without importing transformers), and a small ``generation_config.json``;
* ``model-0000X-of-0000N.safetensors`` shards of at most ``--max-shard-size`` (default 5GB,
  decimal like Hugging Face) plus ``model.safetensors.index.json``; or a single
  ``model.safetensors`` without an index when everything fits in one shard (as
  ``save_pretrained`` does).

Tensor names and order are those of ``LlamaForCausalLM.state_dict()``
(``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``, ...,
``model.norm.weight``, ``lm_head.weight``; ``lm_head.weight`` is left out when the embeddings
are tied, as Hugging Face does). Weights are random normal with std 0.02; RMSNorm weights are
ones, as in a freshly initialised model.

The shard plan is computed from the shapes alone, then each shard is generated, written with
``safetensors.torch.save_file`` and freed before the next one, so memory stays bounded to one
shard. The checkpoint is built in ``OUT.partial`` and renamed to ``OUT`` at the end: ``OUT``
existing means a complete checkpoint, and it is kept as is unless ``--overwrite`` is given.

Examples::

    python benchmarks/make_checkpoint.py --preset tiny --out /tmp/llama-tiny
    python benchmarks/make_checkpoint.py --preset small --out /tmp/llama-small  # ~0.31 GB
    python benchmarks/make_checkpoint.py --preset 8B --num-layers 16 --out /data/l8b16  # ~9.1 GB
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    import torch

log = logging.getLogger("make_checkpoint")

GB = 10**9

TensorSpec = Tuple[str, Tuple[int, ...]]


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 8192
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    rope_scaling: Optional[Dict[str, object]] = None

    @property
    def dim_per_head(self) -> int:
        if self.head_dim is not None:
            return self.head_dim
        return self.hidden_size // self.num_attention_heads


_LLAMA32_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

PRESETS: Dict[str, LlamaShape] = {
    # ~0.5 MB: for quick functional tests.
    "tiny": LlamaShape(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False,
        max_position_embeddings=2048, rope_theta=10000.0,
    ),
    # ~0.31 GB: a small but realistically shaped model for local end-to-end runs.
    "small": LlamaShape(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=4096, rope_theta=10000.0,
    ),
    # Llama-3.2-1B shapes (tied embeddings), ~2.5 GB.
    "1B": LlamaShape(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
        max_position_embeddings=131072, rope_scaling=_LLAMA32_ROPE,
    ),
    # Llama-3.2-3B shapes (tied embeddings), ~6.4 GB.
    "3B": LlamaShape(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=128,
        max_position_embeddings=131072, rope_scaling=_LLAMA32_ROPE,
    ),
    # Llama-3-8B shapes, ~16.1 GB (with --num-layers 16: ~9.1 GB).
    "8B": LlamaShape(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=8192,
    ),
}

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """Parse '5GB' (decimal, like Hugging Face), '512MiB' (binary) or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"bad size {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)"
        )
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def tensor_specs(shape: LlamaShape) -> List[TensorSpec]:
    """Names and shapes in ``LlamaForCausalLM.state_dict()`` order."""
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.dim_per_head
    q_out = shape.num_attention_heads * d
    kv_out = shape.num_key_value_heads * d
    specs: List[TensorSpec] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        specs += [
            (p + "self_attn.q_proj.weight", (q_out, h)),
            (p + "self_attn.k_proj.weight", (kv_out, h)),
            (p + "self_attn.v_proj.weight", (kv_out, h)),
            (p + "self_attn.o_proj.weight", (h, q_out)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not shape.tie_word_embeddings:
        specs.append(("lm_head.weight", (shape.vocab_size, h)))
    return specs


def numel(dims: Tuple[int, ...]) -> int:
    n = 1
    for x in dims:
        n *= x
    return n


def plan_shards(
    specs: List[TensorSpec], itemsize: int, max_shard_size: int
) -> List[List[TensorSpec]]:
    """Greedy split in order, like huggingface_hub's ``split_torch_state_dict_into_shards``."""
    shards: List[List[TensorSpec]] = []
    current: List[TensorSpec] = []
    current_size = 0
    for name, dims in specs:
        size = numel(dims) * itemsize
        if size > max_shard_size:  # too big for any shard: its own shard
            shards.append([(name, dims)])
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append((name, dims))
        current_size += size
    if current:
        shards.append(current)
    return shards


# Without a GPU, torch's CPU normal_ with a generator runs on one thread: a tensor is filled in
# chunks by a thread pool (torch releases the GIL), one seeded generator per chunk.
GEN_CHUNK = 4 * 2**20


def default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def fill_normal_cpu(t: torch.Tensor, std: float, seed: int, pool: ThreadPoolExecutor) -> None:
    """Fill a contiguous CPU tensor with normal(0, std) values in parallel; the values depend on
    ``seed`` only, not on the number of workers."""
    import torch

    flat = t.view(-1)
    starts = range(0, flat.numel(), GEN_CHUNK)

    def work(k: int) -> None:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + k) % 2**63)
        flat[starts[k]:starts[k] + GEN_CHUNK].normal_(0.0, std, generator=gen)

    for _ in pool.map(work, range(len(starts))):
        pass


def config_dict(shape: LlamaShape, dtype_name: str) -> Dict[str, object]:
    """A config.json laid out like the Hugging Face hub's Llama 3 ones (transformers 4.x
    field names; transformers 5 reads them too)."""
    big_vocab = shape.vocab_size > 128001
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000 if big_vocab else 1,
        "eos_token_id": 128001 if big_vocab else 2,
        "head_dim": shape.dim_per_head,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": shape.rope_scaling,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "torch_dtype": dtype_name,
        "transformers_version": "4.45.0",
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


# Files this script writes; --overwrite only deletes a directory made of nothing else.
_OWN_FILE = re.compile(
    r"(config\.json|generation_config\.json|model\.safetensors|model\.safetensors\.index\.json"
    r"|model-\d{5}-of-\d{5}\.safetensors)"
)


def _remove_checkpoint_dir(path: Path) -> None:
    foreign = [
        p.name for p in path.iterdir() if not (p.is_file() and _OWN_FILE.fullmatch(p.name))
    ]
    if foreign:
        raise SystemExit(
            f"refusing to delete {path}: it holds files this script does not write: "
            f"{foreign[:5]}"
        )
    shutil.rmtree(path)


def write_checkpoint(
    out: Path,
    shape: LlamaShape,
    *,
    dtype_name: str = "bfloat16",
    max_shard_size: int = 5 * GB,
    seed: int = 0,
    std: float = 0.02,
    overwrite: bool = False,
    workers: Optional[int] = None,
) -> Path:
    """Write the checkpoint to ``out`` (kept as is if it exists and ``overwrite`` is False)."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    specs = tensor_specs(shape)
    shards = plan_shards(specs, itemsize, max_shard_size)
    total_params = sum(numel(d) for _, d in specs)
    total_size = total_params * itemsize

    if out.exists():
        if not overwrite:
            log.info("%s exists: keeping it (use --overwrite to regenerate)", out)
            return out
        log.info("removing existing %s (--overwrite)", out)
        _remove_checkpoint_dir(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        log.info("removing leftover %s", tmp)
        _remove_checkpoint_dir(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(tmp.parent).free
    if free < total_size + 64 * 2**20:
        raise SystemExit(
            f"not enough disk space in {tmp.parent}: need {total_size / GB:.2f} GB, "
            f"have {free / GB:.2f} GB (try --num-layers)"
        )
    tmp.mkdir()

    log.info(
        "writing %s: %d params, %.3f GB of %s in %d shard(s), %d layers, hidden %d, vocab %d",
        out, total_params, total_size / GB, dtype_name, len(shards), shape.num_hidden_layers,
        shape.hidden_size, shape.vocab_size,
    )
    cfg = config_dict(shape, dtype_name)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "transformers_version": cfg["transformers_version"],
    }
    (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")

    # Random numbers from the GPU when there is one: a CPU thread makes only ~0.05 GB/s of bf16.
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    pool = ThreadPoolExecutor(max_workers=workers or default_workers())
    spec_index = {name: i for i, (name, _) in enumerate(specs)}
    weight_map: Dict[str, str] = {}
    t_start = time.perf_counter()
    written = 0
    n = len(shards)
    for idx, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{idx + 1:05d}-of-{n:05d}.safetensors"
        t0 = time.perf_counter()
        tensors: Dict[str, torch.Tensor] = {}
        for name, dims in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(dims, dtype=dtype)
            elif gen_device == "cpu":
                tensors[name] = torch.empty(dims, dtype=dtype)
                fill_normal_cpu(tensors[name], std, seed * 1_000_003 + spec_index[name], pool)
            else:
                tensors[name] = (
                    torch.empty(dims, dtype=dtype, device=gen_device)
                    .normal_(0.0, std, generator=gen)
                    .cpu()
                )
            weight_map[name] = fname
        t_gen = time.perf_counter() - t0
        shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        os.chmod(tmp / fname, 0o644)  # save_file makes 0600 files; save_pretrained's are 0644
        del tensors
        written += shard_bytes
        log.info(
            "[%d/%d] %s: %d tensors, %.3f GB (generate %.1fs, write %.1fs)",
            idx + 1, n, fname, len(shard), shard_bytes / GB, t_gen,
            time.perf_counter() - t0 - t_gen,
        )
    if n > 1:
        index = {
            "metadata": {"total_parameters": total_params, "total_size": total_size},
            "weight_map": weight_map,
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    pool.shutdown()
    os.replace(tmp, out)
    elapsed = time.perf_counter() - t_start
    log.info(
        "done: %s, %.3f GB in %.1fs (%.2f GB/s)",
        out, written / GB, elapsed, written / GB / max(elapsed, 1e-9),
    )
    return out


def build_shape(args: argparse.Namespace) -> LlamaShape:
    shape = PRESETS[args.preset]
    overrides = {
        "num_hidden_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "vocab_size": args.vocab_size,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "tie_word_embeddings": args.tie_word_embeddings,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "hidden_size" in overrides or "num_attention_heads" in overrides:
        overrides["head_dim"] = None  # back to hidden // heads
        h = overrides.get("hidden_size", shape.hidden_size)
        heads = overrides.get("num_attention_heads", shape.num_attention_heads)
        if heads < 1 or h % heads:
            raise SystemExit(f"hidden size {h} is not a multiple of {heads} heads")
    shape = replace(shape, **overrides)
    sizes = (shape.hidden_size, shape.intermediate_size, shape.vocab_size,
             shape.num_attention_heads, shape.num_key_value_heads)
    if min(sizes) < 1 or shape.num_hidden_layers < 0:
        raise SystemExit("sizes must be positive (and --num-layers >= 0)")
    if shape.num_attention_heads % shape.num_key_value_heads:
        raise SystemExit(
            f"{shape.num_attention_heads} heads is not a multiple of "
            f"{shape.num_key_value_heads} kv heads"
        )
    return shape


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="tiny",
                   help="model shapes (default tiny)")
    p.add_argument("--out", required=True, type=Path, help="output directory (HF layout)")
    p.add_argument("--num-layers", type=int, help="override the number of decoder layers")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--num-kv-heads", type=int)
    p.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="tie lm_head to the embeddings (default: as the preset)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-shard-size", type=parse_size, default=5 * GB,
                   help="max bytes per shard, like save_pretrained (default 5GB = 5e9 bytes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int,
                   help="generator threads when there is no GPU (default: CPU count)")
    p.add_argument("--overwrite", action="store_true", help="regenerate if --out exists")
    p.add_argument("--dry-run", action="store_true",
                   help="print the shapes, shard count and size; write nothing")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    shape = build_shape(args)
    if args.dry_run:
        itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
        specs = tensor_specs(shape)
        shards = plan_shards(specs, itemsize, args.max_shard_size)
        total = sum(numel(d) for _, d in specs) * itemsize
        plan = {"shape": asdict(shape), "tensors": len(specs), "shards": len(shards),
                "total_bytes": total, "total_gb": round(total / GB, 3)}
        print(json.dumps(plan, indent=2))
        return 0
    write_checkpoint(
        args.out, shape, dtype_name=args.dtype, max_shard_size=args.max_shard_size,
        seed=args.seed, overwrite=args.overwrite, workers=args.workers,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
