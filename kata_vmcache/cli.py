"""`kata-vmcache`: the command line.

    kata-vmcache [--config PATH | --runtime-class NAME] [--debug] init | status | get | ...
    kata-vmcache [--config PATH | --runtime-class NAME] check-config
    kata-vmcache demo-guest DIR

Errors are ours (`VmcacheError`): one line on stderr (one per problem for configuration
files), exit 2 for usage and configuration, 1 otherwise. Tracebacks only with --debug; an
exception that is not ours is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import config as configmod
from . import quiet_grpc  # noqa: F401 - before anything imports grpc
from .client.rpc import CacheClient
from .client.snapshot import MonitorClient
from .errors import ConfigError, NoMonitor, ServerUnavailable, UsageError, VmcacheError
from .procs import pid_alive
from .service.logs import setup_logging

PROG = "kata-vmcache"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Keep booted, paused QEMU VMs ready and hand them to Kata Containers "
                    "over gRPC (Kata's VMCache, standalone).",
    )
    parser.add_argument("--config", type=Path, metavar="PATH",
                        help="Kata configuration.toml (default: Kata's lookup order, "
                             + ", ".join(str(p) for p in configmod.DEFAULT_CONFIG_PATHS) + ")")
    parser.add_argument("--runtime-class", metavar="NAME",
                        help="Kata's configuration-NAME.toml, looked up as Kata looks up "
                             "configuration.toml (one instance per runtime class: "
                             "kata-vmcache@NAME.service)")
    parser.add_argument("--debug", action="store_true",
                        help="debug logging, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("init", help="run the VM cache server in the foreground")

    def client_command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--endpoint", type=Path, metavar="PATH",
                       help="server socket (default: [factory] vm_cache_endpoint)")
        return p

    p = client_command("status", "show the server's pid and its cached VMs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = client_command("get", "take one paused VM and print its hand-off JSON "
                              "(you own the VM afterwards)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for a ready VM (default: 60)")
    p.add_argument("--resume", action="store_true",
                   help="resume the VM (booting one directly if the configuration does not "
                        "fit the cache's), and add --cpus/--memory by hot-plug")
    p.add_argument("--cpus", type=int, metavar="N",
                   help="with --resume: vCPUs wanted (default: the base VM's)")
    p.add_argument("--memory", type=int, metavar="MiB",
                   help="with --resume: memory wanted in MiB (default: the base VM's)")
    p.add_argument("--wait-guest", action="store_true",
                   help="with --resume: wait until the guest answers (its timers run), "
                        "then set its clock and reseed its random pool")
    p.add_argument("--guest-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long the guest has to answer (default: 10)")
    client_command("destroy", "stop the server and the VMs it still owns")
    p = client_command("reload", "make the running server re-read its configuration file "
                                 "(SIGHUP) and report whether it applied it")
    p.add_argument("--pid", type=int, metavar="PID",
                   help="the server's pid (systemd's $MAINPID), instead of asking the endpoint")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the server's answer (default: 30)")
    client_command("tui", "live dashboard of the server (take VMs, stop it)")

    sub.add_parser("check-config", help="validate the configuration, print resolved settings")

    p = sub.add_parser("demo-guest", help="build the bundled demo guest and its "
                                          "configuration.toml into DIR")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--cache-number", type=int, default=2, metavar="N",
                   help="vm_cache_number to write (default: 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(debug=args.debug)
    try:
        return run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        if args.debug:
            raise
        return exc.exit_code
    except VmcacheError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        if args.debug:
            raise
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`check-config | head`): nothing more to say to it. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it


def load_config(args: argparse.Namespace) -> configmod.Config:
    config, warnings = configmod.load(args.config)
    for w in warnings:
        logging.getLogger(PROG).warning("%s", w)  # located: path:line: key: message
    return config


def endpoint_of(args: argparse.Namespace) -> Path:
    if getattr(args, "endpoint", None) is not None:
        return Path(args.endpoint)
    return load_config(args).factory.vm_cache_endpoint


def run(args: argparse.Namespace) -> int:
    from .factory.host import require
    from .factory.spec import describe_vm

    command: str = args.command
    if args.runtime_class is not None:
        if args.config is not None:
            raise UsageError("--config and --runtime-class name the file twice; give one")
        args.config = configmod.find_class_config(args.runtime_class)
    if command == "init":
        from .service.daemon import serve

        config = load_config(args)
        setup_logging(debug=args.debug, json_lines=config.daemon.log_format == "json")
        for w in require(config):  # what the file alone cannot tell, on this host
            logging.getLogger(PROG).warning("%s", w)
        asyncio.run(serve(config))
        return 0
    if command == "check-config":
        config = load_config(args)
        for w in require(config):  # what the file alone cannot tell, on this host
            logging.getLogger(PROG).warning("%s", w)
        rows = [*configmod.describe(config), *describe_vm(config)]
        width = max(len(k) for k, _ in rows)
        print(f"# {config.source}: OK")
        for key, value in rows:
            if key == f"{configmod.OUR_TABLE}.kata_version":
                value = f"{value} ({config.daemon.kata_version_origin})"
            print(f"{key:<{width}} = {value}")
        if note := config.budget_note():
            print(f"# {note}")
        return 0
    if command == "status":
        return asyncio.run(status(endpoint_of(args), as_json=args.json))
    if command == "get":
        if args.resume:
            return get_resumed(args)
        for flag, given in (("--cpus", args.cpus), ("--memory", args.memory),
                            ("--wait-guest", args.wait_guest or None)):
            if given is not None:
                raise UsageError(f"{flag} needs --resume (plain `get` hands the VM over "
                                 "paused, as kata-runtime takes it)")
        return asyncio.run(get(endpoint_of(args), timeout=args.timeout))
    if command == "destroy":
        return asyncio.run(destroy(endpoint_of(args)))
    if command == "reload":
        return asyncio.run(reload(args))
    if command == "tui":
        return tui(endpoint_of(args))
    if command == "demo-guest":
        from .demo.guest import build_demo

        if args.cache_number < 1:
            raise UsageError(f"--cache-number must be >= 1 (got {args.cache_number})")
        built = build_demo(args.dir, cache_number=args.cache_number)
        print(built.config)
        return 0
    raise UsageError(f"unknown command {command!r}")  # argparse prevents this


async def status(endpoint: Path, *, as_json: bool) -> int:
    async with CacheClient(endpoint) as client:
        st = await client.status()
    if as_json:
        print(json.dumps({"pid": st.pid, "vms": [
            {"pid": v.pid, "cpu": v.cpu, "memory": v.memory_mib} for v in st.vms],
            "template": {"enabled": st.template_bytes is not None,
                         "bytes": st.template_bytes},
            **await snapshot_json(endpoint)}))
    else:
        # Kata's exact lines (kata-runtime factory status).
        print(f"VM cache server pid = {st.pid}")
        for v in st.vms:
            print(f"VM pid = {v.pid} Cpu = {v.cpu} Memory = {v.memory_mib}MiB")
        if st.template_bytes is not None:
            print(f"VM template = on, {st.template_bytes / 2**20:.1f}MiB")
    return 0


async def get(endpoint: Path, *, timeout: float) -> int:
    async with CacheClient(endpoint) as client:
        vm = await client.get_base_vm(timeout=timeout)
    print(json.dumps(vm.as_json()))
    return 0


def get_resumed(args: argparse.Namespace) -> int:
    # The configuration decides whether the cache's VMs fit; with only --endpoint, the
    # cache's VM is taken as it is (there is nothing of ours to compare it with).
    config = None if args.endpoint is not None and args.config is None else load_config(args)
    endpoint: Path | None = args.endpoint
    if endpoint is None and config is not None:
        endpoint = config.factory.vm_cache_endpoint
    if args.guest_timeout <= 0:
        raise UsageError(f"--guest-timeout must be > 0 seconds (got {args.guest_timeout:g})")
    return asyncio.run(_get_resumed(config, endpoint, args))


async def _get_resumed(config: configmod.Config | None, endpoint: Path | None,
                       args: argparse.Namespace) -> int:
    from .getvm import get_vm

    vm = await get_vm(config, endpoint=endpoint, cpus=args.cpus, memory_mib=args.memory,
                      wait_guest=args.wait_guest, guest_timeout=args.guest_timeout,
                      timeout=args.timeout)
    try:
        print(json.dumps(vm.as_json()), flush=True)
    except BaseException:
        await vm.stop()  # nobody learnt of it: it must not run on unowned
        raise
    # The VM is the caller's: it runs on, and its QMP socket is free for them.
    await vm.detach()
    return 0


async def destroy(endpoint: Path, *, timeout: float = 10.0) -> int:
    async with CacheClient(endpoint) as client:
        pid = (await client.status()).pid
        await client.quit()
    # The server removes its socket as the last step of stopping its VMs; then it exits.
    deadline = time.monotonic() + timeout
    while endpoint.exists() or pid_alive(pid):
        if time.monotonic() > deadline:
            raise VmcacheError(f"the server at {endpoint} (pid {pid}) accepted Quit but has "
                               f"not stopped after {timeout:g} s")
        await asyncio.sleep(0.05)
    print(f"VM cache server pid = {pid} stopped")
    return 0


async def reload(args: argparse.Namespace) -> int:
    """SIGHUP the server and wait for its verdict: one line, "applied" or "refused"."""
    from .service.reload import request_reload

    try:
        config = load_config(args)
    except ConfigError as exc:
        # The server would refuse this file for the same reasons: say so without asking it.
        for problem in exc.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        print(f"{PROG}: reload refused: the configuration has errors; the server keeps its "
              "settings", file=sys.stderr)
        return exc.exit_code
    pid: int | None = args.pid
    if pid is None:
        endpoint = args.endpoint or config.factory.vm_cache_endpoint
        try:
            async with CacheClient(endpoint) as client:
                pid = (await client.status()).pid
        except ServerUnavailable as exc:
            raise ServerUnavailable(f"{exc}; a server started before vm_cache_endpoint was "
                                    "changed still listens on the old path: pass --pid, "
                                    "or restart it") from None
    outcome = await request_reload(pid, config.daemon.state_dir, timeout=args.timeout)
    if outcome.result == "refused":
        print(f"{PROG}: reload refused: {outcome.message}", file=sys.stderr)
        return 1
    print(f"reload applied: {outcome.message}")
    return 0


async def snapshot_json(endpoint: Path) -> dict[str, Any]:
    """`status --json` adds the Monitor service's snapshot under "snapshot"; a server
    without that service (Kata's own VMCache server) gets Kata's keys only."""
    async with MonitorClient(endpoint) as monitor:
        try:
            return {"snapshot": (await monitor.snapshot()).as_json()}
        except NoMonitor:
            return {}


def tui(endpoint: Path) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("tui needs a terminal: stdin and stdout must be a TTY")
    from .tui import run  # here, not at the top: only the dashboard needs Textual

    return run(endpoint)


__all__ = ["main"]
