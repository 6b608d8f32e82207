"""The conformance suite's JSON report (`python -m hypervisor conformance --json`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hypervisor import engines

SUITE = Path(__file__).resolve().parent / "conformance"


@pytest.mark.skipif(bool(engines.why_unavailable("bt")),
                    reason=f"engine bt unavailable: {engines.why_unavailable('bt')}")
def test_json_report_holds_a_case_checked_against_another_case(tmp_path):
    # test_pv_pagetables compares one case's result with another's: the report used to
    # end in a traceback deep-copying that second result (an int subclass)
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(SUITE / "test_pv_pagetables.py"), "-k",
         "test_a_pinned_frame_of_the_guest_is_a_protected_table and bt",
         "--conformance-json", str(report)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    records = json.loads(report.read_text())
    [store] = [r for r in records if r["case"].endswith("::entry_0_after_store")]
    assert store["engine"] == "bt" and store["status"] == "passed"
    assert type(store["expected"]) is int and store["expected"] == store["actual"]
