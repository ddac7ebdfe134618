#!/usr/bin/env bash
# The DaemonSet pod's entry point: install kata-vmcache on the host (mounted at /host),
# (re)start kata-vmcache@<class> for each of $RUNTIME_CLASSES under the host's systemd,
# then sleep. Stopping the pod stops nothing on the host: the service, and the VMs it
# handed out, outlive the pod (that is the point).
set -euo pipefail

HERE=/opt/kata-vmcache-installer
HOST=${HOST:-/host}
RUNTIME_CLASSES=${RUNTIME_CLASSES:-qemu}

host_systemctl() { nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl "$@"; }

ROOT=$HOST CHROOT=yes WHEELS=$HERE/wheels SOURCE=kata-vmcache SHARE=$HERE \
  "$HERE/scripts/install.sh"
host_systemctl daemon-reload
for class in $RUNTIME_CLASSES; do
  unit=kata-vmcache@$class
  host_systemctl enable "$unit"
  # A restart is safe for handed-off VMs (KillMode=process): the new daemon leaves them be.
  host_systemctl restart "$unit" || echo "deploy: $unit failed to start; see journalctl -u $unit" >&2
done
touch /tmp/kata-vmcache-installed
trap 'exit 0' TERM INT
sleep infinity & wait
