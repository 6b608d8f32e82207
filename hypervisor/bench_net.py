"""Ping round trip between two domains on one software bridge, in bare exits.

Two PV kernels with netfront (guest_kernel/netfront.py) in `quiet` mode: one answers,
the other sends PINGS echo requests one after the other, each waiting for its reply, and
times the whole loop with its PV clock ("netfront: N round trips in T ns"). A round trip
is: the pinger's tx request, netback's thread copying the frame into the bridge, the
responder's thread copying it into a posted rx page, the responder seeing it (it polls,
yielding), turning it around and sending it back the same way. The bare exit (`out` to
an unclaimed port, hypervisor/bench.py) is measured in the same process on the same
engine; exits are both domains' for the whole run, over the pings.
"""
from __future__ import annotations

import re
import statistics
import sys

from guest_kernel import workloads
from guest_kernel.pv_kernel import build_pv_kernel

from .bench import time_guest
from .config import parse_vif
from .domain import Domain
from .errors import TraplessError

PINGS = 2000
BARE_EXITS = 100_000
RESULT = re.compile(r"netfront: (\d+) round trips in (\d+) ns")


def measure(engine: str | None = None, pings: int = PINGS) -> dict:
    kernel = build_pv_kernel()
    bridge = "bench-net"
    answer = Domain(kernel, memory_mib=32, engine=engine, domid=2, name="bench-answer",
                    cmdline="netfront quiet ip=10.9.0.2",
                    vifs=[parse_vif(f"mac=00:16:3e:09:00:02, bridge={bridge}", 0)])
    try:
        answer.start()
        with Domain(kernel, memory_mib=32, engine=engine, domid=1, name="bench-ping",
                    cmdline=f"netfront quiet ip=10.9.0.1 peer=10.9.0.2 pings={pings}",
                    vifs=[parse_vif(f"mac=00:16:3e:09:00:01, bridge={bridge}", 0)]) as ping:
            stop = ping.run(timeout=600)
            text = ping.console_output.decode(errors="replace")
            exits = ping.counters().total_exits
            engine_used = ping.engine
        exits += answer.counters().total_exits
    finally:
        answer.destroy()
    m = RESULT.search(text)
    if (stop.kind, stop.shutdown_name) != ("shutdown", "poweroff") or not m or \
            f"{pings} sent, {pings} received" not in text:
        raise TraplessError(f"the pinging guest did not finish ({stop.kind}): {text!r}")
    rtt_ns = int(m.group(2)) / int(m.group(1))
    bare = statistics.median(time_guest(workloads.bare_exit_loop(BARE_EXITS), BARE_EXITS,
                                        engine) for _ in range(3))
    return {"engine": engine_used, "pings": pings, "rtt_us": round(rtt_ns / 1000, 2),
            "bare_exit_ns": round(bare, 1), "rtt_x_bare_exit": round(rtt_ns / bare, 1),
            "exits_per_ping": round(exits / pings, 1)}


def table(results: list[dict]):
    from rich.table import Table
    t = Table(title="ping round trip between two domains on one bridge (netfront <-> "
                    "netback <-> bridge)")
    for col in ("engine", "pings", "round trip µs", "bare exit ns", "round trip / bare exit",
                "exits per ping (both domains)"):
        t.add_column(col, justify="right" if col != "engine" else "left")
    for r in results:
        t.add_row(r["engine"], str(r["pings"]), f"{r['rtt_us']:.2f}", f"{r['bare_exit_ns']:.1f}",
                  f"{r['rtt_x_bare_exit']:.1f}", f"{r['exits_per_ping']:.1f}")
    return t


if __name__ == "__main__":
    from rich.console import Console
    Console().print(table([measure(e) for e in (sys.argv[1:] or [None])]))
