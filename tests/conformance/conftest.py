"""Conformance fixtures: run a ConformanceGuest and hand back its parsed results."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from guest_kernel.conformance import parse


@dataclass
class CaseRun:
    results: dict[str, int]
    dumps: dict[str, bytes]
    console: str
    stop: object
    domain: object

    def __getitem__(self, case: str) -> int:
        assert case in self.results, f"case {case!r} did not report; console:\n{self.console}"
        return self.results[case]


@pytest.fixture
def run_cases(run_guest):
    """run_cases(guest_elf, **kw) -> CaseRun; the guest must power off cleanly."""
    def run(image: bytes, **kw) -> CaseRun:
        stop, console, dom = run_guest(image, **kw)
        assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
        results, dumps = parse(console)
        return CaseRun(results, dumps, console, stop, dom)
    return run
