from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheSnapshot(_message.Message):
    __slots__ = ("pid", "endpoint", "version", "started_at", "uptime_seconds", "taken_at", "stopping", "heartbeat_seconds", "config", "target", "ready", "booting", "clients_waiting", "vms", "counters", "handoff_seconds", "boot_seconds", "events", "vm_cache_number", "memory_budget_mib", "memory_committed_mib", "unclaimed", "autoscale", "target_reason")
    PID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TAKEN_AT_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    BOOTING_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BOOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    VM_CACHE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_MIB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_COMMITTED_MIB_FIELD_NUMBER: _ClassVar[int]
    UNCLAIMED_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALE_FIELD_NUMBER: _ClassVar[int]
    TARGET_REASON_FIELD_NUMBER: _ClassVar[int]
    pid: int
    endpoint: str
    version: str
    started_at: float
    uptime_seconds: float
    taken_at: float
    stopping: bool
    heartbeat_seconds: float
    config: ServerConfig
    target: int
    ready: int
    booting: int
    clients_waiting: int
    vms: _containers.RepeatedCompositeFieldContainer[VMInfo]
    counters: Counters
    handoff_seconds: _containers.RepeatedScalarFieldContainer[float]
    boot_seconds: _containers.RepeatedScalarFieldContainer[float]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    vm_cache_number: int
    memory_budget_mib: int
    memory_committed_mib: int
    unclaimed: _containers.RepeatedCompositeFieldContainer[UnclaimedVM]
    autoscale: bool
    target_reason: str
    def __init__(self, pid: _Optional[int] = ..., endpoint: _Optional[str] = ..., version: _Optional[str] = ..., started_at: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., taken_at: _Optional[float] = ..., stopping: _Optional[bool] = ..., heartbeat_seconds: _Optional[float] = ..., config: _Optional[_Union[ServerConfig, _Mapping]] = ..., target: _Optional[int] = ..., ready: _Optional[int] = ..., booting: _Optional[int] = ..., clients_waiting: _Optional[int] = ..., vms: _Optional[_Iterable[_Union[VMInfo, _Mapping]]] = ..., counters: _Optional[_Union[Counters, _Mapping]] = ..., handoff_seconds: _Optional[_Iterable[float]] = ..., boot_seconds: _Optional[_Iterable[float]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., vm_cache_number: _Optional[int] = ..., memory_budget_mib: _Optional[int] = ..., memory_committed_mib: _Optional[int] = ..., unclaimed: _Optional[_Iterable[_Union[UnclaimedVM, _Mapping]]] = ..., autoscale: _Optional[bool] = ..., target_reason: _Optional[str] = ...) -> None: ...

class UnclaimedVM(_message.Message):
    __slots__ = ("path", "problem", "pid")
    PATH_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    path: str
    problem: str
    pid: int
    def __init__(self, path: _Optional[str] = ..., problem: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class ServerConfig(_message.Message):
    __slots__ = ("vcpus", "memory_mib", "accelerator", "template_enabled", "template_size_bytes", "config_path")
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    vcpus: int
    memory_mib: int
    accelerator: str
    template_enabled: bool
    template_size_bytes: int
    config_path: str
    def __init__(self, vcpus: _Optional[int] = ..., memory_mib: _Optional[int] = ..., accelerator: _Optional[str] = ..., template_enabled: _Optional[bool] = ..., template_size_bytes: _Optional[int] = ..., config_path: _Optional[str] = ...) -> None: ...

class VMInfo(_message.Message):
    __slots__ = ("id", "pid", "state", "vcpus", "memory_mib", "created_at", "age_seconds", "boot_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BOOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    pid: int
    state: str
    vcpus: int
    memory_mib: int
    created_at: float
    age_seconds: float
    boot_seconds: float
    def __init__(self, id: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., vcpus: _Optional[int] = ..., memory_mib: _Optional[int] = ..., created_at: _Optional[float] = ..., age_seconds: _Optional[float] = ..., boot_seconds: _Optional[float] = ...) -> None: ...

class Counters(_message.Message):
    __slots__ = ("handed_out", "booted", "boot_failures", "died_in_pool", "last_error", "next_retry_seconds")
    HANDED_OUT_FIELD_NUMBER: _ClassVar[int]
    BOOTED_FIELD_NUMBER: _ClassVar[int]
    BOOT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    DIED_IN_POOL_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    NEXT_RETRY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    handed_out: int
    booted: int
    boot_failures: int
    died_in_pool: int
    last_error: str
    next_retry_seconds: float
    def __init__(self, handed_out: _Optional[int] = ..., booted: _Optional[int] = ..., boot_failures: _Optional[int] = ..., died_in_pool: _Optional[int] = ..., last_error: _Optional[str] = ..., next_retry_seconds: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "time", "kind", "text", "vm_id")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: float
    kind: str
    text: str
    vm_id: str
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., text: _Optional[str] = ..., vm_id: _Optional[str] = ...) -> None: ...
