"""`python -m hypervisor bench`: our hypercall round trip vs the bare exit round trip.

Two guests, one process, one C run loop: a guest calling xen_version(XENVER_version)
N times and a guest doing `out` to an unclaimed port N times. Rounds alternate so
both see the same machine; the median round of each is reported.
"""
from __future__ import annotations

import json
import statistics
import sys

from rich.console import Console
from rich.table import Table

from guest_kernel import workloads

from .domain import Domain
from .errors import TraplessError

ROUNDS = 5


def time_guest(image: bytes, iterations: int, engine: str | None) -> float:
    """ns per iteration of one run of `image` (whole run, boot included)."""
    with Domain(image, memory_mib=16, engine=engine) as dom:
        stop = dom.run(timeout=120)
        if stop.kind != "shutdown" or stop.reason != 0:
            raise TraplessError(f"benchmark guest did not power off: {stop.kind} {stop.message}")
        return stop.elapsed_ns / iterations


def measure(iterations: int = 100_000, engine: str | None = None, rounds: int = ROUNDS) -> dict:
    hyper_img = workloads.hypercall_loop(iterations)
    bare_img = workloads.bare_exit_loop(iterations)
    hyper, bare = [], []
    for _ in range(rounds):
        hyper.append(time_guest(hyper_img, iterations, engine))
        bare.append(time_guest(bare_img, iterations, engine))
    h, b = statistics.median(hyper), statistics.median(bare)
    return {"hypercall_ns": round(h, 1), "bare_exit_ns": round(b, 1), "ratio": round(h / b, 3),
            "iterations": iterations, "rounds": rounds}


def main(args) -> int:
    result = measure(args.iterations, args.engine)
    if args.json:
        print(json.dumps(result))
        return 0
    table = Table(title=f"hypercall round trip vs bare exit ({result['iterations']:,} each, "
                        f"median of {result['rounds']} rounds)")
    table.add_column("what")
    table.add_column("ns per round trip", justify="right")
    table.add_row("xen_version(XENVER_version) hypercall", f"{result['hypercall_ns']:.1f}")
    table.add_row("bare exit (out to an unclaimed port)", f"{result['bare_exit_ns']:.1f}")
    table.add_row("ratio hypercall / bare exit", f"{result['ratio']:.3f}", style="bold")
    Console(file=sys.stdout).print(table)
    return 0
