"""Debian's kernel booted by trapless (PVH, bt) and by QEMU's TCG (the `pc` machine,
which boots an ELF vmlinux through its PVH note), side by side: wall time from the start
of each process to milestones in the console stream.

QEMU 7.2's `microvm` machine stalls under TCG on this kernel right after "tsc: Marking
TSC unstable due to could not calculate TSC khz" (measured: nothing more in 120 s), so
the `pc` machine is the reference; it has more to probe (PCI, the 8042, a UART console
written a byte per port access) where trapless's guest has hvc0 and no legacy devices.

    python -m hypervisor.compare_linux [--dir build/linux] [--runs N]   (make compare-linux)

Milestones: the kernel's banner, `Run /init as init process`, the /init's own line, and
the process's end (the guest powered off, or stopped). A milestone a run never reached
is shown as such; the ratio trapless/QEMU is given only for milestones both reached.
QEMU (qemu-system-x86_64) must be installed; the command says so in one line if not.
"""
from __future__ import annotations

import argparse
import os
import resource
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .engines import bt_library_note

MILESTONES = (("banner", b"Linux version "),
              ("run /init", b"Run /init as init process"),
              ("/init", b"trapless: /init of a busybox initramfs"))
MEMORY_MIB = 256


def timed_run(argv: list[str], timeout: float) -> tuple[dict[str, float], float, int, bytes,
                                                        tuple[float, float]]:
    """Run argv; seconds to each milestone, to the end, the exit status, the output, and
    the process's CPU time (user, sys; the runs go one at a time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    out, seen = bytearray(), {}
    fd = proc.stdout.fileno()
    while True:
        left = timeout - (time.monotonic() - start)
        if left <= 0:
            proc.kill()
            break
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
        now = time.monotonic() - start
        for name, text in MILESTONES:
            if name not in seen and text in out:
                seen[name] = now
    status = proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
    return seen, time.monotonic() - start, status, bytes(out), cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hypervisor.compare_linux", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("build/linux"),
                   help="vmlinux and initramfs.cpio (make linux-guest)")
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args(argv)
    vmlinux, initrd = args.dir / "vmlinux", args.dir / "initramfs.cpio"
    if not vmlinux.is_file() or not initrd.is_file():
        print(f"compare-linux: no {vmlinux} and {initrd}: run `make linux-guest`", file=sys.stderr)
        return 2
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("compare-linux: qemu-system-x86_64 is not installed "
              "(apt-get install qemu-system-x86)", file=sys.stderr)
        return 2
    runs = {
        "trapless (bt)": [sys.executable, "-m", "hypervisor", "run", str(vmlinux), "--type", "pvh",
                          "--engine", "bt", "--memory", str(MEMORY_MIB), "--ramdisk", str(initrd),
                          "--cmdline", "console=hvc0"],
        "QEMU TCG": [qemu, "-M", "pc", "-accel", "tcg", "-m", str(MEMORY_MIB), "-kernel",
                     str(vmlinux), "-initrd", str(initrd), "-append", "console=ttyS0",
                     "-nographic", "-no-reboot"],
    }
    print(bt_library_note())
    results = {name: timed_run(cmd, args.timeout) for name, cmd in runs.items()}
    names = list(runs)
    print(f"{'milestone':<14}" + "".join(f"{n:>18}" for n in names) + f"{'ratio':>10}")
    for milestone, _ in MILESTONES + (("end", None),):
        cells, values = [], []
        for n in names:
            seen, total, status, _, _ = results[n]
            value = total if milestone == "end" else seen.get(milestone)
            values.append(value)
            cells.append(f"{value:>17.2f}s" if value is not None else f"{'not reached':>18}")
        ratio = (f"{values[0] / values[1]:>9.2f}x" if None not in values and
                 (milestone != "end" or all(results[n][2] == 0 for n in names)) else f"{'-':>10}")
        print(f"{milestone:<14}" + "".join(cells) + ratio)
    for n in names:
        seen, total, status, out, (user, sys_) = results[n]
        tail = out.decode(errors="replace").strip().splitlines()[-1:] or [""]
        print(f"{n}: exit status {status}; CPU {user:.2f} s user + {sys_:.2f} s sys; "
              f"last line: {tail[0][:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
