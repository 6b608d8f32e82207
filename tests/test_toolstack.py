"""The toolstack in-process: many domains at once, isolated; on_poweroff / on_reboot /
on_crash; names and ids; trace decoding; and nothing left behind after shutdown."""
import os
import threading
import time

import pytest

from abi import C
from guest_kernel.asm import rax
from guest_kernel.pv_kernel import build_pv_kernel
from guest_kernel.runtime import PVProgram
from hypervisor import config
from hypervisor._hv import lib
from hypervisor.domain import TraceEntry
from hypervisor.toolstack import (DomainSample, Toolstack, ToolstackError, describe_call,
                                  describe_result, rates)

from helpers import wait_for


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / "pv-kernel.elf"
    path.write_bytes(build_pv_kernel())
    return path


@pytest.fixture(scope="module")
def crasher(tmp_path_factory):
    """A guest that crashes as soon as it starts."""
    p = PVProgram(guest_os="crasher")
    p.print("crashing\n")
    p.a.mov(rax, C.SHUTDOWN_crash)
    p.a.ret()
    path = tmp_path_factory.mktemp("ts") / "crasher.elf"
    path.write_bytes(p.elf())
    return path


@pytest.fixture
def ts():
    toolstack = Toolstack()
    yield toolstack
    toolstack.shutdown()



def interactive(kernel, engine, *words):
    return config.load(kernel, ["memory=16", "cmdline=interactive", f"engine={engine}", *words])


def prompt_ready(rec) -> bool:
    return rec.console_text.endswith("pv> ")


def test_three_domains_run_at_once_and_a_crash_leaves_the_others_running(ts, kernel, engine):
    recs = [ts.create(interactive(kernel, engine, f"name=d{i}")) for i in range(3)]
    assert [r.domid for r in recs] == [1, 2, 3]
    assert all(wait_for(lambda r=r: prompt_ready(r)) for r in recs)
    assert [(row.domid, row.name, row.memory_mib, row.engine) for row in ts.list()] == [
        (1, "d0", 16, engine), (2, "d1", 16, engine), (3, "d2", 16, engine)]
    assert ts.send_input(recs[1], b"shutdown crash\r") == 15       # on_crash = destroy
    assert wait_for(lambda: [row.name for row in ts.list()] == ["d0", "d2"])
    assert "domain 2 (d1) shut down (crash); on_crash = destroy" in "\n".join(ts.dmesg())
    before = ts.sample()
    time.sleep(0.3)
    after = ts.sample()
    for r in rates(before, after):                  # both survivors still tick at 100 Hz
        assert r.name in ("d0", "d2") and r.state in ("running", "blocked")
        assert 50 <= r.hypercalls_per_s["sched_op"] <= 150
    with pytest.raises(ToolstackError, match=r"^domain d1 is gone$"):
        ts.send_input(recs[1], b"x")


def test_on_crash_restart_keeps_the_name_and_console(ts, kernel, engine):
    rec = ts.create(interactive(kernel, engine, "name=phoenix", "on_crash=restart"))
    assert wait_for(lambda: prompt_ready(rec))
    ts.send_input(rec, b"shutdown crash\r")
    assert wait_for(lambda: rec.domid == 2 and ts.state(rec) in ("running", "blocked"))
    assert wait_for(lambda: rec.console_text.count("interactive mode") == 2)
    assert ts.find("phoenix") is rec and ts.find("2") is rec
    with pytest.raises(ToolstackError, match=r"^no domain '1' \(see list\)$"):
        ts.find("1")
    log = "\n".join(ts.dmesg())
    assert "domain 1 (phoenix) shut down (crash); on_crash = restart" in log
    assert "domain phoenix restarted as domain 2" in log


def test_preserve_keeps_a_stopped_domain_to_look_at(ts, kernel, engine):
    crashed = ts.create(interactive(kernel, engine, "name=c", "on_crash=preserve"))
    rebooted = ts.create(interactive(kernel, engine, "name=r", "on_reboot=preserve"))
    assert wait_for(lambda: prompt_ready(crashed) and prompt_ready(rebooted))
    ts.send_input(crashed, b"shutdown crash\r")
    ts.send_input(rebooted, b"shutdown reboot\r")
    assert wait_for(lambda: [row.state for row in ts.list()] == ["crashed", "shutdown"])
    last = ts.trace(crashed, 1)[0]
    assert describe_call(last) == f"sched_op(SCHEDOP_shutdown, {last.args[1]:#x})"
    with pytest.raises(ToolstackError, match=r"^cannot pause domain c: it is crashed$"):
        ts.pause(crashed)
    ts.destroy(crashed)
    assert [row.name for row in ts.list()] == ["r"]


def test_a_crash_loop_is_stopped_after_four_quick_crashes(ts, crasher, engine):
    rec = ts.create(config.load(crasher, ["name=loop", "on_crash=restart", "memory=8",
                                          f"engine={engine}"]))
    note = ("domain 4 (loop) shut down (crash); on_crash = preserve (it stopped within a "
            "second 4 times in a row)")
    assert wait_for(lambda: note in "\n".join(ts.dmesg()))
    assert ts.state(rec) == "crashed"
    assert rec.restarts == 3 and rec.domid == 4
    assert rec.console_text == "crashing\n" * 4


def test_pause_unpause_and_names(ts, kernel, engine):
    a = ts.create(config.load(kernel, ["memory=16", "cmdline=interactive", f"engine={engine}"]))
    b = ts.create(config.load(kernel, ["memory=16", "cmdline=interactive", f"engine={engine}"]))
    assert (a.name, b.name) == ("pv-kernel", "pv-kernel-2")       # named after the image
    with pytest.raises(ToolstackError, match=r"^name 'pv-kernel': a domain with that name exists$"):
        ts.create(interactive(kernel, engine, "name=pv-kernel"))
    ts.pause(a)
    assert wait_for(lambda: ts.state(a) == "paused")
    time.sleep(0.05)                        # a block in progress may still finish
    ticks = ts.sample()[0].hypercalls.get("sched_op", 0)
    time.sleep(0.1)
    assert ts.sample()[0].hypercalls.get("sched_op", 0) == ticks
    ts.unpause(a)
    assert wait_for(lambda: ts.sample()[0].hypercalls.get("sched_op", 0) > ticks)


def test_shutdown_leaves_no_threads_fds_or_vms(kernel, engine):
    # The process-wide threads (console hub, timers, bt's kicker) start with the first
    # domain and stay; warm them up, then count.
    warm = Toolstack()
    warm.create(interactive(kernel, engine))
    warm.shutdown()
    assert wait_for(lambda: lib.hv_sched_workers() == 0)   # idle workers end after 2 s
    ts = Toolstack()
    threads = {t.name for t in threading.enumerate()}
    tasks, fds = len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))
    recs = [ts.create(interactive(kernel, engine, f"name=q{i}")) for i in range(3)]
    assert all(wait_for(lambda r=r: prompt_ready(r)) for r in recs)
    assert len(os.listdir("/proc/self/fd")) > fds
    ts.destroy(recs[0])
    ts.shutdown()
    assert wait_for(lambda: lib.hv_sched_workers() == 0)
    # Nothing of ours is left; a thread an earlier test left ending may have gone meanwhile.
    assert {t.name for t in threading.enumerate()} <= threads
    assert len(os.listdir("/proc/self/task")) <= tasks      # workers, KVM's own tasks too
    assert len(os.listdir("/proc/self/fd")) <= fds          # VM, vCPU and console pipe fds
    assert ts.list() == []
    with pytest.raises(ToolstackError, match="shutting down"):
        ts.create(interactive(kernel, engine))


def test_hypercalls_are_decoded_for_trace():
    def entry(name, *args, ret=0):
        nr = getattr(C, f"__HYPERVISOR_{name}")
        return TraceEntry(1, 0, nr, tuple(args) + (0,) * (5 - len(args)), ret)

    assert describe_call(entry("sched_op", C.SCHEDOP_block, 0)) == "sched_op(SCHEDOP_block, 0)"
    assert describe_call(entry("console_io", C.CONSOLEIO_write, 12, 0x10e000)) == \
        "console_io(CONSOLEIO_write, 12, 0x10e000)"
    assert describe_call(entry("memory_op", (5 << 6) | C.XENMEM_decrease_reservation, 0x2000)) \
        == "memory_op(XENMEM_decrease_reservation@5, 0x2000)"
    assert describe_call(entry("vcpu_op", C.VCPUOP_set_periodic_timer, 0, 0x1000)) == \
        "vcpu_op(VCPUOP_set_periodic_timer, 0, 0x1000)"
    assert describe_call(entry("set_timer_op", 123456789)) == "set_timer_op(0x75bcd15)"
    assert describe_call(TraceEntry(1, 0, 11, (1, 2, 3, 4, 5), -38)) == \
        "hypercall_11(1, 2, 3, 4, 5)"
    assert describe_result(-C.XEN_EINVAL) == "-EINVAL"
    assert describe_result(-C.XEN_ENOSYS) == "-ENOSYS"
    assert describe_result(4096) == "4096"


def test_rates_between_two_samples():
    s = lambda t, cpu, exits, calls: DomainSample(1, "a", "blocked", 16, "kvm", t, cpu, exits,
                                                  calls)
    before = [s(0, 0, 100, {"sched_op": 50})]
    after = [s(2_000_000_000, 100_000_000, 500, {"sched_op": 250, "console_io": 4}),
             DomainSample(2, "new", "running", 16, "kvm", 2_000_000_000, 5, 5, {"sched_op": 5})]
    one, new = rates(before, after)
    assert (one.cpu_pct, one.exits_per_s) == (5.0, 200.0)
    assert one.hypercalls_per_s == {"sched_op": 100.0, "console_io": 2.0}
    assert one.total_hypercalls_per_s == 102.0
    assert (new.cpu_pct, new.exits_per_s, new.hypercalls_per_s) == (0.0, 0.0, {})
