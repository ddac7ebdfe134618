"""The wire contract: generated code is fresh, and the descriptors say exactly what Kata's
protocols/cache/cache.proto says (names, numbers, types, method paths)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor as F

from kata_vmcache.proto import cache_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)],
                   check=True, capture_output=True)
    committed = ROOT / "kata_vmcache" / "proto"
    generated = sorted(p.name for p in tmp_path.glob("*_pb2*"))
    assert generated == sorted(p.name for p in committed.glob("*_pb2*"))
    for name in generated:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"kata_vmcache/proto/{name} is stale: run `make proto`")


EXPECTED = {
    "GrpcVMConfig": [("Data", 1, F.TYPE_BYTES), ("AgentConfig", 2, F.TYPE_BYTES)],
    "GrpcVM": [("id", 1, F.TYPE_STRING), ("hypervisor", 2, F.TYPE_BYTES),
               ("proxyPid", 3, F.TYPE_INT64), ("proxyURL", 4, F.TYPE_STRING),
               ("cpu", 5, F.TYPE_UINT32), ("memory", 6, F.TYPE_UINT32),
               ("cpuDelta", 7, F.TYPE_UINT32)],
    "GrpcStatus": [("pid", 1, F.TYPE_INT64), ("vmstatus", 2, F.TYPE_MESSAGE)],
    "GrpcVMStatus": [("pid", 1, F.TYPE_INT64), ("cpu", 2, F.TYPE_UINT32),
                     ("memory", 3, F.TYPE_UINT32)],
}


def test_messages_match_kata() -> None:
    file = cache_pb2.DESCRIPTOR
    assert file.package == "cache"
    assert set(file.message_types_by_name) == set(EXPECTED)
    for name, fields in EXPECTED.items():
        desc = file.message_types_by_name[name]
        assert [(f.name, f.number, f.type) for f in desc.fields] == fields, name
    status = file.message_types_by_name["GrpcStatus"].fields_by_name["vmstatus"]
    assert status.message_type is not None
    assert status.message_type.full_name == "cache.GrpcVMStatus"
    assert status.is_repeated


def test_service_matches_kata() -> None:
    service = cache_pb2.DESCRIPTOR.services_by_name["CacheService"]
    assert service.full_name == "cache.CacheService"
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name)
               for m in service.methods}
    empty = "google.protobuf.Empty"
    assert methods == {
        "Config": (empty, "cache.GrpcVMConfig"),
        "GetBaseVM": (empty, "cache.GrpcVM"),
        "Status": (empty, "cache.GrpcStatus"),
        "Quit": (empty, empty),
    }
