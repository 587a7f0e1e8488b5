from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("version", "cuda", "pinned", "pid", "storage_path")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STORAGE_PATH_FIELD_NUMBER: _ClassVar[int]
    version: str
    cuda: bool
    pinned: bool
    pid: int
    storage_path: str
    def __init__(self, version: _Optional[str] = ..., cuda: _Optional[bool] = ..., pinned: _Optional[bool] = ..., pid: _Optional[int] = ..., storage_path: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "tier", "size", "pool_bytes", "in_use", "hits", "last_used", "gpu")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: str
    size: int
    pool_bytes: int
    in_use: int
    hits: int
    last_used: float
    gpu: _containers.RepeatedCompositeFieldContainer[GpuResidency]
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[str] = ..., size: _Optional[int] = ..., pool_bytes: _Optional[int] = ..., in_use: _Optional[int] = ..., hits: _Optional[int] = ..., last_used: _Optional[float] = ..., gpu: _Optional[_Iterable[_Union[GpuResidency, _Mapping]]] = ...) -> None: ...

class GpuResidency(_message.Message):
    __slots__ = ("device", "pci_bus_id", "bytes", "shared_bytes", "attached", "pinned", "state")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    device: str
    pci_bus_id: str
    bytes: int
    shared_bytes: int
    attached: int
    pinned: bool
    state: str
    def __init__(self, device: _Optional[str] = ..., pci_bus_id: _Optional[str] = ..., bytes: _Optional[int] = ..., shared_bytes: _Optional[int] = ..., attached: _Optional[int] = ..., pinned: _Optional[bool] = ..., state: _Optional[str] = ...) -> None: ...

class GpuPoolStatus(_message.Message):
    __slots__ = ("device", "pci_bus_id", "budget", "used", "h2d_gbps")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    H2D_GBPS_FIELD_NUMBER: _ClassVar[int]
    device: str
    pci_bus_id: str
    budget: int
    used: int
    h2d_gbps: float
    def __init__(self, device: _Optional[str] = ..., pci_bus_id: _Optional[str] = ..., budget: _Optional[int] = ..., used: _Optional[int] = ..., h2d_gbps: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("storage_path", "pool_size", "pool_used", "block_size", "pinned", "hits", "misses", "evictions", "bytes_served", "models", "loads_in_progress", "gpu_pools", "attach_socket", "disk_gbps", "copy_gbps")
    STORAGE_PATH_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    POOL_USED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SERVED_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LOADS_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    GPU_POOLS_FIELD_NUMBER: _ClassVar[int]
    ATTACH_SOCKET_FIELD_NUMBER: _ClassVar[int]
    DISK_GBPS_FIELD_NUMBER: _ClassVar[int]
    COPY_GBPS_FIELD_NUMBER: _ClassVar[int]
    storage_path: str
    pool_size: int
    pool_used: int
    block_size: int
    pinned: bool
    hits: int
    misses: int
    evictions: int
    bytes_served: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    loads_in_progress: int
    gpu_pools: _containers.RepeatedCompositeFieldContainer[GpuPoolStatus]
    attach_socket: str
    disk_gbps: float
    copy_gbps: float
    def __init__(self, storage_path: _Optional[str] = ..., pool_size: _Optional[int] = ..., pool_used: _Optional[int] = ..., block_size: _Optional[int] = ..., pinned: _Optional[bool] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., bytes_served: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., loads_in_progress: _Optional[int] = ..., gpu_pools: _Optional[_Iterable[_Union[GpuPoolStatus, _Mapping]]] = ..., attach_socket: _Optional[str] = ..., disk_gbps: _Optional[float] = ..., copy_gbps: _Optional[float] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("index_json", "fingerprint", "small_files", "gpu", "attach_socket")
    class SmallFilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    INDEX_JSON_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SMALL_FILES_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    ATTACH_SOCKET_FIELD_NUMBER: _ClassVar[int]
    index_json: str
    fingerprint: str
    small_files: _containers.ScalarMap[str, bytes]
    gpu: _containers.RepeatedCompositeFieldContainer[GpuResidency]
    attach_socket: str
    def __init__(self, index_json: _Optional[str] = ..., fingerprint: _Optional[str] = ..., small_files: _Optional[_Mapping[str, bytes]] = ..., gpu: _Optional[_Iterable[_Union[GpuResidency, _Mapping]]] = ..., attach_socket: _Optional[str] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("model", "verify", "to", "pin")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    model: str
    verify: bool
    to: str
    pin: bool
    def __init__(self, model: _Optional[str] = ..., verify: _Optional[bool] = ..., to: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class PrefetchReply(_message.Message):
    __slots__ = ("hit", "seconds", "bytes")
    HIT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    hit: bool
    seconds: float
    bytes: int
    def __init__(self, hit: _Optional[bool] = ..., seconds: _Optional[float] = ..., bytes: _Optional[int] = ...) -> None: ...

class Destination(_message.Message):
    __slots__ = ("cuda", "shm", "size")
    CUDA_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    cuda: CudaIpcMemory
    shm: SharedMemory
    size: int
    def __init__(self, cuda: _Optional[_Union[CudaIpcMemory, _Mapping]] = ..., shm: _Optional[_Union[SharedMemory, _Mapping]] = ..., size: _Optional[int] = ...) -> None: ...

class CudaIpcMemory(_message.Message):
    __slots__ = ("handle", "offset", "pci_bus_id")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    offset: int
    pci_bus_id: str
    def __init__(self, handle: _Optional[bytes] = ..., offset: _Optional[int] = ..., pci_bus_id: _Optional[str] = ...) -> None: ...

class SharedMemory(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Copy(_message.Message):
    __slots__ = ("file", "offset", "dest", "dest_offset", "length")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DEST_FIELD_NUMBER: _ClassVar[int]
    DEST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    file: int
    offset: int
    dest: int
    dest_offset: int
    length: int
    def __init__(self, file: _Optional[int] = ..., offset: _Optional[int] = ..., dest: _Optional[int] = ..., dest_offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model", "fingerprint", "dests", "copies", "verify")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DESTS_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    model: str
    fingerprint: str
    dests: _containers.RepeatedCompositeFieldContainer[Destination]
    copies: _containers.RepeatedCompositeFieldContainer[Copy]
    verify: bool
    def __init__(self, model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., dests: _Optional[_Iterable[_Union[Destination, _Mapping]]] = ..., copies: _Optional[_Iterable[_Union[Copy, _Mapping]]] = ..., verify: _Optional[bool] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("hit", "seconds", "copy_seconds", "bytes", "streamed")
    HIT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    COPY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STREAMED_FIELD_NUMBER: _ClassVar[int]
    hit: bool
    seconds: float
    copy_seconds: float
    bytes: int
    streamed: bool
    def __init__(self, hit: _Optional[bool] = ..., seconds: _Optional[float] = ..., copy_seconds: _Optional[float] = ..., bytes: _Optional[int] = ..., streamed: _Optional[bool] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("model", "tier")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    model: str
    tier: str
    def __init__(self, model: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class EvictReply(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, evicted: _Optional[_Iterable[str]] = ...) -> None: ...
