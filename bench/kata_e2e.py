"""`make bench-kata`: real Kata 1.x containers on Kata's own VM cache and on ours, side by side.

A user runs a VM cache to make `kata-runtime run` faster, so this is measured as they feel
it: from invoking Kata 1.x's own `kata-runtime run` to the container's first output line,
with the VM taken from Kata's own VMCache server (`kata-runtime factory init`) or from
kata-vmcache (`kata-vmcache init`), both serving the same configuration file, started and
stopped by turns in interleaved rounds (the host's speed drifts over minutes). Each mode
(cold-booted cached VMs, then `enable_template = true`) runs `--rounds` rounds of `--runs`
containers per server, each from a full cache; a round also runs one container without a
cache. Reported per server and mode:

- p50/p95 of `run` -> first output, and the phases of each start from kata-runtime's own
  log (take-over: `get base VM` -> `assign vm to sandbox`; -> `VM started`; -> the
  container running);
- the PSS of the running sandbox's QEMU;
- what each refill costs the host: CPU seconds of the cache server itself (daemon, probes)
  and of the refill's QEMU and kata-proxy, from the hand-off until the cache is full again;
- failed runs, and failed boots (ours: the daemon's count; Kata's cache closes itself on its
  first failure);
- `yamux: duplicate stream` lines in the agent's log (a template saved inside a session).

Needs an installed Kata 1.x (bench/kata1.py says which paths, from flags or the environment);
without one it prints one line saying what is missing and exits 1. Not part of `make bench`.
Writes bench/results/kata-e2e.json and kata-e2e.md. Never fails because of a number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kata1  # beside this file

ROOT = Path(__file__).resolve().parent.parent
STARTED = time.monotonic()


def say(message: str) -> None:
    minutes, seconds = divmod(int(time.monotonic() - STARTED), 60)
    print(f"bench-kata [{minutes:2d}:{seconds:02d}]: {message}", file=sys.stderr, flush=True)


def pct(samples: list[float], q: float) -> float | None:
    ordered = sorted(samples)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def refill_cost(server: kata1.CacheServer, before: set[int], cpu_before: float) -> dict[str, Any]:
    """CPU the server spent from the hand-off until its cache was full again, and the
    refill's QEMU and kata-proxy (the VMs and proxies it started meanwhile)."""
    assert server.proc is not None
    now = server.wait_full(len(before) or 1)
    new_vms = [pid for pid in now if pid not in before]
    daemon = kata1.cpu_seconds(server.proc.pid) - cpu_before
    qemu = sum(kata1.cpu_seconds(pid) for pid in new_vms)
    proxies = [pid for pid in kata1.children(server.proc.pid)
               if kata1.comm(pid) == "kata-proxy"]
    # A refill's proxy is the newest one (the handed-out VMs' proxies are also children).
    proxy = kata1.cpu_seconds(max(proxies)) if proxies and new_vms else 0.0
    return {"daemon_cpu_s": round(daemon, 3), "refill_qemu_cpu_s": round(qemu, 3),
            "refill_proxy_cpu_s": round(proxy, 3)}


def boot_failures(server: kata1.CacheServer) -> int | None:
    """Failed boots so far: ours from `status --json`; Kata's cache has no such count."""
    if server.kind != "vmcache":
        return None
    done = subprocess.run([sys.executable, "-m", "kata_vmcache", "--config",
                           str(server.config), "status", "--json"],
                          capture_output=True, text=True, timeout=30, check=False)
    with contextlib.suppress(ValueError, KeyError):
        return int(json.loads(done.stdout)["snapshot"]["counters"]["boot_failures"])
    return None


def session(tools: kata1.Tools, work: Path, setup: kata1.Setup, kind: str, runs: int,
            round_no: int, syslog: kata1.Syslog, bundle: Path, logs: Path) -> dict[str, Any]:
    """One server's turn: start it on the file, `runs` containers each from a full cache,
    stop it."""
    config = work / "configuration.toml"
    server = kata1.CacheServer(kind, tools, config, work / "cache.sock",
                               logs / f"{kind}-server.log")
    log_start = server.log_path.stat().st_size if server.log_path.exists() else 0
    started = server.start(setup.cache_number)
    say(f"{kind}: {setup.cache_number} VM(s) cached {started:.1f} s after start")
    out: dict[str, Any] = {"server": kind, "round": round_no, "ready_after_start_s":
                           round(started, 2), "runs": []}
    try:
        for i in range(runs):
            time.sleep(1.0)  # the refill's QEMU has paused; let the host settle
            before = set(server.wait_full(setup.cache_number))
            assert server.proc is not None
            cpu_before = kata1.cpu_seconds(server.proc.pid)
            cid = f"kb-{kind}-{round_no}-{i}-{int(time.time())}"
            result = kata1.run_container(tools, config, bundle, cid, syslog=syslog)
            with contextlib.suppress(RuntimeError):
                result.update(refill_cost(server, before, cpu_before))
            out["runs"].append(result)
            say(f"{kind} {cid}: rc {result['rc']}, first output {result['t_output_s']} s, "
                f"phases {result.get('phases')}, PSS {result['pss_kib']} KiB")
        out["boot_failures"] = boot_failures(server)
    finally:
        out["left_running"] = server.stop()
    if kind == "vmcache":
        # Our daemon's own figure for each VM it cached (launch to paused and checked):
        # cold boots, or clones once the template exists.
        with open(server.log_path, "rb") as log:
            log.seek(log_start)
            text = log.read().decode(errors="replace")
        out["ready_in_s"] = [float(x) for x in re.findall(r"VM \S+ ready in ([0-9.]+) s", text)]
    return out


def no_cache(tools: kata1.Tools, work: Path, setup: kata1.Setup, round_no: int,
             syslog: kata1.Syslog, bundle: Path) -> dict[str, Any]:
    config = work / "configuration.toml"
    plain = work / "no-cache.toml"
    text = config.read_text().replace(f"vm_cache_number = {setup.cache_number}",
                                      "vm_cache_number = 0")
    plain.write_text(text.replace("enable_template = true", "enable_template = false"))
    result = kata1.run_container(tools, plain, bundle, f"kb-none-{round_no}-{int(time.time())}",
                                 syslog=syslog)
    say(f"no cache: rc {result['rc']}, first output {result['t_output_s']} s")
    return {"server": "none", "round": round_no, "runs": [result]}


def summarize(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, Any] = {}
    for s in sessions:
        entry = by.setdefault(s["server"], {"runs": [], "boot_failures": 0,
                                            "left_running": [], "ready_in_s": []})
        entry["runs"] += s["runs"]
        entry["ready_in_s"] += s.get("ready_in_s", [])
        entry["boot_failures"] += s.get("boot_failures") or 0
        entry["left_running"] += s.get("left_running", [])
    out = {}
    for server, entry in by.items():
        runs = entry["runs"]
        ok = [r["t_output_s"] for r in runs if r["rc"] == 0 and r["t_output_s"] is not None]
        phases: dict[str, list[float]] = {}
        for r in runs:
            for name, value in (r.get("phases") or {}).items():
                phases.setdefault(name, []).append(value)
        med = {k: round(statistics.median(v), 3) for k, v in phases.items()}

        def median_of(key: str, rows: list[dict[str, Any]] = runs) -> float | None:
            values = [r[key] for r in rows if r.get(key) is not None]
            return round(statistics.median(values), 3) if values else None

        out[server] = {
            "runs": len(runs), "failed": len(runs) - len(ok),
            "from_cache": sum(1 for r in runs if r.get("from_cache")),
            "p50_s": pct(ok, 50), "p95_s": pct(ok, 95), "t_output_s": ok,
            "phases_p50_s": med, "pss_kib_p50": median_of("pss_kib"),
            "daemon_cpu_s_p50": median_of("daemon_cpu_s"),
            "refill_qemu_cpu_s_p50": median_of("refill_qemu_cpu_s"),
            "refill_proxy_cpu_s_p50": median_of("refill_proxy_cpu_s"),
            "boot_failures": entry["boot_failures"] if server == "vmcache" else None,
            "vms_cached": len(entry["ready_in_s"]) if server == "vmcache" else None,
            "ready_in_s_p50": pct(entry["ready_in_s"], 50),
            "ready_in_s_max": max(entry["ready_in_s"], default=None),
            "agent_duplicate_stream": sum(r.get("agent_duplicate_stream", 0) for r in runs),
            "left_running": entry["left_running"],
        }
    return out


def render(report: dict[str, Any]) -> str:
    def s(v: Any) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = [f"# Real Kata 1.x containers on a VM cache ({report['date']})", "",
             f"{report['host']}; `kata-runtime run` -> first output; {report['rounds']} "
             f"interleaved rounds of {report['runs_per_round']} runs per server and mode, "
             f"shared_fs {report['shared_fs']}, vm_cache_number {report['cache_number']}.", ""]
    for mode, summary in report["modes"].items():
        lines += [f"## {mode}", "",
                  "| | Kata's own cache | kata-vmcache | no cache |", "|---|---|---|---|"]
        k, v, n = (summary.get(x, {}) for x in ("kata", "vmcache", "none"))
        ratio = (v["p50_s"] / k["p50_s"]) if k.get("p50_s") and v.get("p50_s") else None
        rows = [
            ("p50 s", k.get("p50_s"), v.get("p50_s"), n.get("p50_s")),
            ("p95 s", k.get("p95_s"), v.get("p95_s"), n.get("p95_s")),
            ("ours / Kata's, p50", None, ratio, None),
            ("runs (failed, from the cache)",
             f"{k.get('runs')} ({k.get('failed')}, {k.get('from_cache')})",
             f"{v.get('runs')} ({v.get('failed')}, {v.get('from_cache')})",
             f"{n.get('runs')} ({n.get('failed')})"),
        ]
        names = sorted({*k.get("phases_p50_s", {}), *v.get("phases_p50_s", {})})
        rows += [(f"phase {p}, p50 s", k.get("phases_p50_s", {}).get(p),
                  v.get("phases_p50_s", {}).get(p), n.get("phases_p50_s", {}).get(p))
                 for p in names]
        rows += [
            ("sandbox QEMU PSS, p50 MiB", _mib(k.get("pss_kib_p50")), _mib(v.get("pss_kib_p50")),
             _mib(n.get("pss_kib_p50"))),
            ("server CPU per refill, p50 s", k.get("daemon_cpu_s_p50"),
             v.get("daemon_cpu_s_p50"), None),
            ("refill QEMU CPU, p50 s", k.get("refill_qemu_cpu_s_p50"),
             v.get("refill_qemu_cpu_s_p50"), None),
            ("refill kata-proxy CPU, p50 s", k.get("refill_proxy_cpu_s_p50"),
             v.get("refill_proxy_cpu_s_p50"), None),
            ("VMs our daemon cached: launch to ready p50 / max s (count)", None,
             _ready(v), None),
            ("failed boots", k.get("boot_failures"), v.get("boot_failures"), None),
            ("agent `duplicate stream` lines", k.get("agent_duplicate_stream"),
             v.get("agent_duplicate_stream"), None),
        ]
        lines += [f"| {r[0]} | {s(r[1])} | {s(r[2])} | {s(r[3])} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def _ready(v: dict[str, Any]) -> str | None:
    if not v.get("vms_cached"):
        return None
    return f"{v['ready_in_s_p50']:.2f} / {v['ready_in_s_max']:.2f} ({v['vms_cached']})"


def _mib(kib: float | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, var in kata1.ENV.items():
        ap.add_argument(f"--{name}", help=f"default: ${var}")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3, help="containers per server and round")
    ap.add_argument("--cache-number", type=int, default=1)
    ap.add_argument("--modes", default="cold,template",
                    help="comma-separated: cold (cached cold boots), template (clones)")
    ap.add_argument("--shared-fs", default="virtio-9p", choices=("virtio-9p", "virtio-fs"))
    ap.add_argument("--servers", default="kata,vmcache",
                    help="comma-separated: kata (Kata's own VMCache), vmcache (ours)")
    ap.add_argument("--syslog-file", type=Path,
                    help="the file a /dev/log listener already running appends to")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="kata-e2e", help="results file name, without suffix")
    a = ap.parse_args()

    tools = kata1.find_tools({name: getattr(a, name) for name in kata1.ENV})
    if isinstance(tools, str):
        print(f"bench-kata: {tools} (bench/kata1.py says what each is)", file=sys.stderr)
        return 1
    if a.shared_fs == "virtio-fs" and (why := kata1.missing_virtiofsd(tools)):
        print(f"bench-kata: {why}", file=sys.stderr)
        return 1
    servers = [s for s in a.servers.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "host": f"{os.cpu_count()} cores",
        "rounds": a.rounds, "runs_per_round": a.runs, "shared_fs": a.shared_fs,
        "cache_number": a.cache_number, "tools": {k: str(v) for k, v in vars(tools).items()},
        "modes": {}, "sessions": {}}
    work = Path(tempfile.mkdtemp(prefix="kb-", dir="/run" if Path("/run").is_dir() else None))
    # The servers' logs outlive the run (they say why a boot failed); the rest does not.
    logs = Path(tempfile.mkdtemp(prefix="kata-e2e-logs-"))
    say(f"the cache servers' logs: {logs}")
    try:
        with kata1.Syslog(a.syslog_file) as syslog, kata1.host_ready():
            if not syslog.available:
                say("/dev/log belongs to another listener and no --syslog-file: no phases")
            for mode in modes:
                setup = kata1.Setup(cache_number=a.cache_number, template=mode == "template",
                                    shared_fs=a.shared_fs)
                config = kata1.write_config(work / "configuration.toml", tools, setup,
                                            endpoint=work / "cache.sock",
                                            template_path=work / "template",
                                            state_dir=work / "state")
                bundle = kata1.make_bundle(work / "bundle", tools, config)
                sessions = []
                for r in range(a.rounds):
                    order = servers if r % 2 == 0 else servers[::-1]
                    for kind in order:
                        sessions.append(session(tools, work, setup, kind, a.runs, r, syslog,
                                                bundle, logs))
                    if mode == modes[0]:
                        sessions.append(no_cache(tools, work, setup, r, syslog, bundle))
                summary = summarize(sessions)
                if mode != modes[0] and "none" in report["modes"].get(modes[0], {}):
                    summary["none"] = report["modes"][modes[0]]["none"]
                report["modes"][mode] = summary
                report["sessions"][mode] = sessions
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(report, indent=1))
    markdown = render(report)
    (a.out / f"{a.name}.md").write_text(markdown + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
