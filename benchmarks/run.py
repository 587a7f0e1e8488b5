#!/usr/bin/env python3
"""The benchmark entry point: ``python benchmarks/run.py SUITE [options]``.

Every suite records the git commit, the settings, the machine and the library versions in one
JSON (``--out``, default ``benchmarks/results/``), runs its contenders in interleaved rounds
(``--rounds``) and checks their outputs. ``python benchmarks/run.py SUITE --help`` lists a suite's
options.

Suites:

* ``local``: local loads (CPU or GPU), cold, warm and in fresh processes, against swept disk
  limits, the host-to-GPU copy and peers (safetensors, runai-model-streamer, fastsafetensors).
* ``compress``: zstd-compressed against plain cold loads, against the best raw read.
* ``remote``: loads from an S3 server (SeaweedFS on loopback) against swept raw GETs and runai.
* ``store``: loads through the store server by fresh processes against the pinned host-to-GPU copy.
* ``vllm``: vLLM engines started with each load format (``sllm`` and vLLM's own), cold and warm.
* ``verify``: what checksum verification costs on each load path (off against on).
* ``stream``: time to a model's first output from a cold start, streaming against blocking loads.
* ``gpu_tier``: attaching to a model the store server holds in GPU memory, its private copy, and a
  fine-tune sharing half its bytes with a resident model.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SUITES = {"local": "suites.local", "store": "suites.store", "compress": "suites.compress",
          "remote": "suites.remote", "verify": "suites.verify", "vllm": "suites.vllm",
          "stream": "suites.stream", "gpu_tier": "suites.gpu_tier"}


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (a ``timeout``): exit through the suite's cleanup (its servers, its scratch data)."""
    raise SystemExit(128 + signum)


def main(argv: Optional[List[str]] = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="suite", required=True)
    modules = {}
    for name, module_name in SUITES.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        sp = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                            description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
        sp.add_argument("--out", type=Path, default=None,
                        help="directory of the results JSON (default benchmarks/results)")
        sp.add_argument("-v", "--verbose", action="store_true")
        module.add_arguments(sp)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    return modules[args.suite].main(args)


if __name__ == "__main__":
    raise SystemExit(main())
