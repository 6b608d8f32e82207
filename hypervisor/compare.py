"""`python -m hypervisor compare`: every workload as a PV guest and as a native guest, on
every engine this host can run; exits by reason, wall time and native/pv ratios.

Every number comes from the C counters (exits by reason) and from hv_vcpu_run's own
clock (wall time inside the vCPU loop, boot included). Each pair of runs must produce
the same result: the same report line (left by the guest in its `report` buffer) and
the same console stream; the command fails (status 1) if they differ.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.table import Table

from guest_kernel import compare_workloads as cw

from . import engines
from .domain import Domain
from .errors import TraplessError
from .image import load_image

MEMORY_MIB = 64
TABLE_WIDTH = 132
RUN_TIMEOUT_S = 600
# Small sizes: a whole comparison in a few seconds (tests, a quick look).
QUICK_SIZES = {"console": 4096, "ticks": 50, "page_tables": 512, "clock": 200, "compute": 2000}


@dataclass
class RunRecord:
    """One workload run by one kind of guest on one engine (one JSON record)."""
    workload: str
    guest: str
    engine: str
    size: int
    exits: int
    exits_by_reason: dict[str, int]
    wall_ns: int
    report: str
    console_bytes: int
    console_sha256: str
    devices: dict | None = field(default=None)

    def same_output(self, other: "RunRecord") -> bool:
        return (self.report, self.console_sha256) == (other.report, other.console_sha256)


def run_workload(workload: str, guest: str, engine: str | None = None,
                 size: int | None = None) -> RunRecord:
    """Build and run one workload guest to its power-off; TraplessError if it fails."""
    w = cw.WORKLOADS[workload]
    size = w.size if size is None else size
    image = cw.build(workload, guest, size)
    report_at = load_image(image, MEMORY_MIB << 20).symbols["report"]
    with Domain(image, memory_mib=MEMORY_MIB, engine=engine, native=guest == "native",
                name=f"{workload}-{guest}") as dom:
        stop = dom.run(timeout=RUN_TIMEOUT_S)
        if (stop.kind, stop.reason) != ("shutdown", 0):
            raise TraplessError(f"{workload} ({guest} guest, {dom.engine}) did not power off: "
                                f"{stop.kind}: {stop.message}")
        counters = dom.counters()
        report = dom.read_guest(report_at, cw.REPORT_SIZE).split(b"\0")[0].decode()
        console = bytes(dom.console_output)
        return RunRecord(workload, guest, dom.engine, size, counters.total_exits,
                         dict(counters.exits), stop.elapsed_ns, report, len(console),
                         hashlib.sha256(console).hexdigest(), dom.device_stats())


def run_all(workloads: list[str], engine_names: list[str], sizes: dict[str, int] | None = None,
            progress=None) -> list[RunRecord]:
    records = []
    for workload in workloads:
        for engine in engine_names:
            for guest in cw.GUESTS:
                if progress:
                    progress(f"{workload}: {guest} guest on {engine}")
                records.append(run_workload(workload, guest, engine, (sizes or {}).get(workload)))
    return records


def _ratio(native: float, pv: float) -> str:
    if not pv:
        return "n/a"
    x = native / pv
    return f"{x:,.0f}×" if x >= 100 else f"{x:.2f}×"


def _by_reason(r: RunRecord) -> str:
    return " · ".join(f"{name.replace('_', ' ')} {n:,}" for name, n in r.exits_by_reason.items()
                      if n) or "none"


def table(records: list[RunRecord]) -> Table:
    t = Table(title="PV vs native guests: exits to the VMM and wall time",
              caption="exits: from the C counters, by reason · wall: time inside the vCPU loop, "
                      "boot included\n×exits, ×time: native / pv on the same engine · same: both "
                      "guests left the same result")
    for col, right in (("workload", False), ("engine", False), ("guest", False),
                       ("exits by reason", False), ("exits", True), ("wall ms", True),
                       ("×exits", True), ("×time", True), ("same", False)):
        t.add_column(col, justify="right" if right else "left", no_wrap=col != "exits by reason")
    pairs = {(r.workload, r.engine, r.guest): r for r in records}
    shown = set()
    for r in records:
        w = cw.WORKLOADS[r.workload]
        first = r.workload not in shown
        if first and shown:
            t.add_section()
        shown.add(r.workload)
        pv = pairs.get((r.workload, r.engine, "pv"))
        extra = ["", "", ""]
        if r.guest == "native" and pv:
            extra = [_ratio(r.exits, pv.exits), _ratio(r.wall_ns, pv.wall_ns),
                     "yes" if r.same_output(pv) else "[bold red]NO[/]"]
        t.add_row(f"{r.workload}\n{r.size:,} {w.unit}" if first else "", r.engine, r.guest,
                  _by_reason(r), f"{r.exits:,}", f"{r.wall_ns / 1e6:,.1f}", *extra,
                  style="bold" if r.guest == "native" else None)
    return t


def mismatches(records: list[RunRecord]) -> list[str]:
    pairs = {(r.workload, r.engine, r.guest): r for r in records}
    bad = []
    for r in records:
        pv = pairs.get((r.workload, r.engine, "pv"))
        if r.guest == "native" and pv and not r.same_output(pv):
            bad.append(f"{r.workload} on {r.engine}: pv reported {pv.report!r}, "
                       f"native {r.report!r} (console {pv.console_bytes} vs {r.console_bytes} bytes)")
    return bad


def main(args) -> int:
    names = [args.engine] if args.engine else engines.available()
    if not names:
        raise TraplessError("no engine can run here: " + "; ".join(
            f"{n}: {engines.why_unavailable(n)}" for n in engines.ENGINES))
    for name in names:
        engines.choose(name)                    # a one-line error if it cannot run
    workloads = args.workload or list(cw.WORKLOADS)
    sizes = QUICK_SIZES if args.quick else None
    # Wide enough for the table even when stdout is a pipe (rich would assume 80).
    out = Console(file=sys.stdout, width=max(TABLE_WIDTH, shutil.get_terminal_size().columns))
    status = Console(file=sys.stderr)
    with status.status("starting") as spinner:
        records = run_all(workloads, names, sizes,
                          progress=lambda what: spinner.update(f"running {what}"))
    out.print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=1)
            f.write("\n")
    bad = mismatches(records)
    for line in bad:
        print(f"trapless: results differ: {line}", file=sys.stderr)
    return 1 if bad else 0
