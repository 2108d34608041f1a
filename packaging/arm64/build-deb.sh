#!/bin/bash
# make deb ARCH=arm64 on an x86 machine: build edgefleet-agent_VERSION_arm64.deb for Raspberry
# Pi OS Bookworm 64-bit in an emulated Debian bookworm arm64 root.
#
#   packaging/arm64/build-deb.sh [--out DIR] [packaging/deb/build.py options]...
#
# The same packaging/deb/build.py as the native package (same unit, user, conffiles and
# maintainer scripts), run by the root's own python3 (3.11), so the venv holds the aarch64
# wheels of requirements/agent.txt, hash-checked. A fresh copy of the base root
# (ARM64_BASE, built once by build-root.sh) is extracted for every build and removed after.
# The project's files are copied in; pip's downloads are cached in ARM64_PIP_CACHE between
# builds (hashes are checked all the same). Prints the .deb's path on the last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
base=${ARM64_BASE:-$repo/build/arm64/bookworm-base.tar}
cache=${ARM64_PIP_CACHE:-$repo/build/arm64/pip-cache}
cpu=${ARM64_BUILD_CPU:-cortex-a72}

out=dist
args=()
while [ $# -gt 0 ]; do
    case $1 in
    --out) out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    *) args+=("$1"); shift ;;
    esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)

"$here/binfmt.sh"
[ -f "$base" ] || "$here/build-root.sh" "$base"

work=$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-arm64-build.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT
root=$work/root
mkdir "$root"
tar -C "$root" -xf "$base"
mkdir -p "$root/src"
# What build.py reads: the project's sources, the lock, the unit, the example config, docs.
for p in pyproject.toml README.md common protocol inference agent controller requirements \
    systemd docs packaging/deb packaging/agent.example.toml; do
    mkdir -p "$root/src/$(dirname "$p")"
    cp -a "$repo/$p" "$root/src/$p"
done
find "$root/src" -name __pycache__ -prune -exec rm -rf {} +
start=$(date +%s)
"$here/run-in-root.sh" "$root" "$cpu" --bind "$out:/out" --bind "$cache:/root/.cache/pip" -- \
    sh -c 'cd /src && exec python3 packaging/deb/build.py --out /out "$@"' build \
    "${args[@]}" >"$work/build.out"
deb=$(tail -n 1 "$work/build.out")
echo "built in the emulated arm64 root in $(($(date +%s) - start)) s" >&2
echo "$out/${deb#/out/}"
