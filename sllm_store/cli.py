"""The ``sllm-store`` command line.

Subcommands: ``convert``, ``verify``, ``info``, ``load``, ``upload``, ``cache``; the store server:
``serve`` (``start``: the same with ServerlessLLM's flags), ``status``, ``prefetch``, ``evict``.
Expected failures (bad input) print one ``error: ...`` line on stderr and exit with status 1;
usage errors exit with 2; Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from sllm_store import __version__
from sllm_store._units import format_size, parse_size
from sllm_store.errors import InvalidArgumentError, SllmStoreError

logger = logging.getLogger("sllm_store.cli")


def _size(value: str) -> int:
    try:
        n = parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive multiple of 4096 bytes")
    return n


def _cmd_convert(args: argparse.Namespace) -> int:
    from sllm_store.converter import convert
    from sllm_store.index import read_index

    order: Any = args.access_order
    if order not in ("auto", "none"):
        try:
            order = [line.strip() for line in Path(order).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise InvalidArgumentError(f"--access-order: cannot read {args.access_order!r}: {e}") from None
    dst = convert(
        args.src, args.dst, dtype=args.dtype, chunk_size=args.chunk_size,
        num_files=args.num_files, overwrite=args.overwrite, quiet=True if args.quiet else None,
        compress=args.compress, access_order=order,
    )
    if isinstance(dst, str):  # uploaded to a URL
        print(f"converted {args.src} and uploaded it to {dst}")
        return 0
    index = read_index(dst)
    print(f"converted {args.src} -> {dst}: {len(index.tensors)} tensors, "
          f"{format_size(index.total_bytes)} in {len(index.files)} data file(s)"
          + (", in access order" if index.access_order else ""))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from sllm_store.formats import open_index
    from sllm_store.loader import verify

    verify(args.path, num_threads=args.num_threads)
    index = open_index(args.path)
    chunks = sum(len(f.checksums) for f in index.files)
    checked = (f"{chunks} chunks verified" if chunks else
               f"no checksums in {index.source.get('format')} checkpoints: index and file sizes checked")
    print(f"OK: {args.path}: {len(index.tensors)} tensors, {len(index.files)} data file(s), {checked}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from collections import Counter

    from sllm_store.index import is_converted, read_index

    if is_converted(args.path):
        index = read_index(args.path)  # JSON only: no torch import
    else:
        from sllm_store.formats import open_index

        index = open_index(args.path)
    if args.json:
        print(json.dumps(index.to_json(), indent=1))
        return 0
    dtypes = Counter(t.dtype for t in index.tensors.values() if t.alias_of is None)
    aliases = sum(1 for t in index.tensors.values() if t.alias_of is not None)
    print(f"path:        {index.path}")
    converted = bool(index.created_by)
    print("format:      " + (f"sllm-store v{index.version} ({index.created_by})" if converted else
                             f"{index.source.get('format')} (read as it is; no checksums)"))
    print(f"source:      {index.source.get('format', '?')} {index.source.get('name', '')}")
    print(f"tensors:     {len(index.tensors)} ({aliases} tied)")
    print(f"weights:     {format_size(index.total_bytes)} "
          f"({', '.join(f'{d}: {n}' for d, n in dtypes.most_common())})")
    if converted:
        print(f"chunk size:  {format_size(index.chunk_size)}, checksum xxh3_64")
    if index.compression:
        raw = sum(f.size for f in index.files)
        disk = sum(f.disk_size for f in index.files)
        print(f"compression: {index.compression.get('codec')} level {index.compression.get('level')}, "
              f"{format_size(raw)} -> {format_size(disk)} on disk (ratio {raw / disk if disk else 1:.3f}x)")
    print("files:")
    for f in index.files:
        if f.chunks is None:
            print(f"  {f.name}  {format_size(f.size)}  {len(f.checksums)} chunks  codec: none")
            continue
        codecs = Counter(c.codec for c in f.chunks)
        groups = Counter(c.group for c in f.chunks if c.codec != "none")
        ratio = f.size / f.disk_size if f.disk_size else 1.0
        print(f"  {f.name}  {format_size(f.size)} -> {format_size(f.disk_size)} ({ratio:.3f}x)  "
              f"{len(f.chunks)} chunks  codec: "
              + ", ".join(f"{k} x{n}" for k, n in codecs.most_common())
              + ("  byte groups: " + ", ".join(f"{g} x{n}" for g, n in sorted(groups.items()))
                 if groups else ""))
    return 0


# The load's timeline in its report (sllm_store.plan.LoadReport), as `load` prints it.
_STEPS = {"open_seconds": "opening", "prepare_seconds": "planning and memory",
          "fill_seconds": "moving the bytes", "finish_seconds": "tensors"}


def _cmd_load(args: argparse.Namespace) -> int:
    from sllm_store.loader import load_state_dict_with_report

    tensors, report = load_state_dict_with_report(
        args.path, args.device, num_threads=args.num_threads, verify=args.verify,
        io_mode=args.io_mode, store=args.store, remote=_remote_options(args),
    )
    print(f"loaded {len(tensors)} tensors, {format_size(report.bytes)} in {report.seconds:.3f} s "
          f"({report.gb_per_s:.2f} GB/s)")
    for dev, nbytes in report.devices.items():
        print(f"  {dev}: {format_size(nbytes)} in one allocation")
    stats = report.stats
    print("  steps: " + ", ".join(f"{what} {stats[key]:.3f} s" for key, what in _STEPS.items()
                                  if key in stats))
    if stats["tier"] == "remote":
        from sllm_store.remote import wait_for_cache

        wait_for_cache()  # the entry is finished in the background; this process ends next
        if not stats["cached"]:
            cached = "partly cached (partial load)"
        elif Path(stats["cached"]).is_dir():
            cached = f"cached in {stats['cached']}"
        else:
            cached = "not cached (see the warning above)"
        print(f"  remote: {format_size(stats['bytes_downloaded'])} downloaded while loading "
              f"({stats['threads']} GETs in flight), {cached}")
        return 0
    if stats["tier"] == "store":
        print(f"  store {stats['store']}: {'hit' if stats['hit'] else 'miss'}"
              f"{' (streamed)' if stats['streamed'] else ''}, server {stats['server_seconds']:.3f} s "
              f"of which copying {stats['copy_seconds']:.3f} s")
        return 0
    print(f"  pipeline: {stats['threads']} threads, {stats['chunks_direct']} direct + "
          f"{stats['chunks_staged']} staged chunks, io_mode {stats['io_mode']}"
          f" (O_DIRECT {'on' if stats['o_direct_used'] else 'off'})"
          + (f", {stats['chunks_verified']} chunks verified" if stats["chunks_verified"] else "")
          + (f", staging buffers made in {stats['staging_alloc_s']:.3f} thread-s"
             if stats.get("staging_alloc_s") else ""))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from sllm_store.server.gpu import parse_gpu_pools
    from sllm_store.server.service import serve

    logging.getLogger("sllm_store").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    serve(args.storage_path, args.mem_pool_size, listen=args.listen, num_threads=args.num_threads,
          block_size=args.chunk_size, io_mode=args.io_mode, max_loads=args.max_loads,
          allow_large_pool=args.allow_large_pool, gpu_pools=parse_gpu_pools(args.gpu_pool or []))
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    from sllm_store.server.compat import start

    logging.getLogger("sllm_store").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    start(args)
    return 0


def _client(args: argparse.Namespace):  # noqa: ANN202 - StoreClient, imported lazily
    from sllm_store.config import store_address
    from sllm_store.server.client import StoreClient

    return StoreClient(store_address(args.store))


def _cmd_status(args: argparse.Namespace) -> int:
    import time

    client = _client(args)
    h = client.health()
    s = client.status()
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps({"health": MessageToDict(h), "status": MessageToDict(s)}, indent=1))
        return 0
    print(f"server:      {client.target} (sllm-store {h.version}, pid {h.pid})")
    print(f"storage:     {s.storage_path}")
    pct = 100 * s.pool_used / s.pool_size if s.pool_size else 0
    print(f"pool:        {format_size(s.pool_used)} of {format_size(s.pool_size)} used ({pct:.0f}%), "
          f"{'pinned' if s.pinned else 'pageable'}, blocks of {format_size(s.block_size)}; "
          f"GPU destinations {'yes' if h.cuda else 'no'}")
    print(f"requests:    {s.hits} hits, {s.misses} misses, {s.evictions} evictions, "
          f"{format_size(s.bytes_served)} served, {s.loads_in_progress} load(s) in progress")
    if s.disk_gbps or s.copy_gbps:
        print(f"measured:    disk to pool {s.disk_gbps:.2f} GB/s, pool to clients {s.copy_gbps:.2f} GB/s")
    for g in s.gpu_pools:
        pct = 100 * g.used / g.budget if g.budget else 0
        print(f"GPU pool:    {g.device} ({g.pci_bus_id}): {format_size(g.used)} of {format_size(g.budget)} "
              f"used ({pct:.0f}%), pool to GPU {g.h2d_gbps:.2f} GB/s")
    if s.attach_socket:
        print(f"attach:      {s.attach_socket}")
    if s.models:
        print(f"{'model':40} {'tier':8} {'size':>10} {'in use':>6} {'hits':>6}  last used")
        now = time.time()
        for m in s.models:
            if m.tier != "gpu":
                print(f"{m.name:40} {m.tier:8} {format_size(m.size):>10} {m.in_use:>6} {m.hits:>6}  "
                      f"{now - m.last_used:.0f} s ago")
            for r in m.gpu:
                shared = f", {format_size(r.shared_bytes)} shared" if r.shared_bytes else ""
                print(f"{m.name:40} {r.device:8} {format_size(r.bytes):>10} {r.attached:>6} "
                      f"{'':>6}  {r.state}{', pinned' if r.pinned else ''}{shared} (attached clients)")
    else:
        print("no models in the pool")
    return 0


def _cmd_prefetch(args: argparse.Namespace) -> int:
    client = _client(args)
    for name in args.models:
        r = client.prefetch(client.model_name(name), verify=args.verify is not False, to=args.to,
                            pin=args.pin)
        if args.to in ("", "dram"):
            state = "already cached" if r.hit else "cached"
        else:
            state = f"already resident on {args.to}" if r.hit else f"resident on {args.to}"
        print(f"{name}: {state}, {format_size(r.bytes)} in {r.seconds:.2f} s")
    return 0


def _cmd_evict(args: argparse.Namespace) -> int:
    client = _client(args)
    names = [client.model_name(m) for m in args.models] or [""]
    evicted = [e for n in names for e in client.evict(n, tier=args.tier)]
    print(f"evicted: {', '.join(evicted)}" if evicted else "nothing evicted")
    return 0


def _remote_options(args: argparse.Namespace):  # noqa: ANN202 - RemoteOptions, imported lazily
    from sllm_store.config import RemoteOptions

    return RemoteOptions(endpoint_url=args.endpoint_url, region=args.region, anonymous=args.anonymous,
                         max_gets=getattr(args, "max_gets", None))


def _cmd_upload(args: argparse.Namespace) -> int:
    from sllm_store.remote import upload

    n = upload(args.path, args.url, options=_remote_options(args), quiet=True if args.quiet else None)
    print(f"uploaded {args.path} -> {args.url}: {format_size(n)}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    import time

    from sllm_store import remote as cache
    from sllm_store.config import CacheSettings

    if args.action == "ls":
        es = cache.entries(args.cache_dir)
        for e in es:
            print(f"{e.name}  {format_size(e.size):>10}  {time.time() - e.last_used:8.0f} s ago  {e.url}")
        total = format_size(sum(e.size for e in es))
        print(f"{len(es)} entries, {total} in {cache.cache_dir(args.cache_dir)}")
        for d in cache.partials(args.cache_dir):
            state = "downloading" if d.active else "interrupted (resumes on the next load)"
            done = f"{format_size(d.written)} of {format_size(d.size)}"
            print(f"unfinished: {d.name}  {done}  {state}  {d.url}")
    elif args.action == "rm":
        if not args.target:
            raise ValueError("cache rm needs an entry name or a URL")
        removed = cache.remove(args.target, args.cache_dir)
        print(f"removed: {', '.join(removed)}" if removed else f"error: nothing cached for {args.target}")
        return 0 if removed else 1
    else:
        limit = parse_size(args.target) if args.target else CacheSettings.resolve().size_limit
        if limit is None:
            raise ValueError("cache prune needs a size (e.g. 100GiB) or SLLM_STORE_CACHE_SIZE")
        removed = cache.prune(limit, args.cache_dir)
        print(f"evicted: {', '.join(removed)}" if removed else "nothing evicted")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sllm-store", description="Convert model checkpoints to a fast-loading format and load them."
    )
    p.add_argument("--version", action="version", version=f"sllm-store {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    ld = _add_checkpoint_commands(sub)
    _add_remote_commands(sub, ld)
    _add_server_commands(sub)
    _add_start_command(sub)
    _add_vllm_command(sub)
    for command in sub.choices.values():  # -v after the command too (sllm-store load -v ...)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log progress (INFO level)")
    return p


def _add_checkpoint_commands(sub: Any) -> argparse.ArgumentParser:
    """convert, verify, info and load; returns load's parser (the remote options join it)."""
    c = sub.add_parser("convert", help="convert a HF model dir / safetensors / torch checkpoint",
                       description="Convert SRC (Hugging Face model directory, .safetensors file "
                       "or torch state-dict file) into an sllm-store checkpoint directory DST.")
    c.add_argument("src", help="source model directory or checkpoint file")
    c.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    c.add_argument("--dtype", default=None, help="cast floating-point weights, e.g. bfloat16")
    c.add_argument("--chunk-size", type=_size, default="32MiB",
                   help="checksum/read unit, multiple of 4096 (default 32MiB)")
    c.add_argument("--num-files", type=int, default=1, help="number of data files (default 1)")
    c.add_argument("--compress", default=None, metavar="zstd[:LEVEL]",
                   help="compress every chunk losslessly with zstd (level 1..22, default 1)")
    c.add_argument("--access-order", default="auto", metavar="auto|none|FILE",
                   help="the order the data is laid out in and the index records: auto (traced from a "
                   "forward pass of the model config.json describes, on the meta device), none (the "
                   "source's), or a file of tensor names, one per line (default auto)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_convert)

    v = sub.add_parser("verify", help="check index, data files and every chunk checksum",
                       description="Verify a converted checkpoint completely; exit 1 on any problem.")
    v.add_argument("path", help="converted checkpoint directory")
    v.add_argument("--num-threads", type=int, default=None,
                   help="reader threads (default: SLLM_STORE_NUM_THREADS, else the CPU count, 4..16)")
    v.set_defaults(func=_cmd_verify)

    i = sub.add_parser("info", help="show what a converted checkpoint holds",
                       description="Show tensors, sizes, files and codecs of a converted checkpoint.")
    i.add_argument("path", help="converted checkpoint directory")
    i.add_argument("--json", action="store_true", help="print the whole index as JSON")
    i.set_defaults(func=_cmd_info)

    ld = sub.add_parser("load", help="load a checkpoint and report time and bandwidth",
                        description="Load a converted checkpoint and report time, GB/s and placement.")
    ld.add_argument("path", help="converted checkpoint directory")
    ld.add_argument("--device", default="cpu", help="target device (default cpu)")
    ld.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                    help="check every chunk's checksum while loading (default: on for a GPU or a store "
                    "server, off for CPU memory; SLLM_STORE_VERIFY)")
    ld.add_argument("--num-threads", type=int, default=None,
                    help="reader threads (default: SLLM_STORE_NUM_THREADS, else the CPU count, 4..16)")
    ld.add_argument("--io-mode", choices=("auto", "buffered", "direct", "mmap"), default=None,
                    help="read mode (default auto: O_DIRECT when not page-cached, else buffered, or mmap "
                    "for a whole checkpoint into CPU memory)")
    ld.add_argument("--store", default=None, metavar="ADDRESS",
                    help="load through a store server (unix:///path or host:port; env SLLM_STORE_ADDRESS)")
    ld.add_argument("--max-gets", type=int, default=None, metavar="N",
                    help="for a URL: ranged GETs in flight (default: SLLM_STORE_REMOTE_GETS, else 24)")
    ld.set_defaults(func=_cmd_load)
    return ld


def _add_remote_commands(sub: Any, ld: argparse.ArgumentParser) -> None:
    """upload and cache, and the object-store options of upload and load."""
    up = sub.add_parser("upload", help="upload a converted checkpoint to s3:// (multipart, parallel)",
                        description="Upload a converted checkpoint directory to an S3-compatible object "
                        "store. The index is uploaded last. Credentials and endpoint: the standard AWS "
                        "environment variables, or the options below.")
    up.add_argument("path", help="converted checkpoint directory")
    up.add_argument("url", help="destination, e.g. s3://bucket/models/llama.sllm")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    for p_ in (up, ld):
        p_.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
        p_.add_argument("--region", default=None, help="S3 region (default: AWS_REGION, else us-east-1)")
        p_.add_argument("--anonymous", action="store_true", help="unsigned requests (public buckets)")
    up.set_defaults(func=_cmd_upload)

    ca = sub.add_parser("cache", help="list, remove or prune locally cached remote checkpoints",
                        description="Manage the local cache of remote checkpoints "
                        "(SLLM_STORE_CACHE_DIR, default ~/.cache/sllm-store).")
    ca.add_argument("action", choices=("ls", "rm", "prune"))
    ca.add_argument("target", nargs="?", default=None,
                    help="rm: entry name or URL; prune: size limit (default SLLM_STORE_CACHE_SIZE)")
    ca.add_argument("--cache-dir", default=None,
                    help="the cache's directory (default: SLLM_STORE_CACHE_DIR, else ~/.cache/sllm-store)")
    ca.set_defaults(func=_cmd_cache)


def _add_server_commands(sub: Any) -> None:
    """serve, and the server's clients: status, prefetch, evict."""
    sv = sub.add_parser("serve", help="run the store server (models held in a pinned memory pool)",
                        description="Serve the models under --storage-path from a pinned host-memory cache. "
                        "Clients load with store=ADDRESS (or env SLLM_STORE_ADDRESS).")
    sv.add_argument("--storage-path", required=True, help="directory holding converted models")
    sv.add_argument("--mem-pool-size", type=_size, required=True, help="size of the memory pool, e.g. 32GiB")
    sv.add_argument("--listen", default=None,
                    help="unix:///path (default: $XDG_RUNTIME_DIR or /tmp, then /sllm-store-UID/store.sock, "
                    "private) "
                    "or [host:]port (TCP; loopback unless a host is given)")
    sv.add_argument("--num-threads", type=int, default=None, help="disk reader threads")
    sv.add_argument("--chunk-size", type=_size, default="32MiB", help="pool block size (default 32MiB)")
    sv.add_argument("--io-mode", choices=("auto", "buffered", "direct"), default="auto")
    sv.add_argument("--max-loads", type=int, default=56,
                    help="loads and prefetches served at once (default 56); more wait in their clients")
    sv.add_argument("--allow-large-pool", action="store_true",
                    help="allocate the pool even if it is larger than the memory available now")
    sv.add_argument("--gpu-pool", action="append", default=None, metavar="cuda:N=SIZE",
                    help="keep models in GPU memory too, up to SIZE on device N (repeat per device); "
                    "clients on this host attach to them instead of copying")
    sv.set_defaults(func=_cmd_serve)

    for cmd, helptext, fn in (
        ("status", "show the store server's memory pool and the models it holds", _cmd_status),
        ("prefetch", "load models into the store server's memory pool", _cmd_prefetch),
        ("evict", "drop models from the store server's memory pool", _cmd_evict),
    ):
        sp = sub.add_parser(cmd, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        sp.add_argument("--store", default=None, metavar="ADDRESS",
                        help="server address (default: env SLLM_STORE_ADDRESS, else the default socket)")
        if cmd == "status":
            sp.add_argument("--json", action="store_true", help="print the server's replies as JSON")
        else:
            sp.add_argument("models", nargs="*" if cmd == "evict" else "+",
                            help="model names (relative to the storage path)"
                            + ("; none: every model not in use" if cmd == "evict" else ""))
        if cmd == "prefetch":
            sp.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                            help="check every chunk's checksum while caching (default: on)")
            sp.add_argument("--to", default="dram", metavar="dram|cuda:N",
                            help="the pinned memory pool (default), or the server's GPU pool on cuda:N")
            sp.add_argument("--pin", action="store_true",
                            help="(with --to cuda:N) keep it resident until evicted by name")
        if cmd == "evict":
            sp.add_argument("--tier", default="", metavar="dram|gpu|cuda:N",
                            help="evict only from this tier (default: every tier)")
        sp.set_defaults(func=fn)


def _add_start_command(sub: Any) -> None:
    """start: ServerlessLLM's `sllm-store start` flags, run by serve (sllm_store.server.compat)."""
    st = sub.add_parser("start", allow_abbrev=False,
                        help="run the store server with ServerlessLLM's `sllm-store start` flags",
                        description="Run the store server (as `serve`) on TCP HOST:PORT, configured with "
                        "the flags of ServerlessLLM's `sllm-store start`. Sizes: KB, MB, GB are powers of "
                        "1024, as in ServerlessLLM. Clients load with store=127.0.0.1:PORT (or "
                        "SLLM_STORE_ADDRESS).")
    st.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1, loopback; 0.0.0.0: every interface, "
                    "reachable from the network)")
    st.add_argument("--port", type=int, default=8073, help="TCP port (default 8073)")
    st.add_argument("--storage-path", default=None,
                    help="directory holding the models, named relative to it (default: STORAGE_PATH, "
                    "else ./models)")
    st.add_argument("--num-thread", type=int, default=None, metavar="N",
                    help="disk reader threads (default as for serve: the CPU count, 4..16)")
    st.add_argument("--chunk-size", default="32MB", metavar="SIZE", help="pool block size (default 32MB)")
    st.add_argument("--mem-pool-size", default="4GB", metavar="SIZE",
                    help="size of the memory pool (default 4GB)")
    st.add_argument("--disk-size", default=None, metavar="SIZE",
                    help="accepted, no effect: the server keeps no disk cache")
    st.add_argument("--registration-required", default="false", metavar="BOOL",
                    help="true or false (default false); accepted, no effect: every model under the "
                    "storage path is served without registration")
    st.set_defaults(func=_cmd_start)


def _cmd_save_vllm(args: argparse.Namespace) -> int:
    from sllm_store.vllm import save

    engine = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    out = save(args.model, args.out, overwrite=args.overwrite, tensor_parallel_size=args.tensor_parallel_size,
               pipeline_parallel_size=args.pipeline_parallel_size, dtype=args.dtype, enforce_eager=True,
               skip_tokenizer_init=True, **engine)
    ranks = args.tensor_parallel_size * args.pipeline_parallel_size
    print(f"saved {args.model} for {ranks} ranks -> {out}")
    return 0


def _add_vllm_command(sub: Any) -> None:
    sv = sub.add_parser("save-vllm", help="save a model as vLLM holds it, a checkpoint per rank (needs vLLM)",
                        description="Start a vLLM engine on MODEL with the given parallel sizes and dtype, "
                        "and save its parameters as an engine-ready checkpoint: one converted checkpoint "
                        "per rank, loaded straight into the parameters by `vllm serve OUT --load-format "
                        "sllm` with the same settings.")
    sv.add_argument("model", help="a converted checkpoint or a safetensors model directory")
    sv.add_argument("out", help="the engine-ready directory to write")
    sv.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    sv.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    sv.add_argument("--dtype", default="auto", help="the engine's dtype (default: the model's)")
    sv.add_argument("--max-model-len", type=int, default=None,
                    help="the engine's context length (smaller: less memory while saving)")
    sv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    sv.set_defaults(func=_cmd_save_vllm)


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so that writers remove their temporary files
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `sllm-store info --json | head`
        sys.stderr.close()
        return 0
    except (SllmStoreError, ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or an input no check foresaw: one line, traceback with -v
        logging.getLogger(__name__).info("unexpected error", exc_info=True)
        print(f"error: unexpected {type(e).__name__}: {e} (sllm-store -v ... shows where; please report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
