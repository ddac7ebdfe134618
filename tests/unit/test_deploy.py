"""deploy/kubernetes: the manifests validate against Kubernetes's own schemas (strict: an
unknown or misspelt field fails), and they say what the issue requires of them: the nodes
kata-deploy labels, the daemon under the host's systemd (never in the pod), minimal RBAC,
scrape annotations, resource requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
#: The oldest Kubernetes still supported upstream when this was written, and the newest the
#: schemas know: the manifests must be valid on both.
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())


def documents() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    docs = documents()
    assert {d["kind"] for d in docs} == {"DaemonSet", "ServiceAccount"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_can_fail() -> None:
    daemonset = next(d for d in documents() if d["kind"] == "DaemonSet")
    daemonset["spec"]["template"]["spec"]["nodeSelectr"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSIONS[-1], strict=True)


def test_daemonset_installs_on_kata_nodes_and_runs_nothing_in_the_pod() -> None:
    daemonset = next(d for d in documents() if d["kind"] == "DaemonSet")
    pod = daemonset["spec"]["template"]
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"katacontainers.io/kata-runtime": "true"}
    assert spec["automountServiceAccountToken"] is False
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    (container,) = spec["containers"]
    assert container["resources"]["requests"].keys() == {"cpu", "memory"}
    # The pod installs and starts the host's service; the daemon never runs in the pod.
    assert container["command"] == ["/opt/kata-vmcache-installer/deploy.sh"]
    script = (DEPLOY / "deploy.sh").read_text()
    assert "kata-vmcache init" not in script
    assert "nsenter --target 1" in script
    assert 'host_systemctl restart "$unit"' in script
    # No API access at all: no Role, no binding.
    assert not [d for d in documents() if d["kind"].endswith(("Role", "RoleBinding"))]
