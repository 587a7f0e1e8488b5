"""Compressed against plain cold loads, against the best raw read of the disk, in one run.

One checkpoint converted twice (plain, and ``--compress zstd:LEVEL``); every timing cold (files
evicted before each), in interleaved rounds, every output checked:

* ``raw-cold``: the best configuration of a raw-read sweep of the plain data files (O_DIRECT and
  buffered x threads x block sizes), on all the bytes, each round;
* ``sllm``: ``load_state_dict(plain, DEVICE)``; ``sllm-zstd``: ``load_state_dict(compressed,
  DEVICE)``, both with the defaults; ``sllm-zstd-fresh``: the compressed load as the first of a
  fresh process (the local suite's child: import, CUDA context and staging buffers its own).

GB/s are effective (tensor bytes over time), so a compressed load that reads fewer bytes can beat
the disk. Also measured, page-cached: the compressed load with 1, 4, 8 and 16 threads (decoding
must scale with threads), and on a GPU the same load into host memory with 16 threads (the
cores' decoding speed without the staging buffers and the copies to the device).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import limits
from common import GB, FreshChild, Rounds, Run, checker, process_summary, tensor_digests, usable

LOCAL_CHILD = str(Path(__file__).resolve().with_name("local.py"))  # one load in a fresh process

log = logging.getLogger("benchmarks.compress")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--src", type=Path, required=True, help="safetensors model directory (HF layout)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--level", type=int, default=None, help="zstd level (default: the library's)")
    ap.add_argument("--sweep-threads", default="4,16,32")
    ap.add_argument("--sweep-blocks-mib", default="16,32,64")
    ap.add_argument("--sweep-bytes", type=float, default=4e9, help="bytes read per sweep point")
    ap.add_argument("--quick", action="store_true", help="CI: one round, a small sweep")


def converted(src: Path, compress: str) -> Path:
    import sllm_store

    dst = src.with_name(src.name + (".zst.sllm" if compress != "none" else ".sllm"))
    if not (dst / "sllm_index.json").is_file():
        log.info("converting %s -> %s (%s)", src, dst, compress)
        sllm_store.convert(src, dst, compress=None if compress == "none" else compress, quiet=True)
    return dst


def main(args: argparse.Namespace) -> int:
    import torch

    import sllm_store

    if args.quick:
        args.rounds, args.sweep_threads, args.sweep_blocks_mib, args.sweep_bytes = 1, "4", "16", 2.5e8
    plain = converted(args.src, "none")
    packed = converted(args.src, "zstd" if args.level is None else f"zstd:{args.level}")
    index, zindex = sllm_store.read_index(plain), sllm_store.read_index(packed)
    files = [index.file_path(i) for i in range(len(index.files))]
    zfiles = [zindex.file_path(i) for i in range(len(zindex.files))]
    nbytes = index.total_bytes
    gpu = args.device != "cpu"
    run = Run("compress", args, data_dir=plain)
    stored = sum(f.stat().st_size for f in zfiles)
    run.results.update(bytes=nbytes, stored_bytes=stored, ratio=sum(f.stat().st_size for f in files) / stored)
    reference = tensor_digests(sllm_store.load_state_dict(plain, "cpu", verify=True))
    check = checker(reference) if gpu else (lambda d: None if d == reference else "tensor bytes differ")
    if gpu:
        torch.empty(1, device=args.device)
    ints = [[int(x) for x in a.split(",")] for a in (args.sweep_threads, args.sweep_blocks_mib)]
    sweep = limits.disk_sweep(files, lambda: run.evictor.evict(files), lambda: None, cold=True,
                              threads=ints[0], blocks_mib=ints[1], limit=int(args.sweep_bytes))
    run.results["disk_sweep"] = sweep
    rounds = Rounds(run.rounds, sync=(lambda: torch.cuda.synchronize(args.device)) if gpu else (lambda: None))
    best = sweep["best"]
    reader = limits.RawReader(best["threads"], best["block_mib"] << 20)
    rounds.add("raw-cold", lambda: reader.read(files, best["direct"]), nbytes,
               before=lambda: run.evictor.evict(files))
    for name, ck, fs in (("sllm", plain, files), ("sllm-zstd", packed, zfiles)):
        rounds.add(name, usable(lambda ck=ck: sllm_store.load_state_dict(ck, args.device), args.device),
                   nbytes, before=lambda fs=fs: run.evictor.evict(fs), check=check)
    digests = Path(run.scratch()) / "digests.json"
    digests.write_text(json.dumps(reference))
    threads = str(sllm_store.LoadConfig.resolve().num_threads)
    fresh = FreshChild(LOCAL_CHILD, ["sllm", str(args.src), str(packed), args.device, threads, str(digests)])
    rounds.add("sllm-zstd-fresh", fresh, nbytes, before=lambda: run.evictor.evict(zfiles),
               seconds_of=lambda r: r["load_s"])
    c = rounds.run()
    run.results["contenders"] = c
    run.results["fresh_processes"] = {"sllm-zstd-fresh": process_summary(fresh.runs, nbytes)}
    run.results["warm_compressed_by_threads"] = by_threads(packed, zfiles, args.device, nbytes, run)
    if args.device != "cpu":  # the same decoding into host memory: the cores' speed alone
        run.results["warm_compressed_to_host"] = by_threads(packed, zfiles, "cpu", nbytes, run, (16,))
    limit = max(best["gbps"], c["raw-cold"].get("best_gbps", 0.0))
    return run.finish({f"{n} / best raw cold read": {"best": c[n]["best_gbps"] / limit,
                                                     "median": c[n]["median_gbps"] / limit}
                       for n in ("sllm", "sllm-zstd", "sllm-zstd-fresh") if "best_gbps" in c[n]},
                      any("error" in v for v in c.values()))


def by_threads(ck: Path, files: List[Path], device: str, nbytes: int, run: Run,
               counts: Tuple[int, ...] = (1, 4, 8, 16)) -> Dict[str, Any]:
    """The page-cached compressed load with each of ``counts`` threads (GB/s, best of the rounds)."""
    import torch

    import sllm_store

    run.evictor.warm(files)
    out = {}
    for threads in counts:
        best = float("inf")
        for _ in range(run.rounds):
            t0 = time.perf_counter()
            sd = sllm_store.load_state_dict(ck, device, num_threads=threads)
            if device != "cpu":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
            del sd
        out[str(threads)] = nbytes / GB / best
        log.info("page-cached compressed load to %s, %2d threads: %.2f GB/s", device, threads,
                 out[str(threads)])
    return out
