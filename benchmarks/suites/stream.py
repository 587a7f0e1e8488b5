"""Time to the first output of a model from a cold start: a streaming load against a blocking one.

Each contender is a fresh process that imports the libraries, creates its CUDA context, loads the
model and runs one forward pass on a fixed prompt (16 tokens); its timeline is measured from the
process launch. In interleaved rounds, per mode: ``cold`` (the checkpoint's files evicted before
each, and the whole page cache dropped when root, so the libraries are read from the disk too),
``cold-weights`` (only the checkpoint's files evicted: the libraries stay cached, as in a warm
container image) and ``warm`` (everything page-cached):

* ``stream``: ``load_model(ck, device_map=DEVICE, stream=True)`` and the forward at once: each
  module waits for its own weights, read in the checkpoint's access order;
* ``blocking``: ``load_model(ck, device_map=DEVICE)``, then the forward;
* ``from_pretrained``: ``AutoModelForCausalLM.from_pretrained(SRC, device_map=DEVICE)``, then the
  forward.

Every output (the logits' bytes) must equal the first contender's. A contender's time is its
process's, from launch to the first output. Recorded per process: imports done, CUDA context made,
load call made, transformers imported and the model built on the meta device (the library's
debug lines), model returned, first layer done, first output, last byte (streaming), every
weight in place. Ratios: the streaming load's time to first output over the blocking load's
(from the load call: its load plus its forward, target <= 0.40; and from the launch), the time
until every weight is in place over the blocking load's (target <= 1.05), and both loads' GB/s
over the best raw read of a sweep of the data files (the disk's limit).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

if not __package__:  # run as a script (a fresh process of --child)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import limits  # noqa: E402
from common import Rounds, Run, summary  # noqa: E402

log = logging.getLogger("benchmarks.stream")
KINDS = ("stream", "blocking", "from_pretrained")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--src", type=Path, required=True, help="safetensors model directory (HF layout)")
    ap.add_argument("--converted", type=Path, default=None,
                    help="its converted copy, with an access order (default SRC.sllm, else made as "
                    "SRC.ordered.sllm)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--modes", default="cold,warm",
                    help="subset of cold (the page cache dropped whole: libraries too), cold-weights "
                         "(only the weights leave the page cache) and warm")
    ap.add_argument("--contenders", default=",".join(KINDS), help=f"subset of {KINDS}")
    ap.add_argument("--sweep-threads", default="4,16,32")
    ap.add_argument("--sweep-blocks-mib", default="16,64")
    ap.add_argument("--sweep-bytes", type=float, default=2e9, help="bytes read per sweep point")
    ap.add_argument("--quick", action="store_true", help="CI: one round, a small sweep")
    ap.add_argument("--preimport", action="store_true",
                    help="every process imports transformers' modelling code before the load call (a worker "
                         "that starts warm): the load, not that import, is then the critical path")


def child_main(argv: List[str]) -> int:
    """``stream.py --child KIND PATH DEVICE LAUNCHED [preimport]``: one cold start in this fresh
    process; prints its timeline (seconds since LAUNCHED, the parent's wall clock) and the logits'
    digest."""
    kind, path, device, launched = argv[0], argv[1], argv[2], float(argv[3])
    preimport = argv[4:] == ["preimport"]
    marks: Dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = time.time() - launched

    class BuildMarks(logging.Handler):  # the library's debug lines: transformers imported, model
        def emit(self, record: logging.LogRecord) -> None:  # built, kernels warmed up
            for key, prefix in (("transformers", "transformers imported"), ("built", "model built"),
                                ("warmed", "kernels warmed up")):
                if record.getMessage().startswith(prefix):
                    mark(key)

    for name in ("sllm_store.model", "sllm_store.warmup"):
        logging.getLogger(name).setLevel(logging.DEBUG)
        logging.getLogger(name).addHandler(BuildMarks())

    import torch

    import sllm_store

    if kind == "from_pretrained" or preimport:
        import transformers
        mark("transformers")
    if preimport:
        from transformers import LlamaForCausalLM  # noqa: F401  (the modelling code, imported now)
    mark("imported")
    if device != "cpu":
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)
    mark("context")
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    mark("load_call")
    dtype = torch.bfloat16
    if kind == "from_pretrained":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map=None if device == "cpu" else device)  # accelerate on a GPU only
    else:
        model = sllm_store.load_model(path, device_map=device, torch_dtype=dtype, stream=kind == "stream")
    if kind == "blocking" and device != "cpu":
        torch.cuda.synchronize(device)
    mark("model")
    def first_layer_done(*_: Any) -> None:
        if device != "cpu":
            torch.cuda.synchronize(device)
        mark("first_layer")

    hook = model.model.layers[0].register_forward_hook(first_layer_done)
    with torch.no_grad():
        logits = model(ids).logits
    out = logits.float().cpu()
    mark("first_output")
    hook.remove()
    pending = getattr(model, "sllm_load", None)
    marks["complete"] = marks["model"]  # every weight in place
    if pending is not None:
        pending.wait()
        marks["last_byte"] = pending.started + pending.timeline["done"] - launched
        marks["complete"] = max(marks["model"], marks["last_byte"])
    digest = hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16]
    print(json.dumps({"marks": marks, "digest": digest, "token": int(out[0, -1].argmax())}))
    return 0


class Child:
    """A fresh-process cold start as a Rounds contender; keeps every run's timeline."""

    def __init__(self, kind: str, path: Path, device: str, reference: Dict[str, str],
                 preimport: bool = False) -> None:
        self.kind, self.path, self.device, self.reference = kind, path, device, reference
        self.preimport = preimport
        self.runs: List[Dict[str, Any]] = []

    def __call__(self) -> Dict[str, Any]:
        launched = time.time()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", self.kind, str(self.path),
               self.device, repr(launched)] + (["preimport"] if self.preimport else [])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-1500:])
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        rec["marks"]["exited"] = time.time() - launched
        self.reference.setdefault("digest", rec["digest"])
        if rec["digest"] != self.reference["digest"]:
            raise AssertionError(f"{self.kind}: logits differ from the first contender's")
        self.runs.append(rec)
        return rec


def ordered_checkpoint(args: argparse.Namespace) -> Path:
    """The converted checkpoint, with an access order (converted anew when it has none)."""
    import sllm_store

    ck = args.converted or args.src.with_name(args.src.name + ".sllm")
    if (ck / "sllm_index.json").is_file() and sllm_store.read_index(ck).access_order:
        return ck
    ck = args.src.with_name(args.src.name + ".ordered.sllm")
    if not (ck / "sllm_index.json").is_file():
        log.info("converting %s -> %s (with its access order)", args.src, ck)
        sllm_store.convert(args.src, ck, quiet=True)
    return ck


def main(args: argparse.Namespace) -> int:
    import sllm_store

    if args.quick:
        args.rounds, args.sweep_threads, args.sweep_blocks_mib, args.sweep_bytes = 1, "4", "16", 2.5e8
    ck = ordered_checkpoint(args)
    index = sllm_store.read_index(ck)
    files = [index.file_path(i) for i in range(len(index.files))]
    shards = sorted(args.src.glob("*.safetensors"))
    nbytes = index.total_bytes
    run = Run("stream", args, data_dir=ck)
    run.results.update(checkpoint=str(ck), bytes=nbytes, access_order=len(index.access_order or ()))
    ints = [[int(x) for x in a.split(",")] for a in (args.sweep_threads, args.sweep_blocks_mib)]
    run.results["disk_sweep"] = limits.disk_sweep(files, lambda: run.evictor.evict(files), lambda: None,
                                                  cold=True, threads=ints[0], blocks_mib=ints[1],
                                                  limit=int(args.sweep_bytes))
    reference: Dict[str, str] = {}
    rounds = Rounds(run.rounds)
    children: Dict[str, Child] = {}
    for mode in [m for m in args.modes.split(",") if m]:
        if mode == "warm":
            before = lambda: run.evictor.warm(files + shards)  # noqa: E731
        else:  # cold: drop_caches too, when root; cold-weights: the weights' pages only
            before = functools.partial(run.evictor.evict, files + shards, everything=mode == "cold")
        for kind in [k for k in args.contenders.split(",") if k]:
            child = children[f"{kind}-{mode}"] = Child(kind, args.src if kind == "from_pretrained" else ck,
                                                       args.device, reference, args.preimport)
            rounds.add(f"{kind}-{mode}", child, nbytes, before=before,  # the cold start, whole
                       seconds_of=lambda rec: rec["marks"]["first_output"])
    run.results["contenders"] = rounds.run()
    run.results["timelines"] = {name: timeline(c.runs, nbytes) for name, c in children.items() if c.runs}
    return run.finish(ratios(run.results), any("error" in c for c in run.results["contenders"].values()))


def timeline(runs: List[Dict[str, Any]], nbytes: int) -> Dict[str, Any]:
    """Best and median of each mark (seconds since the process launch), and from the load call."""
    keys = sorted({k for r in runs for k in r["marks"]})
    out = {k: summary([r["marks"][k] for r in runs if k in r["marks"]], nbytes) for k in keys}
    for k in ("transformers", "warmed", "built", "model", "first_layer", "first_output", "last_byte",
              "complete"):
        if k in keys:
            out[f"{k}_from_load_call"] = summary([r["marks"][k] - r["marks"]["load_call"] for r in runs
                                                  if k in r["marks"]], nbytes)
    return out


def ratios(results: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """Per mode: the streaming load's first output over the blocking load's load plus forward,
    its every weight in place over the blocking load's, and (cold) the streaming load's GB/s
    from the load call to its last byte over the best raw read of the sweep."""
    t, out = results.get("timelines", {}), {}
    best = (results.get("disk_sweep", {}).get("best") or {}).get("gbps")
    for mode in ("cold", "cold-weights", "warm"):
        s, b = t.get(f"stream-{mode}"), t.get(f"blocking-{mode}")
        if not (s and b):
            continue
        for key, k, suffix in (("first output / blocking load + forward", "first_output", "_from_load_call"),
                               ("first output from launch / blocking's", "first_output", ""),
                               ("weights in place / blocking's", "complete", "_from_load_call")):
            n, d = s.get(k + suffix), b.get(k + suffix)
            if n and d and "best_s" in n and "best_s" in d:
                out[f"stream-{mode} {key}"] = {"best": n["best_s"] / d["best_s"],
                                               "median": n["median_s"] / d["median_s"]}
        r = s.get("last_byte_from_load_call")
        if best and mode.startswith("cold") and r:  # the streaming load's bytes alone (no model build)
            out[f"stream-{mode} last byte, GB/s / best raw read"] = {"best": r["best_gbps"] / best,
                                                                     "median": r["median_gbps"] / best}
    return out


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    raise SystemExit(child_main(sys.argv[2:]))
