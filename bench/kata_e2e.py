"""`make bench-kata`: real Kata 1.x containers on Kata's own VM cache and on ours, side by side.

A user runs a VM cache to make `kata-runtime run` faster, so this is measured as they feel
it: from invoking Kata 1.x's own `kata-runtime run` to the container's first output line,
with the VM taken from Kata's own VMCache server (`kata-runtime factory init`) or from
kata-vmcache (`kata-vmcache init`), both serving the same configuration file, started and
stopped by turns in interleaved rounds (the host's speed drifts over minutes), and without
any cache (`vm_cache_number = 0`) as a third "server" in the same rounds. Each mode
(cold-booted cached VMs, then `enable_template = true`) runs `--rounds` rounds of `--runs`
containers per server, each from a full cache (no cache: in the first mode only, the same
either way). Reported per server and mode:

- p50/p95 of `run` -> first output, and the phases of each start from kata-runtime's own
  log (take-over: `get base VM` -> `assign vm to sandbox`; -> `VM started`; -> the
  container running);
- the PSS of the running sandbox's QEMU;
- what each refill costs the host: CPU seconds of the cache server itself (daemon, probes)
  and of the refill's QEMU and kata-proxy, from the hand-off until the cache is full again;
- failed runs, each with why (kata-runtime's own last stderr line), and failed boots (ours:
  the daemon's count; Kata's cache closes itself on its first failure);
- a server that never fills its cache within `--ready-timeout`: what it logged (its first and
  last error lines in syslog, its own log's last error). Its runs still happen while it
  listens, as kata-runtime would make them, so they fail with kata-runtime's own error; when
  it does not listen they are recorded as failed, not run. The other servers go on;
- the take-over as kata-runtime logged it (`get base VM`, `assign vm to sandbox`);
- `yamux: duplicate stream` lines in the agent's log (a template saved inside a session).

Needs an installed Kata 1.x (bench/kata1.py says which paths, from flags or the environment);
without one it prints one line saying what is missing and exits 1. Not part of `make bench`.
Writes bench/results/<--name>.json and .md (default kata-e2e). Never fails because of a
number, nor because one server could not serve.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
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


def failure(result: dict[str, Any]) -> str | None:
    """Why a run failed, in kata-runtime's own words (its last stderr line), or None."""
    if result["rc"] == 0 and result["t_output_s"] is not None:
        return None
    said: list[str] = str(result.get("stderr", "")).strip().splitlines()
    if result["rc"] == "timeout":
        return f"no exit within the run's timeout{': ' + said[-1] if said else ''}"
    if said:
        return said[-1][:400]
    return f"exit {result['rc']}, no `{kata1.MARKER}` line"


def not_served(server: kata1.CacheServer, waited: float, syslog: kata1.Syslog,
               error: str) -> dict[str, Any]:
    """What a cache server that did not fill its cache said: its error lines in syslog since
    its start (its own pid's, and those of processes naming a VM its own lines name, such as
    the virtiofsd it started: others on the host log there too), and its own log's last
    error or warning line (ours logs to that file)."""
    assert server.proc is not None
    lines = syslog.lines()
    tag = f"[{server.proc.pid}]:"
    own = [line for line in lines if tag in line]
    vms = {m for line in own for m in re.findall(r"(?:/vm/|\bvm=|sandbox-)([\w-]{8,})", line)}
    errors = [kata1.short(line) for line in lines if kata1.is_error(line)
              and (tag in line or any(vm in line for vm in vms))]
    if server.proc.poll() is not None:
        what = f"server exited with {server.proc.returncode}"
    else:
        what = f"no VM cached after {waited:.0f} s"
    said = []
    if errors:
        said.append(f"first error in syslog: {errors[0]}")
        if len(errors) > 1:
            said.append(f"last error in syslog: {errors[-1]}")
    tail = server.log_path.read_text(errors="replace").strip().splitlines()
    worst = [line for line in tail if re.search(r"\b(ERROR|WARNING|CRITICAL)\b|level=(error|fatal)",
                                                line)]
    if worst:
        said.append(f"its log's last error: {worst[-1][:400]}")
    elif not errors:
        said.append(f"its log's last line: {tail[-1][:400]}" if tail
                    else f"nothing logged ({error})")
    return {"reason": "; ".join([what, *said]), "errors": errors[-20:],
            "listening": server.listening()}


def session(tools: kata1.Tools, work: Path, setup: kata1.Setup, kind: str, runs: int,
            round_no: int, syslog: kata1.Syslog, bundle: Path, logs: Path,
            ready_timeout: float, busy: int = 0) -> dict[str, Any]:
    """One server's turn: start it on the file, `runs` containers each from a full cache,
    stop it. A server that never fills its cache is still asked, as kata-runtime asks it,
    while it listens (each run then fails with kata-runtime's own error); one that does not
    listen is not, and its runs are recorded as failed with why."""
    if kind == "none":
        return no_cache(tools, work, setup, runs, round_no, syslog, bundle, busy)
    config = work / "configuration.toml"
    server = kata1.CacheServer(kind, tools, config, work / "cache.sock",
                               logs / f"{kind}-server.log")
    log_start = server.log_path.stat().st_size if server.log_path.exists() else 0
    out: dict[str, Any] = {"server": kind, "round": round_no, "ready_after_start_s": None,
                           "runs": []}
    syslog.mark()
    started = time.monotonic()
    server.launch()
    ready = True
    try:
        try:
            server.wait_full(setup.cache_number, ready_timeout)
            out["ready_after_start_s"] = round(time.monotonic() - started, 2)
            say(f"{kind}: {setup.cache_number} VM(s) cached {out['ready_after_start_s']} s "
                "after start")
        except RuntimeError as e:
            ready = False
            out["not_ready"] = not_served(server, time.monotonic() - started, syslog, str(e))
            say(f"{kind}: not ready: {out['not_ready']['reason']}")
        for i in range(runs):
            cid = f"kb-{kind}-{round_no}-{i}-{int(time.time())}"
            before: set[int] = set()
            if ready:
                time.sleep(1.0)  # the refill's QEMU has paused; let the host settle
                try:
                    before = set(server.wait_full(setup.cache_number, ready_timeout))
                except RuntimeError as e:  # no refill: the run below says what that does
                    say(f"{kind}: before run {i}: {e}")
            if not server.listening():
                why = f"{kind} server not listening on {server.endpoint}"
                if server.proc is not None and server.proc.poll() is not None:
                    why += f" (exited with {server.proc.returncode})"
                out["runs"].append({"cid": cid, "rc": None, "t_output_s": None,
                                    "not_run": why, "error": why})
                say(f"{kind} {cid}: not run: {why}")
                continue
            assert server.proc is not None
            cpu_before = kata1.cpu_seconds(server.proc.pid)
            result = kata1.run_container(tools, config, bundle, cid, syslog=syslog, busy=busy)
            result["error"] = failure(result)
            if ready and result["error"] is None:
                with contextlib.suppress(RuntimeError):
                    result.update(refill_cost(server, before, cpu_before))
            out["runs"].append(result)
            say(f"{kind} {cid}: rc {result['rc']}, first output {result['t_output_s']} s, "
                f"phases {result.get('phases')}, PSS {result['pss_kib']} KiB, "
                f"busiest until then {result['busiest_to_output']}"
                + (f", error: {result['error']}" if result["error"] else ""))
        out["boot_failures"] = boot_failures(server)
    finally:
        out["left_running"] = server.stop() + kata1.sweep_descendants()
    if kind == "vmcache":
        # Our daemon's own figure for each VM it cached (launch to paused and checked):
        # cold boots, or clones once the template exists.
        with open(server.log_path, "rb") as log:
            log.seek(log_start)
            text = log.read().decode(errors="replace")
        out["ready_in_s"] = [float(x) for x in re.findall(r"VM \S+ ready in ([0-9.]+) s", text)]
    return out


def no_cache(tools: kata1.Tools, work: Path, setup: kata1.Setup, runs: int, round_no: int,
             syslog: kata1.Syslog, bundle: Path, busy: int = 0) -> dict[str, Any]:
    """`runs` containers on the same file with no cache (vm_cache_number = 0, no template)."""
    config = work / "configuration.toml"
    plain = work / "no-cache.toml"
    text = config.read_text().replace(f"vm_cache_number = {setup.cache_number}",
                                      "vm_cache_number = 0")
    plain.write_text(text.replace("enable_template = true", "enable_template = false"))
    out: dict[str, Any] = {"server": "none", "round": round_no, "runs": []}
    for i in range(runs):
        time.sleep(1.0)
        result = kata1.run_container(tools, plain, bundle,
                                     f"kb-none-{round_no}-{i}-{int(time.time())}", syslog=syslog,
                                     busy=busy)
        result["error"] = failure(result)
        out["runs"].append(result)
        say(f"no cache: rc {result['rc']}, first output {result['t_output_s']} s"
            + (f", error: {result['error']}" if result["error"] else ""))
    out["left_running"] = kata1.sweep_descendants()
    return out


def summarize(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, Any] = {}
    for s in sessions:
        entry = by.setdefault(s["server"], {"runs": [], "boot_failures": 0, "not_ready": [],
                                            "left_running": [], "ready_in_s": []})
        entry["runs"] += s["runs"]
        entry["ready_in_s"] += s.get("ready_in_s", [])
        entry["boot_failures"] += s.get("boot_failures") or 0
        entry["left_running"] += s.get("left_running", [])
        if "not_ready" in s:
            entry["not_ready"].append({"round": s["round"], **s["not_ready"]})
        if "harness_error" in s:
            entry["not_ready"].append({"round": s["round"], "listening": None,
                                       "reason": f"the harness failed: {s['harness_error']}",
                                       "errors": []})
    out = {}
    for server, entry in by.items():
        runs = entry["runs"]
        ok = [r["t_output_s"] for r in runs if not r.get("error")]
        phases: dict[str, list[float]] = {}
        for r in runs:
            for name, value in (r.get("phases") or {}).items():
                phases.setdefault(name, []).append(value)
        med = {k: round(statistics.median(v), 3) for k, v in phases.items()}

        def median_of(key: str, rows: list[dict[str, Any]] = runs) -> float | None:
            values = [r[key] for r in rows if r.get(key) is not None]
            return round(statistics.median(values), 3) if values else None

        errors = collections.Counter(r["error"] for r in runs if r.get("error"))
        takeover: list[str] = next((r["takeover_log"] for r in runs if r.get("takeover_log")),
                                   [])
        out[server] = {
            "runs": len(runs), "failed": len(runs) - len(ok),
            "not_run": sum(1 for r in runs if "not_run" in r),
            "errors": [{"error": e, "runs": n} for e, n in errors.most_common()],
            "not_ready": entry["not_ready"],
            "from_cache": sum(1 for r in runs if r.get("from_cache")),
            "takeover_log_example": takeover,
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


COLUMNS = {"none": "no cache", "kata": "Kata's own cache", "vmcache": "kata-vmcache"}


def paired_ratios(sessions: list[dict[str, Any]]) -> list[float]:
    """Per round, our median time to first output over Kata's, for the rounds where both
    had a successful run: both servers met the same minutes of the host, whose speed
    drifts, so the ratio within a round is what the drift does not move."""
    medians: dict[int, dict[str, float]] = collections.defaultdict(dict)
    for entry in sessions:
        times = [run["t_output_s"] for run in entry.get("runs", [])
                 if run.get("t_output_s") is not None and not run.get("error")]
        if times:
            medians[entry["round"]][entry["server"]] = statistics.median(times)
    return [m["vmcache"] / m["kata"] for _, m in sorted(medians.items())
            if "vmcache" in m and "kata" in m]


def render(report: dict[str, Any]) -> str:
    def s(v: Any) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    servers = report["servers"]
    lines = [f"# Real Kata 1.x containers on a VM cache ({report['date']})", "",
             f"{report['host']}; `kata-runtime run` -> first output; {report['rounds']} "
             f"interleaved rounds of {report['runs_per_round']} runs per server and mode "
             f"({', '.join(COLUMNS[x] for x in servers)}; no cache in the first mode only), "
             f"shared_fs {report['shared_fs']}, vm_cache_number {report['cache_number']}"
             + (f", {n} CPU-bound neighbours beside each run (each in its own session)"
                if (n := report.get("busy_neighbours")) else "") + ".", ""]
    for mode, summary in report["modes"].items():
        cols = [x for x in COLUMNS if x in summary]
        c = [summary[x] for x in cols]
        lines += [f"## {mode}", "", "| | " + " | ".join(COLUMNS[x] for x in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]

        def row(label: str, values: list[Any], out: list[str] = lines) -> None:
            out.append(f"| {label} | " + " | ".join(s(v) for v in values) + " |")

        def ratio(a: dict[str, Any], b: dict[str, Any] | None) -> float | None:
            if not b or not a.get("p50_s") or not b.get("p50_s") or a is b:
                return None
            return round(float(a["p50_s"]) / float(b["p50_s"]), 2)

        caches = [x for x in cols if x != "none"]
        row("p50 s", [x.get("p50_s") for x in c])
        row("p95 s", [x.get("p95_s") for x in c])
        if "none" in cols and caches:
            row("p50 / no cache p50", [ratio(x, summary["none"]) for x in c])
        if "kata" in cols and "vmcache" in cols:
            row("ours / Kata's, p50",
                [ratio(x, summary["kata"]) if k == "vmcache" else None
                 for k, x in zip(cols, c, strict=True)])
            paired = paired_ratios(report["sessions"].get(mode, []))
            row("ours / Kata's, paired by round: median (range, rounds)",
                [f"{statistics.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f}, "
                 f"{len(paired)})" if k == "vmcache" and paired else None for k in cols])
        row("runs (failed, from the cache)",
            [f"{x['runs']} ({x['failed']}, {x['from_cache']})" if k != "none"
             else f"{x['runs']} ({x['failed']})" for k, x in zip(cols, c, strict=True)])
        names = sorted({p for x in c for p in x.get("phases_p50_s", {})})
        for p in names:
            row(f"phase {p}, p50 s", [x.get("phases_p50_s", {}).get(p) for x in c])
        row("sandbox QEMU PSS, p50 MiB", [_mib(x.get("pss_kib_p50")) for x in c])
        if caches:
            for key, label in (("daemon_cpu_s_p50", "server CPU per refill, p50 s"),
                               ("refill_qemu_cpu_s_p50", "refill QEMU CPU, p50 s"),
                               ("refill_proxy_cpu_s_p50", "refill kata-proxy CPU, p50 s")):
                row(label, [x.get(key) for x in c])
            row("cache ready after start (of sessions)",
                [None if k == "none" else _sessions(report, mode, k) for k in cols])
        if "vmcache" in cols:
            row("VMs our daemon cached: launch to ready p50 / max s (count)",
                [_ready(x) if k == "vmcache" else None for k, x in zip(cols, c, strict=True)])
            row("failed boots (our daemon's count)",
                [x.get("boot_failures") for x in c])
        row("agent `duplicate stream` lines", [x.get("agent_duplicate_stream") for x in c])
        lines.append("")
        notes = []
        for k, x in zip(cols, c, strict=True):
            for nr in x.get("not_ready", []):
                then = {True: " (then listening)", False: " (then not listening)", None: ""}
                notes.append(f"- {COLUMNS[k]}, round {nr['round']}: {_md(nr['reason'])}"
                             f"{then[nr['listening']]}")
            for e in x.get("errors", []):
                notes.append(f"- {COLUMNS[k]}: {e['runs']} of {x['runs']} runs failed: "
                             f"{_md(e['error'])}")
            for left in x.get("left_running", []):
                notes.append(f"- {COLUMNS[k]}: left behind and stopped: {_md(left)}")
        if notes:
            lines += ["Failures:", "", *notes, ""]
        evidence = [(k, x) for k, x in zip(cols, c, strict=True) if k != "none"]
        if evidence:
            lines += ["Take-over: kata-runtime's own lines of it (`get base VM`, `assign vm to "
                      "sandbox`), from the first run that logged any:", ""]
            for k, x in evidence:
                example = x.get("takeover_log_example") or []
                lines.append(f"- {COLUMNS[k]}: {x['from_cache']} of {x['runs']} runs took a VM "
                             "from the cache" + (":" if example else "."))
                lines += [f"  - `{_md(line)}`" for line in example]
            lines.append("")
    return "\n".join(lines)


def _sessions(report: dict[str, Any], mode: str, kind: str) -> str:
    ready = [x["ready_after_start_s"] for x in report["sessions"][mode]
             if x["server"] == kind]
    done = [x for x in ready if x is not None]
    return (f"{statistics.median(done):.1f} s ({len(done)} of {len(ready)})" if done
            else f"never (0 of {len(ready)})")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


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
    ap.add_argument("--servers", default="none,kata,vmcache",
                    help="comma-separated, in the first round's order: none (no cache), kata "
                         "(Kata's own VMCache), vmcache (ours); '' is none alone")
    ap.add_argument("--ready-timeout", type=float, default=120.0,
                    help="seconds a cache server has to fill its cache (default 120)")
    ap.add_argument("--syslog-file", type=Path,
                    help="the file a /dev/log listener already running appends to")
    ap.add_argument("--busy", type=int, default=0,
                    help="CPU-bound neighbours (other tenants' sandboxes, each in its own "
                         "session) running beside each container's start (default 0)")
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
    if a.busy < 0:
        print(f"bench-kata: --busy {a.busy}: a number of neighbours, 0 or more",
              file=sys.stderr)
        return 2
    servers = [s for s in a.servers.split(",") if s] or ["none"]
    if unknown := [s for s in servers if s not in COLUMNS]:
        print(f"bench-kata: unknown server(s) {', '.join(unknown)}; known: "
              f"{', '.join(COLUMNS)}", file=sys.stderr)
        return 2
    modes = [m for m in a.modes.split(",") if m]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "host": f"{os.cpu_count()} cores",
        "rounds": a.rounds, "runs_per_round": a.runs, "servers": servers,
        "ready_timeout_s": a.ready_timeout, "shared_fs": a.shared_fs,
        "cache_number": a.cache_number, "busy_neighbours": a.busy,
        "tools": {k: str(v) for k, v in vars(tools).items()},
        "modes": {}, "sessions": {}}
    work = Path(tempfile.mkdtemp(prefix="kb-", dir="/run" if Path("/run").is_dir() else None))
    # The servers' logs outlive the run when something failed (they say why); the rest
    # never does.
    logs = Path(tempfile.mkdtemp(prefix="kata-e2e-logs-"))
    say(f"the cache servers' logs: {logs}")
    kata1.become_subreaper()  # what the runs leave running stays ours to find and stop
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
                        if kind == "none" and mode != modes[0]:
                            continue  # no cache: the same runs in every mode
                        try:
                            sessions.append(session(tools, work, setup, kind, a.runs, r,
                                                    syslog, bundle, logs, a.ready_timeout,
                                                    a.busy))
                        except Exception as e:  # the other servers still run
                            say(f"{kind}: round {r} failed in the harness: {e!r}")
                            sessions.append({"server": kind, "round": r, "runs": [],
                                             "ready_after_start_s": None,
                                             "harness_error": repr(e),
                                             "left_running": kata1.sweep_descendants()})
                summary = summarize(sessions)
                if mode != modes[0] and "none" in report["modes"].get(modes[0], {}):
                    summary["none"] = report["modes"][modes[0]]["none"]
                report["modes"][mode] = summary
                report["sessions"][mode] = sessions
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    # A run that finished with nothing failed has nothing for its servers' logs to explain.
    if any(s["failed"] or s["not_ready"] for mode in report["modes"].values()
           for s in mode.values()):
        say(f"kept the cache servers' logs (a run or a server failed): {logs}")
    else:
        shutil.rmtree(logs, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(report, indent=1))
    markdown = render(report)
    (a.out / f"{a.name}.md").write_text(markdown + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
