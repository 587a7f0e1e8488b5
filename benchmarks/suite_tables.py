"""Markdown tables of the JSON that ``benchmarks/run.py`` writes (one renderer per suite).

Every table states the run it comes from (date, commit, dirty tree, machine, rounds) and gives best
and median; ratios are against the limits measured in the same run. Standard library only.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from common import cache_state_ok, local_limits

Data = Dict[str, Any]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pair(best: Any, median: Any, fmt: str = "{:.2f}") -> str:
    if best is None:
        return "–"
    return fmt.format(best) + ("" if median is None else " (" + fmt.format(median) + ")")


def commit_of(data: Data) -> Optional[str]:
    """The commit a run.py JSON records, if any."""
    return (data.get("git") or {}).get("commit") or None


def run_line(data: Data) -> str:
    """Where and how a run was made."""
    m = data.get("machine") or {}
    gpu = (m.get("gpus") or ["no GPU"])[0].split(",")[0]
    dirty = (data.get("git") or {}).get("dirty")
    commit = (commit_of(data) or "?")[:12] + (" (dirty tree)" if dirty else "")
    fs = m.get("filesystem") or "unknown file system"
    return (f"{str(data.get('date', ''))[:10]}, commit `{commit}`, {gpu}, {m.get('cpu_count')} cores, {fs}; "
            f"{data['args'].get('rounds')} interleaved rounds, best (median).\n")


def _ratio_lines(r: Data, fmt: Callable[[str], str] = lambda _key: "{:.2f}") -> str:
    """The run's ratios as a list, best (median); ``fmt`` gives each key's number format."""
    if not r.get("ratios"):
        return ""
    return "\nRatios, best (median):\n\n" + "".join(
        f"- {k}: {_pair(v['best'], v['median'], fmt(k))}\n" for k, v in r["ratios"].items())


def _contender_rows(c: Data) -> List[List[str]]:
    rows = []
    for name, rec in c.items():
        if "error" in rec:
            rows.append([f"`{name}`", "error: " + rec["error"][:80], "–"])
        else:
            rows.append([f"`{name}`", _pair(rec["best_s"], rec["median_s"], "{:.3f}"),
                         _pair(rec["best_gbps"], rec["median_gbps"])])
    return rows


def _cache_note(rounds: List[Tuple[str, str, List[Optional[float]]]]) -> str:
    """A line naming the rounds that did not start in their page-cache state: ``rounds`` gives,
    per contender, its label, its state ("cold" or "warm") and its resident fraction per round."""
    wrong = []
    for label, state, fractions in rounds:
        bad = [f"round {i + 1}: {100 * f:.0f}%" for i, f in enumerate(fractions)
               if f is not None and not cache_state_ok(state, f)]
        if bad:
            wrong.append(f"`{label}` ({', '.join(bad)} resident)")
    return ("\nNot in their page-cache state when they started: " + "; ".join(wrong) + ".\n") if wrong else ""


def _contenders(r: Data, gbps: str = "GB/s") -> str:
    """The contenders' table (none when the run timed only fresh processes), then the rounds not
    in their page-cache state, and the ratios against the run's limits."""
    rows = _contender_rows(r["contenders"])
    if not rows:
        return _ratio_lines(r).lstrip("\n")
    note = _cache_note([(n, "cold" if n.endswith("-cold") else "warm", c["resident_before"])
                        for n, c in r["contenders"].items() if "resident_before" in c])
    return _table(["contender", "seconds", gbps], rows) + note + _ratio_lines(r)


def render_local(data: Data) -> str:
    r = data["results"]
    sweep = r["disk_sweep"]
    cold, warm = sweep["cold"]["best"], sweep["warm"]["best"]
    lines = [run_line(data), "\n"]
    if cold:
        lines.append(f"Best raw cold read of the sweep: {cold['gbps']:.2f} GB/s "
                     f"({'O_DIRECT' if cold['direct'] else 'buffered'}, {cold['threads']} threads x "
                     f"{cold['block_mib']} MiB, of {len(sweep['cold']['points'])} points). ")
    if warm:
        lines.append(f"Best page-cached read: {warm['gbps']:.2f} GB/s. ")
    if "h2d" in r:
        lines.append(f"Pinned host-to-GPU copy: {r['h2d']['pinned_gbps']:.2f} GB/s, pageable "
                     f"{r['h2d']['pageable_gbps']:.2f} GB/s. ")
    lines.append(f"{r['bytes'] / 1e9:.2f} GB of tensors.\n\n")
    lines.append(_contenders(r))
    cold_limit, warm_limit = local_limits(r)  # those of the suite's ratios
    for key, title, limit, limit_name in (("fresh_cold", "cold", cold_limit, "best raw cold read"),
                                          ("fresh_warm", "page-cached", warm_limit, "warm limit")):
        if r.get(key):
            lines += [f"\nFirst load in a fresh process, {title}:\n\n",
                      _fresh_table(r[key], limit, limit_name, "cold" if key == "fresh_cold" else "warm")]
    lines.append(_model_steps(r.get("steps", {})))
    if r.get("skipped"):
        lines.append("\nNot run: " + "; ".join(f"`{k}` ({v})" for k, v in r["skipped"].items()) + ".\n")
    return "".join(lines)


def _fresh_table(fresh: Data, limit: Optional[float], limit_name: str, state: str) -> str:
    """Each contender's fresh-process load: seconds, over ``limit`` (GB/s), the whole process;
    the runs that did not start in the page-cache ``state``."""
    rows = []
    for name, rec in fresh.items():
        if "error" in rec:
            rows.append([f"`{name}`", "error", "–", "–"])
            continue
        load = rec["load"]
        ratio = _pair(load["best_gbps"] / limit, load["median_gbps"] / limit) if limit else "–"
        rows.append([f"`{name}`", _pair(load["best_s"], load["median_s"], "{:.3f}"), ratio,
                     _pair(rec["process"]["best_s"], rec["process"]["median_s"], "{:.2f}")])
    out = _table(["contender", "load s", f"load / {limit_name}", "whole process s"], rows)
    out += _cache_note([(f"{name} {state}", state,
                         [run["resident_before"] for run in rec.get("runs", []) if "resident_before" in run])
                        for name, rec in fresh.items()])
    made = [run["stats"]["staging_alloc_s"] for run in fresh.get("sllm", {}).get("runs", [])
            if "staging_alloc_s" in run.get("stats", {})]
    if made and max(made) > 0:  # loads to the CPU from its mapped files stage nothing
        threads = fresh["sllm"]["runs"][0]["stats"].get("threads", "its")
        out += (f"\n`sllm` made its page-locked staging buffers in {min(made):.2f}–{max(made):.2f} "
                f"thread-seconds, spread over {threads} reader threads.\n")
    model = [run["stats"]["model"] for run in fresh.get("load_model", {}).get("runs", [])
             if "model" in run.get("stats", {})]
    if model:
        def span(key: str) -> str:
            low, high = (f"{f(m.get(key, 0.0) for m in model):.3f}" for f in (min, max))
            return f"{low} s" if low == high else f"{low}–{high} s"
        out += (f"\n`load_model` built its model in {span('build_s')} beside the load; the loaded "
                f"weights then waited {span('build_wait_s')} for it, and the model took "
                f"{span('assemble_s')} to assemble from them.\n")
    return out


# The steps of a load's report (sllm_store/loader.py, sllm_store/model.py), in order.
MODEL_STEPS = {
    "report_s": "the whole call",
    "open_seconds": "before planning: opening (and for `load_model` the config, starting the build)",
    "prepare_seconds": "planning and taking the memory",
    "fill_seconds": "moving the bytes",
    "finish_seconds": "making the tensors",
    "model_build_s": "building the model (its own thread, beside the load)",
    "model_build_wait_s": "waiting for the build after the load",
    "model_assemble_s": "assembling (parameters, ties, buffers)",
}


def _model_steps(steps: Data) -> str:
    """``load_model``'s rounds beside the plain load's of the same mode (``load_model-warm`` and
    ``sllm-warm``...), step by step as their reports time them (min and max over the rounds,
    seconds): where the model's extra time goes."""
    out = []
    for name, rounds in steps.items():
        if not name.startswith("load_model") or not rounds:
            continue
        partner = "sllm" + name[len("load_model"):]
        columns = [name] + ([partner] if steps.get(partner) else [])

        def cell(contender: str, key: str) -> str:
            values = [r[key] for r in steps[contender] if key in r]
            return f"{min(values):.3f}–{max(values):.3f}" if values else "–"
        rows = [[what, *(cell(c, key) for c in reversed(columns))] for key, what in MODEL_STEPS.items()
                if any(key in r for c in columns for r in steps[c])]
        out.append(f"\n`{name}` step by step (each round's report, min–max, seconds):\n\n"
                   + _table(["step", *(f"`{c}`" for c in reversed(columns))], rows))
    return "".join(out)


def render_store(data: Data) -> str:
    r = data["results"]
    lines = [run_line(data), "\n"]
    if "h2d" in r:
        lines.append(f"Pinned host-to-GPU copy: {r['h2d']['pinned_gbps']:.2f} GB/s. ")
    lines.append(f"{r['bytes'] / 1e9:.2f} GB of tensors.\n\n")
    lines += [_contenders(r), _fresh_processes(r)]
    fresh = r.get("fresh_processes", {})
    stepped = [n for n in ("store-fresh", "store-fresh-connected") if fresh.get(n, {}).get("steps")]
    if stepped:
        keys = {k for n in stepped for k in fresh[n]["steps"]}
        order = [k for k in STORE_STEPS if k in keys] + sorted(keys - set(STORE_STEPS))

        def cell(name: str, key: str) -> str:
            step = fresh[name]["steps"].get(key)
            return _pair(step["best_s"], step["median_s"], "{:.3f}") if step else "–"
        def label(key: str) -> str:  # "of which" only under a step the run timed
            text = STORE_STEPS.get(key, f"`{key}`")
            return text if STEP_PARENT.get(key) in keys else text.removeprefix("of which ")
        rows = [[label(k), *(cell(n, k) for n in stepped)] for k in order]
        lines += ["\nThe fresh process's load, step by step (its report), seconds, best (median):\n\n",
                  _table(["step", *(f"`{n}`" for n in stepped)], rows)]
    return "".join(lines)


def _fresh_processes(r: Data) -> str:
    """The fresh-process contenders' figures: import, CUDA context, setup, load, whole process."""
    fresh = r.get("fresh_processes", {})
    columns = {"import_s": "import", "cuda_s": "CUDA context", "setup_s": "setup before the load",
               "load_s": "load", "process_s": "whole process"}
    if not any("setup_s" in rec for rec in fresh.values()):
        del columns["setup_s"]
    rows = [[f"`{name}`"] + [_pair(rec[k]["best_s"], rec[k]["median_s"], "{:.3f}") if k in rec else "–"
                             for k in columns] for name, rec in fresh.items()]
    return "\nFresh processes, seconds:\n\n" + _table(["", *columns.values()], rows) if rows else ""


# The steps of a store-server load its report times (sllm_store/tiers/store.py).
STORE_STEPS = {
    "report_seconds": "the load as its report times it (from the call into the tier to the tensors)",
    "open_seconds": "opening: reaching the server and describing the model",
    "client_seconds": "of which importing the gRPC client (grpc, protobuf, the messages), making its "
                      "channel",
    "describe_seconds": "of which Describe: the model's index from the server",
    "prepare_seconds": "planning and taking the memory",
    "allocate_seconds": "of which allocating the destination and exporting its IPC handle",
    "fill_seconds": "moving the bytes",
    "rpc_seconds": "of which the Load call, from request to answer",
    "server_seconds": "of which the server's handling (mapping the destination, copying)",
    "copy_seconds": "of which the server's copy, pool to the destination",
    "finish_seconds": "making the tensors",
    "gc_seconds": "Python's garbage collector, anywhere in the load (a fresh process's first full "
                  "collection can fall there)",
}


# The step each "of which" step is part of.
STEP_PARENT = {"client_seconds": "open_seconds", "describe_seconds": "open_seconds",
               "allocate_seconds": "prepare_seconds", "rpc_seconds": "fill_seconds",
               "server_seconds": "rpc_seconds", "copy_seconds": "server_seconds"}


def render_compress(data: Data) -> str:
    r = data["results"]
    best = r["disk_sweep"]["best"]
    lines = [run_line(data), "\n", f"Stored {r['stored_bytes'] / 1e9:.2f} GB for {r['bytes'] / 1e9:.2f} GB "
             f"of tensors ({r['ratio']:.2f}x). Best raw cold read: {best['gbps']:.2f} GB/s.\n\n",
             _contenders(r, "effective GB/s"), _fresh_processes(r),
             "\nPage-cached compressed load by threads (GB/s): "
             + ", ".join(f"{t}: {g:.2f}" for t, g in r["warm_compressed_by_threads"].items()) + ".\n"]
    if r.get("warm_compressed_to_host"):
        lines.append("The same into host memory (faulting its pages in included): "
                     + ", ".join(f"{t} threads {g:.2f}" for t, g in r["warm_compressed_to_host"].items())
                     + " GB/s.\n")
    return "".join(lines)


def render_remote(data: Data) -> str:
    r = data["results"]
    best = r["get_sweep"]["best"]
    disk = r["cache_disk_sweep"]["best"]
    cores = ("shared cores" if r["server_cores"] == "shared"
             else f"server on {len(r['server_cores'])} cores of its own")
    lines = [run_line(data), "\n",
             f"SeaweedFS on loopback, {cores}; the load's {r['max_gets']} GETs in flight. Best raw GETs "
             f"of the sweep: {best['gbps']:.2f} GB/s ({best['piece_mib']} MiB x {best['gets']} in flight, of "
             f"{len(r['get_sweep']['points'])} points)"]
    if disk:
        lines.append(f"; best raw cold read of the cache entry: {disk['gbps']:.2f} GB/s")
    lines += [f". {r['bytes'] / 1e9:.2f} GB of tensors.\n\n", _contenders(r), _fresh_processes(r),
              "\nThe sweep of raw ranged GETs, GB/s (rows: piece MiB; columns: GETs in flight):\n\n",
              _get_sweep(r["get_sweep"]["points"])]
    return "".join(lines)


def _get_sweep(points: List[Data]) -> str:
    pieces = sorted({p["piece_mib"] for p in points})
    gets = sorted({p["gets"] for p in points})
    at = {(p["piece_mib"], p["gets"]): p["gbps"] for p in points}
    rows = [[f"{m}"] + [f"{at[m, g]:.2f}" if (m, g) in at else "–" for g in gets] for m in pieces]
    return _table(["MiB"] + [str(g) for g in gets], rows)


VERIFY_LABELS = {
    "cpu-cold": "CPU memory, cold (O_DIRECT)", "cpu-warm": "CPU memory, page-cached",
    "gpu-cold": "GPU, cold (O_DIRECT, staged)", "gpu-warm": "GPU, page-cached (staged)",
    "store-cold-prefetch": "store server: disk to its pool (server time)",
    "store-warm": "store server: resident model to the GPU",
}


def render_verify(data: Data) -> str:
    r = data["results"]
    c = r["contenders"]
    rows = []
    for key, cost in r["costs"].items():
        off, on = c[key + "-verify-off"], c[key + "-verify-on"]
        rows.append([VERIFY_LABELS.get(key, key), _pair(off["best_s"], off["median_s"], "{:.3f}"),
                     _pair(on["best_s"], on["median_s"], "{:.3f}"),
                     f"{100 * (cost['best_ratio'] - 1):+.1f}% ({cost['median_extra_percent']:+.1f}%)"])
    head = (f"{r['bytes'] / 1e9:.2f} GB checkpoint, {data['args'].get('rounds')} interleaved rounds, "
            f"outputs checked every round; XXH3 on one core: {r['xxh3_one_thread_gbps']:.1f} GB/s.\n\n")
    return head + _table(["path", "verify off: s, best (median)", "verify on: s, best (median)",
                          "extra time, best (median)"], rows)


VLLM_LABELS = {"sllm": "`sllm`, converted checkpoint", "sllm-hf": "`sllm`, Hugging Face directory",
               "sllm-ready": "`sllm`, engine-ready checkpoint", "sharded_state": "`sharded_state`",
               "safetensors": "`safetensors`", "runai_streamer": "`runai_streamer`",
               "fastsafetensors": "`fastsafetensors`",
               "sllm-store": "`sllm`, through the store server",
               "load_state_dict": "`sllm_store.load_state_dict`, no engine",
               "load_state_dict-store": "`sllm_store.load_state_dict` through the store server, no engine"}


def render_vllm(data: Data) -> str:
    """Engine ready time and logged weight-loading time per load format, cold and warm."""
    r = data["results"]
    rows = []
    for key, c in r["contenders"].items():
        fmt, _, mode = key.rpartition("-")
        label = VLLM_LABELS.get(fmt, f"`{fmt}`")
        if "error" in c:
            rows.append([label, mode, "error: " + c["error"].split(": ", 1)[-1].splitlines()[0][:100], "–"])
            continue
        if fmt.startswith("load_state_dict"):  # ours, no engine: its load time in the weights column
            rows.append([label, mode, "–", _pair(c["best_s"], c["median_s"], "{:.3f}")])
            continue
        logged = sorted(w for w in r["weights_s"].get(key, []) if w is not None)
        weights = _pair(logged[0], logged[len(logged) // 2], "{:.3f}") if logged else "not logged"
        rows.append([label, mode, _pair(c["best_s"], c["median_s"]), weights])
    saves = "; ".join(f"{VLLM_LABELS.get(k, k)} saved once in {v['seconds']:.1f} s"
                      for k, v in r["saves"].items())
    head = (f"{run_line(data)}\n{r['bytes'] / 1e9:.3f} GB checkpoint; each engine a fresh process, its 8 "
            f"greedy tokens equal to `safetensors`' in every round. {saves + '.' if saves else ''}\n\n")
    return head + _table(["load format", "page cache", "LLM(...) to ready, s",
                          "weights loaded (vLLM's log), s"], rows) + _ratio_lines(r)


STREAM_MARKS = (("load_call", "load called"), ("transformers", "transformers imported"),
                ("warmed", "kernels warmed up"), ("last_byte", "last byte"), ("built", "model built"),
                ("model", "model returned"),
                ("first_layer", "first layer done"), ("first_output", "first output"),
                ("complete", "every weight in place"))


def render_stream(data: Data) -> str:
    """Per contender and page-cache state: the process timeline from its launch, best (median)."""
    r = data["results"]
    rows = []
    for key, c in r["contenders"].items():
        kind, _, mode = key.partition("-")
        if "error" in c:
            rows.append([f"`{kind}`", mode, "error: " + c["error"].splitlines()[-1][:100]]
                        + ["–"] * (len(STREAM_MARKS) - 1))
            continue
        t = r["timelines"].get(key, {})
        rows.append([f"`{kind}`", mode] + [_pair(t[k]["best_s"], t[k]["median_s"]) if k in t else "–"
                                           for k, _ in STREAM_MARKS])
    best = (r.get("disk_sweep", {}).get("best") or {}).get("gbps")
    preimport = ("; every process imports transformers' modelling code before it calls the load (a worker "
                 "started ahead of its request)" if data["args"].get("preimport") else "")
    head = (f"{run_line(data)}\n{r['bytes'] / 1e9:.3f} GB checkpoint, {r.get('access_order', 0)} tensors in "
            "its access order; each contender a fresh process timed from its launch (imports, CUDA context, "
            "load, one forward of 16 tokens), its logits equal in every round" + preimport
            + (f"; best raw read of the disk sweep {best:.2f} GB/s" if best else "") + ".\n\n")
    return (head + _table(["load", "page cache"] + [f"{label}, s" for _, label in STREAM_MARKS], rows)
            + _ratio_lines(r))


GPU_TIER_LABELS = {
    "attach-fresh": "attach, fresh process", "attach-again": "attach, second load of a process",
    "attach-copy-fresh": "private copy (`copy=True`), fresh process",
    "attach-copy-again": "private copy (`copy=True`), second load of a process",
    "dram-fresh": "store server without a GPU pool (pinned DRAM), fresh process",
    "safetensors-fresh": "`safetensors.torch.load_file`, page-cached, fresh process",
    "base-resident": "server: base model made resident (all bytes over PCIe)",
    "finetune-resident": "server: fine-tune made resident beside the base model",
}


def render_gpu_tier(data: Data) -> str:
    """Loads from the store server's GPU pool against its pinned pool and safetensors, with the
    run's host-to-device and device-to-device copy limits."""
    r = data["results"]
    rows = [[GPU_TIER_LABELS.get(k, f"`{k}`")] + row[1:] for k, row in zip(r["contenders"],
                                                                           _contender_rows(r["contenders"]))]
    d2d = (r.get("d2d") or {}).get("gbps")
    head = (f"{run_line(data)}\n{r['bytes'] / 1e9:.3f} GB checkpoint, {r['tensors']} tensors; the fine-tune "
            f"shares {r['finetune_shared_bytes'] / 1e9:.3f} GB with it. Limits measured in the run: pinned "
            f"host-to-device copy {r['h2d']['pinned_gbps']:.1f} GB/s"
            + (f", device-to-device copy {d2d:.0f} GB/s" if d2d else "")
            + ". Fresh-process loads are timed inside the process, from the load call to its tensors "
            "ready, every tensor checked against the checkpoint.\n\n")
    return head + _table(["contender", "seconds", "GB/s"], rows) + _ratio_lines(
        r, lambda key: "{:.3f}" if "seconds" in key else "{:.2f}")


RENDERERS: Dict[str, Callable[[Data], str]] = {
    "local-gpu": render_local, "local-cpu": render_local, "store": render_store,
    "compress": render_compress, "remote": render_remote, "verify": render_verify,
    "vllm": render_vllm, "stream": render_stream, "gpu_tier": render_gpu_tier,
}


def render(data: Data) -> str:
    """The table of one run.py result, by its suite."""
    return RENDERERS[data["suite"]](data)
