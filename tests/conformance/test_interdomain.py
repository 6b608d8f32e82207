"""Two domains, one interdomain event channel: a vCPU blocked with no timer set is
woken by the other domain's EVTCHNOP_send."""
from abi import C, offsetof

from guest_kernel.asm import byte, dword, eax, qword, rax, rbx, rip
from guest_kernel.conformance import ConformanceGuest, parse
from guest_kernel.pvlib import PENDING_SEL, UPCALL_PENDING, set_port_handler
from hypervisor.domain import Domain

OP = "event_channel_op"
PENDING = rip + "shared_info" + offsetof("shared_info", "evtchn_pending")


def sender(peer: int) -> bytes:
    """Offer port 1 to `peer`, wait until it is bound, let the peer block, then send."""
    g = ConformanceGuest("sender", events=True)
    g.call("alloc_unbound", OP, C.EVTCHNOP_alloc_unbound,
           g.struct("au", "evtchn_alloc_unbound", dom=C.DOMID_SELF, remote_dom=peer))
    g.struct("st", "evtchn_status", dom=C.DOMID_SELF, port=1)
    g.a.label("wait_bound")
    g.hypercall("sched_op", C.SCHEDOP_yield, 0)
    g.hypercall(OP, C.EVTCHNOP_status, "st")
    g.a.cmp(dword[rip + "st" + offsetof("evtchn_status", "status")], C.EVTCHNSTAT_interdomain)
    g.a.jne("wait_bound")
    g.struct("nap", "sched_poll", nr_ports=0)         # 50 ms for the peer to block
    g.a.call("pvclock_read")
    g.a.add(rax, 50_000_000)
    g.a.mov(qword[rip + "nap" + offsetof("sched_poll", "timeout")], rax)
    g.hypercall("sched_op", C.SCHEDOP_poll, "nap")
    g.call("send", OP, C.EVTCHNOP_send, g.struct("s", "evtchn_send", port=1))
    return g.finish()


def receiver(peer: int) -> bytes:
    """Bind to the peer's port, then block with no timer: only a send can wake it."""
    g = ConformanceGuest("receiver", events=True)
    g.struct("bi", "evtchn_bind_interdomain", remote_dom=peer, remote_port=1)
    g.a.label("try_bind")
    g.hypercall(OP, C.EVTCHNOP_bind_interdomain, "bi")
    g.a.test(rax, rax)
    g.a.je("bound")
    g.hypercall("sched_op", C.SCHEDOP_yield, 0)
    g.a.jmp("try_bind")
    g.a.label("bound")
    g.report("bind_interdomain")
    g.a.mov(rax, qword[PENDING])
    g.report("pending_after_bind")        # Xen marks a newly bound port pending
    g.a.mov(qword[PENDING], 0)
    g.a.mov(byte[rip + "shared_info" + UPCALL_PENDING], 0)
    g.a.mov(qword[rip + "shared_info" + PENDING_SEL], 0)
    g.a.mov(rbx, 1)
    set_port_handler(g, rbx, "on_event")
    g.a.mov(eax, dword[rip + "bi" + offsetof("evtchn_bind_interdomain", "local_port")])
    g.report("local_port")
    g.events_on()
    g.call("block", "sched_op", C.SCHEDOP_block, 0)
    g.a.mov(rax, qword["events_seen"])
    g.report("events_seen")
    g.a.jmp("done")
    g.a.label("on_event")
    g.a.inc(qword["events_seen"])
    g.a.ret()
    g.a.label("done")
    g.a.section(".data")
    g.a.label("events_seen")
    g.a.dq(0)
    g.a.section(".text")
    return g.finish()


def test_blocked_vcpu_is_woken_by_a_send_from_another_domain(engine):
    # no console or xenstore rings: the guests know port 1 is the sender's first (offered) port
    a = Domain(sender(peer=12), domid=11, engine=engine, console_ring=False, xenstore=False)
    b = Domain(receiver(peer=11), domid=12, engine=engine, console_ring=False, xenstore=False)
    try:
        b.start()
        a.start()
        stop_a, stop_b = a.wait(20), b.wait(20)
        assert stop_a is not None and stop_b is not None, "a domain hung"
        assert (stop_a.kind, stop_a.reason) == ("shutdown", 0), a.console_output
        assert (stop_b.kind, stop_b.reason) == ("shutdown", 0), b.console_output
        ra, _ = parse(a.console_output.decode())
        rb, _ = parse(b.console_output.decode())
        assert ra["alloc_unbound"] == 0 and ra["send"] == 0
        assert rb["bind_interdomain"] == 0 and rb["local_port"] == 1
        assert rb["pending_after_bind"] == 1 << 1
        assert rb["block"] == 0
        assert rb["events_seen"] == 1
        assert b.counters().blocks >= 1
    finally:
        a.destroy()
        b.destroy()


MASK = rip + "shared_info" + offsetof("shared_info", "evtchn_mask")


def poller(peer: int) -> bytes:
    """Bind to the peer's port, mask it, then SCHEDOP_poll on it with no timeout: only
    the send, which raises no upcall on a masked port, can wake it (Xen's
    evtchn_2l_set_pending checks pollers whether or not the port is masked)."""
    g = ConformanceGuest("poller", events=True)
    g.struct("bi", "evtchn_bind_interdomain", remote_dom=peer, remote_port=1)
    g.a.label("try_bind")
    g.hypercall(OP, C.EVTCHNOP_bind_interdomain, "bi")
    g.a.test(rax, rax)
    g.a.je("bound")
    g.hypercall("sched_op", C.SCHEDOP_yield, 0)
    g.a.jmp("try_bind")
    g.a.label("bound")
    g.a.mov(qword[MASK], 1 << 1)          # port 1 masked, then its bind-time event gone
    g.a.mov(qword[PENDING], 0)
    g.a.mov(byte[rip + "shared_info" + UPCALL_PENDING], 0)
    g.a.mov(qword[rip + "shared_info" + PENDING_SEL], 0)
    g.a.section(".data")
    g.a.align(8)
    g.a.label("poll_ports")
    g.a.dd(1)
    g.a.align(8)
    g.a.label("poll_arg")                 # struct sched_poll: port 1, no timeout
    g.a.dq(g.a.ref("poll_ports"))
    g.a.dd(1, 0)
    g.a.dq(0)
    g.a.section(".text")
    g.call("poll", "sched_op", C.SCHEDOP_poll, "poll_arg")
    g.a.mov(rax, qword[PENDING])
    g.report("pending_after_poll")
    g.a.movzx(eax, byte[rip + "shared_info" + UPCALL_PENDING])
    g.report("upcall_pending")            # masked: the send raised no upcall
    return g.finish()


def test_a_vcpu_polling_a_masked_port_is_woken_by_a_send(engine):
    a = Domain(sender(peer=14), domid=13, engine=engine, console_ring=False, xenstore=False)
    b = Domain(poller(peer=13), domid=14, engine=engine, console_ring=False, xenstore=False)
    try:
        b.start()
        a.start()
        stop_a, stop_b = a.wait(20), b.wait(20)
        assert stop_a is not None and stop_b is not None, "a domain hung"
        assert (stop_b.kind, stop_b.reason) == ("shutdown", 0), b.console_output
        rb, _ = parse(b.console_output.decode())
        assert rb["poll"] == 0
        assert rb["pending_after_poll"] == 1 << 1
        assert rb["upcall_pending"] == 0
        assert b.counters().blocks >= 1
    finally:
        a.destroy()
        b.destroy()
