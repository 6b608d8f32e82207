"""Sequential disk I/O through Xen's block device against the host on the same file.

The guest (guest_kernel/blkfront.py, bench mode) reads the whole image, then writes it,
in 128 KiB indirect requests (as Linux's blkfront sends them), and flushes; it times
each part with its own PV clock and prints "bench: read done in N ns" (when the host
sees a console line says little: under load two lines can come in one chunk). The
host then does the same on the same file, as dd would: 128 KiB preads into one buffer
(the page cache as warm as the guest had it), 128 KiB pwrites and one fdatasync. Each
side runs three times, one after the other, and keeps its best time (the machine is
shared). The ratios are guest time / host time.
"""
from __future__ import annotations

import os
import re
import tempfile
import time

from guest_kernel.blkfront import BENCH_SEGS, blkfront_guest

from .config import parse_disk
from .domain import Domain

CHUNK = BENCH_SEGS * 4096
DONE = re.compile(r"^bench: (read|write) done in (\d+) ns$", re.M)


def _guest_times(image: str, engine: str | None) -> tuple[dict[str, float], str]:
    with Domain(blkfront_guest(bench=True), memory_mib=32, engine=engine, domid=1,
                name="bench-blk", disks=[parse_disk(f"{image},raw,xvda")]) as dom:
        stop = dom.run(timeout=600)
        engine_used = dom.engine
        text = dom.console_output.decode(errors="replace")
    times = {what: int(ns) / 1e9 for what, ns in DONE.findall(text)}
    if (stop.kind, stop.shutdown_name) != ("shutdown", "poweroff") or len(times) != 2:
        raise RuntimeError(f"the bench guest stopped early ({stop.kind}): {text!r}")
    return times, engine_used


def _host_times(image: str) -> dict[str, float]:
    """What the host itself does on the file, as dd with 128 KiB blocks would: reads
    into one buffer, writes from one buffer, then fdatasync."""
    fd = os.open(image, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        buf = bytearray(CHUNK)
        t = time.monotonic()
        for off in range(0, size, CHUNK):
            os.preadv(fd, [buf], off)
        read = time.monotonic() - t
        data = os.urandom(CHUNK)
        t = time.monotonic()
        for off in range(0, size, CHUNK):
            os.pwrite(fd, data, off)
        os.fdatasync(fd)
        write = time.monotonic() - t
    finally:
        os.close(fd)
    return {"read": read, "write": write}


def measure(engine: str | None = None, mib: int = 256, runs: int = 3) -> dict:
    """The best of `runs` guest runs against the best of as many host runs, one after
    the other (the machine is shared: the best run is the one least disturbed)."""
    with tempfile.TemporaryDirectory(prefix="trapless-bench-blk-") as d:
        image = os.path.join(d, "disk.img")
        with open(image, "wb") as f:
            for _ in range(mib * (1 << 20) // CHUNK):
                f.write(os.urandom(CHUNK))
        guest = {"read": float("inf"), "write": float("inf")}
        host = dict(guest)
        for _ in range(runs):
            g, engine_used = _guest_times(image, engine)
            h = _host_times(image)
            for what in guest:
                guest[what] = min(guest[what], g[what])
                host[what] = min(host[what], h[what])
    out = {"engine": engine_used, "mib": mib, "request_kib": CHUNK // 1024, "runs": runs}
    for what in ("read", "write"):
        out[f"guest_{what}_s"] = round(guest[what], 4)
        out[f"host_{what}_s"] = round(host[what], 4)
        out[f"{what}_ratio"] = round(guest[what] / host[what], 2)
        out[f"guest_{what}_mib_s"] = round(mib / guest[what], 1)
    return out


def table(result: dict):
    from rich.table import Table
    t = Table(title=f"sequential I/O on a {result['mib']} MiB raw image, "
                    f"{result['request_kib']} KiB requests ({result['engine']}, "
                    f"best of {result['runs']})")
    for col in ("what", "guest s (blkfront)", "host s", "guest / host", "guest MiB/s"):
        t.add_column(col, justify="right" if col != "what" else "left")
    for what in ("read", "write"):
        t.add_row(what + (" + fdatasync" if what == "write" else ""),
                  f"{result[f'guest_{what}_s']:.4f}", f"{result[f'host_{what}_s']:.4f}",
                  f"{result[f'{what}_ratio']:.2f}", f"{result[f'guest_{what}_mib_s']:.1f}")
    return t


if __name__ == "__main__":
    import sys
    from rich.console import Console
    engines = sys.argv[1:] or [None]
    for engine in engines:
        Console().print(table(measure(engine)))
