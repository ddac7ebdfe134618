from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GrpcVMConfig(_message.Message):
    __slots__ = ("Data", "AgentConfig")
    DATA_FIELD_NUMBER: _ClassVar[int]
    AGENTCONFIG_FIELD_NUMBER: _ClassVar[int]
    Data: bytes
    AgentConfig: bytes
    def __init__(self, Data: _Optional[bytes] = ..., AgentConfig: _Optional[bytes] = ...) -> None: ...

class GrpcVM(_message.Message):
    __slots__ = ("id", "hypervisor", "proxyPid", "proxyURL", "cpu", "memory", "cpuDelta")
    ID_FIELD_NUMBER: _ClassVar[int]
    HYPERVISOR_FIELD_NUMBER: _ClassVar[int]
    PROXYPID_FIELD_NUMBER: _ClassVar[int]
    PROXYURL_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    CPUDELTA_FIELD_NUMBER: _ClassVar[int]
    id: str
    hypervisor: bytes
    proxyPid: int
    proxyURL: str
    cpu: int
    memory: int
    cpuDelta: int
    def __init__(self, id: _Optional[str] = ..., hypervisor: _Optional[bytes] = ..., proxyPid: _Optional[int] = ..., proxyURL: _Optional[str] = ..., cpu: _Optional[int] = ..., memory: _Optional[int] = ..., cpuDelta: _Optional[int] = ...) -> None: ...

class GrpcStatus(_message.Message):
    __slots__ = ("pid", "vmstatus")
    PID_FIELD_NUMBER: _ClassVar[int]
    VMSTATUS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    vmstatus: _containers.RepeatedCompositeFieldContainer[GrpcVMStatus]
    def __init__(self, pid: _Optional[int] = ..., vmstatus: _Optional[_Iterable[_Union[GrpcVMStatus, _Mapping]]] = ...) -> None: ...

class GrpcVMStatus(_message.Message):
    __slots__ = ("pid", "cpu", "memory")
    PID_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    pid: int
    cpu: int
    memory: int
    def __init__(self, pid: _Optional[int] = ..., cpu: _Optional[int] = ..., memory: _Optional[int] = ...) -> None: ...
