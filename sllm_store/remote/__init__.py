"""Remote checkpoints: ``s3://`` and ``http(s)://`` URLs, fetched into a local cache.

``load_state_dict("s3://bucket/model.sllm", "cuda:0")`` streams the checkpoint with parallel
ranged GETs (``obstore``), verifying every chunk, into its destinations, and writes it through to
the local cache (:mod:`sllm_store.remote.cache`; :mod:`sllm_store.remote.stream`); the next load
is a disk (or page-cache) load. ``wait_for_cache()`` waits until the cache entries of this
process's loads are on disk. ``sllm-store upload`` and ``sllm-store cache ls|rm|prune`` manage
the two ends.
"""

from typing import Optional

from sllm_store.remote.objects import RemoteOptions, is_remote


def wait_for_cache(timeout: Optional[float] = None) -> bool:
    """See :func:`sllm_store.remote.cache.wait_for_cache` (imported lazily: it needs numpy)."""
    from sllm_store.remote.cache import wait_for_cache as wait

    return wait(timeout)


__all__ = ["RemoteOptions", "is_remote", "wait_for_cache"]
