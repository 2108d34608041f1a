#!/bin/bash
# make test-arm64: the arm64 package, built and checked under emulation (docs/operations.md).
#
#   packaging/arm64/test-arm64.sh X86_AGENT
#
# 1. builds edgefleet-agent_VERSION_arm64.deb (make deb ARCH=arm64, into build/arm64/dist),
# 2. installs it with dpkg into a fresh Debian bookworm arm64 root: the system user, the
#    enabled unit and the conffile are checked,
# 3. for the Raspberry Pi 4 and 5 cores (QEMU_CPU cortex-a72, cortex-a76, each with its ARM
#    /proc/cpuinfo): check-config, then infer on the video the package ships, compared with
#    X86_AGENT's output of the same video (compare_infer.py: same frames with a face, scores
#    within 0.03, boxes within 0.02),
# 4. runs `edgefleet-agent run` as the edgefleet user against a Mosquitto this script starts
#    on a free loopback port of the host, and checks that detections with a face arrive,
# 5. purges the package and checks that nothing of it is left.
# Needs root, binfmt_misc, qemu-user-static, debootstrap, mosquitto and mosquitto_sub.
set -euo pipefail

x86_agent=${1:?usage: test-arm64.sh X86_AGENT (x86 edgefleet-agent: the reference)}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
base=${ARM64_BASE:-$repo/build/arm64/bookworm-base.tar}
dist=$repo/build/arm64/dist
t0=$(date +%s)
step() { echo "== [$(($(date +%s) - t0)) s] $*" >&2; }
fail() { echo "FAIL: $*" >&2; exit 1; }
for tool in mosquitto mosquitto_sub debootstrap dpkg-deb; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || fail "$tool is not installed"
done
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)

work=$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-test-arm64.XXXXXX")
broker_pid=
cleanup() {
    [ -z "$broker_pid" ] || kill "$broker_pid" 2>/dev/null || true
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

"$here/binfmt.sh"
[ -f "$base" ] || { step "building the base arm64 root (once)"; "$here/build-root.sh" "$base"; }

step "building the arm64 package"
rm -rf "$dist"
# Through the documented command (make deb ARCH=arm64 runs build-deb.sh; the last --out wins).
deb=$(make --no-print-directory -C "$repo" deb ARCH=arm64 "DEB_ARGS=--out $dist" | tail -n 1)
[ -f "$deb" ] || fail "build-deb.sh made no package"
case $deb in *_arm64.deb) ;; *) fail "$deb is not an arm64 package" ;; esac
[ "$(dpkg-deb -f "$deb" Architecture)" = arm64 ] || fail "$deb: Architecture is not arm64"
size=$(stat -c %s "$deb")
echo "package: $(basename "$deb"), $((size / 1024)) KiB, Installed-Size" \
    "$(dpkg-deb -f "$deb" Installed-Size) KiB" >&2

step "installing it into a fresh arm64 root"
root=$work/root
mkdir "$root"
tar -C "$root" -xf "$base"
cp "$deb" "$root/tmp/edgefleet-agent.deb"
inroot() { local cpu=$1; shift; "$here/run-in-root.sh" "$root" "$cpu" -- "$@"; }
inroot cortex-a72 dpkg -i /tmp/edgefleet-agent.deb >&2
inroot cortex-a72 getent passwd edgefleet >/dev/null || fail "no edgefleet user after install"
[ -L "$root/etc/systemd/system/multi-user.target.wants/edgefleet-agent.service" ] \
    || fail "the unit was not enabled"
[ -f "$root/lib/systemd/system/edgefleet-agent.service" ] || fail "no unit file"
inroot cortex-a72 dpkg-query -W -f='${Conffiles}\n' edgefleet-agent | grep -q /etc/edgefleet/agent.toml \
    || fail "/etc/edgefleet/agent.toml is not a conffile"
[ "$(inroot cortex-a72 stat -c '%U:%G %a' /var/lib/edgefleet)" = "edgefleet:edgefleet 750" ] \
    || fail "/var/lib/edgefleet is not edgefleet's (0750)"

site=$(inroot cortex-a72 sh -c 'echo /opt/edgefleet/lib/python3*/site-packages')
video=$site/inference/assets/face-walk-640x480.mp4
[ -f "$root$video" ] || fail "the package does not ship $video"

step "x86 reference: $x86_agent infer"
(cd "$work" && "$x86_agent" infer -m builtin:blazeface-short-int8 --no-progress \
    --jsonl "$work/x86.jsonl" "$root$video") >&2

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$root/etc/edgefleet/test-arm64.toml" <<TOML
device_id = "cam-arm64"
state_dir = "/var/lib/edgefleet"
[broker]
url = "mqtt://127.0.0.1:$port"
[[streams]]
name = "front"
source = "$video"
model = "builtin:blazeface-short-int8"
realtime = false
loop = true
TOML
inroot cortex-a72 sh -c 'chown root:edgefleet /etc/edgefleet/test-arm64.toml &&
    chmod 640 /etc/edgefleet/test-arm64.toml'

results=()
for cpu in cortex-a72 cortex-a76; do
    step "$cpu: check-config and infer"
    inroot "$cpu" runuser -u edgefleet -- edgefleet-agent check-config \
        /etc/edgefleet/test-arm64.toml >&2
    cp "$here/hwcaps.py" "$root/tmp/hwcaps.py"
    inroot "$cpu" python3 /tmp/hwcaps.py "$cpu" >&2 || fail "$cpu: QEMU_CPU is not in effect"
    s=$(date +%s)
    inroot "$cpu" sh -c "cd /tmp && edgefleet-agent infer -m builtin:blazeface-short-int8 \
        --no-progress --jsonl /tmp/$cpu.jsonl $video" >&2
    echo "$cpu: infer took $(($(date +%s) - s)) s (emulated)" >&2
    summary=$(python3 "$here/compare_infer.py" --label "$cpu" "$work/x86.jsonl" \
        "$root/tmp/$cpu.jsonl") || fail "$cpu output differs from x86: $summary"
    results+=("$summary")
done

step "edgefleet-agent run against a Mosquitto on the host (port $port)"
cat >"$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence false
CONF
"$mosquitto" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
broker_pid=$!
for _ in $(seq 50); do
    mosquitto_sub -p "$port" -t '$SYS/#' -C 1 -W 1 >/dev/null 2>&1 && break
    sleep 0.2
done
mosquitto_sub -p "$port" -v -t 'edgefleet/v1/cam-arm64/detections/#' -C 20 -W 240 \
    >"$work/detections.txt" 2>&1 &
sub_pid=$!
inroot cortex-a72 runuser -u edgefleet -- edgefleet-agent run -c /etc/edgefleet/test-arm64.toml \
    >"$work/agent.log" 2>&1 &
agent_pid=$!
wait "$sub_pid" || true
kill -TERM "$agent_pid" 2>/dev/null || true
# SIGTERM reaches unshare, not the agent: stop the agent itself, found by its config path.
for p in $(pgrep -f 'edgefleet-agent run -c /etc/edgefleet/test-arm64.toml' || true); do
    [ "$(readlink "/proc/$p/root")" = "$root" ] && kill -TERM "$p" 2>/dev/null || true
done
wait "$agent_pid" || true
got=$(grep -c '"face"' "$work/detections.txt" || true)
echo "detections received: $(wc -l <"$work/detections.txt") messages, $got with a face" >&2
[ "$got" -gt 0 ] || { tail -n 20 "$work/agent.log" >&2; fail "no detection with a face arrived"; }
kill "$broker_pid" 2>/dev/null || true
wait "$broker_pid" 2>/dev/null || true
broker_pid=

step "purging the package"
rm -f "$root/etc/edgefleet/test-arm64.toml"
inroot cortex-a72 dpkg -P edgefleet-agent >&2
for p in /opt/edgefleet /etc/edgefleet /var/lib/edgefleet /usr/bin/edgefleet-agent \
    /lib/systemd/system/edgefleet-agent.service \
    /etc/systemd/system/multi-user.target.wants/edgefleet-agent.service; do
    [ ! -e "$root$p" ] && [ ! -L "$root$p" ] || fail "$p is left after purge"
done
! inroot cortex-a72 getent passwd edgefleet >/dev/null || fail "the edgefleet user is left"
! inroot cortex-a72 dpkg-query -W edgefleet-agent >/dev/null 2>&1 || fail "dpkg still lists it"

step "passed"
echo "package $(basename "$deb"): $((size / 1024)) KiB"
for r in "${results[@]}"; do echo "x86 vs arm64 $r"; done
echo "make test-arm64 took $(($(date +%s) - t0)) s (emulated)"
