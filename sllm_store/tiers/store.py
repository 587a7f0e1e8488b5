"""The store tier (being written)."""

from __future__ import annotations

from typing import Any


class StoreTier:
    name = "store"

    def accepts(self, path: Any, config: Any) -> bool:
        return bool(config.store.address)

    def open(self, path: Any, config: Any) -> Any:
        raise NotImplementedError
