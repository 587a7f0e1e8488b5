"""Build script for the sllm_store._C extension (C++17, pybind11; no CUDA at build time)."""

from __future__ import annotations

import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

sources = sorted(
    os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "**", "*.cpp"), recursive=True)
)

debug = os.environ.get("SLLM_STORE_DEBUG_BUILD") == "1"
extra_compile_args = ["-O0", "-g"] if debug else ["-O3"]
extra_compile_args += ["-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]

ext = Pybind11Extension(
    "sllm_store._C",
    sources,
    include_dirs=["csrc", "csrc/third_party"],
    cxx_std=17,
    extra_compile_args=extra_compile_args,
    libraries=["dl", "pthread"],
)

# zstd (BSD) is vendored as its single-file amalgamation (the one the `zstandard` package ships):
# `pip install .` needs no system headers or library; built as a C static library, linked in.
zstd = (
    "sllm_zstd",
    {
        "sources": ["csrc/third_party/zstd/zstd.c"],
        "cflags": ["-O3", "-fPIC", "-fvisibility=hidden"],
    },
)



class BuildExt(build_ext):
    """build_ext that builds the vendored C library first (plain build_ext only links it)."""

    def run(self) -> None:
        self.run_command("build_clib")
        super().run()


setup(ext_modules=[ext], libraries=[zstd], cmdclass={"build_ext": BuildExt})
