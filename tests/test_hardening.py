"""The host process holds up: signals, misuse of the API, flooding guests, the memory
budget, lost wakeups, many domains. Each test drives the real command or the real API."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from abi import C
from guest_kernel.pv_kernel import build_pv_kernel
from guest_kernel.runtime import PVProgram
from guest_kernel.workloads import timer_lateness
from hypervisor import domain as domain_mod
from hypervisor._hv import lib
from hypervisor.domain import Domain
from hypervisor.errors import DomainError, EngineError

from helpers import wait_for

FLOOD_CHUNK = 4096


def spinning_guest() -> bytes:
    p = PVProgram(guest_os="spin")
    p.print("spinning\n")
    p.a.label("spin")
    p.a.jmp("spin")
    return p.elf()


def two_spinning_vcpus_guest() -> bytes:
    """vCPU 0 brings vCPU 1 up on its own stack; once vCPU 1 spins (it says so in
    memory), vCPU 0 prints and spins too."""
    from abi import offsetof
    from guest_kernel.asm import qword, rax, rip
    from guest_kernel.conformance import ConformanceGuest
    ctx, regs = "vcpu_guest_context", offsetof("vcpu_guest_context", "user_regs")
    p = ConformanceGuest("spin2")
    a = p.a
    p.struct("ap_context", ctx, flags=C.VGCF_in_kernel, kernel_ss=C.FLAT_KERNEL_SS)
    a.section(".bss")
    a.label("ap_running")
    a.reserve(8)
    a.align(16)
    a.reserve(4096)
    a.label("ap_stack_top")
    a.section(".text")
    p.start_info_field(rax, "pt_base")          # virtual = physical here: the L4's address
    a.mov(qword[rip + "ap_context" + offsetof(ctx, "ctrlreg") + 3 * 8], rax)
    a.lea(rax, qword[rip + "ap_spin"])
    a.mov(qword[rip + "ap_context" + regs + offsetof("xen_user_regs", "rip")], rax)
    a.lea(rax, qword[rip + "ap_stack_top"])
    a.mov(qword[rip + "ap_context" + regs + offsetof("xen_user_regs", "rsp")], rax)
    a.mov(qword[rip + "ap_context" + offsetof(ctx, "kernel_sp")], rax)
    p.hypercall("vcpu_op", C.VCPUOP_initialise, 1, "ap_context")
    p.hypercall("vcpu_op", C.VCPUOP_up, 1, 0)
    a.label("wait_ap")
    a.cmp(qword[rip + "ap_running"], 0)
    a.je("wait_ap")
    p.print("spinning on 2 vCPUs\n")
    a.label("spin")
    a.jmp("spin")
    a.label("ap_spin")
    a.mov(qword[rip + "ap_running"], 1)
    a.label("ap_spin.loop")
    a.jmp("ap_spin.loop")
    return p.elf()


def blocked_guest() -> bytes:
    """Blocks with nothing that could ever wake it. It prints through console_io: the
    console ring's notification would leave an event pending, and SCHEDOP_block
    returns at once while one is."""
    p = PVProgram(guest_os="block", console_ring=False)
    p.print("blocking\n")
    p.a.label("again")
    p.hypercall("sched_op", C.SCHEDOP_block, 0)
    p.a.jmp("again")
    return p.elf()


def flooding_guest() -> bytes:
    """Writes 4 KiB of console text per hypercall, forever."""
    p = PVProgram(guest_os="flood")
    a = p.a
    a.label("again")
    p.hypercall("console_io", C.CONSOLEIO_write, FLOOD_CHUNK, "text")
    a.jmp("again")
    a.section(".data")
    a.label("text")
    a.db(*(b"flood " * (FLOOD_CHUNK // 6) + b"\n" * (FLOOD_CHUNK % 6)))
    a.section(".text")
    return p.elf()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    out = {}
    for name, build in (("spin", spinning_guest), ("spin2", two_spinning_vcpus_guest),
                        ("block", blocked_guest),
                        ("flood", flooding_guest), ("pv", build_pv_kernel)):
        out[name] = d / f"{name}.elf"
        out[name].write_bytes(build())
    return out


# ---- SIGINT and SIGTERM on `run` ------------------------------------------------------

def start_run(image, engine, *extra):
    return subprocess.Popen([sys.executable, "-m", "hypervisor", "run", str(image),
                             "--engine", engine, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("guest,cmdline,first_line", [
    ("spin", "", b"spinning\n"),
    ("spin2", "", b"spinning on 2 vCPUs\n"),
    ("block", "", b"blocking\n"),
    ("pv", "interactive", b"trapless PV kernel: Xen 4.19.0-trapless\n"),
])
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_guest_with_a_documented_status(images, engine, guest, cmdline,
                                                            first_line, sig, status):
    extra = ("--vcpus", "2") if guest == "spin2" else ()
    proc = start_run(images[guest], engine, "--cmdline", cmdline, *extra)
    # the guest is running (or blocked, or at its prompt) once its first line is out
    assert proc.stdout.readline() == first_line
    time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"trapless: d1 stopped by {signal.Signals(sig).name} (rip=0x"), err


# ---- the Python API used the wrong way ----------------------------------------------

def test_a_domain_is_started_once_and_unusable_after_destroy(images, engine):
    dom = Domain(images["block"], memory_mib=16, engine=engine)
    with pytest.raises(DomainError, match="was not started"):
        dom.wait(0)
    dom.start()
    with pytest.raises(DomainError, match="d1 was already started"):
        dom.start()
    assert wait_for(lambda: dom.vcpu_state == "blocked")
    dom.destroy()
    dom.destroy()                                  # twice is fine
    assert dom.stop_info.kind == "stopped"        # what it was, still readable
    for use in (dom.start, dom.pause, dom.unpause, dom.stop, dom.counters,
                lambda: dom.vcpu_state, lambda: dom.cpu_ns, lambda: dom.trace(4),
                lambda: dom.send_input(b"x"), lambda: dom.send_virq(C.VIRQ_CONSOLE),
                lambda: dom.pending_events, dom.device_stats,
                lambda: dom.read_guest(dom.layout.virt_base + dom.layout.image_start, 8)):
        with pytest.raises(DomainError, match="domain d1 is destroyed"):
            use()


def test_destroy_stops_both_spinning_vcpus_of_a_domain(images, engine):
    dom = Domain(images["spin2"], memory_mib=16, engine=engine, vcpus=2)
    dom.start()
    assert dom.wait(0.5) is None                   # both spin: nothing ends by itself
    assert dom.cpu_ns > 0
    # destroy returns only once every vCPU stopped: one left spinning would hang it
    import threading
    destroyer = threading.Thread(target=dom.destroy, daemon=True)
    destroyer.start()
    destroyer.join(20)
    assert not destroyer.is_alive(), "destroy hung: a vCPU kept running"
    assert (dom.stop_info.kind, dom.stop_info.message) == ("stopped", "stopped by the toolstack")


def test_destroy_of_a_domain_never_started(images, engine):
    dom = Domain(images["spin"], memory_mib=16, engine=engine)
    dom.destroy()
    with pytest.raises(DomainError, match="is destroyed"):
        dom.start()


# ---- a flooding guest keeps the host's memory flat --------------------------------------

def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_a_console_flood_for_10_s_keeps_the_host_rss_flat(images, engine):
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor", "run", str(images["flood"]),
                             "--engine", engine, "--timeout", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, rss_mib(proc.pid))
        time.sleep(0.25)
    assert proc.returncode == 9, proc.stderr.read()
    assert 0 < peak < 300, f"peak RSS {peak:.0f} MiB"


def test_console_output_keeps_only_the_latest_bytes(images, engine):
    with Domain(images["flood"], memory_mib=16, engine=engine, console_keep=10_000) as dom:
        dom.start()
        assert wait_for(lambda: dom.counters().hypercalls.get("console_io", 0) > 20)
        dom.stop()
        dom.wait(10)
        assert len(dom.console_output) == 10_000
        assert dom.console_output.endswith(b"flood \n" if FLOOD_CHUNK % 6 == 1 else b"\n")


# ---- the host-wide memory budget ----------------------------------------------------------

def test_domains_beyond_the_memory_budget_are_refused(images, engine):
    saved = domain_mod.memory_budget_mib()
    committed = lib.hv_memory_committed() >> 20
    try:
        domain_mod.set_memory_budget(committed + 48)
        with Domain(images["block"], memory_mib=32, engine=engine):
            with pytest.raises(EngineError, match=r"^cannot create domain: 32 MiB would exceed "
                               rf"the host memory budget: {committed + 32} of "
                               rf"{committed + 48} MiB are given to \d+ domain\(s\)$"):
                Domain(images["block"], memory_mib=32, engine=engine)
            Domain(images["block"], memory_mib=16, engine=engine).destroy()   # fits exactly
        # the first domain is gone: its memory is free again
        Domain(images["block"], memory_mib=32, engine=engine).destroy()
    finally:
        domain_mod.set_memory_budget(saved)


def test_run_beyond_the_budget_is_a_one_line_error(images, engine):
    r = subprocess.run([sys.executable, "-m", "hypervisor", "run", str(images["block"]),
                        "--engine", engine, "--memory", "64"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "TRAPLESS_MEMORY_BUDGET_MIB": "48"})
    assert r.returncode == 2
    assert r.stderr == ("trapless: cannot create domain: 64 MiB would exceed the host memory "
                        "budget: 0 of 48 MiB are given to 0 domain(s)\n")


def test_the_default_budget_is_the_available_memory_less_a_margin():
    available = domain_mod._available_mib()
    budget = domain_mod.memory_budget_mib()
    assert available is not None and budget is not None
    # the process took its reading at import; the host's load moves it a little since
    assert abs(budget - (available - domain_mod.BUDGET_MARGIN_MIB)) < 2048


# ---- lost wakeups ---------------------------------------------------------------------

def test_timers_that_fire_before_the_block_lose_no_wakeup(run_guest):
    """Deadlines in the past or a few µs ahead: the timer fires while the guest is still
    on its way to SCHEDOP_block, every time. A guest that checked with upcalls unmasked
    (or a hypervisor that lost the event) would sleep forever."""
    for delay_ns in (0, 2_000, 20_000):
        stop, out, dom = run_guest(timer_lateness(300, delay_ns=delay_ns), timeout=60)
        assert (stop.kind, stop.reason) == ("shutdown", C.SHUTDOWN_poweroff), (stop, out)
        assert dom.counters().hypercalls["set_timer_op"] == 300


# ---- Xen's domid space ------------------------------------------------------------------

def test_domids_above_255_reach_each_other(engine):
    """An interdomain channel between domids 300 and 32000 (the registry spans Xen's
    domid space, 0 .. 0x7FEF): the blocked receiver is woken by the sender."""
    from conformance.test_interdomain import receiver, sender
    from guest_kernel.conformance import parse
    # no console or xenstore rings: the guests know port 1 is the sender's first (offered) port
    with Domain(sender(peer=32000), memory_mib=16, engine=engine, domid=300,
                console_ring=False, xenstore=False) as a, \
            Domain(receiver(peer=300), memory_mib=16, engine=engine, domid=32000,
                   console_ring=False, xenstore=False) as b:
        b.start()
        a.start()
        sa, sb = a.wait(20), b.wait(20)
        assert (sa.kind, sb.kind) == ("shutdown", "shutdown"), (a.console_output, b.console_output)
        assert parse(b.console_output.decode())[0]["events_seen"] == 1
