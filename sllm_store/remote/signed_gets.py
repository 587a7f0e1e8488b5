"""Ranged GETs read straight into a load's page-locked staging blocks: presigned URLs, http.client.

obstore hands each GET's body over in a buffer of its own. A load to a GPU then copies that
buffer into its page-locked staging blocks (``_C.StagedFill.add``): a memcpy of every byte, plus
the page faults of the buffers. With ``SLLM_STORE_GET_CLIENT=http`` (:func:`get_client`), a load
to a GPU fetches such a chunk with one ranged GET of a presigned URL instead. obstore signs the
URL (``obstore.sign``), so the credentials are still resolved by obstore. The standard library's
``http.client`` sends the request and parses the response's headers. The body is read in place
into the staging blocks, where the chunk is hashed and copied to the device: there is no body
buffer and no copy. Over plain HTTP the core reads the socket (``StagedFill.recv``,
``csrc/pipeline/socket_fill.cpp``): no GIL, and each read hashed while it is in the CPU cache.
Over HTTPS (or with ``RECV_IN_CORE`` off), ``http.client`` reads it, one read at a time
(``HTTPResponse.readinto`` into ``StagedFill.reserve()``, then ``commit``).

It needs an ``s3://`` store that can sign (not anonymous access) and no HTTP proxy for the
endpoint; otherwise the load uses obstore as usual. Requests have the store's timeout. Connection
errors, timeouts and 429/5xx answers are retried up to ``max_retries`` times in a row with backoff,
and a body cut off midway resumes from its last byte (a ranged GET of the rest; the count starts
again after progress). A 403 is tried once more with a URL signed again (temporary credentials
may have expired), then raises, as a 404 does at once.

On the 2-core development machine, raw ranged GETs this way (``bench_remote.py --presigned``)
ran 1.3–1.6x as fast as obstore's, with a third to a half of the client's CPU per GB (session 9).
On the H200 machine (session 10, docs/benchmarks.md), loads to the GPU this way ran as fast as
the default (0.96–1.04x) with a third less client CPU, so it stays opt-in.
"""

from __future__ import annotations

import http.client
import logging
import os
import queue
import re
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from datetime import timedelta
from typing import Any, Optional

from sllm_store.errors import (
    RemoteAuthError,
    RemoteError,
    RemoteNotFoundError,
    RemoteUnavailableError,
    SllmStoreError,
)
from sllm_store.remote.objects import RemoteOptions, remote_error

logger = logging.getLogger(__name__)

# The client of a load's GETs into the staging blocks: None reads SLLM_STORE_GET_CLIENT
# (get_client()); bench_remote patches it.
GET_CLIENT: Optional[str] = None
CLIENTS = ("obstore", "http")
_SIGN_FOR = timedelta(hours=1)  # presigned URLs expire after this,
_RESIGN_AFTER = 1800.0  # and are signed again after this many seconds
_TRANSIENT = {408, 429, 500, 502, 503, 504}
_SCRATCH = 4 << 20  # where bytes go when there is no staging block to read into
# Over plain HTTP, the rest of a body is read from the socket by the core, without the GIL
# (StagedFill.recv, csrc/pipeline/socket_fill.cpp); False: by http.client, a read at a time
# (HTTPS always is). bench_read_back's in_place_py patches it.
RECV_IN_CORE = True


def get_client() -> str:
    """Which client fetches a load's chunks into its staging blocks: ``SLLM_STORE_GET_CLIENT``,
    ``obstore`` (the default: ranged GETs of :func:`~sllm_store.remote.cache.get_piece` bytes,
    each body copied into the blocks) or ``http`` (presigned URLs read in place, this module)."""
    if GET_CLIENT is not None:
        return GET_CLIENT
    value = os.environ.get("SLLM_STORE_GET_CLIENT", "").strip().lower() or "obstore"
    if value not in CLIENTS:
        raise ValueError(f"SLLM_STORE_GET_CLIENT must be one of {', '.join(CLIENTS)}, not {value!r}")
    return value


class SignedGets:
    """Ranged GETs of the objects of one obstore store through presigned URLs, read into a
    ``_C.StagedFill`` in place (:meth:`get_into`). Thread-safe; idle connections are kept for
    the next GET and closed by :meth:`close`. Make one with :meth:`for_store`.

    Example::

        gets = SignedGets.for_store(store, "s3://bucket/m.sllm", RemoteOptions())
        if gets is not None:
            with copier.fill(n, pieces) as fill:
                gets.get_into("data-00000.bin", 0, n, fill)
                digest = fill.finish()
    """

    def __init__(self, store: Any, url: str, options: RemoteOptions) -> None:
        self._store, self._url = store, url
        self._timeout, self._retries = options.timeout_s, max(0, options.max_retries)
        self._signed: dict[str, tuple[float, urllib.parse.SplitResult]] = {}
        self._idle: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._scratch = threading.local()

    @classmethod
    def for_store(cls, store: Any, url: str, options: Optional[RemoteOptions] = None,
                  probe: str = "sllm_index.json") -> Optional[SignedGets]:
        """The signed GETs of ``store`` (rooted at ``url``), or None where they cannot be used:
        a store that cannot sign (plain HTTP URLs, anonymous access), or an HTTP proxy set for
        its endpoint. Signs ``probe`` to find out."""
        try:
            from obstore.store import S3Store
        except ImportError:  # pragma: no cover
            return None
        options = options or RemoteOptions()
        if not isinstance(store, S3Store) or options.anonymous:
            return None
        gets = cls(store, url, options)
        try:
            u = gets._url_of(probe)
        except Exception as e:  # noqa: BLE001 - any failure to sign: obstore's GETs instead
            logger.info("%s: presigned URLs are not available (%s); using obstore's GETs", url, e)
            return None
        if u.hostname and urllib.request.getproxies() and not urllib.request.proxy_bypass(u.hostname):
            logger.info("%s: an HTTP proxy is set for %s; using obstore's GETs", url, u.hostname)
            return None
        return gets

    def _url_of(self, name: str) -> urllib.parse.SplitResult:
        import obstore

        now = time.monotonic()
        with self._lock:
            signed = self._signed.get(name)
        if signed is None or now - signed[0] > _RESIGN_AFTER:
            signed = (now, urllib.parse.urlsplit(obstore.sign(self._store, "GET", name, _SIGN_FOR)))
            with self._lock:
                self._signed[name] = signed
        return signed[1]

    def _connection(self, u: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if conn.host == u.hostname and conn.port == (u.port or conn.default_port):
                return conn
            conn.close()
        if u.scheme == "https":
            return http.client.HTTPSConnection(u.hostname or "", u.port, timeout=self._timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(u.hostname or "", u.port, timeout=self._timeout)

    def get_into(self, name: str, start: int, length: int, fill: Any) -> None:
        """Bytes ``[start, start + length)`` of object ``name`` into ``fill`` (a
        ``_C.StagedFill``), read in place where it reserves room. Raises RemoteNotFoundError,
        RemoteAuthError, RemoteUnavailableError (after the retries) or RemoteError (the object
        is shorter)."""
        where = f"{self._url}/{name}"
        got, failures, failed_at, resigned = 0, 0, -1, False
        while got < length:
            if got > failed_at:  # progress since the last failure: a fresh count of retries
                failures = 0
            conn: Optional[http.client.HTTPConnection] = None
            try:
                try:
                    u = self._url_of(name)
                except Exception as e:  # noqa: BLE001 - obstore's, while resolving credentials
                    raise remote_error(e, where, "signing a GET of") from None
                conn = self._connection(u)
                conn.request("GET", f"{u.path}?{u.query}",
                             headers={"Range": f"bytes={start + got}-{start + length - 1}"})
                resp = conn.getresponse()
                if resp.status in (401, 403) and not resigned:
                    # The URL may have been signed with credentials that have expired since
                    # (temporary ones): signed again, once, before access counts as denied.
                    resigned = True
                    with self._lock:
                        self._signed.pop(name, None)
                    continue
                if resp.status != 206:
                    body = resp.read(2048)
                    raise _status_error(resp.status, body, where)
                if resp.length is not None and resp.length < length - got:
                    raise RemoteError(f"downloading '{where}': the object is shorter than its index says")
                sock = self._plain_socket(conn, resp, length - got, fill)
                if sock is not None:
                    # The bytes that came with the headers, in the response's read buffer, first
                    head = resp.read(min(len(resp.fp.peek(1)), length - got)) if resp.fp else b""
                    if head:
                        fill.add(head)
                        got += len(head)
                    k, err = self._recv(fill, sock, length - got)
                    got += k
                    resp.length -= k  # http.client's count of the body's bytes left
                    if err > 0:
                        raise OSError(err, os.strerror(err))
                    if err == 0 and got < length:  # the server closed the connection
                        raise http.client.IncompleteRead(b"", length - got)
                    # err -1: no page-locked block to read into; the rest below
                while got < length:
                    view = fill.reserve()
                    if view is None:  # no staging block: through this thread's scratch buffer
                        buf = getattr(self._scratch, "buf", None)
                        if buf is None:
                            buf = self._scratch.buf = memoryview(bytearray(_SCRATCH))
                        k = resp.readinto(buf[:min(_SCRATCH, length - got)])
                        if k:
                            fill.add(buf[:k])
                    else:
                        k = resp.readinto(view)
                        fill.commit(k)
                    if not k:
                        raise http.client.IncompleteRead(b"", length - got)
                    got += k
                if resp.read(1):
                    raise RemoteError(f"downloading '{where}': more bytes than asked for")
                self._idle.put(conn)  # the response is read: the connection can serve another
                conn = None
            except SllmStoreError:  # ours (some are OSErrors too): not retried
                raise
            except (_Retry, OSError, http.client.HTTPException) as e:  # 429/5xx, reset, timeout, cut off
                failures, failed_at = failures + 1, got
                why = str(e) if isinstance(e, _Retry) else f"{type(e).__name__}: {e}"
                if failures > self._retries:
                    raise RemoteUnavailableError(f"downloading '{where}': the object store is unavailable "
                                                 f"({why}; after {self._retries} retries)") from None
                logger.debug("%s: %s after %d of %d bytes; retrying (%d)", where, why, got, length, failures)
                time.sleep(min(0.1 * 2 ** (failures - 1), 3.0))
            finally:
                if conn is not None:
                    conn.close()

    @staticmethod
    def _plain_socket(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, n: int,
                      fill: Any) -> Optional[socket.socket]:
        """The connection's socket where the core can read the body's ``n`` bytes left from it:
        plain HTTP, a body of known length, and a fill of the core's; else None."""
        sock = conn.sock
        if not RECV_IN_CORE or type(sock) is not socket.socket or not hasattr(fill, "recv"):
            return None
        if resp.chunked or resp.length != n:
            return None
        return sock

    def _recv(self, fill: Any, sock: socket.socket, n: int) -> tuple[int, int]:
        """``fill.recv`` of ``n`` bytes from ``sock`` with its timeout: (bytes read, error)."""
        timeout = sock.gettimeout()
        return fill.recv(sock.fileno(), n, -1 if timeout is None else max(1, int(timeout * 1000)))

    def close(self) -> None:
        """Close the idle connections (idempotent)."""
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class _Retry(Exception):
    """A transient HTTP answer (429, 5xx): retried like a connection error."""


def _status_error(status: int, body: bytes, where: str) -> Exception:
    text = body.decode("utf-8", "replace")
    # An S3 error document: its code and message are what the user needs
    fields = [m.group(1).strip() for tag in ("Code", "Message")
              for m in [re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S)] if m]
    text = (": ".join(fields) if fields else text).replace("\n", " ")[:300]
    if status == 404:
        return RemoteNotFoundError(f"downloading '{where}': not found (HTTP 404: {text})")
    if status in (401, 403):
        return RemoteAuthError(f"downloading '{where}': access denied, check the credentials "
                               f"(HTTP {status}: {text})")
    if status == 416:
        return RemoteError(f"downloading '{where}': the object is shorter than its index says "
                           f"(HTTP 416: {text})")
    if status in _TRANSIENT:
        return _Retry(f"HTTP {status}: {text}")
    return RemoteError(f"downloading '{where}' failed: HTTP {status}: {text}")
