"""`python -m hypervisor compare` as a user runs it: the table, the JSON, the errors."""
from __future__ import annotations

import dataclasses
import json

import pytest

from guest_kernel import compare_workloads as cw
from hypervisor import compare, engines

from helpers import hv

AVAILABLE = engines.available()
needs_an_engine = pytest.mark.skipif(not AVAILABLE, reason="no engine can run here")



@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `compare --quick` of every workload on every engine here, with its JSON."""
    if not AVAILABLE:
        pytest.skip("no engine can run here")
    path = tmp_path_factory.mktemp("compare") / "compare.json"
    r = hv("compare", "--quick", "--json", path, timeout=300)
    return r, json.loads(path.read_text()) if path.exists() else None


@needs_an_engine
def test_quick_compare_prints_the_table_and_succeeds(quick_run):
    r, _ = quick_run
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "PV vs native guests: exits to the VMM and wall time" in out
    for name, w in cw.WORKLOADS.items():
        assert name in out
        assert f"{compare.QUICK_SIZES[name]:,} {w.unit}" in out
    for engine in AVAILABLE:
        assert out.count(f"│ {engine} ") == 2 * len(cw.WORKLOADS)
    rows = [line for line in out.splitlines() if "│ native " in line]
    assert len(rows) == len(cw.WORKLOADS) * len(AVAILABLE)
    assert all("│ yes " in line for line in rows)
    assert "NO" not in out


@needs_an_engine
def test_the_json_has_one_record_per_run_from_the_counters(quick_run):
    _, records = quick_run
    assert len(records) == len(cw.WORKLOADS) * len(AVAILABLE) * 2
    keys = {"workload", "guest", "engine", "exits", "exits_by_reason", "wall_ns"}
    for r in records:
        assert keys <= r.keys()
        assert r["exits"] == sum(r["exits_by_reason"].values())
        assert r["wall_ns"] > 0
        assert (r["devices"] is None) == (r["guest"] == "pv")
    runs = {(r["workload"], r["engine"], r["guest"]): r for r in records}
    for engine in AVAILABLE:
        pv, native = runs["console", engine, "pv"], runs["console", engine, "native"]
        size = compare.QUICK_SIZES["console"]
        assert pv["console_bytes"] == native["console_bytes"] == size
        # set_trap_table, the console ring's port when full and at the end, shutdown
        assert pv["exits_by_reason"]["hypercall"] == 1 + 2 + 1
        assert native["exits_by_reason"]["io"] == 7 + 2 * size + 1
        assert native["devices"]["uart_tx_bytes"] == size
        pt = runs["page_tables", engine, "native"]
        assert pt["exits_by_reason"]["mmio"] == compare.QUICK_SIZES["page_tables"] + 1
        assert pt["devices"]["pte_writes"] == compare.QUICK_SIZES["page_tables"] + 1
        assert runs["clock", engine, "pv"]["exits_by_reason"]["io"] == 0
        assert runs["clock", engine, "native"]["exits_by_reason"]["io"] >= \
            8 * compare.QUICK_SIZES["clock"]
        for workload in cw.WORKLOADS:
            assert runs[workload, engine, "pv"]["report"] == \
                runs[workload, engine, "native"]["report"] != ""


@needs_an_engine
def test_one_workload_on_one_engine():
    engine = AVAILABLE[0]
    r = hv("compare", "--quick", "--engine", engine, "--workload", "compute")
    assert r.returncode == 0, r.stderr
    assert "compute" in r.stdout and "console" not in r.stdout
    assert r.stdout.count(f"│ {engine} ") == 2


def test_an_engine_that_cannot_run_is_one_line():
    r = hv("compare", "--engine", "kvm", env={"TRAPLESS_NO_KVM": "1"})
    assert r.returncode == 2
    assert r.stderr == "trapless: engine kvm: KVM disabled by TRAPLESS_NO_KVM\n"
    assert r.stdout == ""


def test_an_unknown_workload_is_a_usage_error():
    r = hv("compare", "--workload", "nap")
    assert r.returncode == 2
    assert "invalid choice: 'nap'" in r.stderr and len(r.stderr.splitlines()) == 1


@needs_an_engine
def test_differing_results_are_reported():
    """The check that both guests did the same work: a pair that differs fails."""
    pv = compare.run_workload("compute", "pv", AVAILABLE[0], 100)
    native = compare.run_workload("compute", "native", AVAILABLE[0], 100)
    assert compare.mismatches([pv, native]) == []
    other = dataclasses.replace(native, report=compare.run_workload(
        "compute", "native", AVAILABLE[0], 101).report)
    (line,) = compare.mismatches([pv, other])
    assert line.startswith(f"compute on {AVAILABLE[0]}: pv reported 'compute: 100 rounds")
