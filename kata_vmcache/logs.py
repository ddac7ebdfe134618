"""Logging set-up: one line per event, with a level, readable in a terminal and the journal.

Text lines look like `2026-11-21 19:30:01.123 INFO  cache: VM 3f2a ready in 3.05 s`.
Under systemd (JOURNAL_STREAM set) the timestamp is left to the journal. `json_lines`
switches to one JSON object per line for log shippers. No colour codes, ever: the daemon's
stderr is a pipe more often than a terminal.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time


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


def _short_name(name: str) -> str:
    return name.removeprefix("kata_vmcache.")


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
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(timestamps="JOURNAL_STREAM" not in os.environ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # grpc and asyncio chatter is not ours to show unless asked.
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
