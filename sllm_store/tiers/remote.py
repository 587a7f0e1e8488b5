"""The remote tier (being written)."""

from __future__ import annotations

from typing import Any


class RemoteTier:
    name = "remote"

    def accepts(self, path: Any, config: Any) -> bool:
        return isinstance(path, str) and path.startswith(("s3://", "http://", "https://"))

    def open(self, path: Any, config: Any) -> Any:
        raise NotImplementedError
