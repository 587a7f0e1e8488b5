#!/usr/bin/env python3
"""Time loads through the store server (``sllm-store serve``): a model already resident in the
server's pinned-memory cache, loaded by a fresh process, against the limits measured in the same
run.

Measured, in one run on one checkpoint:

* ``pinned H2D``: torch copy of a pinned host buffer to the GPU (the PCIe limit; best of 3).
* ``safetensors warm``: ``safetensors.torch.load_file(shard, device=DEVICE)`` on the page-cached
  source (best of ``--reps``).
* ``sllm in-process warm``: ``load_state_dict(converted, DEVICE)`` without a server, page-cached.
* ``server start``: seconds from launching ``sllm-store serve`` until it answers (pool pinning).
* ``prefetch cold``: reading the model from a cold disk into the server's cache.
* ``store load, fresh process``: a new Python process imports sllm_store + torch, initialises
  CUDA and calls ``load_state_dict(name, DEVICE, store=...)``; the load call is timed inside the
  process (best and median of ``--reps`` processes) and the whole process from launch too.
* ``store load_model, fresh process``: the same with ``load_model`` (import + build + load),
  when the checkpoint has a config.json.
* ``store load, in-process``: repeated loads in this (warm) process.

GB/s counts tensor payload bytes (1e9). Ratios: store GB/s / pinned H2D GB/s, and / safetensors
warm GB/s.

Example::

    python benchmarks/make_checkpoint.py --preset 8B --out /data/l8b
    python benchmarks/bench_store.py --src /data/l8b --device cuda:0 --pool-size 18GiB \\
        --json results/store.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import GB, Evictor, h2d_bandwidth, source_files, write_json  # noqa: E402

log = logging.getLogger("bench_store")

CHILD_STATE_DICT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, sllm_store
import sllm_store.loader, sllm_store.server.client  # imported by the first load otherwise
t1 = time.perf_counter()
torch.cuda.init(); torch.empty(1, device=sys.argv[2]); torch.cuda.synchronize()
t2 = time.perf_counter()
from sllm_store.loader import load_state_dict_with_report
sd, report = load_state_dict_with_report(sys.argv[1], sys.argv[2], store=sys.argv[3])
torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "cuda_init_s": t2 - t1, "load_s": t3 - t2, "bytes": report.bytes,
                  "hit": report.stats["hit"], "server_s": report.stats["server_seconds"],
                  "copy_s": report.stats["copy_seconds"], "describe_s": report.stats["describe_seconds"],
                  "allocate_s": report.stats["allocate_seconds"], "rpc_s": report.stats["rpc_seconds"]}))
"""

CHILD_MODEL = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, sllm_store
t1 = time.perf_counter()
if sys.argv[3] == "from_pretrained":
    import transformers
    auto = transformers.AutoModelForCausalLM
    model = auto.from_pretrained(sys.argv[1], device_map=sys.argv[2], dtype="auto")
else:
    model = sllm_store.load_model(sys.argv[1], device_map=sys.argv[2], store=sys.argv[3])
torch.cuda.synchronize()
t2 = time.perf_counter()
n = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"import_s": t1 - t0, "load_model_s": t2 - t1, "total_s": t2 - t0, "bytes": n}))
"""


def run_child(code: str, *args: str) -> Dict[str, Any]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"child failed ({p.returncode}): {p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    return out


def summarize(runs: List[Dict[str, Any]], key: str) -> Dict[str, float]:
    vals = [r[key] for r in runs]
    return {"best": min(vals), "median": statistics.median(vals)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="HF-layout safetensors checkpoint")
    ap.add_argument("--converted", type=Path, default=None,
                    help="converted copy (default: SRC.sllm, converted if missing)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--pool-size", default="18GiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--socket", default=None, help="unix socket path (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import safetensors.torch
    import torch

    import sllm_store
    from sllm_store.server.client import StoreClient

    converted = args.converted or args.src.with_name(args.src.name + ".sllm")
    if not converted.exists():
        log.info("converting %s -> %s", args.src, converted)
        sllm_store.convert(args.src, converted, quiet=True)
    index = sllm_store.read_index(converted)
    nbytes = index.total_bytes
    data_files = [index.file_path(i) for i in range(len(index.files))]
    src_files = source_files(args.src)
    results: Dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device), "checkpoint": str(args.src),
        "bytes": nbytes, "pool_size": args.pool_size, "reps": args.reps,
    }
    log.info("checkpoint: %.2f GB in %d file(s)", nbytes / GB, len(data_files))

    # Limits and peers, same run.
    results["h2d"] = h2d_bandwidth(args.device, 2.0)
    log.info("pinned H2D %.1f GB/s", results["h2d"]["pinned_gbps"])
    for f in src_files + data_files:  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    best = float("inf")
    for _ in range(args.reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sd: Dict[str, Any] = {}
        for f in src_files:
            sd.update(safetensors.torch.load_file(str(f), device=args.device))
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        del sd
    results["safetensors_warm_gbps"] = nbytes / GB / best
    best = float("inf")
    for _ in range(args.reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sd = sllm_store.load_state_dict(converted, args.device)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        del sd
    results["sllm_inprocess_warm_gbps"] = nbytes / GB / best
    torch.cuda.empty_cache()
    log.info("safetensors warm %.2f GB/s, sllm in-process warm %.2f GB/s",
             results["safetensors_warm_gbps"], results["sllm_inprocess_warm_gbps"])

    # The server.
    tmp = tempfile.mkdtemp(prefix="bench-store-")
    sock = args.socket or os.path.join(tmp, "store.sock")
    address = f"unix://{sock}"
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "sllm_store", "serve", "--storage-path", str(converted.parent),
         "--mem-pool-size", args.pool_size, "--listen", address],
        stdout=open(os.path.join(tmp, "server.log"), "w"), stderr=subprocess.STDOUT,
    )
    try:
        client = StoreClient(address)
        while True:
            try:
                client.health(timeout=1.0)
                break
            except sllm_store.SllmStoreError:
                if server.poll() is not None or time.perf_counter() - t0 > 300:
                    raise RuntimeError(open(os.path.join(tmp, "server.log")).read()[-3000:]) from None
                time.sleep(0.2)
        results["server_start_s"] = time.perf_counter() - t0
        log.info("server up in %.2f s", results["server_start_s"])

        Evictor(sllm_store).evict(data_files)
        r = client.prefetch(converted.name)
        results["prefetch_cold"] = {"seconds": r.seconds, "gbps": r.bytes / GB / r.seconds}
        log.info("prefetch (cold disk -> pool) %.2f s, %.2f GB/s", r.seconds, r.bytes / GB / r.seconds)

        runs = [run_child(CHILD_STATE_DICT, converted.name, args.device, address) for _ in range(args.reps)]
        fresh = {k: summarize(runs, k) for k in ("import_s", "cuda_init_s", "load_s", "server_s", "copy_s",
                                                  "describe_s", "allocate_s", "rpc_s", "process_wall_s")}
        fresh["gbps_best"] = nbytes / GB / fresh["load_s"]["best"]
        fresh["gbps_median"] = nbytes / GB / fresh["load_s"]["median"]
        fresh["all_hits"] = all(r["hit"] for r in runs)
        results["store_fresh_state_dict"] = fresh
        log.info("fresh process store load: best %.3f s = %.2f GB/s", fresh["load_s"]["best"],
                 fresh["gbps_best"])

        if (converted / "config.json").is_file():
            runs = [run_child(CHILD_MODEL, converted.name, args.device, address) for _ in range(args.reps)]
            results["store_fresh_load_model"] = {k: summarize(runs, k) for k in
                                                 ("import_s", "load_model_s", "total_s", "process_wall_s")}
            # The same fresh process with from_pretrained on the page-cached source, for scale.
            runs = [run_child(CHILD_MODEL, str(args.src), args.device, "from_pretrained")]
            keys = ("import_s", "load_model_s", "total_s", "process_wall_s")
            results["fresh_from_pretrained_warm"] = {k: summarize(runs, k) for k in keys}

        best, best_copy = float("inf"), float("inf")
        from sllm_store.loader import load_state_dict_with_report

        for _ in range(args.reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sd, report = load_state_dict_with_report(converted.name, args.device, store=address)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            best_copy = min(best_copy, report.stats["copy_seconds"])
            del sd
        results["store_inprocess"] = {"gbps": nbytes / GB / best, "server_copy_gbps": nbytes / GB / best_copy}
        results["server_status"] = {"pool_used": client.status().pool_used}
    finally:
        server.terminate()
        try:
            results["server_exit"] = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            results["server_exit"] = "killed"

    h2d = results["h2d"]["pinned_gbps"]
    st = results["safetensors_warm_gbps"]
    fresh = results["store_fresh_state_dict"]
    rows = [
        ("pinned host->GPU copy (torch)", h2d, None),
        ("safetensors.load_file warm", st, None),
        ("sllm in-process warm (page cache)", results["sllm_inprocess_warm_gbps"], None),
        ("prefetch cold (disk -> pool)", results["prefetch_cold"]["gbps"], None),
        ("store load, fresh process (best)", fresh["gbps_best"], fresh["load_s"]["best"]),
        ("store load, fresh process (median)", fresh["gbps_median"], fresh["load_s"]["median"]),
        ("store load, in-process (best)", results["store_inprocess"]["gbps"], None),
        ("server copy only (best)", results["store_inprocess"]["server_copy_gbps"], None),
    ]
    print(f"\n{'what':40} {'GB/s':>8} {'seconds':>8} {'vs H2D':>7} {'vs st warm':>10}")
    for name, gbps, secs in rows:
        print(f"{name:40} {gbps:8.2f} {secs if secs is not None else nbytes / GB / gbps:8.3f} "
              f"{gbps / h2d:7.2f} {gbps / st:10.2f}")
    results["ratios"] = {
        "fresh_best_vs_h2d": fresh["gbps_best"] / h2d,
        "fresh_best_vs_safetensors_warm": fresh["gbps_best"] / st,
        "fresh_median_vs_h2d": fresh["gbps_median"] / h2d,
    }
    print(f"\nserver start (pool pinning) {results['server_start_s']:.2f} s")
    print(f"fresh process: import {fresh['import_s']['median']:.2f} s, "
          f"CUDA init {fresh['cuda_init_s']['median']:.2f} s, load {fresh['load_s']['median']:.3f} s, "
          f"whole process {fresh['process_wall_s']['median']:.2f} s")
    if "store_fresh_load_model" in results:
        m = results["store_fresh_load_model"]
        print(f"fresh process load_model: import {m['import_s']['median']:.2f} s, load_model "
              f"{m['load_model_s']['median']:.2f} s, whole process {m['process_wall_s']['median']:.2f} s")
        m = results["fresh_from_pretrained_warm"]
        print(f"fresh process from_pretrained (page-cached): import {m['import_s']['median']:.2f} s, "
              f"from_pretrained {m['load_model_s']['median']:.2f} s, whole process "
              f"{m['process_wall_s']['median']:.2f} s")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
