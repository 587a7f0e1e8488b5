"""Object stores behind remote checkpoint URLs, through ``obstore``.

``s3://bucket/prefix`` uses the standard AWS configuration (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ...), which
:class:`RemoteOptions` overrides; ``http(s)://host/path`` reads any server that honours range
requests. Every obstore failure becomes a :mod:`sllm_store.errors` class.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

from sllm_store.errors import (
    RemoteAuthError,
    RemoteError,
    RemoteNotFoundError,
    RemoteUnavailableError,
)

SCHEMES = ("s3://", "http://", "https://")


def is_remote(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(SCHEMES)


@dataclass(frozen=True)
class RemoteOptions:
    """Connection settings; ``None`` fields come from the environment (AWS variables).

    Example::

        RemoteOptions(endpoint_url="http://127.0.0.1:8333", region="us-east-1")
    """

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    anonymous: bool = False
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    timeout_s: float = 60.0
    max_retries: int = 5


def open_store(url: str, options: Optional[RemoteOptions] = None) -> Any:
    """An obstore store rooted at ``url`` (object keys are then relative: ``sllm_index.json``)."""
    try:
        from obstore.store import HTTPStore, S3Store
    except ImportError:
        raise RemoteError("remote checkpoints need the 'obstore' package: pip install 'sllm-store[remote]'") \
            from None
    o = options or RemoteOptions()
    client = {"timeout": f"{int(o.timeout_s)}s", "connect_timeout": "10s"}
    retry = {"max_retries": o.max_retries, "retry_timeout": timedelta(seconds=o.timeout_s * 3)}
    url = url.rstrip("/")
    if url.startswith("s3://"):
        kwargs: dict[str, Any] = {}
        endpoint = o.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
        if endpoint:
            kwargs["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                client["allow_http"] = True  # type: ignore[assignment]
        if o.region:
            kwargs["region"] = o.region
        elif not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            kwargs["region"] = "us-east-1"
        if o.anonymous:
            kwargs["skip_signature"] = True
        if o.access_key_id:
            kwargs["access_key_id"] = o.access_key_id
        if o.secret_access_key:
            kwargs["secret_access_key"] = o.secret_access_key
        try:
            return S3Store.from_url(url, client_options=client, retry_config=retry, **kwargs)
        except Exception as e:
            raise RemoteError(f"cannot use '{url}': {e}") from None
    if url.startswith(("http://", "https://")):
        if url.startswith("http://"):
            client["allow_http"] = True  # type: ignore[assignment]
        return HTTPStore.from_url(url, client_options=client, retry_config=retry)
    raise RemoteError(f"unsupported URL {url!r} (supported: s3://bucket/prefix, http(s)://...)")


def remote_error(e: BaseException, url: str, what: str) -> Exception:
    """The sllm_store error for an obstore exception ``e`` while doing ``what`` on ``url``."""
    try:
        from obstore import exceptions as ox
    except ImportError:  # pragma: no cover
        return RemoteError(f"{what} '{url}' failed: {e}")
    text = str(e).split("\n")[0][:300]
    if isinstance(e, (FileNotFoundError, ox.NotFoundError)):
        return RemoteNotFoundError(f"{what} '{url}': not found ({text})")
    if isinstance(e, (ox.PermissionDeniedError, ox.UnauthenticatedError, PermissionError)):
        return RemoteAuthError(f"{what} '{url}': access denied, check the credentials ({text})")
    unreachable = ("connect", "timed out", "error sending request", "connection reset", "broken pipe")
    if isinstance(e, (ConnectionError, TimeoutError)) or any(w in text.lower() for w in unreachable):
        return RemoteUnavailableError(f"{what} '{url}': the object store is unreachable ({text})")
    return RemoteError(f"{what} '{url}' failed: {text}")
