"""Remote checkpoints: ``s3://`` and ``http(s)://`` URLs, fetched into a local cache.

``load_state_dict("s3://bucket/model.sllm")`` downloads the checkpoint with parallel ranged GETs
(``obstore``) into the local cache (:mod:`sllm_store.remote.cache`), verifying every chunk, then
loads it from disk; the next load is a disk (or page-cache) load. ``sllm-store upload`` and
``sllm-store cache ls|rm|prune`` manage the two ends.
"""

from sllm_store.remote.objects import RemoteOptions, is_remote

__all__ = ["RemoteOptions", "is_remote"]
