"""Loads through the store server (``sllm-store serve``), the way a serverless worker makes them:
a fresh process loads a model the server holds in its pinned pool, against the pinned
host-to-GPU copy measured in the same run.

In interleaved rounds (every output checked against the checkpoint's tensors):

* ``store-fresh``: a new process imports sllm_store and torch, creates its CUDA context and calls
  ``load_state_dict(name, DEVICE, store=...)``; the load is timed inside the process, and the whole
  process from launch;
* ``store-fresh-load_model``: the same with ``load_model`` (when the checkpoint has a config.json),
  transformers' modelling code imported and the model built on the meta device once before the
  timed load (a worker's setup, recorded apart as ``setup_s``), as in the local suite;
* ``store-fresh-connected``: the same as ``store-fresh``, with the process's store client made and
  its server asked for its health before the timed load (``StoreClient.get(address).health()``,
  recorded apart as ``setup_s``): a worker that starts before its request and connects while it
  waits for it;
* ``store-inprocess``: repeated loads in this (warm) process;
* ``prefetch-cold``: the server reading the model from a cold disk into its pool (its own time);
* on the CPU, in-process times include one pass over every byte (as in the local suite);
* peers on the same bytes: ``sllm-warm`` (``load_state_dict`` without a server, page-cached) and
  ``safetensors-warm`` (``load_file``, page-cached).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

if not __package__:  # run as a script (a fresh process of --child)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import limits  # noqa: E402
from common import (  # noqa: E402
    FreshChild,
    Rounds,
    Run,
    StoreServer,
    checker,
    process_summary,
    tensor_digests,
    usable,
)

log = logging.getLogger("benchmarks.store")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--src", type=Path, required=True, help="safetensors model directory (HF layout)")
    ap.add_argument("--converted", type=Path, default=None, help="its converted copy (default SRC.sllm)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--pool-size", default=None, help="the server's pool (default: model size + 2 GiB)")


def child_main(argv: List[str]) -> int:
    """``store.py --child KIND NAME DEVICE ADDRESS DIGESTS SRC``: one load in this fresh process."""
    t0 = time.perf_counter()
    kind, name, device, address, digests_path, src = argv
    import torch

    import sllm_store

    t1 = time.perf_counter()
    if device != "cpu":
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    setup_s = None
    if kind == "load_model":  # transformers' classes, imported and built once, as a worker's setup
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
        setup_s = time.perf_counter() - t2
    elif kind == "connected":  # the client made and the server reached before the request comes
        sllm_store.StoreClient.get(address).health()
        setup_s = time.perf_counter() - t2
    collections = _CollectionTime()
    gc.callbacks.append(collections)
    t3 = time.perf_counter()
    if kind == "load_model":
        out = dict(sllm_store.load_model(name, device_map=device, torch_dtype=torch.bfloat16,
                                         store=address).state_dict())
        steps = {}
    else:
        from sllm_store.loader import load_state_dict_with_report

        out, report = load_state_dict_with_report(name, device, store=address)
        steps = {k: v for k, v in report.stats.items() if k.endswith("_seconds")}
        steps["report_seconds"] = report.seconds
    if device != "cpu":
        torch.cuda.synchronize(device)
    t4 = time.perf_counter()
    gc.callbacks.remove(collections)
    steps["gc_seconds"] = collections.seconds
    reference = {k: int(v) for k, v in json.loads(Path(digests_path).read_text()).items()}
    problem = checker(reference, subset=kind == "load_model")(out)
    record = {"import_s": t1 - t0, "cuda_s": t2 - t1, "load_s": t4 - t3, "steps": steps,
              "problem": problem}
    print(json.dumps(record if setup_s is None else {**record, "setup_s": setup_s}))
    return 0


class _CollectionTime:
    """A ``gc.callbacks`` entry adding up the seconds Python's garbage collector runs."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: Optional[float] = None

    def __call__(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


def main(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import load_file

    import sllm_store

    ck = args.converted or args.src.with_name(args.src.name + ".sllm")
    if not (ck / "sllm_index.json").is_file():
        sllm_store.convert(args.src, ck, quiet=True)
    index = sllm_store.read_index(ck)
    files = [index.file_path(i) for i in range(len(index.files))]
    nbytes = index.total_bytes
    gpu = args.device != "cpu"
    run = Run("store", args, data_dir=ck)
    run.results.update(checkpoint=str(ck), bytes=nbytes)
    reference = tensor_digests(sllm_store.load_state_dict(ck, "cpu", verify=True))
    digests = Path(run.scratch()) / "digests.json"
    digests.write_text(json.dumps({k: str(v) for k, v in reference.items()}))
    check = checker(reference) if gpu else (lambda d: None if d == reference else "tensor bytes differ")
    if gpu:
        torch.empty(1, device=args.device)
        run.results["h2d"] = limits.h2d(args.device)
    shards = [str(f) for f in sorted(args.src.glob("*.safetensors"))]
    server = StoreServer(ck.parent, args.pool_size or f"{(nbytes >> 30) + 2}GiB")
    try:
        name = server.client.model_name(ck)
        sync = (lambda: torch.cuda.synchronize(args.device)) if gpu else (lambda: None)
        rounds = Rounds(run.rounds, sync=sync)

        def cold() -> None:
            server.client.evict(name)
            run.evictor.evict(files)

        def resident() -> None:
            server.client.prefetch(name)

        rounds.add("prefetch-cold", lambda: server.client.prefetch(name), nbytes, before=cold,
                   seconds_of=lambda reply: reply.seconds)
        child = [name, args.device, server.address, str(digests), str(args.src)]
        fresh_sd = FreshChild(str(Path(__file__).resolve()), ["state_dict", *child])
        rounds.add("store-fresh", fresh_sd, nbytes, before=resident, seconds_of=lambda r: r["load_s"])
        fresh_connected = FreshChild(str(Path(__file__).resolve()), ["connected", *child])
        rounds.add("store-fresh-connected", fresh_connected, nbytes, before=resident,
                   seconds_of=lambda r: r["load_s"])
        fresh_model = None
        if (ck / "config.json").is_file() and (args.src / "config.json").is_file():
            fresh_model = FreshChild(str(Path(__file__).resolve()), ["load_model", *child])
            rounds.add("store-fresh-load_model", fresh_model, nbytes, before=resident,
                       seconds_of=lambda r: r["load_s"])
        rounds.add("store-inprocess",
                   usable(lambda: sllm_store.load_state_dict(name, args.device, store=server.address),
                          args.device), nbytes,
                   before=resident, check=check)
        warm = lambda: run.evictor.warm(files + [Path(f) for f in shards])  # noqa: E731
        rounds.add("sllm-warm", usable(lambda: sllm_store.load_state_dict(ck, args.device), args.device),
                   nbytes, before=warm, check=check)
        rounds.add("safetensors-warm",
                   usable(lambda: {k: v for f in shards for k, v in load_file(f, args.device).items()},
                          args.device), nbytes,
                   before=warm, check=check)
        contenders = rounds.run()
    finally:
        server.close()
    run.results["contenders"] = contenders
    run.results["fresh_processes"] = {
        "store-fresh": process_summary(fresh_sd.runs, nbytes),
        "store-fresh-connected": process_summary(fresh_connected.runs, nbytes),
        **({"store-fresh-load_model": process_summary(fresh_model.runs, nbytes)} if fresh_model else {})}
    return run.finish(ratios(run.results), any("error" in c for c in contenders.values()))


def ratios(results: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """The fresh-process store loads (and the in-process one) over the pinned host-to-GPU copy,
    the plain fresh one over safetensors warm;
    ``load_model``'s time over ``load_state_dict``'s, both in fresh processes."""
    c = results["contenders"]
    out = {}
    fresh_sd = c.get("store-fresh", {})
    if "best_gbps" not in fresh_sd:
        return out
    h2d = results.get("h2d", {}).get("pinned_gbps")
    if h2d:
        out["store-fresh / pinned H2D"] = {"best": fresh_sd["best_gbps"] / h2d,
                                           "median": fresh_sd["median_gbps"] / h2d}
        for name in ("store-fresh-connected", "store-inprocess"):
            other = c.get(name, {})
            if "best_gbps" in other:
                out[f"{name} / pinned H2D"] = {"best": other["best_gbps"] / h2d,
                                               "median": other["median_gbps"] / h2d}
    model = c.get("store-fresh-load_model", {})
    if "best_s" in model:
        out["store-fresh-load_model time / store-fresh time"] = {
            "best": model["best_s"] / fresh_sd["best_s"], "median": model["median_s"] / fresh_sd["median_s"]}
    st = c.get("safetensors-warm", {})
    if "best_gbps" in st:
        out["store-fresh / safetensors-warm"] = {"best": fresh_sd["best_gbps"] / st["best_gbps"],
                                                 "median": fresh_sd["median_gbps"] / st["median_gbps"]}
    return out


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    raise SystemExit(child_main(sys.argv[2:]))
