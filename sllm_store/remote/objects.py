"""Object stores behind remote checkpoint URLs, through ``obstore``.

``s3://bucket/prefix`` uses the standard AWS configuration, which :class:`RemoteOptions`
overrides, in this order:

1. the environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
   ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``;
2. the shared files: profile ``AWS_PROFILE`` (default ``default``) of ``~/.aws/credentials``
   (``AWS_SHARED_CREDENTIALS_FILE``) and ``~/.aws/config`` (``AWS_CONFIG_FILE``): static keys,
   ``region``, ``endpoint_url``. A profile without static keys (SSO, assumed roles,
   ``credential_process``) is resolved by ``boto3`` when it is installed;
3. what the object store client finds itself: web identity tokens, ECS and EC2 instance roles.

``http(s)://host/path`` reads any server that honours range requests. Every obstore failure becomes
a :mod:`sllm_store.errors` class. :func:`upload` puts a converted checkpoint into a bucket.
"""

from __future__ import annotations

import configparser
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from sllm_store.config import RemoteOptions
from sllm_store.errors import (
    MissingDependencyError,
    RemoteAuthError,
    RemoteError,
    RemoteNotFoundError,
    RemoteUnavailableError,
)

logger = logging.getLogger(__name__)

# Profile settings that mean "credentials come from elsewhere" (only boto3 resolves them).
_RESOLVED_BY_BOTO3 = ("role_arn", "source_profile", "credential_process", "sso_session", "sso_start_url",
                      "web_identity_token_file")

SMALL_FILE_LIMIT = 64 << 20  # non-weight objects (config, tokenizer) fetched with a checkpoint


def obstore_module() -> Any:
    """The ``obstore`` package, which every remote operation uses; MissingDependencyError naming
    the extra that brings it when it is not installed."""
    try:
        import obstore
    except ImportError:
        raise MissingDependencyError("remote checkpoints", "obstore", "remote") from None
    return obstore


def open_bucket(url: str, options: Optional[RemoteOptions] = None) -> Any:
    """An obstore handle rooted at ``url`` (object keys are then relative: ``sllm_index.json``):
    the bucket (and prefix) of an ``s3://`` URL, the directory of an ``http(s)://`` one."""
    obstore_module()
    from obstore.store import HTTPStore, S3Store
    o = options or RemoteOptions()
    client = {"timeout": f"{int(o.timeout_s)}s", "connect_timeout": "10s"}
    retry = {"max_retries": o.max_retries, "retry_timeout": timedelta(seconds=o.timeout_s * 3)}
    url = url.rstrip("/")
    if url.startswith("s3://"):
        kwargs: dict[str, Any] = {}
        profile = aws_profile()
        endpoint = (o.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
                    or profile.get("endpoint_url"))
        if endpoint:
            kwargs["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                client["allow_http"] = True  # type: ignore[assignment]
        region = o.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
            or profile.get("region") or "us-east-1"
        kwargs["region"] = region
        if o.anonymous:
            kwargs["skip_signature"] = True
        elif _env_has_keys(o):
            pass  # obstore reads the environment's keys (and session token)
        elif "aws_access_key_id" in profile and "aws_secret_access_key" in profile:
            kwargs["access_key_id"] = profile["aws_access_key_id"]
            kwargs["secret_access_key"] = profile["aws_secret_access_key"]
            if profile.get("aws_session_token"):
                kwargs["session_token"] = profile["aws_session_token"]
        elif any(k in profile for k in _RESOLVED_BY_BOTO3):
            provider = _boto3_provider(profile["name"])
            if provider is not None:
                kwargs["credential_provider"] = provider
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


def _env_has_keys(o: RemoteOptions) -> bool:
    return bool(o.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"))


def aws_profile(name: Optional[str] = None) -> dict[str, str]:
    """Settings of an AWS profile from the shared credentials and config files, as lower-case keys
    (``aws_access_key_id``, ``region``, ``endpoint_url``, ...) plus ``name``; ``{}`` if neither
    file has it. ``name`` defaults to ``AWS_PROFILE`` (or ``AWS_DEFAULT_PROFILE``), else
    ``default``.

    Example::

        aws_profile("minio")  # {'name': 'minio', 'aws_access_key_id': ..., 'region': ...}
    """
    name = name or os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    aws = Path.home() / ".aws"
    config = os.environ.get("AWS_CONFIG_FILE") or aws / "config"
    credentials = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or aws / "credentials"
    files = [(config, name if name == "default" else f"profile {name}"), (credentials, name)]
    out: dict[str, str] = {}
    for path, section in files:  # the credentials file wins over the config file
        parser = configparser.RawConfigParser()
        try:
            parser.read(Path(path).expanduser())
        except configparser.Error as e:
            raise RemoteError(f"cannot parse the AWS file '{path}': {e}") from None
        if parser.has_section(section):
            out.update({k.lower(): v.strip() for k, v in parser.items(section)})
    if out:
        out["name"] = name
    elif name != "default":
        raise RemoteAuthError(f"AWS profile '{name}' is in neither '{config}' nor '{credentials}'")
    return out


def _boto3_provider(profile: str) -> Any:
    """A boto3-backed credential provider for a profile without static keys, if boto3 is there."""
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        logger.warning("AWS profile '%s' has no static keys and boto3 is not installed to resolve it; "
                       "trying instance credentials", profile)
        return None
    return Boto3CredentialProvider(boto3.Session(profile_name=profile))


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


def upload(local: str | os.PathLike[str], url: str, *, options: Optional[RemoteOptions] = None,
           quiet: Optional[bool] = None, max_concurrency: int = 16) -> int:
    """Upload a converted checkpoint directory to ``url`` (multipart, parallel); the index goes
    last, so a reader never sees a partial checkpoint. Returns the bytes uploaded.

    Example::

        upload("llama-8b.sllm", "s3://models/llama-8b.sllm")
    """
    from tqdm.auto import tqdm

    from sllm_store.index import INDEX_FILE, read_index
    from sllm_store.writer import default_quiet

    obstore = obstore_module()
    src = Path(local)
    read_index(src)  # a valid checkpoint only
    bucket = open_bucket(url, options)
    files = sorted((p for p in src.rglob("*") if p.is_file() and p.name != INDEX_FILE), key=lambda p: str(p))
    files.append(src / INDEX_FILE)
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="uploading",
              disable=default_quiet() if quiet is None else quiet, dynamic_ncols=True) as bar:
        for p in files:
            key = p.relative_to(src).as_posix()
            try:
                obstore.put(bucket, key, p, chunk_size=32 << 20, max_concurrency=max_concurrency)
            except Exception as e:
                raise remote_error(e, f"{url.rstrip('/')}/{key}", "uploading") from None
            bar.update(p.stat().st_size)
    return total


def fetch_small_files(bucket: Any, url: str, weights: set[str], dest: Path) -> None:
    """Copy the checkpoint's other top-level objects (config.json, tokenizer...) into ``dest``:
    every listed object under :data:`SMALL_FILE_LIMIT` bytes that is not in ``weights`` (the
    data files and the index). A server that cannot list (plain HTTP) gives none."""
    from sllm_store.errors import CacheError

    obstore = obstore_module()

    try:
        listing = obstore.list_with_delimiter(bucket)
    except Exception:  # e.g. plain HTTP servers cannot list: weights only
        logger.debug("%s: cannot list; fetching weights only", url)
        return
    for obj in listing.get("objects", []):
        key = obj["path"].rsplit("/", 1)[-1]
        if key in weights or obj["size"] > SMALL_FILE_LIMIT or key.startswith("."):
            continue
        try:
            content = bytes(obstore.get(bucket, key).bytes())
        except Exception as e:
            raise remote_error(e, f"{url}/{key}", "downloading") from None
        try:
            (dest / key).write_bytes(content)
        except OSError as e:
            raise CacheError(f"cannot write '{dest / key}': {e.strerror or e}") from None
