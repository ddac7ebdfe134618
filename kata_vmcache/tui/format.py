"""How the dashboard writes numbers: short, fixed-width-friendly, no surprises.

Pure functions of their arguments (the clock included), so screenshots are reproducible.
"""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """12s, 3m 04s, 1h 02m, 3d 04h: two units at most, the way `uptime` reads."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h:02d}h"


def seconds(value: float | None) -> str:
    """Boot times: 2.31 s; absent (still booting) as a dash."""
    return "—" if value is None else f"{value:.2f} s"


def millis(value: float) -> str:
    """Hand-off latencies, given in seconds: 12 ms, 1.4 s."""
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def clock(unix_time: float) -> str:
    """An event's time of day, in the local time zone."""
    return time.strftime("%H:%M:%S", time.localtime(unix_time))


def size(n_bytes: int) -> str:
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
