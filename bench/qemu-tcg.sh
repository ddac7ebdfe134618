#!/bin/sh
# Kata 1.x's QEMU command line on a host without KVM: `[hypervisor.qemu] path` for the
# Kata 1.x bench (bench/kata1.py). Kata 1.x builds a KVM command line (govmm); this host's
# QEMU runs it under TCG after four rewrites, and passes everything else through untouched:
#   -machine ...,accel=kvm,...           -> accel=tcg
#   -machine ...,kernel_irqchip[=...]    -> dropped (KVM only; QEMU 7.2 refuses the bare key)
#   -cpu host[,...]                      -> -cpu max (TCG has no "host" model)
#   -global kvm-pit.lost_tick_policy=... -> dropped (no kvm-pit under TCG)
# kata-vmcache builds its own command line ([vmcache] accelerator = "tcg"): nothing to rewrite.
# QEMU_REAL names the real binary (default: qemu-system-x86_64 on PATH).
real=${QEMU_REAL:-qemu-system-x86_64}
n=$#
i=0
while [ "$i" -lt "$n" ]; do
  a=$1; shift; i=$((i + 1))
  case $a in
  -machine|-M)
    v=$1; shift; i=$((i + 1))
    v=$(printf '%s' "$v" | tr ',' '\n' | sed -e 's/^accel=kvm.*/accel=tcg/' -e '/^kernel_irqchip/d' | paste -sd, -)
    set -- "$@" "$a" "$v" ;;
  -cpu)
    v=$1; shift; i=$((i + 1))
    case $v in host|host,*) v=max ;; esac
    set -- "$@" -cpu "$v" ;;
  -global)
    v=$1; shift; i=$((i + 1))
    case $v in kvm-pit.*) ;; *) set -- "$@" -global "$v" ;; esac ;;
  *) set -- "$@" "$a" ;;
  esac
done
exec "$real" "$@"
