#!/usr/bin/env bash
# Install the Debian packages kata-vmcache needs, only those missing (idempotent, quiet
# when there is nothing to do). Called by `make setup`; needs root or sudo to install.
set -euo pipefail

packages=(
  qemu-system-x86          # the VMs (TCG here, KVM on production hosts)
  busybox-static           # the demo guest's userland
  linux-image-cloud-amd64  # the demo guest's kernel (small, virtio and serial built in)
  systemd                  # systemd-analyze verify for the unit file tests
  tmux                     # drives the TUI in tests as a person would
  prometheus               # scrapes the daemon's /metrics in the integration suite
  debootstrap              # the systemd test bed's Debian rootfs (make test-systemd)
  systemd-container        # systemd-nspawn boots it, systemd as PID 1 (make test-systemd)
)
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  packages+=(python3-venv)
fi

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "setup: installing ${missing[*]}" >&2
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null; then
  sudo=(sudo)
else
  echo "setup: missing packages ${missing[*]}; run as root or install them yourself" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
