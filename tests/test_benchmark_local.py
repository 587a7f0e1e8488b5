"""The local benchmark suite's peer settings: each is set for the duration of one load only."""

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
