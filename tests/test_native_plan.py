"""The native load checks the plan it is given, whatever its source: ranges that wrap around
2**64 are refused with FormatError, never a crash."""

from __future__ import annotations

import numpy as np
import pytest

from sllm_store.errors import FormatError
from sllm_store.native import _C

U64 = 2**64


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    return str(path)


def _load(files, chunks, segments, dest, encodings=()):
    return _C.run_load(files, chunks, segments, [("cpu", dest.ctypes.data, dest.nbytes)], num_threads=2,
                       io_mode="buffered", verify=False, encodings=list(encodings))


@pytest.mark.parametrize("stored", [(0, U64 - 1), (0, U64 - 4096), (4096, U64 - 4096)])
def test_wrapping_stored_ranges_are_refused(data_file, stored) -> None:
    dest = np.zeros(8192, np.uint8)
    with pytest.raises(FormatError, match="overflows"):
        _load([data_file], [(0, 0, 8192, None)], [(0, 0, 0, 0, 8192)], dest, [(*stored, 1, 1)])


def test_wrapping_chunk_range_is_refused(data_file) -> None:
    dest = np.zeros(8192, np.uint8)
    with pytest.raises(FormatError, match="overflows"):
        _load([data_file], [(0, U64 - 4096, 8192, None)], [(0, 0, 0, 0, 8192)], dest)


def test_a_valid_plan_loads(data_file) -> None:
    dest = np.zeros(8192, np.uint8)
    _load([data_file], [(0, 4096, 8192, None)], [(0, 0, 0, 0, 8192)], dest)
    assert dest.tobytes() == (bytes(range(256)) * 64)[4096:12288]
