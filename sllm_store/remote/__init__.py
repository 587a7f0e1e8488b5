"""Remote checkpoints: ``s3://`` and ``http(s)://`` URLs, fetched into a local disk cache.

``load_state_dict("s3://bucket/model.sllm", "cuda:0")`` loads the checkpoint while it downloads
(parallel ranged GETs, every chunk verified) and writes it through to the local cache; the next
load of the URL is a disk (or page-cache) load (the remote tier, :mod:`sllm_store.tiers.remote`).
The modules here:

* :mod:`~sllm_store.remote.objects`: object-store connections (``obstore``), error mapping,
  :func:`upload`;
* :mod:`~sllm_store.remote.entries`: the cache directory: entries, partial downloads, locks;
* :mod:`~sllm_store.remote.fetcher`: the chunk fetcher (GETs, decoding, verification);
* :mod:`~sllm_store.remote.partial`: the files of a partial download and the write-behind;
* :mod:`~sllm_store.remote.download`: the download of one checkpoint (the coordinator),
  :func:`fetch` and :func:`wait_for_cache`.

Example::

    from sllm_store.remote import entries, fetch, prune, upload, wait_for_cache

    upload("llama-8b.sllm", "s3://models/llama-8b.sllm")
    path = fetch("s3://models/llama-8b.sllm")      # the cache entry, downloaded
    prune(100 << 30)                                # evict the least recently used entries
"""

from sllm_store.config import CacheSettings, RemoteOptions
from sllm_store.index import is_remote
from sllm_store.remote.download import fetch, wait_for_cache
from sllm_store.remote.entries import (
    CacheEntry,
    PartialDownload,
    cache_dir,
    entries,
    partials,
    prune,
    remove,
)
from sllm_store.remote.objects import upload

__all__ = [
    "CacheEntry",
    "CacheSettings",
    "PartialDownload",
    "RemoteOptions",
    "cache_dir",
    "entries",
    "fetch",
    "is_remote",
    "partials",
    "prune",
    "remove",
    "upload",
    "wait_for_cache",
]
