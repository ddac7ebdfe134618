"""Logging set-up: one line per event, with a level, readable in a terminal and the journal.

Text lines look like `2026-11-21 19:30:01.123 INFO  cache: VM 3f2a ready in 3.05 s`.
`json_lines` switches to one JSON object per line for log shippers. No colour codes, ever:
the daemon's stderr is a pipe more often than a terminal.

Under systemd, when stderr is the journal (JOURNAL_STREAM names its device and inode, as
sd-daemon(3) says to check), the timestamp is left to the journal and each line starts with
its syslog priority (`<3>` for errors): journald strips the prefix and records the priority,
so `journalctl -p err -u kata-vmcache` finds the errors.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

#: sd-daemon(3) prefixes: syslog priorities by logging level.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd connected (not merely inherited env)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalPrefix(logging.Formatter):
    """Wraps a formatter: every line of a record gets the record's `<priority>` prefix."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITIES.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


#: The packages that only say which layer a module is in: a log line names the module
#: (`reload:`, `filling:`, `direct.<vm id>:`), as it did before the tree had layers.
_LAYERS = ("service.", "pool.", "vm.", "factory.", "client.", "config.", "kata.")


def _short_name(name: str) -> str:
    name = name.removeprefix("kata_vmcache.")
    for layer in _LAYERS:
        if name.startswith(layer):
            return name.removeprefix(layer)
    return name


class TextFormatter(logging.Formatter):
    def __init__(self, *, timestamps: bool) -> None:
        fmt = "%(levelname)-7s %(short)s: %(message)s"
        if timestamps:
            fmt = "%(asctime)s.%(msecs)03d " + fmt
        super().__init__(fmt, datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.short = _short_name(record.name)
        return super().format(record)


def setup_logging(*, debug: bool = False, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    journal = stderr_is_journal()
    formatter: logging.Formatter = (JsonFormatter() if json_lines
                                    else TextFormatter(timestamps=not journal))
    handler.setFormatter(JournalPrefix(formatter) if journal else formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # grpc and asyncio chatter is not ours to show unless asked.
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
