#!/bin/bash
# Make sure this x86 machine runs arm64 binaries: binfmt_misc mounted and qemu-user-static's
# qemu-aarch64 handler registered and enabled. Registers nothing new beyond Debian's own
# handler (update-binfmts) and starts no service.
set -euo pipefail

bm=/proc/sys/fs/binfmt_misc
if [ "$(uname -m)" = aarch64 ]; then
    exit 0  # native arm64: nothing to emulate
fi
[ "$(id -u)" = 0 ] || { echo "error: the arm64 targets need root (chroot, mounts)" >&2; exit 1; }
if [ ! -e "$bm/status" ]; then
    mount -t binfmt_misc binfmt_misc "$bm" || {
        echo "error: cannot mount binfmt_misc at $bm (a container without it cannot run" \
            "arm64 binaries; use a VM or a machine with binfmt_misc)" >&2
        exit 1
    }
fi
if [ ! -e "$bm/qemu-aarch64" ]; then
    if [ -x /usr/sbin/update-binfmts ] && [ -e /usr/share/binfmts/qemu-aarch64 ]; then
        update-binfmts --import qemu-aarch64 >/dev/null
    else
        echo "error: no qemu-aarch64 binfmt handler: apt-get install qemu-user-static" \
            "binfmt-support (then: systemctl disable binfmt-support, if you want no service)" >&2
        exit 1
    fi
fi
grep -qx enabled "$bm/qemu-aarch64" || echo 1 >"$bm/qemu-aarch64"
grep -q '^flags:.*F' "$bm/qemu-aarch64" || {
    echo "error: the qemu-aarch64 handler lacks the F (fix-binary) flag, so a chroot cannot" \
        "find the emulator; reinstall qemu-user-static" >&2
    exit 1
}
