#!/bin/bash
# Build the base Debian bookworm arm64 root the arm64 package is built and tested in, as a
# tarball (make test-arm64 extracts a fresh copy of it for every build and every install).
#
#   packaging/arm64/build-root.sh OUT.tar [SUITE] [MIRROR]
#
# Needs root, debootstrap and qemu-user-static with binfmt_misc (the qemu-aarch64 handler
# with the F flag, as Debian's qemu-user-static registers it). The root holds what Raspberry
# Pi OS Bookworm 64-bit has for the package: python3 (3.11) with venv and pip, adduser and
# init-system-helpers (deb-systemd-helper, so the maintainer scripts enable and purge the
# unit as on a device), CA certificates. No service is started: there is no init in a chroot.
set -euo pipefail

out=${1:?usage: build-root.sh OUT.tar [SUITE] [MIRROR]}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}
here=$(cd "$(dirname "$0")" && pwd)

"$here/binfmt.sh"
command -v debootstrap >/dev/null || {
    echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2
    exit 1
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-arm64-root.XXXXXX")
trap 'rm -rf --one-file-system "$tmp"' EXIT
echo "debootstrap $suite arm64 from $mirror (emulated: several minutes)" >&2
start=$(date +%s)
debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,adduser,init-system-helpers \
    "$suite" "$tmp/root" "$mirror" >"$tmp/debootstrap.log" 2>&1 || {
    tail -n 30 "$tmp/debootstrap.log" >&2
    echo "error: debootstrap failed (log above)" >&2
    exit 1
}
rm -rf "$tmp/root/var/cache/apt/archives/"*.deb "$tmp/root/var/lib/apt/lists/"*_Packages
mkdir -p "$(dirname "$out")"
tar -C "$tmp/root" --numeric-owner -cf "$out.part" .
mv "$out.part" "$out"
echo "arm64 $suite root: $out ($(du -h "$out" | cut -f1), $(($(date +%s) - start)) s)" >&2
