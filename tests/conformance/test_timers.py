"""set_timer_op (15), vcpu_op (24) timers, the PV clock, and sched_op block/poll."""
import struct

from abi import C, offsetof

from guest_kernel.asm import byte, dword, eax, edi, ptr, qword, r12, r13, rax, rbx, rdi, rip, rsi
from guest_kernel.conformance import NULL, UNMAPPED, ConformanceGuest
from guest_kernel.pvlib import UPCALL_MASK, set_port_handler

EFAULT, EINVAL, ENOENT, ETIME, ENOSYS, EEXIST = (
    -C.XEN_EFAULT, -C.XEN_EINVAL, -C.XEN_ENOENT, -C.XEN_ETIME, -C.XEN_ENOSYS, -C.XEN_EEXIST)
MS = 1_000_000


def timer_guest(name: str) -> ConformanceGuest:
    """A guest with VIRQ_TIMER bound to `on_timer`, which counts and stamps the time."""
    g = ConformanceGuest(name, events=True)
    a = g.a
    a.mov(edi, C.VIRQ_TIMER)
    a.call("bind_virq")
    g.report("bind_timer")
    a.mov(rbx, rax)
    set_port_handler(g, rbx, "on_timer")
    g.events_on()
    a.jmp("after_on_timer")
    a.label("on_timer")
    a.inc(qword["timer_count"])
    a.call("pvclock_read")
    a.mov(qword["timer_stamp"], rax)
    a.ret()
    a.label("after_on_timer")
    a.section(".data")
    a.label("timer_count")
    a.dq(0)
    a.label("timer_stamp")
    a.dq(0)
    a.section(".text")
    return g


def mask_until_block(g: ConformanceGuest) -> None:
    """Xen's rule for waiting: mask upcalls, arm the timer, then SCHEDOP_block, which
    unmasks and returns at once if the event is already pending. Unmasked, a timer that
    fires before the block (long past, or a loaded host) is delivered on the way back
    from whatever hypercall comes first, and the block then sleeps for good."""
    g.a.mov(byte[rip + "shared_info" + UPCALL_MASK], 1)


def at_now_plus(g: ConformanceGuest, label: str, ns: int, offset: int = 0) -> None:
    """The qword at label + offset = PV-clock now + ns."""
    g.a.call("pvclock_read")
    g.a.add(rax, ns)
    g.a.mov(qword[rip + label + offset], rax)


def test_one_shot_timer_wakes_a_blocked_vcpu(run_cases):
    g = timer_guest("set_timer_op")
    a = g.a
    g.struct("deadline", "vcpu_set_periodic_timer")     # a spare qword
    at_now_plus(g, "deadline", 5 * MS)
    mask_until_block(g)
    a.mov(rdi, qword["deadline"])
    g.call("set_timer_op", "set_timer_op", rdi)
    g.call("block", "sched_op", C.SCHEDOP_block, 0)
    a.mov(rax, qword["timer_count"])
    g.report("fired")
    a.mov(rax, qword["timer_stamp"])
    a.sub(rax, qword["deadline"])
    g.report("late_ns")
    run = run_cases(g.finish())
    assert run["events_init"] == 0 and run["bind_timer"] > 0
    assert run["set_timer_op"] == 0 and run["block"] == 0
    assert run["fired"] == 1
    assert 0 <= run["late_ns"] < 50 * MS        # never early; on time within a loaded CI's slack


def test_cancelled_and_past_timers(run_cases):
    g = timer_guest("cancel")
    a = g.a
    g.struct("deadline", "vcpu_set_periodic_timer")
    at_now_plus(g, "deadline", 2 * MS)
    a.mov(rdi, qword["deadline"])
    g.call("set", "set_timer_op", rdi)
    g.call("cancel", "set_timer_op", 0)
    # poll nothing for 20 ms: the cancelled timer must not fire meanwhile
    g.struct("poll", "sched_poll", nr_ports=0)
    at_now_plus(g, "poll", 20 * MS, offsetof("sched_poll", "timeout"))
    g.call("poll_20ms", "sched_op", C.SCHEDOP_poll, "poll")
    a.mov(rax, qword["timer_count"])
    g.report("fired_after_cancel")
    mask_until_block(g)
    g.call("past", "set_timer_op", 1)               # long past: fires at once
    g.call("block_past", "sched_op", C.SCHEDOP_block, 0)
    a.mov(rax, qword["timer_count"])
    g.report("fired_after_past")
    run = run_cases(g.finish())
    assert run["set"] == 0 and run["cancel"] == 0 and run["poll_20ms"] == 0
    assert run["fired_after_cancel"] == 0
    assert run["past"] == 0 and run["fired_after_past"] == 1


def test_vcpu_op_timers(run_cases):
    g = timer_guest("vcpu_op")
    a = g.a
    g.struct("sshot", "vcpu_set_singleshot_timer", flags=C.VCPU_SSHOTTMR_future)
    g.struct("period_2ms", "vcpu_set_periodic_timer", period_ns=2 * MS)
    g.struct("period_short", "vcpu_set_periodic_timer", period_ns=MS - 1)
    g.call("is_up", "vcpu_op", C.VCPUOP_is_up, 0, 0)
    g.call("is_up_bad_vcpu", "vcpu_op", C.VCPUOP_is_up, 5, 0)
    g.call("initialise", "vcpu_op", C.VCPUOP_initialise, 0, 0)
    g.call("singleshot_past_future_flag", "vcpu_op", C.VCPUOP_set_singleshot_timer, 0, "sshot")
    g.call("singleshot_other_vcpu", "vcpu_op", C.VCPUOP_set_singleshot_timer, 1, "sshot")
    g.call("singleshot_null", "vcpu_op", C.VCPUOP_set_singleshot_timer, 0, NULL)
    at_now_plus(g, "sshot", 3 * MS)
    mask_until_block(g)
    g.call("singleshot", "vcpu_op", C.VCPUOP_set_singleshot_timer, 0, "sshot")
    g.call("block_singleshot", "sched_op", C.SCHEDOP_block, 0)
    a.mov(rax, qword["timer_count"])
    g.report("fired_singleshot")
    g.call("stop_singleshot", "vcpu_op", C.VCPUOP_stop_singleshot_timer, 0, 0)
    g.call("periodic_too_short", "vcpu_op", C.VCPUOP_set_periodic_timer, 0, "period_short")
    g.call("periodic_unmapped", "vcpu_op", C.VCPUOP_set_periodic_timer, 0, UNMAPPED)
    g.call("periodic", "vcpu_op", C.VCPUOP_set_periodic_timer, 0, "period_2ms")
    a.call("pvclock_read")
    a.mov(r12, rax)
    a.label("wait_5_ticks")
    g.hypercall("sched_op", C.SCHEDOP_block, 0)
    a.cmp(qword["timer_count"], 6)
    a.jb("wait_5_ticks")
    a.call("pvclock_read")
    a.sub(rax, r12)
    g.report("five_periods_ns")
    g.call("stop_periodic", "vcpu_op", C.VCPUOP_stop_periodic_timer, 0, 0)
    g.call("runstate", "vcpu_op", C.VCPUOP_get_runstate_info, 0, "scratch")
    g.dump("runstate", "scratch", 4)
    g.call("unknown", "vcpu_op", 99, 0, 0)
    run = run_cases(g.finish())
    assert run["is_up"] == 1 and run["is_up_bad_vcpu"] == ENOENT
    assert run["initialise"] == EFAULT               # Xen copies the context in first
    assert run["singleshot_past_future_flag"] == ETIME
    assert run["singleshot_other_vcpu"] == ENOENT   # vCPU 1 does not exist
    assert run["singleshot_null"] == EFAULT
    assert run["singleshot"] == 0 and run["fired_singleshot"] == 1
    assert run["stop_singleshot"] == 0
    assert run["periodic_too_short"] == EINVAL and run["periodic_unmapped"] == EFAULT
    assert run["periodic"] == 0
    assert 10 * MS - 2 * MS <= run["five_periods_ns"] < 100 * MS
    assert run["stop_periodic"] == 0
    assert run["runstate"] == 0
    assert struct.unpack("<i", run.dumps["runstate"])[0] == C.RUNSTATE_running
    assert run["unknown"] == ENOSYS


def test_pv_clock_tracks_host_time_without_exits(run_cases):
    g = ConformanceGuest("pvclock", events=True)
    a = g.a
    a.call("pvclock_read")
    a.mov(r12, rax)
    a.mov(r13, 100_000)
    a.label("reads")
    a.call("pvclock_read")
    a.dec(r13)
    a.jne("reads")
    a.mov(r13, rax)
    g.struct("poll", "sched_poll", nr_ports=0)
    a.add(rax, 10 * MS)
    a.mov(qword[rip + "poll" + offsetof("sched_poll", "timeout")], rax)
    g.call("poll", "sched_op", C.SCHEDOP_poll, "poll")
    a.call("pvclock_read")
    a.sub(rax, r13)
    g.report("poll_10ms_took")
    a.mov(rax, r13)
    a.sub(rax, r12)
    g.report("reads_took")
    a.mov(rax, qword[rip + "shared_info" + offsetof("shared_info", "wc_sec")])
    g.report("wc_sec")
    run = run_cases(g.finish())
    assert run["poll"] == 0
    assert 10 * MS <= run["poll_10ms_took"] < 60 * MS
    assert run["reads_took"] > 0                # rdtsc cost varies a lot under nested KVM
    import time
    assert abs((run["wc_sec"] & 0xFFFFFFFF) - time.time()) < 3600 * 24 * 365 * 60  # wc_sec is boot time
    counters = run.domain.counters()
    # 100,001 clock reads and nothing but the few hypercalls of the case itself
    assert counters.total_exits < 30, counters


def test_poll_arguments(run_cases):
    g = ConformanceGuest("poll", events=True)
    g.a.section(".data")
    g.a.label("ports")
    g.a.dd(1, 4095, 0)
    g.a.section(".text")
    g.call("bind_ipi", "event_channel_op", C.EVTCHNOP_bind_ipi, g.struct("bi", "evtchn_bind_ipi"))
    g.call("send", "event_channel_op", C.EVTCHNOP_send, g.struct("s1", "evtchn_send", port=1))
    g.a.lea(rsi, ptr["ports"])
    g.a.mov(qword[rip + "p1"], rsi)
    g.struct("p1", "sched_poll", nr_ports=1)         # port 1: pending, returns at once
    g.call("poll_pending", "sched_op", C.SCHEDOP_poll, "p1")
    g.struct("p_many", "sched_poll", nr_ports=129)
    g.call("poll_too_many", "sched_op", C.SCHEDOP_poll, "p_many")
    g.a.lea(rsi, ptr["ports"])
    g.a.add(rsi, 4)
    g.a.mov(qword[rip + "p_bad"], rsi)
    g.struct("p_bad", "sched_poll", nr_ports=1)      # port 4095 > this domain's limit
    g.call("poll_bad_port", "sched_op", C.SCHEDOP_poll, "p_bad")
    g.struct("p_null", "sched_poll", ports=0, nr_ports=2)
    g.call("poll_null_ports", "sched_op", C.SCHEDOP_poll, "p_null")
    g.call("poll_null_arg", "sched_op", C.SCHEDOP_poll, NULL)
    run = run_cases(g.finish())
    assert run["bind_ipi"] == 0 and run["send"] == 0
    assert run["poll_pending"] == 0
    assert run["poll_too_many"] == EINVAL
    assert run["poll_bad_port"] == EINVAL
    assert run["poll_null_ports"] == EFAULT and run["poll_null_arg"] == EFAULT


def test_register_runstate_memory_area(run_cases):
    """Linux (PV and PVH) BUG()s without it. The area is written at once; the handle is
    taken as given, and a write that faults is not an error (as in Xen)."""
    g = ConformanceGuest("vcpu_op runstate area")
    a = g.a
    g.struct("area", "vcpu_register_runstate_memory_area")
    g.struct("area_unmapped", "vcpu_register_runstate_memory_area", addr=UNMAPPED)
    g.fill("scratch", 48, 0xFF)
    a.lea(rax, ptr["scratch"])
    a.mov(qword["area"], rax)
    g.call("register", "vcpu_op", C.VCPUOP_register_runstate_memory_area, 0, "area")
    g.dump("area_state", "scratch", 4)
    a.mov(rax, qword[rip + "scratch" + 8])
    g.report("state_entry_time")
    g.call("register_null_arg", "vcpu_op", C.VCPUOP_register_runstate_memory_area, 0, NULL)
    g.call("register_unmapped_area", "vcpu_op", C.VCPUOP_register_runstate_memory_area, 0,
           "area_unmapped")
    g.call("register_bad_vcpu", "vcpu_op", C.VCPUOP_register_runstate_memory_area, 3, "area")
    run = run_cases(g.finish())
    assert run["register"] == 0
    assert struct.unpack("<i", run.dumps["area_state"])[0] == C.RUNSTATE_running
    assert run["state_entry_time"] > 0
    assert run["register_null_arg"] == EFAULT
    assert run["register_unmapped_area"] == 0
    assert run["register_bad_vcpu"] == ENOENT


def test_the_runstate_area_counts_time_blocked(run_cases):
    """The registered area is rewritten as the vCPU blocks and runs again (Xen writes it
    at every schedule): 20 ms in SCHEDOP_poll with no port shows up in time[blocked],
    and the state reads running once the vCPU is back."""
    g = ConformanceGuest("vcpu_op runstate accounting", events=True)
    a = g.a
    g.struct("area", "vcpu_register_runstate_memory_area")
    g.struct("poll", "sched_poll")
    g.fill("scratch", 48, 0)
    blocked = 16 + 8 * C.RUNSTATE_blocked
    a.lea(rax, ptr["scratch"])
    a.mov(qword["area"], rax)
    g.call("register", "vcpu_op", C.VCPUOP_register_runstate_memory_area, 0, "area")
    a.mov(rax, qword[rip + "scratch" + blocked])
    g.report("blocked_before")
    a.call("pvclock_read")
    g.report("poll_start")
    a.add(rax, 20_000_000)
    a.mov(qword[rip + "poll" + 16], rax)
    g.call("poll", "sched_op", C.SCHEDOP_poll, "poll")
    a.mov(rax, qword[rip + "scratch" + blocked])
    g.report("blocked_after")
    a.mov(eax, dword[rip + "scratch"])
    g.report("state_after")
    a.call("pvclock_read")
    g.report("poll_end")
    run = run_cases(g.finish())
    assert run["register"] == 0 and run["poll"] == 0
    # blocked from when the poll began to the 20 ms deadline: less by what the host took
    # to get the vCPU into the poll (a loaded host can take ms), never more than the
    # time that passed
    blocked_ns = run["blocked_after"] - run["blocked_before"]
    assert 10_000_000 <= blocked_ns <= run["poll_end"] - run["poll_start"]
    assert run["state_after"] == C.RUNSTATE_running
