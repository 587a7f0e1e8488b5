"""The vllm benchmark suite reads the whole load's time from the line the ``sllm`` load format
logs, not a part of it."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from suites.vllm import LOAD_TIME  # noqa: E402

from sllm_store.integrations.engine import describe  # noqa: E402


def test_the_logged_load_time_is_the_whole_load():
    report = SimpleNamespace(bytes=3 << 20, stats={"tier": "local"}, seconds=0.2, gb_per_s=1.5)
    t0 = time.perf_counter() - 2.0  # began two seconds ago; the hand-over began just now
    line = describe("/models/llama", report, t0, time.perf_counter())
    assert 2.0 <= float(LOAD_TIME["sllm"].search(line).group(1)) < 3.0, line
    ready = ("sllm-store loaded /m (engine-ready rank 0 of 1, 299.0 MiB, local tier) in 0.64 s, "
             "0.49 GB/s, straight into the parameters")
    assert LOAD_TIME["sllm"].search(ready).group(1) == "0.64"
