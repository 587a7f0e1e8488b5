#!/usr/bin/env python3
"""Compressed vs uncompressed cold loads against the raw disk read limit, in one run.

Measured on one checkpoint (converted twice: plain, and ``--compress zstd:LEVEL``), every timing
cold (files evicted from the page cache before each):

* ``raw-direct`` / ``raw-buffered``: parallel ``preadv`` (16 threads, 32 MiB blocks) of the plain
  data files, with and without O_DIRECT; the best is the raw disk limit.
* ``sllm``: ``load_state_dict(plain, DEVICE)``.
* ``sllm-zstd``: ``load_state_dict(compressed, DEVICE)`` (default settings: ``io_mode="auto"``
  reads compressed checkpoints buffered).
* ``sllm-zstd-direct``: the same with ``io_mode="direct"`` (O_DIRECT); ``sllm-zstd-32t``: with 32
  threads (more reads in flight while others decode). These two tell whether the default read mode
  and concurrency still suit compressed chunks on this disk.

``--skip NAME,...`` leaves contenders out; ``--no-scaling`` skips the warm decoding runs.

The contenders run in rounds (``--reps``): each round runs every contender once, in the same order,
so a disk whose speed drifts during the run affects them all alike. The table gives each
contender's best and median; the ratios use the best, and the per-round ratios of the compressed
load to that round's raw limit are in the JSON (``rounds``).

GB/s are *effective*: tensor payload bytes (1e9) per second, so a compressed load that reads fewer
bytes can beat the disk. Also measured, warm (page-cached), the compressed load with 1, 4, 8 and 16
threads: decompression must scale with threads.

Example::

    python benchmarks/bench_compress.py --src /data/l8b --device cuda:0 --json results/compress.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import GB, Evictor, RawReader, run_rounds, write_json  # noqa: E402

log = logging.getLogger("bench_compress")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="checkpoint to convert (HF dir, .safetensors)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip", type=lambda v: {x for x in v.split(",") if x}, default=set(),
                    help="contenders to leave out (not raw-*, sllm, sllm-zstd)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the warm decoding runs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    import sllm_store

    cuda = args.device.startswith("cuda")
    plain = args.src.with_name(args.src.name + ".sllm")
    comp = args.src.with_name(args.src.name + f".zstd{args.level}.sllm")
    results: Dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device,
                               "gpu": torch.cuda.get_device_name(args.device) if cuda else None,
                               "checkpoint": str(args.src), "level": args.level}
    if not plain.exists():
        sllm_store.convert(args.src, plain, quiet=True)
    if not comp.exists():
        t0 = time.perf_counter()
        sllm_store.convert(args.src, comp, compress=f"zstd:{args.level}", quiet=True)
        results["convert_compressed_s"] = time.perf_counter() - t0
    pi, ci = sllm_store.read_index(plain), sllm_store.read_index(comp)
    nbytes = pi.total_bytes
    plain_files = [pi.file_path(i) for i in range(len(pi.files))]
    comp_files = [ci.file_path(i) for i in range(len(ci.files))]
    raw_size = sum(f.size for f in ci.files)
    disk_size = sum(f.disk_size for f in ci.files)
    results.update(bytes=nbytes, file_bytes=raw_size, compressed_file_bytes=disk_size,
                   ratio=raw_size / disk_size)
    log.info("%.2f GB of weights; compressed files %.2f GB (%.3fx)", nbytes / GB, disk_size / GB,
             raw_size / disk_size)

    evictor = Evictor(sllm_store)
    reader = RawReader(16, 32 << 20)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(args.device)

    file_bytes = sum(p.stat().st_size for p in plain_files)
    contenders: List[Tuple[str, Any, int]] = [
        ("raw-direct", lambda: reader.read(plain_files, True), file_bytes),
        ("raw-buffered", lambda: reader.read(plain_files, False), file_bytes),
        ("sllm", lambda: sllm_store.load_state_dict(plain, args.device), nbytes),
        ("sllm-zstd", lambda: sllm_store.load_state_dict(comp, args.device), nbytes),
        ("sllm-zstd-direct",
         lambda: sllm_store.load_state_dict(comp, args.device, io_mode="direct"), nbytes),
        ("sllm-zstd-32t", lambda: sllm_store.load_state_dict(comp, args.device, num_threads=32), nbytes),
    ]
    contenders = [c for c in contenders if c[0] not in args.skip]

    def before(name: str) -> None:
        if cuda:
            torch.cuda.empty_cache()
        evictor.evict(plain_files + comp_files)
        sync()

    results.update(run_rounds(contenders, args.reps, before, sync))
    for name, _fn, _count in contenders:
        if "error" in results[name]:
            raise SystemExit(f"{name} failed: {results[name]['error']}")
    rounds = [{"sllm_zstd_vs_raw": min(d, b) * nbytes / file_bytes / z}
              for d, b, z in zip(results["raw-direct"]["all_s"], results["raw-buffered"]["all_s"],
                                 results["sllm-zstd"]["all_s"])]
    results["rounds"] = rounds
    raw_best = max(results["raw-direct"]["gbps"], results["raw-buffered"]["gbps"])

    # Warm: decompression throughput by thread count (files page-cached).
    for f in [] if args.no_scaling else comp_files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    scaling = {}
    for threads in () if args.no_scaling else (1, 4, 8, 16):
        best = float("inf")
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            out = sllm_store.load_state_dict(comp, args.device, num_threads=threads)
            sync()
            best = min(best, time.perf_counter() - t0)
            del out
        scaling[threads] = nbytes / GB / best
        log.info("warm compressed load, %2d threads: %.2f GB/s", threads, scaling[threads])
    results["warm_compressed_by_threads"] = scaling

    names = [name for name, _, _ in contenders]
    results["ratios"] = {f"{name}_vs_raw": results[name]["gbps"] / raw_best for name in names[2:]}
    results["ratios"]["sllm_zstd_vs_sllm"] = results["sllm-zstd"]["gbps"] / results["sllm"]["gbps"]
    print(f"\ncompression: {raw_size / GB:.2f} GB -> {disk_size / GB:.2f} GB ({raw_size / disk_size:.3f}x)")
    print(f"cold, {args.reps} rounds    {'best s':>7} {'GB/s':>7} {'vs raw':>7} {'median GB/s':>12}")
    for name in names:
        r = results[name]
        print(f"{name:20} {r['seconds']:7.2f} {r['gbps']:7.2f} {r['gbps'] / raw_best:7.2f} "
              f"{r['median_gbps']:12.2f}")
    print("compressed vs raw limit, per round: " +
          ", ".join(f"{x['sllm_zstd_vs_raw']:.2f}x" for x in rounds))
    print("warm compressed load by threads: " + ", ".join(f"{t}: {g:.2f} GB/s" for t, g in scaling.items()))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
