"""`make bench`: the cache's numbers, side by side with what a user would get without it.

Runs a real daemon (`python -m kata_vmcache init`) on the bundled demo guest, drives it from
separate client processes (bench/worker.py) and writes:

- bench/results/latest.json  every figure (the keys the issue names) plus raw samples;
- bench/results/latest.md    a Markdown table with each figure's ratio to its reference;
- bench/results/latency.png  the latency distributions.

It never fails because of a number. Each phase waits for the cache to be full before it
measures ("VM ready in the cache"), so hand-off samples never include a boot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kata1 import cpu_seconds  # beside this file

ROOT = Path(__file__).resolve().parent.parent
WORKER = [sys.executable, str(ROOT / "bench" / "worker.py")]
SYNC_CLIENT = [sys.executable, str(ROOT / "bench" / "sync_client.py")]
CLI = [sys.executable, "-m", "kata_vmcache"]
CACHE = 8  # enough for 8 concurrent clients to find a ready VM each


STARTED = time.monotonic()


def log(message: str) -> None:
    """A progress line, with the minutes and seconds since the bench started."""
    minutes, seconds = divmod(int(time.monotonic() - STARTED), 60)
    print(f"bench [{minutes:2d}:{seconds:02d}]: {message}", file=sys.stderr, flush=True)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.05)
    return value


def stop_vms(records: list[dict[str, Any]]) -> None:
    """Stop the VMs the workers took as their owner would, side by side: the client's
    `VMHandle.stop()` (kata_vmcache.vm.qmp's stop sequence: QMP quit, a bounded wait, SIGTERM,
    SIGKILL, through a pidfd on the process proven to be that VM's QEMU)."""
    from kata_vmcache.client.handle import VMHandle
    from kata_vmcache.client.rpc import BaseVM
    from kata_vmcache.errors import VMDead

    async def stop(record: dict[str, Any]) -> None:
        try:
            vm = VMHandle.adopt(BaseVM(record["ID"], 0, 0, 0, record))
        except VMDead:
            return  # gone already (adopt removed what it left)
        await vm.stop(5.0)

    async def stop_all() -> None:
        await asyncio.gather(*(stop(record) for record in records))

    if records:
        asyncio.run(stop_all())


def stop_vm(record: dict[str, Any]) -> None:
    """Stop one VM the bench took (its hypervisor record), as its owner would."""
    stop_vms([record])


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def smaps_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def mount_type(path: Path) -> str:
    """The type of the file system `path` is on (the longest mount point above it)."""
    best, kind = "", "unknown"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype, *_ = line.split()
        if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, kind = point, fstype
    return kind


class Bench:
    def __init__(self, samples: int, out: Path) -> None:
        self.samples = samples
        self.out = out
        # The daemon's state (VM records, QMP sockets) lives in /run on a real host: a
        # tmpfs. Measure on one too: /run when it is one; else, as root, a tmpfs of our own
        # mounted on the bench's temp directory (and unmounted by stop()); else the temp
        # directory as it is (not /dev/shm: the daemon refuses state under /dev).
        # latest.json names the file system (machine.state_dir_fs): the hand-off renames a
        # record on it.
        run = Path("/run")
        on_run = mount_type(run) == "tmpfs" and os.access(run, os.W_OK)
        self.tmp = Path(tempfile.mkdtemp(prefix="kvc-bench-", dir=run if on_run else None))
        self.mounted = False
        if not on_run and os.geteuid() == 0 and shutil.which("mount"):
            self.mounted = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "kvc-bench",
                 str(self.tmp)], capture_output=True).returncode == 0
        #: Read now: stop() unmounts our tmpfs before the results are written.
        self.state_fs = mount_type(self.tmp)
        self.taken: list[dict[str, Any]] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.raw: dict[str, list[float]] = {}

    # set-up

    def start(self) -> None:
        from kata_vmcache.demo.guest import build_demo

        self.build = build_demo(ROOT / ".demo")
        self.accelerator = self.build.accelerator
        self.endpoint = self.tmp / "cache.sock"
        self.state = self.tmp / "state"
        self.config = self.tmp / "configuration.toml"
        self.write_config()
        self.start_daemon(self.config, self.tmp / "daemon.log")

    def write_config(self, **vmcache: object) -> None:
        """The daemon's file: the demo guest's, with a cache of CACHE and `vmcache` keys."""
        from kata_vmcache.demo.config import render_config

        self.config.write_text(render_config(
            self.build.guest, endpoint=self.endpoint, state_dir=self.state,
            cache_number=CACHE, accelerator=self.build.accelerator, **vmcache))

    def start_pool_only(self) -> None:
        """The paths the pool runs use, without the first daemon."""
        self.endpoint = self.tmp / "cache.sock"
        self.state = self.tmp / "state"

    def start_daemon(self, config: Path, log_path: Path) -> None:
        self.daemon_log_path = log_path
        self.daemon_log = open(log_path, "wb")  # noqa: SIM115
        self.daemon = subprocess.Popen([*CLI, "--config", str(config), "init"],
                                       stdout=self.daemon_log, stderr=subprocess.STDOUT)
        wait_for(self.endpoint.exists, 30, "the daemon's socket")

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None
        self.daemon_log.close()
        self.release_taken()

    def ready(self) -> list[dict[str, Any]]:
        from kata_vmcache.vm.records import read_records

        return [r for _, r in read_records(self.state) if r.get("state") == "ready"]

    def wait_full(self) -> list[dict[str, Any]]:
        def full() -> list[dict[str, Any]]:
            ready = self.ready()
            return ready if len(ready) >= CACHE else []
        found: list[dict[str, Any]] = wait_for(full, 300, f"{CACHE} ready VMs")
        return found

    def wait_ready(self, count: int) -> None:
        wait_for(lambda: len(self.ready()) >= count, 300, f"{count} ready VMs")

    def worker(self, *args: str) -> dict[str, Any]:
        out = subprocess.run([*WORKER, *args], capture_output=True, check=True, timeout=600)
        result: dict[str, Any] = json.loads(out.stdout)
        self.taken += result.get("vms", [])
        return result

    def release_taken(self) -> None:
        stop_vms(self.taken)
        self.taken.clear()

    def stop(self) -> None:
        if self.daemon is not None:
            self.stop_daemon()
        self.release_taken()
        if self.mounted:
            subprocess.run(["umount", str(self.tmp)], check=False)
            self.mounted = False
        shutil.rmtree(self.tmp, ignore_errors=True)

    # phases

    def handoff_and_floor(self) -> None:
        floors: list[float] = []
        quiet: list[float] = []
        handoffs: list[float] = []
        per_round = CACHE - 1  # one VM of each round warms the worker's GetBaseVM up
        rounds = max(1, -(-self.samples // per_round))
        for i in range(rounds):
            self.wait_full()
            result = self.worker("handoff", "--endpoint", str(self.endpoint),
                                 "--count", str(per_round), "--floor", str(CACHE * 4))
            floors += result["floor_ms"]
            quiet += result["floor_quiet_ms"]
            handoffs += result["handoff_ms"]
            self.release_taken()
            log(f"hand-off round {i + 1}/{rounds}: p50 {pct(handoffs, 50):.2f} ms, "
                f"floor {pct(floors, 50):.2f} ms")
        self.raw["floor_ms"] = floors
        self.raw["floor_quiet_ms"] = quiet
        self.raw["handoff_ms"] = handoffs

    def handoff_sync(self, samples: int) -> dict[str, Any]:
        """GetBaseVM against the Status calls right before it, from a plain synchronous
        grpcio client (bench/sync_client.py), each from a full cache: the client the
        issue's 2.1x was measured with. The client stops each VM it takes."""
        self.wait_full()
        out = subprocess.run([*SYNC_CLIENT, "--endpoint", str(self.endpoint), "--cache",
                              str(CACHE), "--samples", str(samples)],
                             capture_output=True, check=True, timeout=600)
        raw: dict[str, Any] = json.loads(out.stdout)
        self.raw["sync_status_ms"] = [t for ts in raw["status_ms"] for t in ts]
        self.raw["sync_handoff_ms"] = raw["handoff_ms"]
        status, handoff, ratio = raw["status_paired_ms"], raw["handoff_ms"], raw["ratio"]
        return {
            "status_p50_ms": pct(self.raw["sync_status_ms"], 50),
            "status_p95_ms": pct(self.raw["sync_status_ms"], 95),
            "getbasevm_p50_ms": pct(handoff, 50),
            "getbasevm_p95_ms": pct(handoff, 95),
            # Each GetBaseVM over the median of the Status calls right before it.
            "ratio_paired_p50": pct(ratio, 50),
            "ratio_paired_p95": pct(ratio, 95),
            "ratio_of_p50s": pct(handoff, 50) / pct(status, 50),
            "samples": len(handoff),
            "status_calls_per_sample": len(raw["status_ms"][0]) if raw["status_ms"] else 0,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "state_dir_fs": self.state_fs,
            "load_average": os.getloadavg()[0],
        }

    def concurrent(self, clients: int = 8, rounds: int = 2) -> None:
        samples: list[float] = []
        for _ in range(rounds):
            self.wait_full()
            at = time.monotonic_ns() + 1_500_000_000  # time for every process to start
            procs = [subprocess.Popen([*WORKER, "once", "--endpoint", str(self.endpoint),
                                       "--at", str(at)], stdout=subprocess.PIPE)
                     for _ in range(clients)]
            for p in procs:
                out, _ = p.communicate(timeout=300)
                result = json.loads(out)
                samples += result["handoff_ms"]
                self.taken += result["vms"]
            self.release_taken()
        self.raw["concurrent8_handoff_ms"] = samples

    def refill(self) -> float:
        self.wait_full()
        result = self.worker("handoff", "--endpoint", str(self.endpoint), "--count", str(CACHE))
        emptied = time.monotonic()
        self.release_taken()
        del result
        self.wait_full()
        minutes = (time.monotonic() - emptied) / 60
        return CACHE / minutes

    def boot_priority(self, rounds: int = 3) -> dict[str, Any]:
        """Refill boots at boot_priority "idle" and "normal" on a host with nothing else to
        run (live reload between them, alternating): the boots ahead of demand that
        idle priority keeps out of running sandboxes' way must be no slower when nobody else
        wants the CPU. Each round empties the cache of 8 and times its refill, read from
        the daemon's own "ready in" lines."""
        seconds: dict[str, list[float]] = {"idle": [], "normal": []}
        for i in range(rounds * 2):
            level = ("idle", "normal")[i % 2] if rounds % 2 else ("normal", "idle")[i % 2]
            self.reload_priority(level)
            self.wait_full()
            before = len(boot_seconds(self.daemon_log_path))
            self.worker("handoff", "--endpoint", str(self.endpoint), "--count", str(CACHE))
            self.release_taken()
            self.wait_full()
            seconds[level] += boot_seconds(self.daemon_log_path)[before:]
            log(f"boot_priority {level}: refill boots p50 "
                f"{statistics.median(seconds[level]):.2f} s")
        self.raw["boot_idle_s"], self.raw["boot_normal_s"] = seconds["idle"], seconds["normal"]
        kept = self.sandbox_share()
        # The daemon keeps the file's default for the phases after this one.
        self.reload_priority(None)
        return {"boot_idle_p50_s": statistics.median(seconds["idle"]),
                "boot_normal_p50_s": statistics.median(seconds["normal"]),
                "boot_priority_samples": len(seconds["idle"]),
                "sandbox_kept_idle": statistics.median(kept["idle"]),
                "sandbox_kept_normal": statistics.median(kept["normal"]),
                "sandbox_kept_quiet": statistics.median(kept["quiet"]),
                "sandbox_share_rounds": len(kept["idle"])}

    def sandbox_share(self, rounds: int = 3, seconds: float = 6.0) -> dict[str, list[float]]:
        """What running sandboxes keep of the CPU while the cache refills, per level: one
        CPU-bound stand-in per core, each in a session of its own like a handed-out QEMU,
        spins for `seconds` right after 8 VMs are taken (the refill boots meanwhile); the
        share of their cores they got. "quiet" is the same on the full cache, before.
        Alternating levels, live reload between them."""
        kept: dict[str, list[float]] = {"idle": [], "normal": [], "quiet": []}
        for i in range(rounds * 2):
            level = ("idle", "normal")[i % 2]
            self.reload_priority(level)
            self.wait_full()
            kept["quiet"].append(spinner_share(seconds))
            self.worker("handoff", "--endpoint", str(self.endpoint), "--count", str(CACHE))
            self.release_taken()
            kept[level].append(spinner_share(seconds))
            self.wait_full()
            log(f"boot_priority {level}: sandboxes got {kept[level][-1]:.2f} of their cores "
                f"during a refill of 8 ({kept['quiet'][-1]:.2f} on the full cache)")
        for key, shares in kept.items():
            self.raw[f"sandbox_kept_{key}"] = shares
        return kept

    def reload_priority(self, level: str | None) -> None:
        """The daemon at `boot_priority = level` (None: the file's default), by live reload."""
        self.write_config(**({} if level is None else {"boot_priority": level}))
        done = subprocess.run([*CLI, "--config", str(self.config), "reload"],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"reload to boot_priority {level}: {done.stderr.strip()}")

    def memory(self) -> dict[str, float]:
        assert self.daemon is not None
        vm = self.wait_full()[0]
        return {
            "daemon_rss_mib": status_kb(self.daemon.pid, "VmRSS") / 1024,
            "vm_rss_mib": smaps_kb(vm["pid"], "Rss") / 1024,
            "vm_pss_mib": smaps_kb(vm["pid"], "Pss") / 1024,
        }

    def idle_cpu(self, seconds: float = 20.0) -> float:
        # /proc counts CPU time in clock ticks (10 ms): 20 s resolve 0.05% of a core.
        assert self.daemon is not None
        self.wait_full()
        before = cpu_seconds(self.daemon.pid)
        time.sleep(seconds)
        return (cpu_seconds(self.daemon.pid) - before) / seconds * 100

    def template(self) -> dict[str, Any]:
        """A second daemon with `enable_template`: clone time against a cold boot, the PSS
        of one cached clone, the template's size. Stops the first daemon (CPU to spare)."""
        from kata_vmcache.config import load

        cold = boot_seconds(self.tmp / "daemon.log")
        if self.daemon is not None:
            self.stop_daemon()
        tmpl = self.tmp / "template"
        config = self.config.with_name("template.toml")
        config.write_text(self.config.read_text().replace(
            "enable_template = false",
            f'enable_template = true\ntemplate_path = "{tmpl}"'))
        load(config)  # fail here, in one line, if the edit went wrong
        self.start_daemon(config, self.tmp / "template-daemon.log")
        vm = self.wait_full()[0]
        status = json.loads(subprocess.run([*CLI, "--config", str(config), "status", "--json"],
                                           capture_output=True, check=True).stdout)
        pss = smaps_kb(vm["pid"], "Pss") / 1024
        refill = self.refill()  # each refill VM a clone
        log(f"templating: refill {refill:.0f} VMs per minute")
        self.stop_daemon()
        clones = boot_seconds(self.tmp / "template-daemon.log")
        self.raw["template_clone_ms"] = [t * 1000 for t in clones]
        self.raw["direct_boot_ms"] = [t * 1000 for t in cold]
        return {
            "template_clone_ms": statistics.median(clones) * 1000 if clones else float("nan"),
            "direct_boot_ms": statistics.median(cold) * 1000 if cold else float("nan"),
            "template_vm_pss_mib": pss,
            "template_mib": (status["template"]["bytes"] or 0) / 2**20,
            "template_refill_vms_per_min": refill,
        }

    def pool_policies(self, trace_names: list[str],
                      policy_names: list[str]) -> tuple[list[dict[str, Any]], list[Any]]:
        """bench/pool.py: each policy against each trace, on a daemon of its own."""
        import pool

        from kata_vmcache.demo.config import render_config
        from kata_vmcache.demo.guest import build_demo

        if self.daemon is not None:
            self.stop_daemon()
        build = build_demo(ROOT / ".demo")
        traces = pool.traces()
        rows: list[dict[str, Any]] = []
        runs: list[Any] = []
        for name in trace_names:
            for policy in policy_names:
                settings = pool.POLICIES[policy]
                number = settings["cache_number"]
                ours = {key: value for key, value in settings.items() if key != "cache_number"}
                config = self.tmp / f"pool-{policy}-{name}.toml"
                config.write_text(render_config(build.guest, endpoint=self.endpoint,
                                                state_dir=self.state, cache_number=number,
                                                accelerator=build.accelerator, **ours))
                self.start_daemon(config, self.tmp / f"pool-{policy}-{name}.log")
                self.wait_ready(number)
                run = pool.Run(policy, traces[name])
                asyncio.run(pool.replay(self.endpoint, run, stop_vm))
                self.stop_daemon()
                figures = run.figures()
                rows.append(figures)
                runs.append(run)
                log(f"pool: {name} / {policy}: miss {figures['miss_rate']:.0%}, p50 "
                    f"{figures['p50_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms, idle "
                    f"{figures['idle_vm_seconds']:.0f} VM-s")
        return rows, runs

    def to_guest(self, rounds: int = 5) -> tuple[list[float], list[float]]:
        cached: list[float] = []
        for _ in range(rounds * 2):  # cheap: twice the samples of the cold boots
            self.wait_full()
            cached += self.worker("guest", "--endpoint", str(self.endpoint))["to_guest_ms"]
            self.release_taken()
        cold: list[float] = []
        for _ in range(rounds):
            cold += self.worker("cold", "--config", str(self.config))["to_guest_ms"]
        return cached, cold


# A sandbox's vCPU, for spinner_share: spins for argv[1] seconds, prints the CPU seconds
# it got.
SPIN = ("import sys, time\nend = time.monotonic() + float(sys.argv[1])\n"
        "while time.monotonic() < end:\n    pass\nprint(time.process_time())\n")


def spinner_share(seconds: float) -> float:
    """The share of their cores that CPU-bound processes, one per core, each leading its
    own session (as a handed-out QEMU does), got over `seconds`."""
    cores = os.cpu_count() or 1
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(seconds)],
                                 stdout=subprocess.PIPE, start_new_session=True)
                for _ in range(cores)]
    return sum(float(spinner.communicate(timeout=seconds + 60)[0])
               for spinner in spinners) / (seconds * cores)


def boot_seconds(daemon_log: Path) -> list[float]:
    """The daemon's own "VM <id> ready in S s" figures: launch to paused and ready."""
    found = re.findall(r"VM \S+ ready in ([0-9.]+) s", daemon_log.read_text(errors="replace"))
    return [float(x) for x in found]


def qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def render_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    rows = [
        ("hand-off p50 / p99 (ms)", f"{r['handoff_p50_ms']:.2f} / {r['handoff_p99_ms']:.2f}",
         f"{r['handoff_p50_ms'] / r['floor_p50_ms']:.2f}x the floor"),
        ("gRPC floor: Status p50 / p99 (ms), right before each hand-off",
         f"{r['floor_p50_ms']:.2f} / {r['floor_p99_ms']:.2f}",
         f"reference (paired ratio p50 {r['handoff_over_floor_paired_p50']:.2f}x)"),
        ("Status p50 on a quiet full cache (ms)", f"{r['floor_quiet_p50_ms']:.2f}",
         f"hand-off is {r['handoff_p50_ms'] / r['floor_quiet_p50_ms']:.2f}x this"),
        ("8 concurrent clients: hand-off p50 (ms)", f"{r['concurrent8_handoff_p50_ms']:.2f}",
         f"{r['concurrent8_handoff_p50_ms'] / r['floor_p50_ms']:.1f}x the floor"),
        ("asking for a VM to guest answering, cached p50 (ms)",
         f"{r['cached_to_guest_p50_ms']:.0f}",
         f"{r['cold_to_guest_p50_ms'] / r['cached_to_guest_p50_ms']:.1f}x faster than cold"),
        ("same, cold boot without cache p50 (ms)", f"{r['cold_to_guest_p50_ms']:.0f}",
         "reference"),
        ("refill (VMs ready per minute)", f"{r['refill_vms_per_min']:.1f}",
         f"boot parallelism {r['boot_parallelism']}"),
        *priority_rows(r),
        ("daemon RSS (MiB)", f"{r['daemon_rss_mib']:.1f}", "target < 80"),
        ("daemon CPU with a full cache (% of a core)", f"{r['daemon_idle_cpu_percent']:.2f}",
         "target near 0"),
        ("one cached VM: RSS / PSS (MiB)", f"{r['vm_rss_mib']:.1f} / {r['vm_pss_mib']:.1f}",
         f"guest memory {r['vm_memory_mib']} MiB"),
    ]
    if "handoff_sync_client" in r:
        rows[2:2] = sync_rows(r["handoff_sync_client"])
    if "template_clone_ms" in r:
        rows += [
            ("templating: launch to a ready, checked clone p50 (ms)",
             f"{r['template_clone_ms']:.0f}",
             f"{r['direct_boot_ms'] / r['template_clone_ms']:.1f}x faster than a cold boot "
             f"({r['direct_boot_ms']:.0f} ms)"),
            ("templating: PSS of one cached clone (MiB)", f"{r['template_vm_pss_mib']:.1f}",
             f"{r['vm_pss_mib']:.1f} without templating; template {r['template_mib']:.0f} MiB"),
        ]
    lines = [f"Machine: {m['cores']} cores, {m['memory_gib']:.0f} GiB, {m['accelerator'].upper()}, "
             f"{m['qemu']}; {m['date']}", "",
             "| figure | value | against its reference |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def priority_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    if "boot_idle_p50_s" not in r:
        return []
    return [("refill boot at boot_priority idle / normal, idle host, p50 (s)",
             f"{r['boot_idle_p50_s']:.2f} / {r['boot_normal_p50_s']:.2f}",
             f"{r['boot_idle_p50_s'] / r['boot_normal_p50_s']:.2f}x ({r['boot_priority_samples']}"
             " boots each, alternating)"),
            *([("share of their cores running sandboxes get while 8 VMs refill, idle / normal,"
                " p50", f"{r['sandbox_kept_idle']:.2f} / {r['sandbox_kept_normal']:.2f}",
                f"{r['sandbox_kept_quiet']:.2f} on the full cache ({r['sandbox_share_rounds']}"
                " rounds each, a CPU-bound stand-in per core)")]
              if "sandbox_kept_quiet" in r else [])]


def sync_rows(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        ("sync grpcio client: GetBaseVM p50 / p95 (ms), full cache",
         f"{s['getbasevm_p50_ms']:.2f} / {s['getbasevm_p95_ms']:.2f}",
         f"{s['ratio_paired_p50']:.2f}x the Status right before it (p95 "
         f"{s['ratio_paired_p95']:.2f}x; goal <= 1.5x)"),
        ("sync grpcio client: Status p50 / p95 (ms), right before each GetBaseVM",
         f"{s['status_p50_ms']:.2f} / {s['status_p95_ms']:.2f}",
         f"reference ({s['samples']} samples of {s['status_calls_per_sample']} Status + "
         f"1 GetBaseVM; {s['date']}, state on {s.get('state_dir_fs', '?')})"),
    ]


def chart(raw: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (fast, slow) = plt.subplots(1, 2, figsize=(11, 4.5))
    fast_keys = [k for k in ("floor_ms", "handoff_ms", "concurrent8_handoff_ms") if raw.get(k)]
    fast.boxplot([raw[k] for k in fast_keys], tick_labels=[
        {"floor_ms": "Status (floor)", "handoff_ms": "GetBaseVM",
         "concurrent8_handoff_ms": "GetBaseVM, 8 at once"}[k] for k in fast_keys],
        showfliers=True)
    fast.set_ylabel("ms")
    fast.set_title("gRPC round trips from a separate client process")
    slow_keys = [k for k in ("cached_to_guest_ms", "cold_to_guest_ms") if raw.get(k)]
    slow.boxplot([raw[k] for k in slow_keys], tick_labels=[
        {"cached_to_guest_ms": "through the cache", "cold_to_guest_ms": "cold boot"}[k]
        for k in slow_keys])
    slow.set_yscale("log")
    slow.set_ylabel("ms (log)")
    slow.set_title("asking for a VM -> guest answers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=56, help="hand-off samples (default 56)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true",
                        help="hand-off and floor only, printed, nothing written (for development)")
    parser.add_argument("--no-template", action="store_true",
                        help="skip the templating phase (about 30 s)")
    parser.add_argument("--pool-only", action="store_true",
                        help="only the pool policies (bench/pool.py), merged into the "
                             "existing latest.json")
    parser.add_argument("--traces", default="steady,bursts,ramp",
                        help="pool traces to replay (default: steady,bursts,ramp)")
    parser.add_argument("--policies", default="fixed-2,fixed-8,autoscale",
                        help="pool policies to compare (default: fixed-2,fixed-8,autoscale)")
    parser.add_argument("--no-pool", action="store_true",
                        help="skip the pool policies (about 20 minutes of the run)")
    parser.add_argument("--sync-samples", type=int, default=24,
                        help="GetBaseVM samples of the synchronous grpcio client, each from "
                             "a full cache (default 24, 1-2 minutes on TCG)")
    parser.add_argument("--only-priority", action="store_true",
                        help="only the boot_priority phase; its figures replace those in "
                             "latest.json (the rest is kept)")
    parser.add_argument("--only-sync", action="store_true",
                        help="the synchronous client's phase alone: its figures replace "
                             "handoff_sync_client in latest.json (the rest is kept) and "
                             "latest.md is rendered again")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.samples, args.out)
    trace_names = [t for t in args.traces.split(",") if t]
    policy_names = [p for p in args.policies.split(",") if p]
    if args.only_sync:
        return only_sync(bench, args.sync_samples, args.out)
    if args.only_priority:
        return only_priority(bench, args.out)
    if args.pool_only:
        try:
            bench.start_pool_only()
            policies = bench.pool_policies(trace_names, policy_names)
        finally:
            bench.stop()
        write_pool(args.out, *policies)
        return 0
    if args.quick:
        try:
            bench.start()
            bench.handoff_and_floor()
        finally:
            bench.stop()
        h, f = bench.raw["handoff_ms"], bench.raw["floor_ms"]
        q = bench.raw["floor_quiet_ms"]
        print(f"hand-off p50 {pct(h, 50):.2f} ms p99 {pct(h, 99):.2f} ms; floor p50 "
              f"{pct(f, 50):.2f} ms p99 {pct(f, 99):.2f} ms; ratio {pct(h, 50) / pct(f, 50):.2f}x"
              f"; quiet floor p50 {pct(q, 50):.2f} ms")
        return 0
    try:
        bench.start()
        log("phase: hand-off and floor")
        bench.handoff_and_floor()
        log("phase: hand-off from a synchronous grpcio client")
        sync = bench.handoff_sync(args.sync_samples)
        log("phase: 8 concurrent clients")
        bench.concurrent()
        log("phase: refill")
        refill = bench.refill()
        log("phase: refill boots at boot_priority idle and normal")
        priority = bench.boot_priority()
        log("phase: memory and idle CPU")
        memory = bench.memory()
        idle = bench.idle_cpu()
        log("phase: time to a running guest, cached and cold")
        cached, cold = bench.to_guest()
        bench.raw["cached_to_guest_ms"] = cached
        bench.raw["cold_to_guest_ms"] = cold
        template: dict[str, Any] = {}
        if not args.no_template:
            log("phase: templating (clone time, clone PSS)")
            template = bench.template()
        rows: list[dict[str, Any]] = []
        runs: list[Any] = []
        if not args.no_pool:
            log("phase: pool policies against arrival traces")
            rows, runs = bench.pool_policies(trace_names, policy_names)
    finally:
        bench.stop()
    from kata_vmcache.config import load

    config, _ = load(ROOT / ".demo" / "configuration.toml")
    raw = bench.raw
    result: dict[str, Any] = {
        "handoff_p50_ms": pct(raw["handoff_ms"], 50),
        "handoff_p99_ms": pct(raw["handoff_ms"], 99),
        "floor_p50_ms": pct(raw["floor_ms"], 50),
        "floor_p99_ms": pct(raw["floor_ms"], 99),
        # Status on a full, quiet cache (no refill booting): what the floor is on an idle
        # machine, for comparison; the hand-off's own floor is floor_p50_ms.
        "floor_quiet_p50_ms": pct(raw["floor_quiet_ms"], 50),
        "handoff_over_floor_paired_p50": pct(
            [h / f for h, f in zip(raw["handoff_ms"], raw["floor_ms"], strict=True)], 50),
        "cached_to_guest_p50_ms": statistics.median(cached),
        "cold_to_guest_p50_ms": statistics.median(cold),
        "refill_vms_per_min": refill,
        **priority,
        **memory,
        **template,
        "daemon_idle_cpu_percent": idle,
        "handoff_sync_client": sync,
        "concurrent8_handoff_p50_ms": pct(raw["concurrent8_handoff_ms"], 50),
        "concurrent8_handoff_p99_ms": pct(raw["concurrent8_handoff_ms"], 99),
        "boot_parallelism": config.daemon.boot_parallelism,
        "vm_memory_mib": config.hypervisor.memory_mib,
        "samples": {k: len(v) for k, v in raw.items()},
        "machine": {
            "cores": os.cpu_count(),
            "memory_gib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30,
            "accelerator": bench.accelerator,
            "qemu": qemu_version(),
            "kernel": platform.release(),
            "state_dir_fs": bench.state_fs,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "raw": raw,
    }
    (args.out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "latest.md").write_text(render_markdown(result))
    chart(raw, args.out / "latency.png")
    print(render_markdown(result))
    if rows:
        write_pool(args.out, rows, runs)
    return 0


def write_pool(out: Path, rows: list[dict[str, Any]], runs: list[Any]) -> None:
    """The pool policies into latest.json ("pool_policies", "pool_verdict"), a table in
    pool.md and one chart per trace (pool-<trace>.png)."""
    import pool

    path = out / "latest.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result["pool_policies"] = rows
    result["pool_verdict"] = pool.verdict(rows)
    result["pool_traces"] = {t.name: t.about for t in {r.trace.name: r.trace
                                                         for r in runs}.values()}
    if "template_refill_vms_per_min" in result:
        result["pool_template_refill_vms_per_min"] = result["template_refill_vms_per_min"]
    path.write_text(json.dumps(result, indent=2) + "\n")
    (out / "pool.md").write_text(pool.markdown(rows))
    for name in dict.fromkeys(r.trace.name for r in runs):
        pool.chart(next(r.trace for r in runs if r.trace.name == name),
                   [r for r in runs if r.trace.name == name], out / f"pool-{name}.png")
    print(pool.markdown(rows))
    print(json.dumps(result["pool_verdict"], indent=2))


def only_sync(bench: Bench, samples: int, out: Path) -> int:
    try:
        bench.start()
        log("phase: hand-off from a synchronous grpcio client")
        sync = bench.handoff_sync(samples)
    finally:
        bench.stop()
    path = out / "latest.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    result["handoff_sync_client"] = sync
    raw = result.setdefault("raw", {})
    raw["sync_status_ms"] = bench.raw["sync_status_ms"]
    raw["sync_handoff_ms"] = bench.raw["sync_handoff_ms"]
    path.write_text(json.dumps(result, indent=2) + "\n")
    if "handoff_p50_ms" in result:
        (out / "latest.md").write_text(render_markdown(result))
    print("\n".join(f"| {a} | {b} | {c} |" for a, b, c in sync_rows(sync)))
    return 0


def only_priority(bench: Bench, out: Path) -> int:
    try:
        bench.start()
        log("phase: refill boots at boot_priority idle and normal")
        figures = bench.boot_priority()
    finally:
        bench.stop()
    path = out / "latest.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    result.update(figures)
    raw = result.setdefault("raw", {})
    raw.update({key: samples for key, samples in bench.raw.items()
                if key.startswith(("boot_", "sandbox_kept_"))})
    path.write_text(json.dumps(result, indent=2) + "\n")
    if "handoff_p50_ms" in result:
        (out / "latest.md").write_text(render_markdown(result))
    print("\n".join(f"| {a} | {b} | {c} |" for a, b, c in priority_rows(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
