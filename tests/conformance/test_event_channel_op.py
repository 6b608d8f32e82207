"""event_channel_op (32): every implemented sub-op with good and bad arguments, the
2-level pending/mask bits, and upcall delivery as a guest sees it."""
import struct

from abi import C, offsetof

from guest_kernel.asm import byte, ecx, qword, rax, rbx, rdi, rip, rsi
from guest_kernel.conformance import NON_CANONICAL, NULL, UNMAPPED, ConformanceGuest
from guest_kernel.pvlib import UPCALL_MASK, set_port_handler

EFAULT, EINVAL, ENOENT, EEXIST, EPERM, ESRCH, ENOSPC, ENOSYS = (
    -C.XEN_EFAULT, -C.XEN_EINVAL, -C.XEN_ENOENT, -C.XEN_EEXIST, -C.XEN_EPERM, -C.XEN_ESRCH,
    -C.XEN_ENOSPC, -C.XEN_ENOSYS)
OP = "event_channel_op"
PENDING = offsetof("shared_info", "evtchn_pending")
MASK = offsetof("shared_info", "evtchn_mask")


def status(run, case):
    return struct.unpack("<HHIIIHHI", run.dumps[case])


def test_ports_and_status(run_cases):
    g = ConformanceGuest("evtchn_ops")
    self_ = C.DOMID_SELF
    g.call("alloc_unbound", OP, C.EVTCHNOP_alloc_unbound,
           g.struct("au", "evtchn_alloc_unbound", dom=self_, remote_dom=self_))
    g.dump("alloc_unbound", "au", 8)
    g.call("alloc_unbound_other_dom", OP, C.EVTCHNOP_alloc_unbound,
           g.struct("au2", "evtchn_alloc_unbound", dom=5, remote_dom=self_))
    g.call("alloc_unbound_no_such_remote", OP, C.EVTCHNOP_alloc_unbound,
           g.struct("au3", "evtchn_alloc_unbound", dom=self_, remote_dom=99))
    g.call("bind_virq_timer", OP, C.EVTCHNOP_bind_virq, g.struct("bv", "evtchn_bind_virq", virq=C.VIRQ_TIMER))
    g.dump("bind_virq_timer", "bv", 12)
    g.call("bind_virq_again", OP, C.EVTCHNOP_bind_virq, g.struct("bv2", "evtchn_bind_virq", virq=C.VIRQ_TIMER))
    g.call("bind_virq_out_of_range", OP, C.EVTCHNOP_bind_virq,
           g.struct("bv3", "evtchn_bind_virq", virq=C.NR_VIRQS))
    g.call("bind_virq_global_on_vcpu1", OP, C.EVTCHNOP_bind_virq,
           g.struct("bv4", "evtchn_bind_virq", virq=C.VIRQ_CONSOLE, vcpu=1))
    g.call("bind_virq_bad_vcpu", OP, C.EVTCHNOP_bind_virq,
           g.struct("bv5", "evtchn_bind_virq", virq=C.VIRQ_DEBUG, vcpu=7))
    g.call("bind_virq_console", OP, C.EVTCHNOP_bind_virq, g.struct("bv6", "evtchn_bind_virq", virq=C.VIRQ_CONSOLE))
    g.call("bind_ipi", OP, C.EVTCHNOP_bind_ipi, g.struct("bi", "evtchn_bind_ipi", vcpu=0))
    g.dump("bind_ipi", "bi", 8)
    g.call("bind_ipi_bad_vcpu", OP, C.EVTCHNOP_bind_ipi, g.struct("bi2", "evtchn_bind_ipi", vcpu=3))
    for port in (1, 2, 4, 9):
        g.call(f"status_{port}", OP, C.EVTCHNOP_status, g.struct(f"st{port}", "evtchn_status", dom=self_, port=port))
        g.dump(f"status_{port}", f"st{port}", 24)
    g.call("status_port0", OP, C.EVTCHNOP_status, g.struct("st0", "evtchn_status", dom=self_, port=0))
    g.call("status_other_dom", OP, C.EVTCHNOP_status, g.struct("st5", "evtchn_status", dom=5, port=1))
    g.call("send_unbound", OP, C.EVTCHNOP_send, g.struct("s1", "evtchn_send", port=1))
    g.call("send_virq", OP, C.EVTCHNOP_send, g.struct("s2", "evtchn_send", port=2))
    g.call("send_ipi", OP, C.EVTCHNOP_send, g.struct("s4", "evtchn_send", port=4))
    g.call("send_closed", OP, C.EVTCHNOP_send, g.struct("s9", "evtchn_send", port=9))
    g.call("send_port0", OP, C.EVTCHNOP_send, g.struct("s0", "evtchn_send", port=0))
    g.call("send_huge_port", OP, C.EVTCHNOP_send, g.struct("sh", "evtchn_send", port=5000))
    g.call("unmask_bad", OP, C.EVTCHNOP_unmask, g.struct("um", "evtchn_unmask", port=4096))
    g.call("unmask_ipi", OP, C.EVTCHNOP_unmask, g.struct("um2", "evtchn_unmask", port=4))
    g.call("bind_vcpu_virq_timer", OP, C.EVTCHNOP_bind_vcpu, g.struct("bc", "evtchn_bind_vcpu", port=2, vcpu=0))
    g.call("bind_vcpu_unbound", OP, C.EVTCHNOP_bind_vcpu, g.struct("bc2", "evtchn_bind_vcpu", port=1, vcpu=0))
    g.call("bind_vcpu_bad_vcpu", OP, C.EVTCHNOP_bind_vcpu, g.struct("bc3", "evtchn_bind_vcpu", port=1, vcpu=4))
    g.call("bind_vcpu_ipi", OP, C.EVTCHNOP_bind_vcpu, g.struct("bc4", "evtchn_bind_vcpu", port=4, vcpu=0))
    g.call("close_virq", OP, C.EVTCHNOP_close, g.struct("c2", "evtchn_close", port=2))
    g.call("close_again", OP, C.EVTCHNOP_close, "c2")
    g.call("status_after_close", OP, C.EVTCHNOP_status, "st9")
    g.call("rebind_timer_after_close", OP, C.EVTCHNOP_bind_virq, "bv2")
    g.dump("rebind_timer_after_close", "bv2", 12)
    for bad, ptr in (("null", NULL), ("noncanonical", NON_CANONICAL), ("unmapped", UNMAPPED)):
        g.call(f"bind_ipi_{bad}", OP, C.EVTCHNOP_bind_ipi, ptr)
        g.call(f"send_{bad}", OP, C.EVTCHNOP_send, ptr)
    g.call("reset", OP, C.EVTCHNOP_reset, g.struct("rs", "evtchn_reset", dom=self_))
    g.call("unknown_cmd", OP, 99, "rs")
    run = run_cases(g.finish())

    assert run["alloc_unbound"] == 0
    assert run.dumps["alloc_unbound"] == struct.pack("<HHI", C.DOMID_SELF, C.DOMID_SELF, 1)
    assert run["alloc_unbound_other_dom"] == EPERM
    assert run["alloc_unbound_no_such_remote"] == ESRCH
    assert run["bind_virq_timer"] == 0
    assert run.dumps["bind_virq_timer"] == struct.pack("<III", C.VIRQ_TIMER, 0, 2)
    assert run["bind_virq_again"] == EEXIST
    assert run["bind_virq_out_of_range"] == EINVAL
    assert run["bind_virq_global_on_vcpu1"] == EINVAL
    assert run["bind_virq_bad_vcpu"] == ENOENT
    assert run["bind_virq_console"] == 0            # port 3
    assert run["bind_ipi"] == 0
    assert run.dumps["bind_ipi"] == struct.pack("<II", 0, 4)
    assert run["bind_ipi_bad_vcpu"] == ENOENT
    domid = run.domain.domid
    assert status(run, "status_1")[3:6] == (C.EVTCHNSTAT_unbound, 0, domid)
    assert status(run, "status_2")[3] == C.EVTCHNSTAT_virq
    assert struct.unpack_from("<I", run.dumps["status_2"], 16)[0] == C.VIRQ_TIMER
    assert status(run, "status_4")[3] == C.EVTCHNSTAT_ipi
    assert status(run, "status_9")[3] == C.EVTCHNSTAT_closed
    assert run["status_port0"] == EINVAL
    assert run["status_other_dom"] == EPERM
    assert run["send_unbound"] == 0 and run["send_ipi"] == 0
    assert run["send_virq"] == EINVAL and run["send_closed"] == EINVAL
    assert run["send_port0"] == EINVAL and run["send_huge_port"] == EINVAL
    assert run["unmask_bad"] == EINVAL and run["unmask_ipi"] == 0
    assert run["bind_vcpu_virq_timer"] == EINVAL    # per-vCPU VIRQs stay put
    assert run["bind_vcpu_unbound"] == 0
    assert run["bind_vcpu_bad_vcpu"] == ENOENT
    assert run["bind_vcpu_ipi"] == EINVAL
    assert run["close_virq"] == 0 and run["close_again"] == EINVAL
    assert run["status_after_close"] == 0
    assert run["rebind_timer_after_close"] == 0
    assert run.dumps["rebind_timer_after_close"] == struct.pack("<III", C.VIRQ_TIMER, 0, 2)
    for bad in ("null", "noncanonical", "unmapped"):
        assert run[f"bind_ipi_{bad}"] == EFAULT and run[f"send_{bad}"] == EFAULT
    assert run["reset"] == ENOSYS and run["unknown_cmd"] == ENOSYS


def test_port_limit_is_enospc(run_cases):
    g = ConformanceGuest("evtchn_limit")
    g.struct("ipi", "evtchn_bind_ipi", vcpu=0)
    for i in range(1, 9):
        g.call(f"ipi_{i}", OP, C.EVTCHNOP_bind_ipi, "ipi")
    run = run_cases(g.finish(), max_evtchn_ports=8)
    assert [run[f"ipi_{i}"] for i in range(1, 8)] == [0] * 7      # ports 1..7; 0 is reserved
    assert run["ipi_8"] == ENOSPC


def ipi_guest(name: str, sends: int, masked: bool, unmask_later: bool = False) -> bytes:
    """Bind an IPI with a counting handler, send it `sends` times (with upcalls masked
    or not), report how many upcalls the handler saw, and maybe unmask afterwards."""
    g = ConformanceGuest(name, events=True)
    a = g.a
    g.call("bind_ipi", OP, C.EVTCHNOP_bind_ipi, g.struct("bi", "evtchn_bind_ipi", vcpu=0))
    a.mov(rbx, 1)                                   # the IPI is port 1
    set_port_handler(g, rbx, "on_ipi")
    g.events_on()
    a.mov(byte[rip + "shared_info" + UPCALL_MASK], 1 if masked else 0)
    a.mov(rbx, sends)
    a.label("send_loop")
    g.hypercall(OP, C.EVTCHNOP_send, g.struct("send_arg", "evtchn_send", port=1))
    a.dec(rbx)
    a.jne("send_loop")
    a.mov(rax, qword["ipi_count"])
    g.report("handled")
    if unmask_later:
        a.mov(byte[rip + "shared_info" + UPCALL_MASK], 0)
        g.hypercall("xen_version", C.XENVER_version, 0)   # Xen's way to force the callback
        a.mov(rax, qword["ipi_count"])
        g.report("handled_after_unmask")
    a.jmp("after_handler")
    a.label("on_ipi")
    a.inc(qword["ipi_count"])
    a.ret()
    a.label("after_handler")
    a.section(".data")
    a.label("ipi_count")
    a.dq(0)
    a.section(".text")
    return g.finish()


def test_masked_upcalls_arrive_after_unmask(run_cases):
    run = run_cases(ipi_guest("mask_unmask", sends=3, masked=True, unmask_later=True))
    assert run["events_init"] == 0 and run["bind_ipi"] == 0
    assert run["handled"] == 0
    assert run["handled_after_unmask"] == 1         # three sends, one pending bit, one upcall
    assert run.domain.counters().upcalls == 1


def test_never_unmasking_guest_gets_no_upcall(run_cases):
    run = run_cases(ipi_guest("never_unmask", sends=1000, masked=True))
    assert run["handled"] == 0
    assert run.domain.counters().upcalls == 0


def test_send_flood_leaves_host_and_guest_healthy(run_cases):
    run = run_cases(ipi_guest("flood", sends=20000, masked=False))
    counters = run.domain.counters()
    assert counters.hypercalls["event_channel_op"] == 20001
    # Every send raised the port; each upcall handled what was pending at the time.
    assert 1 <= run["handled"] <= 20000
    assert counters.upcalls == run["handled"]


def copy_shared_info(g: ConformanceGuest, label: str, offset: int, length: int) -> str:
    """Copy length bytes of shared_info from offset into a new buffer at label (to dump)."""
    a = g.a
    a.section(".data")
    a.label(label)
    a.db(bytes(length))
    a.section(".text")
    a.lea(rsi, qword[rip + "shared_info" + offset])
    a.lea(rdi, qword[rip + label])
    a.mov(ecx, length)
    a.rep_movsb()
    return label


def test_ports_bound_to_a_second_vcpu_mark_its_vcpu_info(run_cases):
    """vcpus=2: an IPI port and a per-vCPU VIRQ bound to vCPU 1 (down, never run) are
    raised in shared_info for vCPU 1, whose vcpu_info says so; vCPU 0's does not."""
    from abi import ffi
    vi1 = offsetof("shared_info", "vcpu_info") + ffi.sizeof("struct vcpu_info")
    vi0 = offsetof("shared_info", "vcpu_info")
    g = ConformanceGuest("evtchn_vcpu1", events=True)
    g.call("bind_ipi_vcpu1", OP, C.EVTCHNOP_bind_ipi, g.struct("bi", "evtchn_bind_ipi", vcpu=1))
    g.dump("bind_ipi_vcpu1", "bi", 8)
    g.call("bind_virq_timer_vcpu1", OP, C.EVTCHNOP_bind_virq,
           g.struct("bv", "evtchn_bind_virq", virq=C.VIRQ_TIMER, vcpu=1))
    g.call("bind_virq_timer_vcpu1_again", OP, C.EVTCHNOP_bind_virq,
           g.struct("bv2", "evtchn_bind_virq", virq=C.VIRQ_TIMER, vcpu=1))
    g.call("bind_virq_timer_vcpu2", OP, C.EVTCHNOP_bind_virq,
           g.struct("bv3", "evtchn_bind_virq", virq=C.VIRQ_TIMER, vcpu=2))
    g.call("send_ipi_vcpu1", OP, C.EVTCHNOP_send, g.struct("s", "evtchn_send", port=1))
    g.dump("vcpu_info_0", copy_shared_info(g, "vi0_copy", vi0, 16), 16)
    g.dump("vcpu_info_1", copy_shared_info(g, "vi1_copy", vi1, 16), 16)
    g.dump("pending", copy_shared_info(g, "pending_copy", PENDING, 8), 8)
    run = run_cases(g.finish(), vcpus=2)
    assert run["events_init"] == 0
    assert run["bind_ipi_vcpu1"] == 0 and run.dumps["bind_ipi_vcpu1"] == struct.pack("<II", 1, 1)
    assert run["bind_virq_timer_vcpu1"] == 0
    assert run["bind_virq_timer_vcpu1_again"] == EEXIST
    assert run["bind_virq_timer_vcpu2"] == ENOENT
    assert run["send_ipi_vcpu1"] == 0
    assert struct.unpack("<Q", run.dumps["pending"])[0] & 0b10    # port 1
    pending0, _, sel0 = struct.unpack("<BB6xQ", run.dumps["vcpu_info_0"])
    pending1, _, sel1 = struct.unpack("<BB6xQ", run.dumps["vcpu_info_1"])
    assert (pending1, sel1) == (1, 1)                 # selector word 0 holds port 1
    assert (pending0, sel0) == (0, 0)
