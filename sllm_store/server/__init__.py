"""The store server (``sllm-store serve``): a long-lived process that holds models in a pinned
host-memory pool and copies them into the memory of client processes.

* :mod:`sllm_store.server.store.proto` / ``store_pb2`` - the gRPC protocol.
* :mod:`sllm_store.server.pool` - the pinned memory pool, cut into blocks.
* :mod:`sllm_store.server.models` - models held in the pool: LRU, in-use pinning, pass-through.
* :mod:`sllm_store.server.service` - the gRPC service and :func:`serve`.
* :mod:`sllm_store.server.client` - the client: :class:`StoreClient`, used by the store tier
  (:mod:`sllm_store.tiers.store`) and the CLI.

Nothing here is imported by ``import sllm_store``; ``grpc`` is imported only when a server or a
client is used.
"""

from sllm_store.errors import MissingDependencyError

try:
    import google.protobuf  # noqa: F401
    import grpc  # noqa: F401
except ImportError as e:
    raise MissingDependencyError("the store server and its clients", e.name or "grpcio", "server") from None
