#!/bin/bash
# Run a command in an arm64 root under qemu-user, as a Raspberry Pi of the given core.
#
#   packaging/arm64/run-in-root.sh ROOT CPU [--bind HOST:INROOT]... -- COMMAND [ARG]...
#
# CPU is cortex-a72 (Raspberry Pi 4) or cortex-a76 (Raspberry Pi 5). The two emulation traps
# (docs/operations.md, "arm64 package"):
# - QEMU_CPU names the core. qemu's default model (max) emulates SME, and with qemu 7.2 the
#   INT8 model then silently detects nothing.
# - /proc/cpuinfo is the host's under qemu-user (x86 text); LiteRT's CPU detection reads it
#   and crashes in allocate_tensors. An ARM cpuinfo of that core (cpuinfo-CPU beside this
#   script) is bind-mounted over it.
# Mounts (proc, dev, the cpuinfo, --bind folders) live in a private mount namespace
# (unshare -m) and vanish with the command. The command gets a clean environment: QEMU_CPU,
# PATH, HOME, LANG, and PIP_CERT/SSL_CERT_FILE pointing at the host's CA bundle, copied in
# (the root trusts what the host trusts: a proxy's CA included). EDGEFLEET_PIP_INDEX_URL, when
# set, becomes PIP_INDEX_URL. The host's own pip configuration (local wheel folders, file://
# indexes, constraints) is not carried in: those paths do not exist in the root.
set -euo pipefail

usage="usage: run-in-root.sh ROOT cortex-a72|cortex-a76 [--bind HOST:INROOT]... -- COMMAND..."
root=${1:?$usage}
cpu=${2:?$usage}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
binds=()
while [ $# -gt 0 ]; do
    case $1 in
    --bind) binds+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "error: unexpected $1; $usage" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "error: no command; $usage" >&2; exit 2; }
cpuinfo=$here/cpuinfo-$cpu
[ -f "$cpuinfo" ] || {
    echo "error: unknown CPU $cpu: use cortex-a72 (Pi 4) or cortex-a76 (Pi 5)" >&2
    exit 2
}
[ -x "$root/usr/bin/python3" ] || { echo "error: $root is not an arm64 root" >&2; exit 2; }

ca=/etc/ssl/certs/ca-certificates.crt
mkdir -p "$root/etc/edgefleet-host"
[ ! -f "$ca" ] || cp "$ca" "$root/etc/edgefleet-host/ca-certificates.crt"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true

env=(QEMU_CPU="$cpu" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1)
if [ -f "$root/etc/edgefleet-host/ca-certificates.crt" ]; then
    env+=(PIP_CERT=/etc/edgefleet-host/ca-certificates.crt
        SSL_CERT_FILE=/etc/edgefleet-host/ca-certificates.crt)
fi
[ -z "${EDGEFLEET_PIP_INDEX_URL:-}" ] || env+=(PIP_INDEX_URL="$EDGEFLEET_PIP_INDEX_URL")

mounts="mount -t proc proc '$root/proc' && mount --bind '$cpuinfo' '$root/proc/cpuinfo'"
mounts+=" && mount --rbind /dev '$root/dev' && mount --rbind /sys '$root/sys'"
for b in "${binds[@]}"; do
    src=${b%%:*}
    dst=$root/${b#*:}
    mkdir -p "$src" "$dst"
    mounts+=" && mount --bind '$src' '$dst'"
done
# QEMU_CPU outside too: chroot execs the root's first arm64 binary through binfmt_misc.
exec unshare -m --propagation private \
    env QEMU_CPU="$cpu" sh -c "$mounts && exec chroot '$root' /usr/bin/env -i \"\$@\"" \
    run-in-root "${env[@]}" "$@"
