"""Conformance fixtures and the report.

`run_cases(image)` runs a ConformanceGuest and hands back its results. Every equality
check a test makes on a case result (`assert run["case"] == -C.XEN_EFAULT`) is also
recorded — hypercall, sub-op, engine, case, expected, actual, status — so
`make conformance` can print the hypercall x sub-op x engine table and write the JSON
report (`--conformance-json PATH`).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from abi import C, HYPERCALL_NAMES
from guest_kernel.conformance import parse

RECORDS: list["Record"] = []
ENOSYS = -C.XEN_ENOSYS


@dataclass
class Record:
    hypercall: str
    subop: str
    engine: str
    case: str
    status: str            # passed, failed, not implemented
    expected: int
    actual: int


def implemented(hypercall: str) -> bool:
    from hypervisor._hv import lib
    numbers = {name: nr for nr, name in HYPERCALL_NAMES.items()}
    return hypercall in numbers and bool(lib.hv_hypercall_implemented(numbers[hypercall]))


class Result(int):
    """A case's result; comparing it with == records the check for the report."""

    def __new__(cls, value: int, record):
        self = super().__new__(cls, value)
        self._record = record
        return self

    def __eq__(self, expected):
        ok = int(self) == expected
        if isinstance(expected, int):
            # int(): the expected value may be another case's Result, which the JSON
            # report (dataclasses.asdict deep-copies) could not copy
            self._record(int(expected), int(self), ok)
        return ok

    def __ne__(self, expected):
        return not self.__eq__(expected)

    __hash__ = int.__hash__


@dataclass
class CaseRun:
    results: dict[str, int]
    dumps: dict[str, bytes]
    console: str
    stop: object
    domain: object
    cases: dict
    engine: str
    test: str
    family: str            # the test file's subject, for cases that are not one call

    def __getitem__(self, case: str) -> Result:
        assert case in self.results, f"case {case!r} did not report; console:\n{self.console}"

        def record(expected: int, actual: int, ok: bool) -> None:
            hypercall, subop = self.cases.get(case, (self.family, "(behaviour)"))
            status = "passed" if ok else "failed"
            if ok and expected == ENOSYS and not implemented(hypercall):
                status = "not implemented"
            RECORDS.append(Record(hypercall, subop, self.engine, f"{self.test}::{case}",
                                  status, expected, actual))
        return Result(self.results[case], record)


@pytest.fixture
def run_cases(run_guest, engine, request):
    """run_cases(guest_image, **kw) -> CaseRun; the guest must power off cleanly."""
    def run(image: bytes, **kw) -> CaseRun:
        # No console or xenstore ring: their event channels would take ports 1 and 2,
        # and the cases count the ports they allocate from 1 (test_console_ring.py and
        # test_xenstore.py cover the rings).
        kw.setdefault("console_ring", False)
        kw.setdefault("xenstore", False)
        stop, console, dom = run_guest(image, **kw)
        assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
        results, dumps = parse(console)
        return CaseRun(results, dumps, console, stop, dom, getattr(image, "cases", {}),
                       engine, request.node.name, request.module.__name__.removeprefix("test_"))
    return run


def pytest_addoption(parser):
    group = parser.getgroup("conformance")
    group.addoption("--conformance-report", action="store_true",
                    help="print the hypercall x sub-op x engine table at the end")
    group.addoption("--conformance-json", metavar="PATH",
                    help="write one JSON record per checked case to PATH")


def summary_table(records: list[Record]):
    from rich.table import Table
    engines = sorted({r.engine for r in records})
    cells: dict[tuple[str, str], dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[(r.hypercall, r.subop)][r.engine].append(r)
    table = Table(title="hypercall ABI conformance (trapless)")
    table.add_column("hypercall")
    table.add_column("sub-op")
    for e in engines:
        table.add_column(e, justify="right")
    for (hypercall, subop) in sorted(cells):
        row = []
        for e in engines:
            rs = cells[(hypercall, subop)].get(e, [])
            failed = sum(r.status == "failed" for r in rs)
            if not rs:
                row.append("-")
            elif failed:
                row.append(f"[red]{failed} of {len(rs)} failed[/red]")
            elif all(r.status == "not implemented" for r in rs):
                row.append("[yellow]not implemented[/yellow]")
            else:
                row.append(f"[green]{len(rs)} passed[/green]")
        table.add_row(hypercall, subop, *row)
    return table


def pytest_terminal_summary(terminalreporter, config):
    if not RECORDS:
        return
    path = config.getoption("--conformance-json")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps([asdict(r) for r in RECORDS], indent=1) + "\n")
        terminalreporter.write_line(f"conformance report: {len(RECORDS)} checks written to {path}")
    if config.getoption("--conformance-report"):
        from rich.console import Console
        Console(file=terminalreporter._tw._file, force_terminal=False, width=100).print(
            summary_table(RECORDS))
        failed = sum(r.status == "failed" for r in RECORDS)
        terminalreporter.write_line(
            f"{len(RECORDS)} checks: {len(RECORDS) - failed} as expected, {failed} failed")
