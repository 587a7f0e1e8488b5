"""The local benchmark suite: each peer setting is set for the duration of one load only, and
our loads' own reports are kept per round and rendered."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from suites.local import PEER_VARIANTS, environment, make_loader  # noqa: E402


def test_a_peer_setting_lasts_one_load_and_the_old_values_come_back(monkeypatch):
    monkeypatch.setenv("FASTSAFETENSORS_ODIRECT", "1")
    monkeypatch.delenv("RUNAI_STREAMER_FS_STRATEGY", raising=False)
    settings = {k: v for env in PEER_VARIANTS.values() for k, v in env.items()}
    with pytest.raises(RuntimeError), environment(settings):
        assert os.environ["FASTSAFETENSORS_ODIRECT"] == "0"
        assert os.environ["RUNAI_STREAMER_FS_STRATEGY"].startswith("io_uring_buffered")
        raise RuntimeError("a failed load")
    assert os.environ["FASTSAFETENSORS_ODIRECT"] == "1"
    assert "RUNAI_STREAMER_FS_STRATEGY" not in os.environ


def test_every_buffered_peer_is_a_contender_of_its_own(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    for name in PEER_VARIANTS:
        try:
            assert callable(make_loader(name, tmp_path, tmp_path, "cpu", 2))
        except ImportError:  # the peer is not installed here
            pass
    with pytest.raises(ValueError, match="unknown contender"):
        make_loader("runai_direct", tmp_path, tmp_path, "cpu", 2)


def test_load_model_reports_are_kept_per_round_and_rendered():
    from suite_tables import _model_steps
    from suites.local import report_steps

    stats = {"seconds": 0.2, "report_s": 0.25, "threads": 16, "tier": "local",
             "model": {"build_s": 0.04, "build_wait_s": 0.0, "assemble_s": 0.008}}
    steps = report_steps(stats)
    assert steps == {"seconds": 0.2, "report_s": 0.25, "model_build_s": 0.04, "model_build_wait_s": 0.0,
                     "model_assemble_s": 0.008}
    table = _model_steps({"sllm-warm": [report_steps({"report_s": 0.2, "fill_seconds": 0.19})],
                          "load_model-warm": [steps, {**steps, "model_assemble_s": 0.011}]})
    assert "| step | `sllm-warm` | `load_model-warm` |" in table  # beside the plain load of its mode
    assert "| assembling (parameters, ties, buffers) | – | 0.008–0.011 |" in table
    assert "| the whole call | 0.200–0.200 | 0.250–0.250 |" in table
    assert "| moving the bytes | 0.190–0.190 | – |" in table
    assert "sllm" not in _model_steps({"load_model-cold": [steps]})  # no partner: its own column
    assert _model_steps({}) == ""
