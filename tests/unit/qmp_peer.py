"""A fake QMP peer and fake QEMU children for the unit tests of qmp.py, qemu.py, handle.py.

`FakeQMP` listens on a real Unix socket and speaks QMP's JSON as QEMU does: a greeting,
`qmp_capabilities`, commands answered with the caller's `id`, events. It is scriptable per
command: answer later (`hold`), never answer (`silent`), hang up (`hang_up`), run a hook
when a command arrives (`on`, e.g. `quit` ends the fake QEMU), or never greet at all
(`greet = False`: a QMP slot someone else holds). It records what it was asked and lets a
test await a command's arrival (`arrived`) instead of sleeping.

`child_argv` is a fake QEMU: a Python child named like a VM's QEMU (`-name sandbox-<id>`),
optionally ignoring SIGTERM, that says it is ready (its handlers installed) by a line on
its stdout and, if asked, by creating a file, so that a test never races its signal
handling. `QemuProcess.start()` waits for the
QMP socket to exist before connecting: the child creates it, as a symlink to the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8},
                                "package": ""}, "capabilities": []}}

_CHILD = """\
import os, signal, sys, time
if sys.argv[1] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[2]:
    os.symlink(sys.argv[3], sys.argv[2])
print("ready", flush=True)  # handlers installed
while True:
    time.sleep(3600)
"""


def child_argv(vm_id: str, *, ignore_term: bool = False, ready: Path | None = None,
               target: Path | None = None) -> list[str]:
    """A fake QEMU named as VM vm_id's; with `ready`, it creates that path (a symlink to
    `target`) once its signal handling is set up."""
    return [sys.executable, "-S", "-c", _CHILD, "ignore-term" if ignore_term else "term",
            str(ready or ""), str(target or ""), "-name", f"sandbox-{vm_id}"]


class FakeQMP:
    """A scriptable QMP peer on a real Unix socket (module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.greet = True
        self.answers: dict[str, Any] = {"query-status": {"status": "paused",
                                                         "running": False}}
        self.hold: dict[str, asyncio.Event] = {}
        self.silent: set[str] = set()
        self.hang_up: set[str] = set()
        self.on: dict[str, Callable[[], None]] = {}
        self.commands: list[str] = []
        self.connections = 0
        self.open_connections = 0
        self._arrived: dict[str, asyncio.Event] = {}
        self._closed = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeQMP:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        # A connection held on a command (`hold`) would otherwise outlive the peer.
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def arrived(self, command: str) -> asyncio.Event:
        """Set once `command` has been received (on any connection)."""
        return self._arrived.setdefault(command, asyncio.Event())

    def closed(self) -> asyncio.Event:
        """Set each time a client connection ends (cleared by the caller to wait again)."""
        return self._closed

    async def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every connected client."""
        line = json.dumps({"event": name, "data": data or {},
                           "timestamp": {"seconds": 0, "microseconds": 0}}) + "\n"
        for writer in list(self._writers):
            writer.write(line.encode())
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        self.connections += 1
        self.open_connections += 1
        self._writers.add(writer)
        try:
            if not self.greet:
                await reader.read()  # hold the slot: accepted, never greeted
                return
            writer.write(json.dumps(GREETING).encode() + b"\n")
            async for message in _messages(reader):
                command = message["execute"]
                self.commands.append(command)
                self.arrived(command).set()
                if hook := self.on.get(command):
                    hook()
                if command in self.silent:
                    continue
                if command in self.hang_up:
                    return
                if command in self.hold:
                    await self.hold[command].wait()
                reply: dict[str, Any] = {"return": self.answers.get(command, {})}
                if "id" in message:
                    reply["id"] = message["id"]
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self.open_connections -= 1
            writer.close()
            self._closed.set()


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """JSON objects as QEMU's parser takes them: a stream, with or without newlines
    (qemu.qmp sends none)."""
    decoder = json.JSONDecoder()
    buffer = ""
    while chunk := await reader.read(4096):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                message, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                break  # incomplete: wait for more
            buffer = buffer.lstrip()[end:]
            yield message


def sigstop(pid: int) -> None:
    """Stop child `pid` with SIGSTOP and return once it is stopped (a blocking waitid that
    leaves the stop to be seen again: milliseconds)."""
    os.kill(pid, signal.SIGSTOP)
    os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)
