"""`[vmcache]`: our own table, the settings Kata has no key for.

Kata never reads it, so nothing in it may be guessed: an unknown key is refused with a
"did you mean" hint, and each bound is the least that can work (a ready timeout under a
second, a stop timeout under half of one) or the most a host should be asked for. The
directories of VM sockets must leave room for the longest socket path below them.
"""

from __future__ import annotations

import grp
import os
import re
from collections.abc import Mapping
from typing import Any

from .keys import KATA_VM_STORAGE_PATH, OUR_KEYS, OUR_TABLE
from .model import AutoscaleSettings, DaemonSettings, KataVersion
from .reader import Reader
from .values import split_address

#: The fewest seconds that can work: no guest is ready within a second of QEMU's start
#: (the demo guest under KVM takes longer), and QMP `quit` plus QEMU's exit take a good
#: part of half a second on a busy host (below it every stop would end in SIGKILL).
MIN_READY_TIMEOUT = 1.0
MIN_STOP_TIMEOUT = 0.5
#: A VM id (12 characters) plus the longest file name Kata puts in a VM's directory.
_VM_SOCKET_TAIL = len("/0123456789ab/console.sock")


def vmcache(r: Reader, t: Mapping[str, Any], version: KataVersion,
            origin: str) -> DaemonSettings | None:
    """The table `t`, for a file of Kata `version` (chosen as `origin` says); None if a
    directory in it is unusable."""
    p = OUR_TABLE
    d = DaemonSettings()
    r.check_keys(t, p, OUR_KEYS, strict=True)
    accel = r.choice(t, f"{p}.accelerator", ("auto", "kvm", "tcg"), d.accelerator)
    ready_timeout = r.seconds(t, f"{p}.ready_timeout", d.ready_timeout,
                              MIN_READY_TIMEOUT, 3600)
    stop_timeout = r.seconds(t, f"{p}.stop_timeout", d.stop_timeout,
                             MIN_STOP_TIMEOUT, 60)
    state_dir = r.abs_path(t, f"{p}.state_dir", str(d.state_dir))
    if state_dir is not None:
        r.not_in_system_tree(f"{p}.state_dir", state_dir)
    parallel = r.get(t, f"{p}.boot_parallelism", int, d.boot_parallelism,
                     "an integer from 1 to 64")
    if not 1 <= parallel <= 64:
        r.problem(f"{p}.boot_parallelism", f"out of range (got {parallel}, "
                  "expected 1 to 64)")
    boot_priority = r.choice(t, f"{p}.boot_priority", ("idle", "normal"), d.boot_priority)
    agent = r.choice(t, f"{p}.guest_agent", ("kata", "none"), d.guest_agent)
    probe = ready_probe(r, t, f"{p}.ready_probe", agent)
    ready_line = r.get(t, f"{p}.ready_line", str, d.ready_line, "a string")
    if not ready_line.strip() or "\n" in ready_line:
        r.problem(f"{p}.ready_line", f"must be one non-empty line (got {ready_line!r})")
    max_memory = r.get(t, f"{p}.max_memory", int, 0, "an integer (MiB), 0 for host memory")
    if max_memory < 0:
        r.problem(f"{p}.max_memory", f"must be >= 0 MiB (got {max_memory})")
    budget = r.get(t, f"{p}.memory_budget_mib", int, 0,
                   "an integer (MiB), 0 for half of the host's memory")
    if budget < 0:
        r.problem(f"{p}.memory_budget_mib", f"must be >= 0 MiB (got {budget})")
        budget = 0
    mode, group = socket_access(r, t, p, d)
    log_format = r.choice(t, f"{p}.log_format", ("text", "json"), d.log_format)
    vm_storage = r.abs_path(t, f"{p}.vm_storage_path", KATA_VM_STORAGE_PATH)
    if vm_storage is not None:
        r.not_in_system_tree(f"{p}.vm_storage_path", vm_storage)
    for key, root in ((f"{p}.vm_storage_path", vm_storage), (f"{p}.state_dir", state_dir)):
        # sun_path holds 107 bytes: the VM's sockets must fit below this directory.
        if root is not None and len(os.fsencode(root)) + _VM_SOCKET_TAIL > 107:
            r.problem(key, f"too long for the VMs' sockets below it (got "
                      f"{len(os.fsencode(root))} bytes, expected at most "
                      f"{107 - _VM_SOCKET_TAIL})")
    metrics = r.get(t, f"{p}.metrics_address", str, d.metrics_address,
                    'a "host:port" string like "127.0.0.1:9464", or ""')
    if metrics:
        try:
            split_address(metrics)
        except ValueError as exc:
            r.problem(f"{p}.metrics_address", f"{exc} (got {metrics!r}, expected "
                      '"host:port" like "127.0.0.1:9464" or "[::1]:9464", or "")')
    scaling = autoscale(r, t, p)
    if state_dir is None or vm_storage is None:
        return None
    return DaemonSettings(
        accelerator=accel,
        ready_timeout=ready_timeout,
        state_dir=state_dir,
        boot_parallelism=parallel,
        boot_priority=boot_priority,
        stop_timeout=stop_timeout,
        ready_probe=probe,
        ready_line=ready_line,
        max_memory_mib=max_memory,
        memory_budget_mib=budget,
        socket_mode=mode,
        socket_group=group,
        log_format=log_format,
        vm_storage_path=vm_storage,
        guest_agent=agent,
        kata_version=version,
        kata_version_origin=origin,
        metrics_address=metrics,
        autoscale=scaling,
    )


def socket_access(r: Reader, t: Mapping[str, Any], p: str,
                  d: DaemonSettings) -> tuple[int, str]:
    """socket_mode and socket_group: the owner reads and writes, others never do, and the
    group exists on this host."""
    mode_text = r.get(t, f"{p}.socket_mode", str, "0600", "an octal string like \"0660\"")
    mode = d.socket_mode
    if not re.fullmatch(r"0?[0-7]{3}", mode_text):
        r.problem(f"{p}.socket_mode", f"not an octal mode (got {mode_text!r}, "
                  "expected \"0600\" or \"0660\")")
    else:
        mode = int(mode_text, 8)
        if mode & 0o007:
            r.problem(f"{p}.socket_mode", f"must not grant access to others "
                      f"(got {mode_text!r}, expected \"0600\" or \"0660\")")
        elif mode & 0o600 != 0o600:
            r.problem(f"{p}.socket_mode", f"the owner needs read and write "
                      f"(got {mode_text!r}, expected \"0600\" or \"0660\")")
    group = r.get(t, f"{p}.socket_group", str, "", "a group name")
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            r.problem(f"{p}.socket_group", f"no such group on this host (got {group!r})")
    return mode, group


def autoscale(r: Reader, t: Mapping[str, Any], p: str) -> AutoscaleSettings:
    """autoscale, min_ready, max_ready and shrink_after: keys of [vmcache] itself, one
    setting of the pool (autoscale.py)."""
    d = AutoscaleSettings()
    enabled = r.get(t, f"{p}.autoscale", bool, d.enabled, "true or false")
    # min_ready = 0: no VM is held without demand (scale to zero; the first request
    # after an idle period waits for a boot). max_ready = 0 would be no cache at all.
    least = r.get(t, f"{p}.min_ready", int, d.min_ready, "an integer from 0 to 256")
    most = r.get(t, f"{p}.max_ready", int, d.max_ready, "an integer from 1 to 256")
    for key, value, low in ((f"{p}.min_ready", least, 0), (f"{p}.max_ready", most, 1)):
        if not low <= value <= 256:
            r.problem(key, f"out of range (got {value}, expected {low} to 256)")
    if 1 <= most < least <= 256:
        r.problem(f"{p}.max_ready", f"below min_ready (got {most}, expected at least "
                                    f"min_ready = {least})")
    idle = r.seconds(t, f"{p}.shrink_after", d.shrink_after, 1, 86400)
    return AutoscaleSettings(enabled, least, most, idle)


def ready_probe(r: Reader, t: Mapping[str, Any], key: str, agent: str) -> Any:
    """ready_probe, whose default and whose choices depend on guest_agent."""
    default = "kata-agent" if agent == "kata" else "serial"
    if t.get("ready_probe") == "none":
        # It cached VMs whose guest had barely run (`cont`, then `stop`), so a
        # hand-off saved no boot at all: a cached VM must have booted (Kata's NewVM).
        r.problem(key, 'no longer supported (got "none": it cached VMs before their '
                  'guest had booted; expected "kata-agent" for a Kata guest, or '
                  '"serial" for a guest that prints ready_line)')
        return default
    probe = r.choice(t, key, ("kata-agent", "serial"), default)
    if probe == "kata-agent" and agent == "none":
        r.problem(key, 'needs an agent to ask (got "kata-agent" with guest_agent = '
                  '"none"; expected "serial")')
    return probe
