"""`[factory]`: Kata's table for the cache itself, which kata-runtime reads too.

kata-runtime finds our socket by `vm_cache_endpoint` in the same table, so its checks are
the ones a Unix socket needs (an absolute path that fits sun_path, not in the kernel's
trees) and not more: the other keys are Kata's own meaning, read as Kata reads them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .keys import KATA_DEFAULT_ENDPOINT, KATA_DEFAULT_TEMPLATE_PATH, KATA_FACTORY_KEYS
from .model import FactorySettings
from .reader import Reader


def factory(r: Reader, t: Mapping[str, Any]) -> FactorySettings | None:
    """The table `t`; None if a path in it is unusable."""
    p = "factory"
    r.check_keys(t, p, KATA_FACTORY_KEYS, strict=False)
    number = r.get(t, f"{p}.vm_cache_number", int, 0, "an integer >= 0")
    if number < 0:
        r.problem(f"{p}.vm_cache_number", f"must be >= 0 (got {number}, "
                  "expected the number of VMs to keep ready)")
    elif number > 256:
        r.problem(f"{p}.vm_cache_number", f"too large (got {number}, expected at most 256)")
    endpoint = r.abs_path(t, f"{p}.vm_cache_endpoint", KATA_DEFAULT_ENDPOINT)
    # sun_path is 108 bytes on Linux; a longer path fails late and obscurely in bind().
    if endpoint is not None and len(os.fsencode(endpoint)) > 107:
        r.problem(f"{p}.vm_cache_endpoint", f"too long for a Unix socket "
                  f"(got {len(os.fsencode(endpoint))} bytes, expected at most 107)")
    if endpoint is not None:
        r.not_in_system_tree(f"{p}.vm_cache_endpoint", endpoint)
    template = r.get(t, f"{p}.enable_template", bool, False, "true or false")
    template_path = r.abs_path(t, f"{p}.template_path", KATA_DEFAULT_TEMPLATE_PATH)
    if endpoint is None or template_path is None:
        return None
    return FactorySettings(number, endpoint, template, template_path)
