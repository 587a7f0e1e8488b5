"""Tiers: where checkpoints come from, behind one seam (:mod:`sllm_store.tiers.base`).

The registry is ordered; the first tier that accepts a path opens it:

1. ``store``: a store server is configured (``store=`` / ``SLLM_STORE_ADDRESS``): the server copies
   the model from its pinned memory pool into this process (:mod:`~sllm_store.tiers.store`).
2. ``remote``: ``s3://`` and ``http(s)://`` URLs, fetched with ranged GETs into the local disk
   cache while they load (:mod:`~sllm_store.tiers.remote`); a cached URL opens as a local
   checkpoint.
3. ``local``: a directory or file on a local file system (:mod:`~sllm_store.tiers.local`).

Importing this package is cheap: each tier imports its clients (grpc, obstore) when it opens.
"""

from __future__ import annotations

from sllm_store.config import LoadConfig
from sllm_store.errors import SllmStoreError
from sllm_store.index import PathLike, check_path
from sllm_store.tiers.base import Checkpoint, Tier, first_accepting
from sllm_store.tiers.local import LocalTier
from sllm_store.tiers.remote import RemoteTier
from sllm_store.tiers.store import StoreTier

TIERS: list[Tier] = [StoreTier(), RemoteTier(), LocalTier()]


def register(tier: Tier, *, first: bool = True) -> None:
    """Add a tier to the registry: before the others (``first``), or last."""
    TIERS.insert(0, tier) if first else TIERS.append(tier)


def open_checkpoint(path: PathLike, config: LoadConfig) -> Checkpoint:
    """The checkpoint at ``path``, opened by the first tier that accepts it."""
    check_path(path)
    tier = first_accepting(TIERS, path, config)
    if tier is None:  # pragma: no cover - the local tier accepts any path
        raise SllmStoreError(f"no tier can open {path!r}")
    return tier.open(path, config)


__all__ = ["TIERS", "Checkpoint", "Tier", "open_checkpoint", "register"]
