#!/usr/bin/env bash
# Install kata-vmcache on a host: its own virtualenv, the systemd units, a default
# configuration when the host has none of Kata's. One installer for `make install` (from
# the source tree) and the Kubernetes DaemonSet's pod (deploy/kubernetes/, from the wheels
# in its image, onto the host's root mounted in the pod).
#
#   ROOT=/            the host's root as seen here (the pod mounts it at /host)
#   PREFIX=/opt/kata-vmcache   the virtualenv, as seen from ROOT
#   UNITDIR=/etc/systemd/system
#   SOURCE=.          what pip installs: a source tree, or with WHEELS a requirement name
#   WHEELS=           a directory of wheels: install offline from it (the image's)
#   CHROOT=no         yes: run the host's python3 inside ROOT (the DaemonSet: the virtualenv
#                     must be built by the host's interpreter, which is what runs it later);
#                     no: run $PYTHON here and create the virtualenv at $ROOT$PREFIX (make
#                     install with ROOT=/, and the test against a temporary root)
#   PYTHON=python3    the interpreter for CHROOT=no
#   PIP_ARGS=         extra pip arguments
#
# Never overwrites Kata's configuration: it is kata-runtime's file as much as ours.
set -euo pipefail

ROOT=${ROOT:-/}
PREFIX=${PREFIX:-/opt/kata-vmcache}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SOURCE=${SOURCE:-.}
WHEELS=${WHEELS:-}
CHROOT=${CHROOT:-no}
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
SHARE=${SHARE:-$HERE}   # where README.md, etc/ and systemd/ are (the image copies them)

root=${ROOT%/}
say() { echo "install: $*" >&2; }

if [ "$CHROOT" = yes ]; then
  # Inside ROOT: paths as the host sees them; the wheels are copied in first.
  stage=$(mktemp -d "$root/tmp/kata-vmcache-install.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  if [ -n "$WHEELS" ]; then cp -a "$WHEELS"/. "$stage"/; fi
  run() { chroot "$root" "$@"; }
  venv=$PREFIX
  find_links=${stage#"$root"}
  python=python3
else
  run() { "$@"; }
  venv=$root$PREFIX
  find_links=$WHEELS
  python=$PYTHON
fi

run "$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' 2>/dev/null || {
  say "the host's python3 must be 3.11 or newer (with venv)"; exit 1; }
run "$python" -m venv "$venv"
# shellcheck disable=SC2086 # PIP_ARGS is a list of words
if [ -n "$WHEELS" ]; then
  run "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade \
    --no-index --find-links "$find_links" $PIP_ARGS "$SOURCE"
else
  run "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade \
    $PIP_ARGS "$SOURCE"
fi

install -D -m 0644 "$SHARE/README.md" "$root$PREFIX/share/doc/kata-vmcache/README.md"
# The README links these pages: install them beside it.
for page in "$SHARE"/docs/*.md; do
    [ -e "$page" ] || continue
    install -D -m 0644 "$page" "$root$PREFIX/share/doc/kata-vmcache/docs/${page##*/}"
done
install -D -m 0644 "$SHARE/etc/configuration.toml" \
  "$root$PREFIX/share/kata-vmcache/configuration.toml"
for unit in kata-vmcache.service kata-vmcache@.service; do
  install -d "$root$UNITDIR"
  sed "s#/opt/kata-vmcache#$PREFIX#g" "$SHARE/systemd/$unit" > "$root$UNITDIR/$unit.tmp"
  chmod 0644 "$root$UNITDIR/$unit.tmp"
  mv "$root$UNITDIR/$unit.tmp" "$root$UNITDIR/$unit"
done

kata_config=/etc/kata-containers/configuration.toml
if [ -e "$root$kata_config" ] || [ -e "$root/usr/share/defaults/kata-containers/configuration.toml" ]
then
  say "kept Kata's configuration; set [factory] vm_cache_number > 0 in it" \
      "(example: $PREFIX/share/kata-vmcache/configuration.toml)"
else
  install -D -m 0644 "$SHARE/etc/configuration.toml" "$root$kata_config"
  say "wrote $kata_config"
fi
if [ "$root" = "" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
say "installed in $root$PREFIX; units in $root$UNITDIR"
