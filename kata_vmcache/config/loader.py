"""The entry point: which file, read as UTF-8 TOML, validated once into a `Config`.

Without `--config` the file is where Kata looks for it (`DEFAULT_CONFIG_PATHS`, in Kata's
order), or a runtime class's `configuration-<class>.toml` beside it. A file that cannot be
read or parsed is one problem; a file that parses is validated whole (validate.py), and
`ConfigError` carries every problem at once. Warnings come back beside the `Config`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):  # noqa: UP036 - tomli stays the fallback the brief asks for
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError, ConfigProblem
from .model import Config
from .reader import Reader
from .validate import validate

#: Kata's configuration lookup order (kata-containers/runtime, pkg/katautils).
DEFAULT_CONFIG_PATHS = (
    Path("/etc/kata-containers/configuration.toml"),
    Path("/usr/share/defaults/kata-containers/configuration.toml"),
)


def find_config(explicit: Path | None) -> Path:
    """The file to read: `explicit`, or the first of Kata's default paths that exists."""
    if explicit is not None:
        return explicit
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.exists():
            return candidate
    tried = " or ".join(str(p) for p in DEFAULT_CONFIG_PATHS)
    raise ConfigError(
        [ConfigProblem("", f"no configuration file found (looked for {tried}; use --config PATH)")]
    )


def find_class_config(runtime_class: str) -> Path:
    """The file of one Kata runtime class: `configuration-<class>.toml` in Kata's lookup
    directories, in Kata's order (what kata-deploy installs per runtime class, e.g.
    configuration-qemu.toml)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", runtime_class):
        raise ConfigError([ConfigProblem("", f"--runtime-class: not a runtime class name "
                                             f"(got {runtime_class!r}, expected e.g. \"qemu\")")])
    name = f"configuration-{runtime_class}.toml"
    candidates = [p.parent / name for p in DEFAULT_CONFIG_PATHS]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = " or ".join(str(p) for p in candidates)
    raise ConfigError([ConfigProblem("", f"no configuration file for runtime class "
                                         f"{runtime_class!r} (looked for {tried})")])


def load(path: Path | None = None) -> tuple[Config, list[ConfigProblem]]:
    """Read, parse and validate a configuration file; raise ConfigError with every problem."""
    path = find_config(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigProblem("", f"{path}: no such file")]) from None
    except IsADirectoryError:
        raise ConfigError([ConfigProblem("", f"{path}: is a directory, not a file")]) from None
    except PermissionError:
        raise ConfigError([ConfigProblem("", f"{path}: permission denied")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem("", f"not UTF-8 text ({exc.reason})", path)]) from None
    return parse(text, source=path)


def parse(text: str, *, source: Path | None = None) -> tuple[Config, list[ConfigProblem]]:
    """Parse and validate the text of a configuration file (`source` names it in problems);
    raise ConfigError with every problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("", f"invalid TOML: {exc}", source)]) from None
    reader = Reader(doc, text, source)
    config = validate(reader)
    if reader.problems:
        raise ConfigError(reader.problems)
    assert config is not None
    return config, reader.warnings
