"""The store server's GPU tier: attaching to a model held in GPU memory, from fresh processes.

Two store servers on the same checkpoints, one with a GPU pool (``--gpu-pool DEVICE=SIZE``) and
one without. In interleaved rounds (every output checked against the checkpoint's tensors):

* ``attach-fresh``: a new process calls ``load_state_dict(name, DEVICE, store=...)`` on the server
  that holds the model on that GPU: it attaches (maps the server's memory read-only); the call is
  timed inside the process (goal <= 20 ms whatever the tensor count);
* ``attach-copy-fresh``: the same with ``copy=True``: a private device-to-device copy (goal >=
  1.5 TB/s effective), against the GPU's own device-to-device copy measured in the same run;
* ``attach-again`` and ``attach-copy-again``: the same loads timed a second time in their process
  (its libraries imported and its connections open): what attaching costs once a process runs;
* ``dram-fresh``: the same load from the server without a GPU pool (its pinned pool, copied over
  PCIe);
* ``safetensors-fresh``: ``safetensors.torch.load_file(shard, DEVICE)`` in a new process,
  page-cached;
* ``finetune-resident``: the server making a fine-tune resident that shares half its bytes with
  the resident base model (only the other half crosses PCIe), against ``base-resident``: the base
  model made resident with nothing shared (goal: about half the time). Both are the server's own
  times (``prefetch --to``), the model already in its pinned pool.

The fine-tune is written next to the converted checkpoint (``.ft.sllm``): the base's tensors of
the first half of its layers and its embeddings unchanged, the rest perturbed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

if not __package__:  # run as a script (a fresh process of --child)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import limits  # noqa: E402
from common import FreshChild as Fresh  # noqa: E402
from common import Rounds, Run, StoreServer, checker, tensor_digests  # noqa: E402

SCRIPT = str(Path(__file__).resolve())  # run again as the fresh processes (--child)
log = logging.getLogger("benchmarks.gpu_tier")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--src", type=Path, required=True, help="safetensors model directory (HF layout)")
    ap.add_argument("--converted", type=Path, default=None, help="its converted copy (default SRC.sllm)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--quick", action="store_true", help="CI: one round")


def child_main(argv: List[str]) -> int:
    """``gpu_tier.py --child KIND NAME DEVICE ADDRESS DIGESTS``: one load in this fresh process."""
    kind, name, device, address, digests_path = argv
    import torch

    import sllm_store

    def load() -> Dict[str, Any]:
        if kind == "safetensors":
            from safetensors.torch import load_file

            shards = sorted(Path(name).glob("*.safetensors"))
            return {k: v for f in shards for k, v in load_file(f, device).items()}
        return sllm_store.load_state_dict(name, device, store=address, copy=kind.startswith("attach-copy"))

    torch.empty(1, device=device)
    torch.cuda.synchronize(device)
    if kind.endswith("-again"):  # the first load is not timed; its tensors are released
        load()
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = load()
    torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    reference = {k: int(v) for k, v in json.loads(Path(digests_path).read_text()).items()}
    print(json.dumps({"load_s": load_s, "problem": checker(reference)(out)}))
    return 0


def finetune(ck: Path) -> Path:
    """A copy of ``ck`` whose later half of layers (and head) differ: half its bytes shared."""
    import sllm_store

    out = ck.with_name(ck.name.removesuffix(".sllm") + ".ft.sllm")
    if (out / "sllm_index.json").is_file():
        return out
    sd = sllm_store.load_state_dict(ck, "cpu")
    layers = sorted({int(n.split(".")[2]) for n in sd if n.startswith("model.layers.")})
    changed = {n for n in sd if not n.startswith("model.layers.") and "embed" not in n}
    changed |= {n for n in sd if n.startswith("model.layers.") and int(n.split(".")[2]) >= len(layers) // 2}
    ft = {n: (t + 1 if n in changed else t) if t.is_floating_point() else t for n, t in sd.items()}
    sllm_store.save_state_dict({n: t.contiguous() for n, t in ft.items()}, out)
    for f in ck.glob("*.json"):
        if f.name != "sllm_index.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    import sllm_store
    from sllm_store.index import shared_bytes

    if args.quick:
        args.rounds = 1
    ck = args.converted or args.src.with_name(args.src.name + ".sllm")
    if not (ck / "sllm_index.json").is_file():
        sllm_store.convert(args.src, ck, quiet=True)
    ft = finetune(ck)
    index = sllm_store.read_index(ck)
    nbytes = index.total_bytes
    run = Run("gpu_tier", args, data_dir=ck)
    run.results.update(checkpoint=str(ck), bytes=nbytes, tensors=len(index.tensors),
                       finetune_shared_bytes=shared_bytes(index, sllm_store.read_index(ft)))
    reference = tensor_digests(sllm_store.load_state_dict(ck, "cpu", verify=True))
    digests = Path(run.scratch()) / "digests.json"
    digests.write_text(json.dumps({k: str(v) for k, v in reference.items()}))
    torch.empty(1, device=args.device)
    run.results["h2d"] = limits.h2d(args.device)
    run.results["d2d"] = limits.d2d(args.device)
    pool = f"{2 * (nbytes >> 30) + 4}GiB"
    gpu_budget = f"{2 * (nbytes >> 30) + 2}GiB"
    gpu = StoreServer(ck.parent, pool, args=("--gpu-pool", f"{args.device}={gpu_budget}"))
    dram = StoreServer(ck.parent, pool)
    try:
        name, ft_name = gpu.client.model_name(ck), gpu.client.model_name(ft)
        for s in (gpu, dram):
            s.client.prefetch(name)
        gpu.client.prefetch(ft_name)

        def base_resident_only() -> None:
            gpu.client.evict("", tier="gpu")
            gpu.client.prefetch(name, to=args.device)

        rounds = Rounds(run.rounds, sync=lambda: torch.cuda.synchronize(args.device))
        load_s = lambda r: r["load_s"]  # noqa: E731
        for label, kind in (("attach-fresh", "attach"), ("attach-copy-fresh", "attach-copy"),
                            ("attach-again", "attach-again"), ("attach-copy-again", "attach-copy-again")):
            rounds.add(label, Fresh(SCRIPT, [kind, name, args.device, gpu.address, str(digests)]), nbytes,
                       before=lambda: gpu.client.prefetch(name, to=args.device), seconds_of=load_s)
        rounds.add("dram-fresh", Fresh(SCRIPT, ["dram", name, args.device, dram.address, str(digests)]),
                   nbytes, seconds_of=load_s)
        st_child = ["safetensors", str(args.src), args.device, "", str(digests)]
        rounds.add("safetensors-fresh", Fresh(SCRIPT, st_child), nbytes, seconds_of=load_s)
        rounds.add("base-resident", lambda: gpu.client.prefetch(name, to=args.device), nbytes,
                   before=lambda: gpu.client.evict("", tier="gpu"), seconds_of=lambda r: r.seconds)
        rounds.add("finetune-resident", lambda: gpu.client.prefetch(ft_name, to=args.device), nbytes,
                   before=base_resident_only, seconds_of=lambda r: r.seconds)
        contenders = rounds.run()
        run.results["server_status"] = _gpu_status(gpu)
    finally:
        gpu.close()
        dram.close()
    run.results["contenders"] = contenders
    return run.finish(ratios(run.results), any("error" in c for c in contenders.values()))


def _gpu_status(server: StoreServer) -> Dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    s = server.client.status()
    return {"gpu_pools": [MessageToDict(p) for p in s.gpu_pools],
            "models": [MessageToDict(m) for m in s.models]}


def ratios(results: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """Attach time (seconds, not a ratio), the private copy's TB/s and its share of the GPU's own
    device-to-device copy, the fine-tune's time over the base model's, and each fresh load over
    the pinned-pool load and over safetensors."""
    c = results["contenders"]
    out: Dict[str, Dict[str, float]] = {}

    def ok(k: str) -> bool:
        return "best_s" in c.get(k, {})

    for k in ("attach-fresh", "attach-again"):
        if ok(k):
            out[f"{k} seconds"] = {"best": c[k]["best_s"], "median": c[k]["median_s"]}
    d2d = results.get("d2d", {}).get("gbps")
    for k in ("attach-copy-fresh", "attach-copy-again"):
        if ok(k):
            out[f"{k} TB/s"] = {"best": c[k]["best_gbps"] / 1e3, "median": c[k]["median_gbps"] / 1e3}
            if d2d:
                out[f"{k} GB/s / device copy"] = {"best": c[k]["best_gbps"] / d2d,
                                                  "median": c[k]["median_gbps"] / d2d}
    if ok("finetune-resident") and ok("base-resident"):
        out["finetune-resident / base-resident (time)"] = {
            "best": c["finetune-resident"]["best_s"] / c["base-resident"]["best_s"],
            "median": c["finetune-resident"]["median_s"] / c["base-resident"]["median_s"]}
    for peer in ("dram-fresh", "safetensors-fresh"):
        for k in ("attach-fresh", "attach-copy-fresh"):
            if ok(k) and ok(peer):
                out[f"{k} speed / {peer}"] = {"best": c[peer]["best_s"] / c[k]["best_s"],
                                              "median": c[peer]["median_s"] / c[k]["median_s"]}
    return out


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    raise SystemExit(child_main(sys.argv[2:]))
