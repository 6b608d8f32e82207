"""The PV console ring (Xen's xenconsole protocol) and trapless's backend, cext/console_ring.c.

Each guest finds the ring and its port in start_info, as a Xen domU does; the host side
checks exactly what reached the console stream, on every engine."""
from __future__ import annotations

import time

from abi import C, offsetof
from guest_kernel.asm import byte, cl, dword, eax, edx, ptr, qword, r12, r13, rax, rbx, rcx, rdi, rdx, rip, rsi
from guest_kernel.runtime import PVProgram

from helpers import wait_for

SI_MFN = offsetof("start_info", "console_mfn")
SI_EVTCHN = offsetof("start_info", "console_evtchn")
OUT = offsetof("xencons_interface", "out")
OUT_CONS = offsetof("xencons_interface", "out_cons")
OUT_PROD = offsetof("xencons_interface", "out_prod")
IN_CONS = offsetof("xencons_interface", "in_cons")
IN_PROD = offsetof("xencons_interface", "in_prod")
EVTCHN_PENDING = offsetof("shared_info", "evtchn_pending")


def ring_program() -> PVProgram:
    """A guest with r12 = the console ring (VIRT_BASE 0: virtual = pseudo-physical),
    r13 = its port, and the frontend's routines:
      ring_write(rdi = buffer, rsi = length): produce into out, sending whenever the
        ring is full and once at the end;
      ring_send(): EVTCHNOP_send on the console port.
    Its print() is console_io: these tests drive the ring themselves."""
    p = PVProgram(console_ring=False)
    a = p.a
    a.mov(rax, qword["start_info_ptr"])
    a.mov(r12, qword[rax + SI_MFN])
    a.shl(r12, 12)
    a.mov(eax, dword[rax + SI_EVTCHN])
    a.mov(r13, rax)
    a.jmp("body")

    a.label("ring_send")
    a.push(rdi)
    a.push(rsi)
    a.mov(rax, r13)
    a.mov(dword["send_arg"], eax)
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "send_arg")
    a.pop(rsi)
    a.pop(rdi)
    a.ret()

    a.label("ring_write")
    a.label("ring_write.loop")
    a.test(rsi, rsi)
    a.je("ring_write.done")
    a.mov(eax, dword[r12 + OUT_PROD])
    a.mov(edx, eax)
    a.sub(edx, dword[r12 + OUT_CONS])
    a.cmp(edx, C.XENCONS_OUT_SIZE)
    a.jb("ring_write.room")
    a.call("ring_send")                 # full: the backend drains it, then go on
    a.jmp("ring_write.loop")
    a.label("ring_write.room")
    a.mov(edx, eax)
    a.and_(edx, C.XENCONS_OUT_SIZE - 1)
    a.mov(cl, byte[rdi])
    a.mov(byte[r12 + rdx + OUT], cl)
    a.inc(eax)
    a.mov(dword[r12 + OUT_PROD], eax)  # x86 keeps stores in order: data, then index
    a.inc(rdi)
    a.dec(rsi)
    a.jmp("ring_write.loop")
    a.label("ring_write.done")
    a.call("ring_send")
    a.ret()

    a.section(".data")
    a.label("send_arg")
    a.dd(0)
    a.section(".text")
    a.label("body")
    return p


def text_block(tag: str, size: int) -> bytes:
    """size bytes of numbered lines, so a lost or repeated piece shows."""
    out, i = b"", 0
    while len(out) < size:
        out += f"{tag} line {i:04d} of the console ring test\n".encode()
        i += 1
    return out[:size - 1] + b"\n"


def emit_data(p: PVProgram, label: str, data: bytes) -> None:
    a = p.a
    a.section(".rodata")
    a.label(label)
    a.db(data)
    a.section(".text")


def test_start_info_names_the_ring_and_its_port(engine, run_guest):
    p = ring_program()
    a = p.a
    p.print("mfn ")
    a.mov(rdi, r12)
    a.shr(rdi, 12)
    a.call("print_hex")
    p.print(" port ")
    a.mov(rdi, r13)
    a.call("print_dec")
    p.print("\n")
    a.xor(eax, eax)
    a.ret()
    stop, console, dom = run_guest(p.elf())
    assert (stop.kind, stop.reason) == ("shutdown", 0), stop
    # the domain's second port: as Xen's toolstack, the xenstore ring takes the first
    assert (dom.store_evtchn, dom.console_evtchn) == (1, 2)
    assert console == f"mfn {dom.layout.console >> 12:#x} port 2\n"
    # the ring page lies in the start-of-day region, right after the xenstore page
    assert dom.layout.console == dom.layout.xenstore + 4096


def test_output_through_the_ring_wraps_and_arrives_exactly(engine, run_guest):
    first, second = text_block("first", 1500), text_block("second", 3000)
    p = ring_program()
    a = p.a
    emit_data(p, "first", first)
    emit_data(p, "second", second)
    p.print("console_io before\n")
    # 1500 bytes, then 3000: the second write wraps the 2048-byte ring inside one
    # backend pass, fills it and goes on after the backend has drained it.
    a.lea(rdi, ptr["first"])
    a.mov(rsi, len(first))
    a.call("ring_write")
    a.lea(rdi, ptr["second"])
    a.mov(rsi, len(second))
    a.call("ring_write")
    p.print("console_io after\n")
    # the backend consumed everything: out_cons == out_prod
    a.mov(eax, dword[r12 + OUT_PROD])
    a.cmp(eax, dword[r12 + OUT_CONS])
    a.jne("drained.no")
    p.print("drained\n")
    a.label("drained.no")
    a.xor(eax, eax)
    a.ret()
    stop, console, dom = run_guest(p.elf())
    assert (stop.kind, stop.reason) == ("shutdown", 0), stop
    # Once the guest wrote to its ring, the ring is its console and console_io output
    # is the hypervisor's log of it (Xen: `xl console` vs `xl dmesg`).
    assert dom.console_output == b"console_io before\n" + first + second
    assert dom.xen_log == b"console_io after\ndrained\n"


def test_hostile_indexes_are_ignored_and_harmless(engine, run_guest):
    """out_prod far ahead of out_cons, one past a full ring, behind it: the backend
    takes nothing (as xenconsoled does) and the guest carries on; then a sane write."""
    p = ring_program()
    a = p.a
    for bad in (0x10000, C.XENCONS_OUT_SIZE + 1, 0xFFFFFFFF, 0x80000000):
        a.mov(eax, dword[r12 + OUT_CONS])
        a.add(eax, bad)
        a.mov(dword[r12 + OUT_PROD], eax)
        for _ in range(3):
            a.call("ring_send")
    # a send loop the backend must answer in bounded time each
    a.mov(rdi, 2000)
    a.label("many")
    a.push(rdi)
    a.call("ring_send")
    a.pop(rdi)
    a.dec(rdi)
    a.jne("many")
    # garbage in the in ring's producer too: host input must not land anywhere
    a.mov(dword[r12 + IN_PROD], 0x7FFFFFFF)
    p.print("still here\n")
    # give up the bad index: producer back at the consumer, then a real message
    a.mov(eax, dword[r12 + OUT_CONS])
    a.mov(dword[r12 + OUT_PROD], eax)
    emit_data(p, "after", b"after the storm\n")
    a.lea(rdi, ptr["after"])
    a.mov(rsi, 16)
    a.call("ring_write")
    a.xor(eax, eax)
    a.ret()
    stop, console, dom = run_guest(p.elf(), console_input=b"x" * 100)
    assert (stop.kind, stop.reason) == ("shutdown", 0), stop
    assert dom.console_output == b"still here\nafter the storm\n"
    ring_va = dom.layout.virt(dom.layout.console)
    before = dom.read_guest(ring_va, 4096)
    assert before[:C.XENCONS_IN_SIZE] == b"x" * 100 + bytes(C.XENCONS_IN_SIZE - 100)
    # More input, now that in_prod is garbage: nothing is written, the host keeps at most
    # one bounded buffer's worth, and the rest is refused.
    assert dom.send_input(b"y" * 10000) == 4096
    assert dom.send_input(b"z" * 10) == 0
    assert dom.read_guest(ring_va, 4096) == before


def read_line_program() -> PVProgram:
    """Reads the in ring until a newline, waiting in SCHEDOP_poll on the console port
    between notifications (as XTF's and Linux's console drivers do), then prints the
    line through console_io with "got: " in front."""
    p = ring_program()
    a = p.a
    # shared_info, placed where the guest can clear its port's pending bit
    a.lea(rax, ptr["shared_info"])
    a.shr(rax, 12)
    a.mov(qword[rip + "xatp" + offsetof("xen_add_to_physmap", "gpfn")], rax)
    p.hypercall("memory_op", C.XENMEM_add_to_physmap, "xatp")
    a.mov(rax, r13)
    a.mov(dword["poll_port"], eax)
    p.print("ready\n")
    a.lea(rdi, ptr["line"])             # rdi: where the next byte goes
    a.label("read.again")
    # clear our pending bit first, then look: a notify after the look wakes the poll
    a.mov(rcx, r13)
    a.mov(edx, 1)
    a.shl(rdx, cl)
    a.not_(rdx)
    a.lea(rax, ptr["shared_info"])
    a.lock()
    a.and_(qword[rax + EVTCHN_PENDING], rdx)
    a.label("read.look")
    a.mov(eax, dword[r12 + IN_CONS])
    a.cmp(eax, dword[r12 + IN_PROD])
    a.je("read.wait")
    a.mov(edx, eax)
    a.and_(edx, C.XENCONS_IN_SIZE - 1)
    a.mov(cl, byte[r12 + rdx])
    a.mov(byte[rdi], cl)
    a.inc(rdi)
    a.inc(eax)
    a.mov(dword[r12 + IN_CONS], eax)
    a.cmp(cl, ord("\n"))
    a.jne("read.look")
    a.call("ring_send")                 # we consumed: tell the backend
    a.lea(rsi, ptr["line"])
    a.sub(rdi, rsi)
    a.mov(rbx, rdi)                     # the line's length
    p.print("got: ")
    a.lea(rdi, ptr["line"])
    a.mov(rsi, rbx)
    a.call("print")
    a.xor(eax, eax)
    a.ret()
    a.label("read.wait")
    a.push(rdi)
    p.hypercall("sched_op", C.SCHEDOP_poll, "poll_arg")
    a.pop(rdi)
    a.jmp("read.again")

    a.section(".data")
    a.align(8)
    a.label("xatp")                     # struct xen_add_to_physmap
    a.dw(C.DOMID_SELF, 0)
    a.dd(C.XENMAPSPACE_shared_info)
    a.dq(0, 0)
    a.label("poll_port")
    a.dd(0, 0)
    a.label("poll_arg")                 # struct sched_poll {ports, nr_ports, timeout}
    a.dq("poll_port")
    a.dd(1, 0)
    a.dq(0)
    a.section(".bss")
    a.align(4096)
    a.label("shared_info")
    a.reserve(4096)
    a.label("line")
    a.reserve(4096)
    a.section(".text")
    return p


def test_input_reaches_the_in_ring_with_a_notification(engine):
    from hypervisor.domain import Domain
    with Domain(read_line_program().elf(), memory_mib=16, engine=engine) as dom:
        dom.start()
        assert wait_for(lambda: dom.console_output == b"ready\n")
        time.sleep(0.05)                    # let it sleep in SCHEDOP_poll: the notify must wake it
        assert dom.send_input(b"typed into the ring\n") == 20
        stop = dom.wait(20)
        assert stop is not None and (stop.kind, stop.reason) == ("shutdown", 0), stop
        assert dom.console_output == b"ready\ngot: typed into the ring\n"


def test_a_domain_without_a_ring_names_none(engine, run_guest):
    p = PVProgram()
    a = p.a
    a.mov(rax, qword["start_info_ptr"])
    a.mov(rdi, qword[rax + SI_MFN])
    a.call("print_dec")
    p.print(" ")
    a.mov(rax, qword["start_info_ptr"])
    a.mov(eax, dword[rax + SI_EVTCHN])
    a.mov(rdi, rax)
    a.call("print_dec")
    a.xor(eax, eax)
    a.ret()
    stop, console, dom = run_guest(p.elf(), console_ring=False)
    assert (stop.kind, stop.reason) == ("shutdown", 0), stop
    assert console == "0 0" and dom.console_evtchn == 0


def test_the_port_is_interdomain_with_dom0_and_the_guest_may_close_it(engine, run_guest):
    """EVTCHNOP_status sees the console port bound to dom0 (where xenconsoled lives in
    Xen); after EVTCHNOP_close, a send is -EINVAL and the ring is no longer served."""
    p = ring_program()
    a = p.a
    a.mov(rax, r13)
    a.mov(dword[rip + "st" + offsetof("evtchn_status", "port")], eax)
    a.mov(dword[rip + "close_arg" + offsetof("evtchn_close", "port")], eax)
    p.hypercall("event_channel_op", C.EVTCHNOP_status, "st")
    a.mov(rdi, rax)
    a.call("print_sdec")
    for field in ("status", "u_dom"):
        p.print(" ")
        a.mov(eax, dword[rip + "st" + offsetof("evtchn_status", field)])
        a.mov(rdi, rax)
        a.call("print_dec")
    p.print("\n")
    p.hypercall("event_channel_op", C.EVTCHNOP_close, "close_arg")
    a.mov(rdi, rax)
    a.call("print_sdec")
    p.print("\n")
    emit_data(p, "unheard", b"nobody reads this\n")
    a.lea(rdi, ptr["unheard"])
    a.mov(rsi, 18)
    a.call("ring_write")                # its send fails: the port is closed
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "send_arg")
    a.mov(rdi, rax)
    a.call("print_sdec")
    p.print("\n")
    a.xor(eax, eax)
    a.ret()
    a.section(".data")
    a.align(8)
    a.label("st")                       # struct evtchn_status
    a.dw(C.DOMID_SELF)
    a.db(bytes(22))
    a.label("close_arg")                # struct evtchn_close
    a.dd(0)
    a.section(".text")
    stop, console, dom = run_guest(p.elf())
    assert (stop.kind, stop.reason) == ("shutdown", 0), stop
    assert console == f"0 {C.EVTCHNSTAT_interdomain} 0\n0\n{-C.XEN_EINVAL}\n"
