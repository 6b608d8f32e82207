"""sched_op (29): yield, shutdown, shutdown_code; bad pointers, reasons and sub-ops."""
import pytest

from abi import C

from guest_kernel.asm import eax
from guest_kernel.conformance import NON_CANONICAL, NULL, UNMAPPED, ConformanceGuest

EFAULT, EINVAL, ENOSYS = -C.XEN_EFAULT, -C.XEN_EINVAL, -C.XEN_ENOSYS


def reason_arg(g: ConformanceGuest, label: str, reason: int) -> str:
    g.a.section(".data")
    g.a.label(label)
    g.a.dd(reason)
    g.a.section(".text")
    return label


def test_sched_op_errors_leave_the_domain_running(run_cases):
    g = ConformanceGuest("sched_op")
    g.call("yield", "sched_op", C.SCHEDOP_yield, 0)
    g.call("shutdown_null", "sched_op", C.SCHEDOP_shutdown, NULL)
    g.call("shutdown_noncanonical", "sched_op", C.SCHEDOP_shutdown, NON_CANONICAL)
    g.call("shutdown_unmapped", "sched_op", C.SCHEDOP_shutdown, UNMAPPED)
    g.call("shutdown_bad_reason", "sched_op", C.SCHEDOP_shutdown, reason_arg(g, "r99", 99))
    g.call("shutdown_code_null", "sched_op", C.SCHEDOP_shutdown_code, NULL)
    g.call("shutdown_code_bad_reason", "sched_op", C.SCHEDOP_shutdown_code, "r99")
    g.call("unknown_cmd", "sched_op", 42, 0)
    g.call("remote_shutdown", "sched_op", C.SCHEDOP_remote_shutdown, 0)
    run = run_cases(g.finish())
    assert run["yield"] == 0
    for case in ("shutdown_null", "shutdown_noncanonical", "shutdown_unmapped", "shutdown_code_null"):
        assert run[case] == EFAULT, case
    assert run["shutdown_bad_reason"] == EINVAL
    assert run["shutdown_code_bad_reason"] == EINVAL
    assert run["unknown_cmd"] == ENOSYS
    assert run["remote_shutdown"] == ENOSYS


@pytest.mark.parametrize("reason", ["poweroff", "reboot", "suspend", "crash", "watchdog", "soft_reset"])
def test_shutdown_reports_its_reason(run_guest, reason):
    g = ConformanceGuest(f"shutdown_{reason}")
    g.hypercall("sched_op", C.SCHEDOP_shutdown, reason_arg(g, "reason", getattr(C, f"SHUTDOWN_{reason}")))
    g.print("still running after shutdown\n")
    stop, console, _ = run_guest(g.finish())
    assert (stop.kind, stop.reason, stop.shutdown_name) == (
        "shutdown", getattr(C, f"SHUTDOWN_{reason}"), reason)
    assert "still running" not in console


def test_shutdown_code_is_latched(run_guest):
    """SCHEDOP_shutdown_code records a reason that wins over the later shutdown's."""
    g = ConformanceGuest("shutdown_code")
    g.call("latch", "sched_op", C.SCHEDOP_shutdown_code, reason_arg(g, "crash", C.SHUTDOWN_crash))
    g.call("latch_again", "sched_op", C.SCHEDOP_shutdown_code, reason_arg(g, "reboot", C.SHUTDOWN_reboot))
    g.a.xor(eax, eax)      # main returns 0: the runtime shuts down with poweroff
    stop, console, _ = run_guest(g.finish())
    assert "result latch 0" in console and "result latch_again 0" in console
    assert (stop.kind, stop.reason) == ("shutdown", C.SHUTDOWN_crash)
