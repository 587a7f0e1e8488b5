"""Local loads, cold and page-cached, against the disk's and the bus's limits and against peers.

One run on one checkpoint (a safetensors model directory and its converted copy):

* limits: raw disk reads swept over O_DIRECT/buffered x threads x block sizes (cold) and buffered
  reads over threads x block sizes (page-cached); pinned and pageable host-to-GPU copies;
* contenders in interleaved rounds, cold (every file evicted before each) and warm: ``sllm``
  (``load_state_dict``, defaults; ``sllm_direct``, ``sllm_buffered``, ``sllm_mmap``: one io_mode,
  on request), ``serverlessllm`` (``load_state_dict`` of the same tensors
  in ServerlessLLM's layout), ``safetensors`` (``load_file``), ``runai`` (runai-model-streamer,
  as many streams as our threads), ``fastsafetensors`` (without GDS), both with O_DIRECT as they
  default to (``runai_buffered``, ``fastsafetensors_buffered``: through the page cache, on
  request), and ``raw`` (the best cold configuration of the sweep, on all the bytes, each round);
* every contender's first load in a fresh process (import, CUDA context, pinning included), cold
  (``fresh``) and page-cached (``fresh-warm``);
* every output checked against the checkpoint's tensors (XXH3 of each), every round.

On the CPU a contender's time includes one pass over every byte it returns (an XXH3 of each
tensor): the time until the tensors are usable, whether the loader copies or maps lazily.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

if not __package__:  # run as a script (a fresh process of --child)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import limits  # noqa: E402
from common import (  # noqa: E402
    Rounds,
    Run,
    checker,
    fresh_ratios,
    local_limits,
    resident_fraction,
    summary,
    tensor_digests,
    usable,
)

log = logging.getLogger("benchmarks.local")

CONTENDERS = ("sllm", "serverlessllm", "safetensors", "runai", "fastsafetensors", "load_model",
              "from_pretrained")
MODELS = ("load_model", "from_pretrained")  # whole models: their state_dict is checked
IO_VARIANTS = ("sllm_direct", "sllm_buffered", "sllm_mmap")  # ``sllm`` with one io_mode (not by default)
# The peers read with O_DIRECT by default, past the page cache; these variants (on request) read
# through it, each with the setting its library documents for that.
PEER_VARIANTS = {"runai_buffered": {"RUNAI_STREAMER_FS_STRATEGY": "io_uring_buffered,sync_buffered"},
                 "fastsafetensors_buffered": {"FASTSAFETENSORS_ODIRECT": "0"}}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--src", type=Path, required=True, help="safetensors model directory (HF layout)")
    ap.add_argument("--converted", type=Path, default=None, help="its converted copy (default SRC.sllm)")
    ap.add_argument("--device", default="cuda:0", help="cpu or cuda:N")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"subset of {CONTENDERS}, and of {IO_VARIANTS} (the default load with one io_mode) "
                         f"and {tuple(PEER_VARIANTS)} (the peer reading through the page cache)")
    ap.add_argument("--modes", default="cold,warm,fresh", help="subset of cold, warm, fresh, fresh-warm")
    ap.add_argument("--sweep-threads", default="1,4,8,16,32")
    ap.add_argument("--sweep-blocks-mib", default="4,16,32,64")
    ap.add_argument("--sweep-bytes", type=float, default=4e9, help="bytes read per sweep point")
    ap.add_argument("--quick", action="store_true",
                    help="CI: one round, a small sweep; checks the code, measures nothing")


# --- contenders ---------------------------------------------------------------------------------

def shards(src: Path) -> List[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no .safetensors files in {src}")
    return files


@contextlib.contextmanager
def environment(values: Dict[str, str]) -> Iterator[None]:
    """``values`` set in ``os.environ`` for the duration (a peer's settings are environment variables)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_loader(name: str, src: Path, ck: Path, device: str, threads: int,
                stats: Optional[Dict[str, Any]] = None) -> Callable[[], Dict[str, Any]]:
    """The load of one contender (raises ImportError when its package is missing). ``stats``: our
    loads put their report's figures there."""
    stats = {} if stats is None else stats
    if name in ("sllm", "serverlessllm"):
        from sllm_store.loader import load_state_dict_with_report

        path = ck if name == "sllm" else serverlessllm_copy(src)

        def load_sd() -> Dict[str, Any]:
            out, report = load_state_dict_with_report(path, device)
            stats.update(report.stats, report_s=report.seconds)
            return out
        return load_sd
    if name in IO_VARIANTS:
        import sllm_store

        io_mode = name.removeprefix("sllm_")
        return lambda: sllm_store.load_state_dict(ck, device, io_mode=io_mode)
    if name in MODELS:
        return model_loader(name, src, ck, device, stats)
    files = [str(f) for f in shards(src)]
    if name == "safetensors":
        from safetensors.torch import load_file

        def load() -> Dict[str, Any]:
            out: Dict[str, Any] = {}
            for f in files:
                out.update(load_file(f, device=device))
            return out
        return load
    if name in ("runai", "runai_buffered"):
        from runai_model_streamer import SafetensorsStreamer

        os.environ.setdefault("RUNAI_STREAMER_CONCURRENCY", str(threads))
        env = PEER_VARIANTS.get(name, {})

        def load() -> Dict[str, Any]:
            with environment(env), SafetensorsStreamer() as streamer:
                # its tensors are the caller's (owned), on the device it copies each one to
                streamer.stream_files(files, device=device)
                return dict(streamer.get_tensors())
        return load
    if name in ("fastsafetensors", "fastsafetensors_buffered"):
        from fastsafetensors import fastsafe_open

        env = PEER_VARIANTS.get(name, {})

        def load() -> Dict[str, Any]:
            with environment(env), fastsafe_open(filenames=files, nogds=True, device=device) as f:
                return {k: f.get_tensor(k).clone() for k in f.keys()}
        return load
    raise ValueError(f"unknown contender {name!r}")


def serverlessllm_copy(src: Path) -> Path:
    """The checkpoint in ServerlessLLM's layout (``tensor_index.json`` + ``tensor.data_N``), beside
    the source (written by ``sllm_store.torch.save_dict`` from the main process, before any timing)."""
    return src.with_name(src.name + ".serverlessllm")


def write_serverlessllm_copy(src: Path, ck: Path) -> List[Path]:
    """Make :func:`serverlessllm_copy` when it is missing; its data files."""
    import sllm_store
    from sllm_store.formats import serverlessllm_partitions

    out = serverlessllm_copy(src)
    if not (out / "tensor_index.json").is_file():
        from sllm_store.torch import save_dict

        log.info("writing %s (ServerlessLLM's layout)", out)
        save_dict(sllm_store.load_state_dict(ck, "cpu"), out)
    return serverlessllm_partitions(out)


def model_loader(name: str, src: Path, ck: Path, device: str,
                 stats: Dict[str, Any]) -> Callable[[], Dict[str, Any]]:
    """``load_model`` (its report's figures into ``stats``) or ``from_pretrained`` in bf16; the
    model's classes are imported here, before any timing (a fresh process pays for them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sllm_store.model import load_model_with_report

    if not (src / "config.json").is_file():
        raise ImportError(f"{src} has no config.json")
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    if name == "load_model":
        def load() -> Dict[str, Any]:
            model, report = load_model_with_report(ck, device_map=device, torch_dtype=torch.bfloat16)
            stats.update(report.stats, report_s=report.seconds)
            return dict(model.state_dict())
        return load
    device_map = None if device == "cpu" else device  # a device_map needs accelerate
    return lambda: dict(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16,
                                                             device_map=device_map).state_dict())


# --- fresh processes ----------------------------------------------------------------------------

def child_main(argv: List[str]) -> int:
    """``local.py --child NAME SRC CK DEVICE THREADS DIGESTS``: one load in this fresh process,
    its output checked against the reference digests afterwards; prints JSON."""
    t0 = time.perf_counter()
    name, src, ck, device, threads = argv[0], Path(argv[1]), Path(argv[2]), argv[3], int(argv[4])
    reference = {k: int(v) for k, v in json.loads(Path(argv[5]).read_text()).items()}
    import torch

    t1 = time.perf_counter()
    if device != "cpu":
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    stats: Dict[str, Any] = {}  # the load's own account (its reads, staging buffers, model building)
    load = make_loader(name, src, ck, device, threads, stats)
    t3 = time.perf_counter()
    out = usable(load, device)()  # on the CPU: the load and one pass over every byte
    if device != "cpu":
        torch.cuda.synchronize(device)
    t4 = time.perf_counter()
    if device == "cpu":  # the digests made in the timed pass
        got = {k: v for k, v in out.items() if k in reference}
        problem = None if got == reference else "tensor bytes differ"
    else:
        problem = checker(reference, subset=name in MODELS)(out)
    print(json.dumps({"import_s": t1 - t0, "cuda_s": t2 - t1, "load_s": t4 - t3, "setup_s": t3 - t2,
                      "since_start_s": t4 - t0, "problem": problem, "stats": stats}, default=str))
    return 0


def fresh_load(name: str, args: argparse.Namespace, ck: Path, threads: int, digests: Path) -> Dict[str, Any]:
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, str(args.src), str(ck),
           args.device, str(threads), str(digests)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"fresh {name} failed: {r.stderr[-1500:]}")
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    if rec["problem"]:
        raise RuntimeError(f"fresh {name}: wrong output: {rec['problem']}")
    rec["process_s"] = wall
    return rec


# --- the suite ----------------------------------------------------------------------------------

def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def measure_limits(run: Run, args: argparse.Namespace, files: List[Path]) -> None:
    evict, warm = (lambda: run.evictor.evict(files)), (lambda: run.evictor.warm(files))
    if args.device != "cpu":
        run.results["h2d"] = limits.h2d(args.device)
    kw = {"threads": _ints(args.sweep_threads), "blocks_mib": _ints(args.sweep_blocks_mib),
          "limit": int(args.sweep_bytes)}
    run.results["disk_sweep"] = {"cold": limits.disk_sweep(files, evict, warm, cold=True, **kw),
                                 "warm": limits.disk_sweep(files, evict, warm, cold=False, **kw),
                                 "bytes_per_point": kw["limit"]}


def fresh_rounds(run: Run, args: argparse.Namespace, names: List[str], ck: Path, before: Callable[[], None],
                 threads: int, reference: Dict[str, int], cache: Tuple[str, List[Path]]) -> Dict[str, Any]:
    """Each contender's first load in a fresh process, ``rounds`` times (interleaved), after
    ``before`` (the page cache dropped or filled: ``cache``, the state and its files, whose resident
    fraction each run records), its output checked against ``reference``."""
    digests = Path(run.scratch()) / "digests.json"
    digests.write_text(json.dumps(reference))
    runs: Dict[str, List[Dict[str, Any]]] = {n: [] for n in names}
    errors: Dict[str, str] = {}
    for _ in range(run.rounds):
        for name in names:
            if name in errors:
                continue
            before()
            resident = resident_fraction(f"fresh {name}", *cache)
            try:
                record = fresh_load(name, args, ck, threads, digests)
                runs[name].append({**record, "resident_before": resident})
            except RuntimeError as e:
                errors[name] = str(e)[-500:]
    nbytes = run.results["bytes"]
    return {n: {"error": errors[n]} if n in errors else
            {"load": summary([t["load_s"] for t in runs[n]], nbytes),
             "process": summary([t["process_s"] for t in runs[n]], nbytes), "runs": runs[n]}
            for n in names}


def main(args: argparse.Namespace) -> int:
    import torch

    import sllm_store
    from sllm_store.config import LoadConfig

    if args.quick:
        args.rounds, args.sweep_threads, args.sweep_blocks_mib, args.sweep_bytes = 1, "1,4", "4,16", 2.5e8
    ck = args.converted or args.src.with_name(args.src.name + ".sllm")
    if not (ck / "sllm_index.json").is_file():
        log.info("converting %s -> %s", args.src, ck)
        sllm_store.convert(args.src, ck, quiet=True)
    index = sllm_store.read_index(ck)
    files = [index.file_path(i) for i in range(len(index.files))]
    nbytes = index.total_bytes
    gpu = args.device != "cpu"
    threads = LoadConfig.resolve().num_threads
    run = Run("local-" + ("gpu" if gpu else "cpu"), args, data_dir=ck)
    run.results.update(checkpoint=str(ck), source=str(args.src), bytes=nbytes, files=len(files),
                       threads=threads)
    reference = tensor_digests(sllm_store.load_state_dict(ck, "cpu", verify=True))
    others = write_serverlessllm_copy(args.src, ck) if "serverlessllm" in args.contenders.split(",") else []
    # every contender's files: the converted checkpoint, the peers' safetensors, the other layout
    data = files + sorted(args.src.glob("*.safetensors")) + others
    evict, warm = (lambda: run.evictor.evict(data)), (lambda: run.evictor.warm(data))
    if gpu:
        torch.empty(1, device=args.device)
    measure_limits(run, args, files)

    modes = set(args.modes.split(","))
    rounds = Rounds(run.rounds, sync=(lambda: torch.cuda.synchronize(args.device)) if gpu else (lambda: None))
    best = run.results["disk_sweep"]["cold"]["best"]
    if best and "cold" in modes:
        reader = limits.RawReader(best["threads"], best["block_mib"] << 20)
        rounds.add("raw-cold", lambda: reader.read(files, best["direct"]), nbytes, before=evict,
                   cache=("cold", files))
    skipped: Dict[str, str] = {}
    loaders, reports = {}, {}
    for name in args.contenders.split(","):
        reports[name] = {}  # our loads' own account of their latest load (model building included)
        try:
            loaders[name] = usable(make_loader(name, args.src, ck, args.device, threads, reports[name]),
                                   args.device)
        except ImportError as e:
            skipped[name] = f"not installed ({e})"
    steps: Dict[str, List[Dict[str, Any]]] = {}  # per contender, its report's figures in each round

    def reported(key: str, fn: Callable[[], Any], stats: Dict[str, Any]) -> Callable[[], Any]:
        def load() -> Any:
            stats.clear()
            out = fn()
            if stats:
                steps.setdefault(key, []).append(report_steps(stats))
            return out
        return load

    def same_digests(d: Any) -> Optional[str]:  # the CPU contenders return their digests
        d = {k: v for k, v in d.items() if k in reference}  # a model's state_dict may add tied names
        return None if d == reference else "tensor bytes differ"

    for state, before in (("cold", evict), ("warm", warm)):
        if state in modes:
            for name, fn in loaders.items():
                rounds.add(f"{name}-{state}", reported(f"{name}-{state}", fn, reports[name]), nbytes,
                           before=before, cache=(state, data),
                           check=checker(reference, subset=name in MODELS) if gpu else same_digests)
    contenders = rounds.run() if rounds.contenders else {}
    fresh = {key: fresh_rounds(run, args, list(loaders), ck, before, threads, reference, (state, data))
             for mode, key, before, state in (("fresh", "fresh_cold", evict, "cold"),
                                              ("fresh-warm", "fresh_warm", warm, "warm"))
             if mode in modes}
    run.results.update(contenders=contenders, steps=steps, **fresh, skipped=skipped)
    failed = list(contenders.values()) + [c for f in fresh.values() for c in f.values()]
    return run.finish(ratios(run.results), any("error" in c for c in failed))


def report_steps(stats: Dict[str, Any]) -> Dict[str, float]:
    """The timings of a load's report: its seconds fields, and model building's (``model_*``)."""
    out = {k: v for k, v in stats.items() if isinstance(v, float) and k.endswith(("_s", "seconds"))}
    out.update({f"model_{k}": v for k, v in stats.get("model", {}).items() if isinstance(v, float)})
    return out


def ratios(results: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """Each contender's GB/s over the limit that bounds it (:func:`common.local_limits`): cold over
    the best cold raw read, warm over the best page-cached read (on a GPU at most the pinned
    host-to-GPU copy); ``load_model``'s and ``safetensors``' times against ``load_state_dict``'s."""
    c = results["contenders"]
    cold_limit, warm_limit = local_limits(results)
    out = {}
    for name, rec in c.items():
        if "best_gbps" not in rec or name == "raw-cold":
            continue
        lim = cold_limit if name.endswith("-cold") else warm_limit
        if lim:
            out[f"{name} / {'best raw cold read' if name.endswith('-cold') else 'warm limit'}"] = {
                "best": rec["best_gbps"] / lim, "median": rec["median_gbps"] / lim}
    for state in ("cold", "warm"):
        model, sd = c.get(f"load_model-{state}", {}), c.get(f"sllm-{state}", {})
        if "best_s" in model and "best_s" in sd:
            out[f"load_model-{state} time / sllm-{state} time"] = {
                "best": model["best_s"] / sd["best_s"], "median": model["median_s"] / sd["median_s"]}
    sllm_warm, st_warm = c.get("sllm-warm", {}), c.get("safetensors-warm", {})
    if "best_gbps" in sllm_warm and "best_gbps" in st_warm:
        out["sllm-warm / safetensors-warm"] = {"best": sllm_warm["best_gbps"] / st_warm["best_gbps"],
                                              "median": sllm_warm["median_gbps"] / st_warm["median_gbps"]}
    out.update(fresh_ratios(results))
    return out


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    raise SystemExit(child_main(sys.argv[2:]))
