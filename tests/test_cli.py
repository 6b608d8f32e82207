"""End to end: `python -m hypervisor` as a user runs it — output and exit status."""
import os
from pathlib import Path

import pytest

from guest_kernel.asm import rax
from guest_kernel.conformance import ConformanceGuest
from guest_kernel.pv_kernel import build_pv_kernel
from hypervisor import engines

from helpers import hv

needs_bt = pytest.mark.skipif(engines.why_unavailable("bt") is not None,
                              reason=f"bt engine unavailable: {engines.why_unavailable('bt')}")



@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernel") / "pv-kernel.elf"
    path.write_bytes(build_pv_kernel())
    return path


def test_pv_kernel_boots_prints_and_powers_off(kernel, engine):
    r = hv("run", "--engine", engine, kernel, "--cmdline", "hello world ticks=5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "trapless PV kernel: Xen 4.19.0-trapless"
    assert lines[1] == "command line: hello world ticks=5"
    assert "events: shared_info mapped, upcalls through the event callback" in lines
    assert "VIRQ_TIMER bound to port 3" in lines     # 1, 2: the xenstore and console rings
    assert any(line.startswith("5 ticks at 100 Hz in ") for line in lines)
    assert lines[-7:] == [
        "memory: 16384 pages",
        "balloon: gave back 256 pages (1 MiB): 16128 pages",
        "balloon: populated 256 pages again: 16384 pages",
        "mmu: mapped 256 pages at 0x400000 with one multicall of 2 mmu_updates (257 PTEs): ok",
        "mmu: wrote and read back 256 pages through the new mappings: ok",
        "mmu: unmapped them; balloon: gave back 256 pages: 16128 pages",
        "powering off",
    ]
    assert r.stderr == ""


def test_stats_table_counts_hypercalls(kernel, engine):
    r = hv("run", "--engine", engine, kernel, "--stats", "--cmdline", "ticks=1")
    assert r.returncode == 0, r.stderr
    assert "hypercall: xen_version" in r.stdout
    assert "hypercall: sched_op" in r.stdout


@pytest.mark.parametrize("reason,status", [("reboot", 3), ("crash", 5), ("watchdog", 6)])
def test_shutdown_reasons_become_exit_statuses(tmp_path, reason, status, engine):
    from abi import C
    g = ConformanceGuest(reason)
    g.a.mov(rax, getattr(C, f"SHUTDOWN_{reason}"))
    g.a.ret()
    image = tmp_path / "g.elf"
    image.write_bytes(g.elf())
    r = hv("run", "--engine", engine, image)
    assert r.returncode == status
    assert r.stderr == f"trapless: d1 shut down: {reason}\n"


def test_triple_fault_is_reported_and_the_host_survives(tmp_path, engine):
    from guest_kernel.runtime import PVProgram
    p = PVProgram("triple-fault", xen_pv=False)     # a ring-0 kernel: it owns the IDT
    p.print("about to fault\n")
    p.a.ud2()                       # no IDT yet: #UD -> #GP -> #DF -> triple fault
    image = tmp_path / "tf.elf"
    image.write_bytes(p.elf())
    r = hv("run", "--engine", engine, image)
    assert r.returncode == 8
    assert r.stdout == "about to fault\n"
    assert r.stderr.startswith("trapless: d1 guest fault: triple fault at rip=0x")
    assert "Traceback" not in r.stderr
    # and the next domain runs fine
    assert hv("run", "--cmdline", "ticks=1").returncode == 0


def test_guest_exception_handler_reports_and_crashes(tmp_path, engine):
    from guest_kernel.pvlib import emit_traps
    from guest_kernel.runtime import PVProgram
    p = PVProgram("exception")
    p.a.call("traps_init")
    p.a.ud2()
    emit_traps(p)
    image = tmp_path / "ud.elf"
    image.write_bytes(p.elf())
    r = hv("run", "--engine", engine, image)
    assert r.returncode == 5
    assert "trapless PV kernel: exception 6 error 0x0 at rip 0x" in r.stdout


def test_timeout_stops_a_spinning_guest(tmp_path, engine):
    from guest_kernel.runtime import PVProgram
    p = PVProgram("spin")
    p.a.label("spin")
    p.a.jmp("spin")
    image = tmp_path / "spin.elf"
    image.write_bytes(p.elf())
    r = hv("run", "--engine", engine, image, "--timeout", "0.5")
    assert r.returncode == 9
    assert r.stderr.startswith("trapless: d1 timed out after 0.5 s (rip=0x")


@needs_bt
def test_bt_on_the_unicorn_packages_own_library_takes_timer_events_and_stops(kernel, tmp_path):
    """TRAPLESS_UNICORN=stock: bt on the unicorn wheel's library, where kicks from other
    threads go through the per-block hook instead of the patched library's uc_kick:
    timer upcalls still arrive, and a spinning guest is still stopped by its timeout."""
    from guest_kernel.runtime import PVProgram
    stock = {"TRAPLESS_UNICORN": "stock"}
    r = hv("run", "--engine", "bt", kernel, "--cmdline", "ticks=5", env=stock)
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("5 ticks at 100 Hz in ") for line in r.stdout.splitlines())
    p = PVProgram("spin")
    p.a.label("spin")
    p.a.jmp("spin")
    image = tmp_path / "spin.elf"
    image.write_bytes(p.elf())
    r = hv("run", "--engine", "bt", image, "--timeout", "0.5", env=stock)
    assert r.returncode == 9
    assert r.stderr.startswith("trapless: d1 timed out after 0.5 s (rip=0x")


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"#!/bin/sh\necho hi\n" + b"\0" * 64, "not an ELF file"),
    (b"\x7fELF\x01\x01\x01" + b"\0" * 57,
     "not an x86 ELF file (e_machine 0, expected EM_386 = 3 or EM_X86_64 = 62)"),
])
def test_bad_images_are_one_line_errors(tmp_path, content, message):
    image = tmp_path / "bad.elf"
    image.write_bytes(content)
    r = hv("run", image, env={"TRAPLESS_NO_KVM": ""})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert r.stdout == ""


def test_missing_image_file(tmp_path):
    r = hv("run", tmp_path / "nope.elf")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "nope.elf" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["run", "--memory", "lots"], "invalid int value"),
    (["run", "--memory", "1"], "memory 1 MiB"),
    (["run", "--engine", "vmware"], "invalid choice"),
    (["run", "--vcpus", "33"], "argument --vcpus: 33: must be between 1 and 32"),
    (["run", "--vcpus", "two"], "argument --vcpus: 'two': must be a whole number"),
    (["frobnicate"], "invalid choice"),
    (["run", "--disk", "format=qcow2, vdev=xvda, target=x.img"],
     "argument --disk: 'format=qcow2, vdev=xvda, target=x.img': format=qcow2: trapless "
     "serves raw images only"),
    (["run", "--disk", "vdev=hdq9, target=x.img"], "vdev=hdq9: expected a whole Xen virtual disk"),
    (["run", "--disk", "vdev=xvda, target=/nonexistent/x.img"],
     "trapless: disk xvda: cannot open /nonexistent/x.img (No such file or directory)"),
])
def test_bad_options_are_one_line_errors(args, message):
    r = hv(*args)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


@needs_bt
def test_without_kvm_bt_runs_the_guest_and_says_why_in_one_line(kernel):
    r = hv("run", kernel, "--cmdline", "ticks=2", env={"TRAPLESS_NO_KVM": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stderr == "trapless: kvm unavailable (KVM disabled by TRAPLESS_NO_KVM); using bt\n"
    assert r.stdout.splitlines()[-1] == "powering off"


def test_no_engine_is_one_line_and_status_2(kernel):
    r = hv("run", kernel, env={"TRAPLESS_NO_KVM": "1", "TRAPLESS_NO_BT": "1"})
    assert r.returncode == 2
    assert r.stderr == ("trapless: no engine can run here (kvm: KVM disabled by TRAPLESS_NO_KVM; "
                        "bt: bt disabled by TRAPLESS_NO_BT)\n")


def test_bench_json_has_the_promised_keys(engine):
    import json
    r = hv("bench", "--json", "--engine", engine, "--iterations", "500", "--samples", "20",
           "--domains", "5", "--ticking", "3", timeout=180)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    # times of 500 rounds say little (a run of 500 minus a run of 1): the exits say what
    # each row measured
    paths = result["pv_paths"]
    assert (result["hypercall_ns"], result["bare_exit_ns"], result["ratio"]) == (
        paths[engine]["hypercall"]["ns"], paths[engine]["bare_exit"]["ns"],
        paths[engine]["hypercall"]["x_bare_exit"])
    assert paths["engines"] == [engine]
    assert [paths[engine][k]["exits"] for k in ("bare_exit", "hypercall", "exception_bounce",
                                                "syscall_bounce")] == [1, 1, 2, 2]
    # compat code's round trip where the engine runs it (kvm: with Unicorn for its twin)
    if engines.compat_mode_unavailable(engine):
        assert "compat_syscall_bounce" not in paths[engine]
    else:
        assert paths[engine]["compat_syscall_bounce"]["exits"] == 2
    assert result["timer_lateness"]["samples"] == 20
    assert result["mmu_update_512"]["batched"]["mmu_update_calls"] == 1
    assert result["mmu_update_512"]["single"]["mmu_update_calls"] == 512
    # figures only: a benchmark is a command, not a timed test
    assert result["cold_start"]["runs"] == 7 and result["cold_start"]["ratio"] > 0
    blocked = result["scale"][engine]["blocked"]
    assert (blocked["domains"], blocked["blocked"], blocked["domids"]) == (5, 5, [1, 5])
    assert {"rss_mib_per_domain", "threads_per_domain", "idle_cpu_percent_of_a_core"} <= set(blocked)
    if engine == "bt":
        assert result["scale"]["bt"]["ticking"]["domains"] == 3


def test_bench_pv_paths_runs_only_the_pv_cpu_models_rows(engine):
    import json
    r = hv("bench", "--pv-paths", "--json", "--engine", engine, "--iterations", "200",
           "--rounds", "1", timeout=120)
    assert r.returncode == 0, r.stderr
    paths = json.loads(r.stdout)["pv_paths"]
    assert set(json.loads(r.stdout)) == {"pv_paths"}
    assert paths["engines"] == [engine]
    assert (paths[engine]["iterations"], paths[engine]["rounds"]) == (200, 1)
    assert [paths[engine][k]["exits"] for k in ("bare_exit", "hypercall", "exception_bounce",
                                                "syscall_bounce")] == [1, 1, 2, 2]
    # compat code's round trip where the engine runs it (kvm: with Unicorn for its twin)
    if engines.compat_mode_unavailable(engine):
        assert "compat_syscall_bounce" not in paths[engine]
    else:
        assert paths[engine]["compat_syscall_bounce"]["exits"] == 2
    bad = hv("bench", "--pv-paths", "--rounds", "0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "argument --rounds: '0': must be a whole number above 0")


def test_a_reader_that_goes_away_does_not_disturb_the_guest(engine):
    """`run | head -1`: the guest still powers off (status 0) and nothing is printed
    on stderr about the closed pipe."""
    import subprocess
    import sys
    cmd = f"{sys.executable} -m hypervisor run --engine {engine} --cmdline ticks=1 | head -1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout == "trapless PV kernel: Xen 4.19.0-trapless\n"
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


def test_an_extension_older_than_the_header_is_one_line(tmp_path):
    """After a pull that changed abi/xen_abi.h, without `make setup`: one line, exit 2."""
    import shutil
    import subprocess
    import sys
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "abi", tmp_path / "abi", ignore=shutil.ignore_patterns("__pycache__"))
    header = tmp_path / "abi" / "xen_abi.h"
    header.write_text(header.read_text() + "/* changed after the build */\n")
    done = subprocess.run([sys.executable, "-m", "hypervisor", "--help"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}:{repo}"},
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == (f"trapless: {header} changed since hypervisor._hv was built "
                           "from it: rebuild it (make setup)\n")
