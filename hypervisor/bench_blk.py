"""Sequential disk I/O through Xen's block device against the host on the same file.

The guest (guest_kernel/blkfront.py, bench mode) reads the whole image, then writes it,
in 128 KiB indirect requests (as Linux's blkfront sends them), and flushes; it times
each part with its own PV clock and prints "bench: read done in N ns" (when the host
sees a console line says little: under load two lines can come in one chunk). The
host then does the same on the same file, as dd would: 128 KiB preads into one buffer
(the page cache as warm as the guest had it), 128 KiB pwrites and one fdatasync. Each
side runs three times, one after the other, and keeps its best time (the machine is
shared). The ratios are guest time / host time.

Each run is also reported on its own, the guest's against the host's right after it,
with what the backend's thread (blkback.c, named "blkback") did meanwhile: its CPU time
and how long it waited, runnable, for a core (/proc's schedstat). On a shared host that
wait is where a slow run's time went.
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


def _backend_threads() -> dict[str, tuple[int, int]]:
    """Each blkback thread of this process: (ns on a CPU, ns runnable and waiting for one)."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != "blkback":
                    continue
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                on_cpu, waiting, _ = (int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue                    # gone meanwhile, or no schedstats in this kernel
        out[tid] = (on_cpu, waiting)
    return out


def _guest_run(image: str, engine: str | None) -> dict:
    """One run of the bench guest: its read and write times (its own clock), the engine,
    and the backend's thread over the run: CPU seconds and seconds waiting for a core
    (None where /proc does not say)."""
    with Domain(blkfront_guest(bench=True), memory_mib=32, engine=engine, domid=1,
                name="bench-blk", disks=[parse_disk(f"{image},raw,xvda")]) as dom:
        before = _backend_threads()
        stop = dom.run(timeout=600)
        after = _backend_threads()      # before destroy: the thread ends with the domain
        engine_used = dom.engine
        text = dom.console_output.decode(errors="replace")
    times = {what: int(ns) / 1e9 for what, ns in DONE.findall(text)}
    if (stop.kind, stop.shutdown_name) != ("shutdown", "poweroff") or len(times) != 2:
        raise RuntimeError(f"the bench guest stopped early ({stop.kind}): {text!r}")
    run = dict(times, engine=engine_used, backend_cpu_s=None, backend_wait_s=None)
    if after:
        run["backend_cpu_s"] = sum(a[0] - before.get(t, (0, 0))[0] for t, a in after.items()) / 1e9
        run["backend_wait_s"] = sum(a[1] - before.get(t, (0, 0))[1] for t, a in after.items()) / 1e9
    return run


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
            # on the disk before the first run: else its write-back goes on under the
            # first guest's writes (the host's come after) and slows them alone
            f.flush()
            os.fsync(f.fileno())
        guest = {"read": float("inf"), "write": float("inf")}
        host = dict(guest)
        each = []
        for _ in range(runs):
            g = _guest_run(image, engine)
            h = _host_times(image)
            for what in guest:
                guest[what] = min(guest[what], g[what])
                host[what] = min(host[what], h[what])
            each.append({"guest_read_s": round(g["read"], 4), "host_read_s": round(h["read"], 4),
                         "read_ratio": round(g["read"] / h["read"], 2),
                         "guest_write_s": round(g["write"], 4), "host_write_s": round(h["write"], 4),
                         "write_ratio": round(g["write"] / h["write"], 2),
                         "backend_cpu_s": g["backend_cpu_s"], "backend_wait_s": g["backend_wait_s"]})
    out = {"engine": g["engine"], "mib": mib, "request_kib": CHUNK // 1024, "runs": runs}
    for what in ("read", "write"):
        out[f"guest_{what}_s"] = round(guest[what], 4)
        out[f"host_{what}_s"] = round(host[what], 4)
        out[f"{what}_ratio"] = round(guest[what] / host[what], 2)
        out[f"guest_{what}_mib_s"] = round(mib / guest[what], 1)
    out["each_run"] = each
    return out


def table(result: dict):
    from rich.console import Group
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
    each = result.get("each_run", [])
    if not each:
        return t
    runs = Table(title="each run: the guest, then the host on the same file")
    for col in ("run", "read g/h s", "ratio", "write g/h s", "ratio", "bk CPU s", "bk wait s"):
        runs.add_column(col, justify="right", no_wrap=True)
    seconds = lambda x: "?" if x is None else f"{x:.4f}"
    for i, r in enumerate(each, 1):
        runs.add_row(str(i), f"{r['guest_read_s']:.4f}/{r['host_read_s']:.4f}", f"{r['read_ratio']:.2f}",
                     f"{r['guest_write_s']:.4f}/{r['host_write_s']:.4f}", f"{r['write_ratio']:.2f}",
                     seconds(r["backend_cpu_s"]), seconds(r["backend_wait_s"]))
    runs.caption = ("g/h: guest/host; bk: the blkback thread's CPU time, and its time "
                    "runnable waiting for a core. " +
                    "; ".join(f"{what} ratio <= 1.25 in {sum(r[f'{what}_ratio'] <= 1.25 for r in each)}"
                              f" of {len(each)} runs" for what in ("read", "write")))
    return Group(t, runs)


if __name__ == "__main__":
    import sys
    from rich.console import Console
    engines = sys.argv[1:] or [None]
    for engine in engines:
        Console().print(table(measure(engine)))
