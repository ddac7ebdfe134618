"""The `Config` payload: the VMConfig JSON kata-runtime compares with its own, derived for
one generation, and the other questions asked of a file per generation.

This is `kata`'s face (re-exported by `kata/__init__.py`): every function takes the
generation explicitly, with no default, because the two generations' payloads differ
and a wrong guess makes Kata boot its own VM silently. It checks the generation and the
hypervisor, then hands the table to `gen1` or `gen3`; each payload holds exactly the fields
of its generation's structs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import gen1, gen3
from .defaults import (
    AGENT_TYPE,
    DEFAULT_HYPERVISOR_PATH,
    DEFAULT_HYPERVISOR_PATH_3X,
    HYPERVISOR_TYPE,
)
from .generation import GENERATIONS, Generation
from .go import toml_table


def _check(generation: str, hypervisor: str = HYPERVISOR_TYPE) -> None:
    if generation not in GENERATIONS:
        raise ValueError(f"unknown Kata generation {generation!r} (expected 1.x or 3.x)")
    if hypervisor != HYPERVISOR_TYPE:
        raise ValueError(f"Kata's VM cache supports only qemu (got {hypervisor!r})")


def hypervisor_config(doc: Mapping[str, Any], generation: Generation,
                      hypervisor: str = "qemu") -> dict[str, Any]:
    """Kata's HypervisorConfig JSON object derived from a parsed configuration.toml (the whole
    document, as tomllib returns it) the way `generation`'s loader derives it.

    Only QEMU: Kata's checkFactoryConfig refuses a VM cache with any other hypervisor.
    """
    _check(generation, hypervisor)
    h = toml_table(doc, "hypervisor", hypervisor)
    if generation == "3.x":
        return gen3.hypervisor(h, gen3.agent_table(doc) or {})
    return gen1.hypervisor(h, gen1.agent_table(doc) or {})


def agent_config(doc: Mapping[str, Any], generation: Generation) -> dict[str, Any]:
    """Kata's KataAgentConfig JSON object, as `generation`'s updateRuntimeConfigAgent
    derives it."""
    _check(generation)
    return gen3.agent_config(doc) if generation == "3.x" else gen1.agent_config(doc)


def proxy_config(doc: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Kata 1.x's ProxyType and ProxyConfig (3.x has no proxy): kata-proxy unless the
    hypervisor's UseVSock holds, derived as its hypervisor getter derives it."""
    return gen1.proxy_config(doc, gen1.use_vsock(toml_table(doc, "hypervisor",
                                                            HYPERVISOR_TYPE)))


def vm_config(doc: Mapping[str, Any], generation: Generation) -> dict[str, Any]:
    """The whole VMConfig JSON for GrpcVMConfig.Data, for `generation`.

    1.x: {"HypervisorType": "qemu", "HypervisorConfig": ..., "AgentType": "kata",
    "AgentConfig": ..., "ProxyType": ..., "ProxyConfig": {"Path": ..., "Debug": ...}}.
    3.x: {"HypervisorType": "qemu", "AgentConfig": ..., "HypervisorConfig": ...} (3.x's
    VMConfig has no agent type and no proxy).
    """
    hypervisor = hypervisor_config(doc, generation)
    if generation == "3.x":
        return {
            "HypervisorType": HYPERVISOR_TYPE,
            "AgentConfig": agent_config(doc, generation),
            "HypervisorConfig": hypervisor,
        }
    proxy_type, proxy = proxy_config(doc)
    return {
        "HypervisorType": HYPERVISOR_TYPE,
        "HypervisorConfig": hypervisor,
        "AgentType": AGENT_TYPE,
        "AgentConfig": agent_config(doc, generation),
        "ProxyType": proxy_type,
        "ProxyConfig": proxy,
    }


def default_hypervisor_path(generation: Generation) -> str:
    """The binary `generation`'s loader uses when `path` is unset."""
    _check(generation)
    return DEFAULT_HYPERVISOR_PATH_3X if generation == "3.x" else DEFAULT_HYPERVISOR_PATH


def loader_refusals(doc: Mapping[str, Any], generation: Generation) -> list[tuple[str, str]]:
    """What makes `generation`'s loader refuse the file, beyond what our validator already
    refuses (missing files, both or neither of initrd and image), as (key, reason).

    kata-runtime cannot load such a file, so it never asks the cache; the daemon still
    works for our own client. 3.x's need of /dev/vhost-vsock is about the host, not the
    file: see `host_has_vhost_vsock()`.
    """
    _check(generation)
    if generation == "1.x":
        return []
    return gen3.refusals(toml_table(doc, "hypervisor", HYPERVISOR_TYPE))
