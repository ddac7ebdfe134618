"""Kernel parameters as Kata splits, stores and orders them: the `KernelParams` list of
`{"Key", "Value"}` objects in both generations' HypervisorConfig.

Kata compares that list element by element, in order, so the split of the user's
kernel_params, the bare-word rule and the parameters Kata puts first must all be Kata's.
The generation-specific parts (1.x splits with strings.Fields, 3.x with KernelParamFields;
which agent parameters follow) are in `gen1` and `gen3`; what both share is here.
"""

from __future__ import annotations

from .defaults import SYSTEMD_UNIT_NAME
from .go import _go_trim_space


def _kernel_param_fields(s: str) -> list[str]:
    """3.x vc.KernelParamFields: split on ' ' outside double quotes, each field TrimSpace'd
    (a tab or newline inside a field stays in it)."""
    params: list[str] = []
    start, in_quote = 0, False
    for i, c in enumerate(s):
        if c == '"':
            in_quote = not in_quote
        elif c == " " and not in_quote:
            field = _go_trim_space(s[start:i])
            if field:
                params.append(field)
            start = i + 1
    field = _go_trim_space(s[start:])
    if field:
        params.append(field)
    return params


def _param(key: str, value: str) -> dict[str, str]:
    return {"Key": key, "Value": value}


def _deserialize_params(fields: list[str]) -> list[dict[str, str]]:
    """vc.DeserializeParams: split at the first "=", a bare word gets an empty Value."""
    params = []
    for field in fields:
        if field == "":
            continue
        key, sep, value = field.partition("=")
        params.append(_param(key, value if sep else ""))
    return params


def _boot_params(image_path: str, block_driver: str) -> list[dict[str, str]]:
    """The first KernelParams of both generations' SetKernelParams: systemd's (needSystemd:
    an image boots systemd, an initrd does not), then the virtio-scsi scan mode."""
    params: list[dict[str, str]] = []
    if image_path != "":
        params += [
            _param("systemd.unit", SYSTEMD_UNIT_NAME),
            _param("systemd.mask", "systemd-networkd.service"),
            _param("systemd.mask", "systemd-networkd.socket"),
        ]
    if block_driver == "virtio-scsi":
        params.append(_param("scsi_mod.scan", "none"))
    return params
