"""The toolstack's view of a running domain: pause/unpause, state, trace, counters."""
import time

from abi import C
from guest_kernel.pv_kernel import build_pv_kernel
from hypervisor.domain import Domain

from helpers import wait_for


def test_pause_stops_ticks_and_unpause_resumes(engine):
    with Domain(build_pv_kernel(), cmdline="ticks=60", engine=engine) as dom:
        dom.start()
        assert wait_for(lambda: b"tick 10" in dom.console_output)
        dom.pause()
        assert wait_for(lambda: dom.vcpu_state == "paused")
        frozen = dom.counters().total_exits
        time.sleep(0.2)                               # 20 ticks' worth of time
        assert dom.counters().total_exits == frozen
        assert dom.vcpu_state == "paused"
        dom.unpause()
        stop = dom.wait(20)
        assert (stop.kind, stop.reason) == ("shutdown", C.SHUTDOWN_poweroff)
        assert b"60 ticks at 100 Hz" in dom.console_output
        assert dom.vcpu_state == "stopped"
        assert dom.cpu_ns > 0


def test_blocked_state_and_destroy_while_blocked(engine):
    with Domain(build_pv_kernel(), cmdline="ticks=100000", engine=engine) as dom:
        dom.start()
        assert wait_for(lambda: b"tick 10" in dom.console_output)
        # between 100 Hz ticks the vCPU sleeps in SCHEDOP_block most of the time
        assert wait_for(lambda: dom.vcpu_state == "blocked")
        dom.destroy()
        assert dom.stop_info.kind == "stopped"


def test_trace_records_the_latest_hypercalls_decoded(engine):
    import time
    before = time.monotonic_ns()            # CLOCK_MONOTONIC: the domain's system time
    with Domain(build_pv_kernel(), cmdline="ticks=3", engine=engine) as dom:
        stop = dom.run(timeout=20)
        assert stop.kind == "shutdown"
        trace = dom.trace()
        after = time.monotonic_ns()
        # each call's time is system time, in call order, the three 100 Hz ticks
        # at least 20 ms apart from the first call to the last
        times = [e.time_ns for e in trace]
        assert before <= times[0] and times == sorted(times) and times[-1] <= after
        assert times[-1] - times[0] >= 20_000_000
        assert trace[-1].name == "sched_op"
        assert trace[-1].args[0] == C.SCHEDOP_shutdown and trace[-1].ret == 0
        assert [e.seq for e in trace] == list(range(trace[0].seq, trace[-1].seq + 1))
        first = dom.trace(3)
        assert len(first) == 3 and first[-1].seq == trace[-1].seq
        assert any(e.name == "vcpu_op" and e.args[0] == C.VCPUOP_set_periodic_timer for e in trace)
