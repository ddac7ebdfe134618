"""`kata-vmcache`: the command line.

    kata-vmcache [--config PATH] [--debug] init | status | get | destroy | check-config
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
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import config as configmod
from .client import CacheClient, not_running
from .errors import ConfigError, UsageError, VmcacheError
from .logs import setup_logging
from .procs import pid_alive

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
    client_command("destroy", "stop the server and the VMs it still owns")

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


def load_config(args: argparse.Namespace) -> configmod.Config:
    config, warnings = configmod.load(args.config)
    for w in warnings:
        where = f"{config.source}:{w.line}: " if w.line else f"{config.source}: "
        logging.getLogger(PROG).warning("%s%s", where, w)
    return config


def endpoint_of(args: argparse.Namespace) -> Path:
    if getattr(args, "endpoint", None) is not None:
        return Path(args.endpoint)
    return load_config(args).factory.vm_cache_endpoint


def run(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "init":
        from .daemon import serve

        config = load_config(args)
        setup_logging(debug=args.debug, json_lines=config.daemon.log_format == "json")
        asyncio.run(serve(config))
        return 0
    if command == "check-config":
        config = load_config(args)
        width = max(len(k) for k, _ in configmod.describe(config))
        print(f"# {config.source}: OK")
        for key, value in configmod.describe(config):
            print(f"{key:<{width}} = {value}")
        return 0
    if command == "status":
        return asyncio.run(status(endpoint_of(args), as_json=args.json))
    if command == "get":
        return asyncio.run(get(endpoint_of(args), timeout=args.timeout))
    if command == "destroy":
        return asyncio.run(destroy(endpoint_of(args)))
    if command == "demo-guest":
        from .demo_guest import build_demo

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
                         "bytes": st.template_bytes}}))
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


__all__ = ["main", "not_running"]
