"""What checksum verification costs on each load path, verification off against on, in one run.

Paths and page-cache states, each with ``verify=False`` and ``verify=True`` in interleaved rounds:

* ``cpu``: ``load_state_dict(converted, "cpu")``, cold (files evicted) and warm (page-cached);
* ``gpu``: ``load_state_dict(converted, DEVICE)`` (reads staged through pinned buffers), cold and warm;
* ``store``: the store server reading the model from a cold disk into its pool
  (``prefetch``, the server's own time; the model is evicted from the pool before each round),
  and a load of the resident model to ``DEVICE`` in this process.

Every output is checked against the checkpoint's tensors (an XXH3 of each tensor). Remote loads
always check every chunk before it is cached or handed over, so they have no "off" to compare:
their verification is fused with the staging copy (the ``remote`` suite times those loads).

Also measured: XXH3 speed of one thread over page-cached bytes, the bound of what hashing can cost.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from common import GB, Rounds, Run, StoreServer, checker, tensor_digests

log = logging.getLogger("benchmarks.verify")

PATHS = ("cpu", "gpu", "store")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--src", type=Path, required=True,
                    help="converted checkpoint, or a safetensors checkpoint to convert to SRC.sllm")
    ap.add_argument("--device", default="cuda:0", help="the GPU of the gpu and store paths")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    ap.add_argument("--pool-size", default=None, help="store server pool (default: model size + 1 GiB)")


def converted_checkpoint(src: Path) -> Path:
    import sllm_store

    if (src / "sllm_index.json").is_file():
        return src
    dst = src.with_name(src.name + ".sllm")
    if not (dst / "sllm_index.json").is_file():
        log.info("converting %s -> %s", src, dst)
        sllm_store.convert(src, dst, quiet=True)
    return dst


def hash_speed(files: List[Path]) -> float:
    """GB/s of XXH3-64 on one thread over the (page-cached) data files' first 2 GB."""
    from sllm_store.native import _C

    buf = bytearray(256 << 20)
    done, seconds = 0, 0.0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while done < 2e9:
                n = fh.readinto(buf)
                if not n:
                    break
                view = memoryview(buf)[:n]
                t0 = time.perf_counter()
                _C.xxh3_64(view)
                seconds += time.perf_counter() - t0
                done += n
    return done / GB / seconds if seconds else 0.0


def add_local(rounds: Rounds, run: Run, ck: Path, device: str, files: List[Path], nbytes: int,
              check: Callable[[Any], Optional[str]]) -> None:
    import sllm_store

    for state in ("cold", "warm"):
        before = (lambda: run.evictor.evict(files)) if state == "cold" else (lambda: run.evictor.warm(files))
        for verify in (False, True):
            name = f"{'cpu' if device == 'cpu' else 'gpu'}-{state}-verify-{'on' if verify else 'off'}"
            rounds.add(name, lambda v=verify: sllm_store.load_state_dict(ck, device, verify=v), nbytes,
                       before=before, check=check)


def add_store(rounds: Rounds, run: Run, server: StoreServer, ck: Path, device: str, files: List[Path],
              nbytes: int, check: Callable[[Any], Optional[str]]) -> None:
    import sllm_store

    name = server.client.model_name(ck)

    def cold() -> None:
        server.client.evict(name)
        run.evictor.evict(files)

    for verify in (False, True):
        tag = "on" if verify else "off"
        rounds.add(f"store-cold-prefetch-verify-{tag}",
                   lambda v=verify: server.client.prefetch(name, verify=v), nbytes,
                   before=cold, seconds_of=lambda reply: reply.seconds)
        # The model is resident (and verified once, when asked) before the timed load.
        rounds.add(f"store-warm-verify-{tag}",
                   lambda v=verify: sllm_store.load_state_dict(ck, device, verify=v, store=server.address),
                   nbytes, before=lambda v=verify: server.client.prefetch(name, verify=v), check=check)


def costs(contenders: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Per path and state: on/off of best and of median seconds, and the extra time in percent."""
    out: Dict[str, Any] = {}
    for off_name, off in contenders.items():
        if not off_name.endswith("-verify-off") or "best_s" not in off:
            continue
        key = off_name[: -len("-verify-off")]
        on = contenders.get(key + "-verify-on", {})
        if "best_s" not in on:
            continue
        out[key] = {"best_ratio": on["best_s"] / off["best_s"],
                    "median_ratio": on["median_s"] / off["median_s"],
                    "median_extra_percent": 100 * (on["median_s"] / off["median_s"] - 1)}
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    import sllm_store

    ck = converted_checkpoint(args.src)
    index = sllm_store.read_index(ck)
    files = [index.file_path(i) for i in range(len(index.files))]
    nbytes = index.total_bytes
    paths = [p for p in args.paths.split(",") if p]
    run = Run("verify", args, data_dir=ck)
    run.results.update(checkpoint=str(ck), bytes=nbytes, files=len(files), chunk_size=index.chunk_size,
                       compressed=index.compressed)
    log.info("%s: %.2f GB in %d files", ck, nbytes / GB, len(files))

    reference = tensor_digests(sllm_store.load_state_dict(ck, "cpu", verify=True))
    check = checker(reference)
    run.evictor.warm(files)
    run.results["xxh3_one_thread_gbps"] = hash_speed(files)
    gpu = torch.cuda.is_available() and args.device.startswith("cuda")
    if gpu:
        torch.empty(1, device=args.device)
    rounds = Rounds(run.rounds, sync=(lambda: torch.cuda.synchronize(args.device)) if gpu else (lambda: None))
    if "cpu" in paths:
        add_local(rounds, run, ck, "cpu", files, nbytes, check)
    if "gpu" in paths and gpu:
        add_local(rounds, run, ck, args.device, files, nbytes, check)
    server = None
    try:
        if "store" in paths:
            pool = args.pool_size or f"{(nbytes >> 30) + 2}GiB"
            server = StoreServer(ck.parent, pool)
            add_store(rounds, run, server, ck, args.device if gpu else "cpu", files, nbytes, check)
        contenders = rounds.run()
    finally:
        if server is not None:
            server.close()
    run.results["contenders"] = contenders
    run.results["costs"] = costs(contenders)
    run.write()
    print(f"\n{'path':28} {'off s (med)':>12} {'on s (med)':>11} {'extra':>7}")
    for key, c in run.results["costs"].items():
        off, on = contenders[key + "-verify-off"], contenders[key + "-verify-on"]
        print(f"{key:28} {off['median_s']:12.3f} {on['median_s']:11.3f} {c['median_extra_percent']:6.1f}%")
    return 0 if all("error" not in c for c in contenders.values()) else 1
