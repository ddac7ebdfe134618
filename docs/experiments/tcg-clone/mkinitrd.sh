#!/bin/sh
# The experiments' guest: busybox-static plus ./init (prints its clock source, then
# "tick N up=..." every second from a `sleep 1` loop, with a shell on the console).
# Writes $D/initrd.gz (D defaults to /tmp/tcgclone, where vm.py looks).
set -eu
D=${D:-/tmp/tcgclone}
here=$(cd "$(dirname "$0")" && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$D/shm"
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
cp "$here/init" "$root/init"
chmod 755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$D/initrd.gz"
cp "$here"/*.py "$D/"
echo "built $D/initrd.gz; run the scripts from $D (python3 tmpl_dirty.py 8, ...)"
