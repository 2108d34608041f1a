"""Run in the arm64 root: check that qemu emulates the named core, not its default ``max``.

    python3 hwcaps.py cortex-a72|cortex-a76

Reads AT_HWCAP/AT_HWCAP2 from /proc/self/auxv (qemu-user fills them from the CPU model).
Exit 1 when the CPU has SVE or SME (qemu's ``max``: the INT8 model then detects nothing
under qemu 7.2) or its features do not match the named core (cortex-a76 has atomics and
asimddp, cortex-a72 neither). Standard library only: it runs on the root's python3.
"""

from __future__ import annotations

import sys

AT_HWCAP, AT_HWCAP2 = 16, 26
HWCAP_ATOMICS, HWCAP_ASIMDDP, HWCAP_SVE = 1 << 8, 1 << 20, 1 << 22
HWCAP2_SME = 1 << 23
CORES = ("cortex-a72", "cortex-a76")


def hwcaps(auxv: bytes) -> tuple[int, int]:
    """(AT_HWCAP, AT_HWCAP2) of a 64-bit little-endian auxiliary vector."""
    words = [int.from_bytes(auxv[i : i + 8], "little") for i in range(0, len(auxv) - 7, 8)]
    caps = dict(zip(words[::2], words[1::2], strict=False))
    return caps.get(AT_HWCAP, 0), caps.get(AT_HWCAP2, 0)


def problem(cpu: str, hwcap: int, hwcap2: int) -> str | None:
    """Why these capabilities are not those of ``cpu`` (None when they are)."""
    if cpu not in CORES:
        return f"unknown core {cpu!r}: use one of {', '.join(CORES)}"
    if hwcap & HWCAP_SVE or hwcap2 & HWCAP2_SME:
        return "SVE/SME present: qemu runs its default 'max' model; set QEMU_CPU to a core"
    a76 = bool(hwcap & HWCAP_ATOMICS) and bool(hwcap & HWCAP_ASIMDDP)
    if a76 != (cpu == "cortex-a76"):
        return f"hwcap {hwcap:#x} is not {cpu}'s (QEMU_CPU names another core?)"
    return None


def main(cpu: str) -> int:
    with open("/proc/self/auxv", "rb") as f:
        hwcap, hwcap2 = hwcaps(f.read())
    print(f"{cpu}: hwcap={hwcap:#x} hwcap2={hwcap2:#x}")
    why = problem(cpu, hwcap, hwcap2)
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
