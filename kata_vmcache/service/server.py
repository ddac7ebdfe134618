"""The gRPC face of the cache: Kata's `cache.CacheService` on a Unix socket.

The servicer is thin: each RPC is a call into the cache plus a message built from data
prepared beforehand (the `Config` reply is built once; each VM's hand-off record is built
when it becomes ready), so the hand-off path does as little as possible.

Errors map to status codes a caller can act on: a closing cache is UNAVAILABLE, a VM that
cannot be had before the caller's deadline is DEADLINE_EXCEEDED (ours, sent just before the
deadline so that a VM is never handed to a caller that is giving up), anything of ours that
goes wrong is INTERNAL with our one-line message.

A GetBaseVM whose client cancels or disconnects before the reply is written loses no VM:
grpc.aio cancels the handler's task at whatever it awaits (waiting for a VM, checking it,
releasing it), and the write of the reply itself is awaited (see `add_cache_service`), so
every way out of the handler but a written reply returns the VM to the cache.

What hands a VM over is the OK status, not the message. A unary gRPC client (Kata's Go
client, ours) only returns a reply once the call ends with status OK; a message followed by
an error, a reset or a dropped connection is an error, and the message is discarded. The
status goes out after the handler returns, so the hand-off is, in this order: write the
message (awaited, at most HANDOFF_WRITE_TIMEOUT), mark the VM handed off (`give_now()`: its
record is renamed to say so), return. Hence:

- a client that stops reading (HTTP/2 flow control holds the message in our buffers) cannot
  pin a VM: after HANDOFF_WRITE_TIMEOUT the write is given up, the VM goes back to the pool
  (it never left `ready`), and the call ends with no status, so even if that client reads
  the message later its call cannot succeed. A write still pending after REFILL_AFTER
  starts the refill, so other callers are not kept waiting meanwhile;
- a daemon killed while a write is blocked leaves the VM's record saying `ready`: its
  successor stops the VM (the client cannot have it: no status was sent). Killed after the
  rename, the record says `handed_off` and the VM is left to the client, as it must be when
  the status may have gone out.

`start_server()` owns the endpoint: it creates the parent directory, refuses to start while a
live server answers there, replaces a stale socket file, and sets the socket's mode and
group. An endpoint that cannot be listened on is one line naming the key and the reason
(EndpointUnusable), not grpc's "Failed to bind" and a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from ..config import Config
from ..errors import CacheClosed, EndpointInUse, EndpointUnusable, VmcacheError
from ..pool.cache import VMCache
from ..proto import cache_pb2, cache_pb2_grpc
from ..shape import VMShape
from ..vm.owned import VM, VMState
from ..vm.spec import VMSpec
from .monitor import MonitorServicer
from .monitor import add_to_server as add_monitor_to_server

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name

log = logging.getLogger(__name__)

#: Kata's messages are tiny; a peer sending megabytes is not a Kata runtime.
MAX_MESSAGE_BYTES = 64 * 1024
#: GetBaseVM gives up this long before the caller's deadline: a reply racing the deadline
#: could reach a caller that has just given up, and nobody would own that VM.
DEADLINE_MARGIN = 0.1
#: A hand-off whose reply message cannot be written within this time is undone: the client
#: stopped reading (or grants no flow-control window), and must not pin a VM. Writing the
#: reply takes well under a millisecond when the client reads.
HANDOFF_WRITE_TIMEOUT = 3.0
#: A reply not written after this long wakes the pool to boot the VM's replacement, so a
#: stalled client does not leave the cache short while its hand-off is undone.
REFILL_AFTER = 0.5
#: A connection must complete HTTP/2's opening within this time (grpc's default is 120 s):
#: a peer that connects and says nothing must not hold a file descriptor for long.
HANDSHAKE_TIMEOUT_MS = 5_000


def vm_shape(spec: VMSpec) -> VMShape:
    """The VMs a factory boots, for the Config reply's trailing metadata (shape.py): the
    base VM and its hot-plug ceilings, the very values its hand-off record gives the client
    (vm.py `hypervisor_record`: MaxMemory, MemorySlots), so that a request refused after a
    VM is taken is refused before (for a 3.x file the spec's max_memory_mib is Kata's
    DefaultMaxMemorySize, not Config.max_memory_mib)."""
    return VMShape(cpus=spec.vcpus, max_cpus=spec.max_vcpus, memory_mib=spec.memory_mib,
                   max_memory_mib=max(spec.max_memory_mib, spec.memory_mib),
                   memory_slots=spec.memory_slots)


def config_reply(config: Config) -> cache_pb2.GrpcVMConfig:
    """Kata's VMConfig JSON of the file's generation ([vmcache] kata_version), derived once."""
    vm_config = config.kata_vm_config()
    return cache_pb2.GrpcVMConfig(
        Data=json.dumps(vm_config, separators=(",", ":")).encode(),
        AgentConfig=json.dumps(vm_config["AgentConfig"], separators=(",", ":")).encode(),
    )


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: VMCache, config: Config, quit: Callable[[], None]) -> None:
        self.cache = cache
        self._config = config_reply(config)
        self._quit = quit

    def set_config(self, config: Config) -> None:
        """Answer `Config` from `config` from now on (a configuration reload)."""
        self._config = config_reply(config)

    async def Config(self, request: empty_pb2.Empty,
                     context: grpc.aio.ServicerContext) -> cache_pb2.GrpcVMConfig:
        # The VMs of the cache's factory now (a reload replaces it along with the config).
        context.set_trailing_metadata(vm_shape(self.cache.factory.spec).metadata())
        return self._config

    async def GetBaseVM(self, request: empty_pb2.Empty,
                        context: grpc.aio.ServicerContext) -> None:
        """Hand out one VM. Registered as a stream of one reply (`add_cache_service`): the
        reply is written with `context.write()`, whose failure we can see."""
        asked = time.monotonic()
        remaining = context.time_remaining()
        try:
            # A ready VM is had without suspending (reserve_nowait); waiting, and the
            # task wait_for makes, only when the pool is empty.
            vm = self.cache.reserve_nowait() or await self._wait_for_vm(remaining)
        except TimeoutError:
            # While boots fail, the caller learns why here: no VM is coming soon.
            stats = self.cache.stats
            failing = (f"; boots failing ({stats.consecutive_failures} in a row): "
                       f"{stats.last_error}" if stats.last_error else "")
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no VM became ready within the caller's deadline "
                                f"({remaining:.1f} s; {self.cache.ready_count} ready, "
                                f"{self.cache.booting_count} booting{failing})")
        except CacheClosed as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except VmcacheError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        # Made with the VM's hand-off record when it became ready (vm.py, handoff.py).
        reply = vm.handoff.message
        refill = asyncio.get_running_loop().call_later(REFILL_AFTER, self.cache.refill)
        try:
            async with asyncio.timeout(HANDOFF_WRITE_TIMEOUT):
                await context.write(reply)
        except TimeoutError:
            # The message may still sit in grpc's buffers, but no status will follow it:
            # ending the handler by cancellation sends none (module docstring).
            self.cache.take_back_later(vm, "the client did not read its reply within "
                                           f"{HANDOFF_WRITE_TIMEOUT:g} s")
            raise asyncio.CancelledError from None
        except asyncio.CancelledError:
            self.cache.take_back_later(vm, "GetBaseVM was cancelled before its reply was "
                                           "written")
            raise
        except Exception as exc:
            # The write failed: the client is gone. End the RPC as cancelled, which is what
            # it is (raising the batch error would make grpc log it as a server bug).
            self.cache.take_back_later(vm, "the client went away before the reply was "
                                           f"written ({type(exc).__name__})")
            raise asyncio.CancelledError from exc
        finally:
            refill.cancel()
        if vm.state is not VMState.READY:
            # It died while its reply was being written: the error status tells the client
            # not to use the message it has (the cache has already dropped the VM).
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"VM {vm.id} died during its hand-off ({vm.reason}); ask again")
        try:
            self.cache.give_now(vm)
        except Exception as exc:
            self.cache.take_back_later(vm, f"it could not be marked handed off ({exc})")
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"VM {vm.id} could not be marked handed off: {exc}")
        # Bookkeeping (a log line, the activity record, watchers, the refill) once the
        # call is over: grpc runs done callbacks when the status has been sent, so none of
        # it competes with the reply for the 2 cores (the refill's QEMU launch alone holds
        # the loop 0.4-10 ms). It runs however the call ends, so the refill always starts.
        context.add_done_callback(functools.partial(self._delivered, vm, asked))

    def _delivered(self, vm: VM, asked: float, context: object) -> None:
        self.cache.delivered(vm, asked=asked)

    async def _wait_for_vm(self, remaining: float | None) -> VM:
        if remaining is None:
            return await self.cache.reserve()
        return await asyncio.wait_for(self.cache.reserve(),
                                      max(0.0, remaining - DEADLINE_MARGIN))

    async def Status(self, request: empty_pb2.Empty,
                     context: grpc.aio.ServicerContext) -> cache_pb2.GrpcStatus:
        """Kata's server answers with the VMs in its cache (factory/cache/cache.go GetVMStatus:
        the paused VMs a GetBaseVM can have), so do we: only ready VMs. Booting ones, and
        every other state, are in the Monitor snapshot (`status --json`)."""
        # Templating on and the template's size ride in trailing metadata: Kata's
        # GrpcStatus must not grow fields (protos/cache.proto is Kata's contract;
        # tests/unit/test_proto.py).
        if metadata := self.cache.factory.status_metadata():
            context.set_trailing_metadata(metadata)
        return cache_pb2.GrpcStatus(
            pid=os.getpid(),
            vmstatus=[
                cache_pb2.GrpcVMStatus(pid=vm.pid or 0, cpu=vm.spec.vcpus,
                                       memory=vm.spec.memory_mib)
                for vm in self.cache.owned() if vm.state is VMState.READY
            ],
        )

    async def Quit(self, request: empty_pb2.Empty,
                   context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        log.info("Quit requested over gRPC")
        # Reply first: the caller waits for this answer, then for the socket to go away.
        asyncio.get_running_loop().call_later(0.05, self._quit)
        return empty_pb2.Empty()


def add_cache_service(servicer: CacheServicer, server: grpc.aio.Server) -> None:
    """Register cache.CacheService as the generated `add_CacheServiceServicer_to_server`
    does, except that GetBaseVM is served as a server stream of exactly one message.

    On the wire the two are the same frames (response HEADERS, one DATA message, trailers),
    so Kata's unary client cannot tell. The difference is on our side: a unary handler's
    reply is sent after the handler returns, and if the client has gone by then grpc.aio
    only logs the failed write (done callbacks cannot tell either: `context.cancelled()`
    stays False, grpc/grpc#36193), so the VM would be lost. A streaming handler awaits
    `context.write()`, which raises, or is cancelled, when the reply cannot be written.
    """
    empty = empty_pb2.Empty
    handlers = {
        "Config": grpc.unary_unary_rpc_method_handler(
            servicer.Config, request_deserializer=empty.FromString,
            response_serializer=cache_pb2.GrpcVMConfig.SerializeToString),
        "GetBaseVM": grpc.unary_stream_rpc_method_handler(
            servicer.GetBaseVM, request_deserializer=empty.FromString,
            response_serializer=cache_pb2.GrpcVM.SerializeToString),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status, request_deserializer=empty.FromString,
            response_serializer=cache_pb2.GrpcStatus.SerializeToString),
        "Quit": grpc.unary_unary_rpc_method_handler(
            servicer.Quit, request_deserializer=empty.FromString,
            response_serializer=empty.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def probe_endpoint(path: Path) -> bool:
    """True when something accepts connections on the Unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                return False
            raise
        return True


def unusable(path: Path, why: str) -> EndpointUnusable:
    return EndpointUnusable(f"factory.vm_cache_endpoint: cannot listen on {path}: {why}")


def prepare_endpoint(path: Path) -> None:
    """Make `path` bindable: parent dir, no live server, no stale socket."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise unusable(path, _why(exc, path.parent)) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise EndpointInUse(f"{path} exists and is not a socket; refusing to replace it")
    try:
        live = probe_endpoint(path)
        if not live:
            log.info("replacing stale socket %s", path)
            path.unlink()
    except OSError as exc:
        raise unusable(path, _why(exc, path)) from None
    if live:
        raise EndpointInUse(f"a server is already answering on {path} "
                            "(stop it with 'kata-vmcache destroy')")


def _why(exc: OSError, path: Path) -> str:
    if isinstance(exc, FileExistsError | NotADirectoryError):
        # mkdir of a directory whose path has a file in it: say which.
        for parent in (path, *path.parents):
            if parent.exists() and not parent.is_dir():
                return f"{parent} is not a directory"
    return exc.strerror or str(exc)


def bind_error(path: Path) -> str:
    """Why `path` cannot be bound, found by binding it ourselves (grpc only says that it
    failed, and its core logging is off: quiet_grpc.py)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.bind(str(path))
        except OSError as exc:
            return exc.strerror or str(exc)
    with contextlib.suppress(OSError):
        path.unlink()  # ours, made just now
    return "grpc could not bind it"


async def start_server(config: Config, servicer: CacheServicer,
                       monitor: MonitorServicer) -> grpc.aio.Server:
    endpoint = config.factory.vm_cache_endpoint
    prepare_endpoint(endpoint)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        # Drop connections that say nothing: hostile or half-open peers must not pile up.
        ("grpc.max_connection_idle_ms", 5 * 60 * 1000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ])
    add_cache_service(servicer, server)
    add_monitor_to_server(monitor, server)  # our own service beside Kata's (monitor.py)
    # The socket must never exist with wider permissions than asked, not even briefly.
    old = os.umask(0o177)
    try:
        try:
            server.add_insecure_port(f"unix:{endpoint}")
        except RuntimeError:
            raise unusable(endpoint, bind_error(endpoint)) from None
        await server.start()
    finally:
        os.umask(old)
    apply_permissions(endpoint, config.daemon.socket_mode, config.daemon.socket_group)
    return server


def apply_permissions(path: Path, mode: int, group: str) -> None:
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)


def remove_endpoint(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
