"""Guests that measure: each does one thing N times, then powers off.

The hypercall loop and the bare-exit loop have the same shape (a counted loop around
one exit), so timing both with the same C run loop isolates what our hypercall
dispatch adds to the hardware's own exit round trip.
"""
from __future__ import annotations

from abi import C, offsetof

from .asm import byte, word, dword, eax, ebx, ecx, edi, esi, ptr, qword, r11, r12, r13, rax, rbx, rcx, rdi, rdx, rip, rsi, rsp
from .pvh_ring3 import emit_load_tss
from .runtime import PVProgram

UNCLAIMED_PORT = 0x80  # the POST-code port: no device model claims it


def hypercall_loop(iterations: int, xen_pv: bool = False) -> bytes:
    """xen_version(XENVER_version) `iterations` times: by default as a ring-0 kernel
    through the `in` stub, to set beside bare_exit_loop (which only ring 0 may run);
    xen_pv: under Xen's PV CPU model, through Xen's syscall stub."""
    p = PVProgram(guest_os="trapless-bench-hypercall", xen_pv=xen_pv)
    a = p.a
    a.mov(r12, iterations)
    a.label("loop")
    a.mov(edi, C.XENVER_version)
    a.xor(esi, esi)
    a.call("hypercall_xen_version")
    a.dec(r12)
    a.jne("loop")
    a.xor(eax, eax)
    a.ret()
    return p.elf()


def compute_loop(rounds: int, xen_pv: bool) -> bytes:
    """compare_workloads' compute loop (xorshift64, registers only, no exit), as a
    ring-0 PV kernel or under Xen's PV CPU model (ring 3)."""
    from .compare_workloads import emit_xorshift_rounds
    p = PVProgram(guest_os="trapless-bench-compute", xen_pv=xen_pv)
    a = p.a
    emit_xorshift_rounds(a, rounds, "loop")
    a.xor(eax, eax)
    a.ret()
    return p.elf()


def bare_exit_loop(iterations: int) -> bytes:
    """`out` to a port nobody claims, `iterations` times: the bare exit.

    The `out` sits in a stub on a page of its own that the loop calls, exactly as the
    hypercall loop calls its stub on the hypercall page, so both guests touch the same
    pages between exits and differ only in what the VMM does with the exit.
    """
    # port I/O is #GP for a kernel in ring 3: this one requires ring 0
    p = PVProgram(guest_os="trapless-bench-bare-exit", xen_pv=False)
    a = p.a
    a.mov(r12, iterations)
    a.label("loop")
    a.mov(edi, C.XENVER_version)
    a.xor(esi, esi)
    a.call("bare_exit_stub")
    a.dec(r12)
    a.jne("loop")
    a.xor(eax, eax)
    a.ret()
    a.align(4096)
    a.label("bare_exit_stub")
    a.mov(eax, C.__HYPERVISOR_xen_version)
    a.out(UNCLAIMED_PORT, eax)
    a.ret()
    return p.elf()


# The ring-3 bare exit's CPU set-up (a PVH guest's own): null, kernel code64, kernel
# data, user code32 (unused), user data, user code64, then the TSS (filled at run time)
RING3_KERNEL_CS, RING3_KERNEL_DS, RING3_USER_DS, RING3_USER_CS, RING3_TSS_SEL = 0x08, 0x10, 0x23, 0x2B, 0x30
RING3_GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFFB000000FFFF,
             0x00CFF3000000FFFF, 0x00AFFB000000FFFF, 0, 0)
# The TSS's I/O bitmap covers ports 0 to 8 * IOMAP_BYTES - 1 and opens only the four
# that a 32-bit `out` to UNCLAIMED_PORT touches; ports past it are denied, and the byte
# after a bitmap must be all ones.
IOMAP_BYTES = UNCLAIMED_PORT // 8 + 1
TSS_LIMIT = 0x68 + IOMAP_BYTES + 1 - 1


def ring3_bare_exit_loop(iterations: int) -> bytes:
    """`out` to a port nobody claims, `iterations` times, from ring 3: the bare exit of
    the ring a Xen-model PV kernel runs in.

    A Xen PV kernel cannot exit bare (its port I/O is a #GP that the hypervisor
    emulates), so this is a PVH guest: its kernel, in ring 0, gives itself a TSS whose
    I/O bitmap opens UNCLAIMED_PORT and drops to ring 3, where the loop calls a stub on
    a page of its own doing the `out`, as bare_exit_loop does; the CPU checks the
    bitmap and the `out` exits to the VMM with nothing else to do. An `int3` (a DPL-3
    gate) brings the loop's end back to ring 0, which powers off.
    """
    from .elf import build_elf
    from .pvh_guest import _entry32, emit_entry32_data, emit_first_gib_tables, emit_start64
    from .pvlib import emit_traps

    p = PVProgram(guest_os="trapless-bench-ring3-bare-exit", xen_pv=False, console_ring=False)
    a = p.a
    a.call("idt_init")
    # the TSS: its ring-0 stack, the bitmap's offset; then its descriptor and ltr
    a.lea(rax, ptr["kstack_top"])
    a.mov(qword[rip + "tss" + 4], rax)
    a.mov(word[rip + "tss" + 0x66], 0x68)
    emit_load_tss(a, TSS_LIMIT, RING3_TSS_SEL)
    a.mov(edi, 3)                                   # int3 from ring 3: the loop is over
    a.lea(rsi, ptr["on_int3"])
    a.call("idt_set_gate")
    a.mov(byte[rip + "idt" + 3 * 16 + 5], 0xEE)     # DPL 3
    # iretq to the loop in ring 3, interrupts on
    a.mov(qword["kernel_rsp"], rsp)
    a.push(RING3_USER_DS)
    a.lea(rax, ptr["user_stack_top"])
    a.push(rax)
    a.push(0x202)
    a.push(RING3_USER_CS)
    a.lea(rax, ptr["user_loop"])
    a.push(rax)
    a.iretq()

    a.label("on_int3")                              # back in ring 0: main returns 0
    a.mov(rsp, qword["kernel_rsp"])
    a.cli()
    a.xor(eax, eax)
    a.ret()

    a.label("user_loop")
    a.mov(r12, iterations)
    a.label("user_loop.next")
    a.call("ring3_exit_stub")
    a.dec(r12)
    a.jne("user_loop.next")
    a.int3()
    a.align(4096)
    a.label("ring3_exit_stub")
    a.mov(eax, C.__HYPERVISOR_xen_version)
    a.out(UNCLAIMED_PORT, eax)
    a.ret()

    emit_start64(a, RING3_KERNEL_DS)

    a.section(".data")
    emit_entry32_data(a)
    a.align(8)
    a.label("kernel_rsp")
    a.dq(0)
    a.align(16)
    a.label("gdt")
    a.dq(*RING3_GDT)
    a.label("gdt_desc")
    a.dw(len(RING3_GDT) * 8 - 1)
    a.dd("gdt")
    a.align(16)
    a.label("tss")
    a.db(*([0] * 0x68))
    iomap = [0xFF] * (IOMAP_BYTES + 1)
    for port in range(UNCLAIMED_PORT, UNCLAIMED_PORT + 4):
        iomap[port // 8] &= ~(1 << (port % 8))
    a.db(*iomap)
    emit_first_gib_tables(a, user=True)
    a.section(".bss")
    a.align(16)
    a.reserve(4096)
    a.label("kstack_top")
    a.reserve(4096)
    a.label("user_stack_top")

    emit_traps(p, "ring-3 bare-exit guest")
    a.section(".text32", "rx")
    _entry32(a)
    img = p.image()
    notes = [(C.XEN_ELFNOTE_GUEST_OS, "trapless-bench-ring3-bare-exit"),
             (C.XEN_ELFNOTE_PHYS32_ENTRY, img.symbols["_start32"])]
    return build_elf(img.sections, img.symbols, img.symbols["_start32"], notes)


def exception_bounce_loop(iterations: int) -> bytes:
    """`int3` `iterations` times in a Xen-model PV kernel (ring 3): each is an exception
    the hypervisor bounces to the kernel's trap-table handler for #BP, which returns
    with the iret hypercall, as Linux's and XTF's handlers do."""
    from .pvlib import emit_bounce_return, emit_trap_info

    p = PVProgram(guest_os="trapless-bench-exception-bounce")
    a = p.a
    p.hypercall("set_trap_table", "bounce_traps")
    a.mov(r12, iterations)
    a.label("loop")
    a.int3()
    a.dec(r12)
    a.jne("loop")
    a.xor(eax, eax)
    a.ret()
    # the bounce frame: rcx, r11, then the iret frame (int3's rip is the next
    # instruction)
    a.label("on_bp")
    emit_bounce_return(p)
    a.section(".data")
    a.align(16)
    emit_trap_info(a, "bounce_traps", [(3, 3, "on_bp")])   # #BP, DPL 3: `int3` may raise it
    a.section(".text")
    return p.elf()


def syscall_bounce_loop(iterations: int) -> bytes:
    """`syscall` `iterations` times from guest user mode of a Xen-model PV kernel: each
    enters the kernel's syscall callback through the hypervisor, and the callback goes
    back to user mode with the iret hypercall and VGCF_in_syscall, as Linux's sysret
    path does. One L4 serves kernel and user (MMUEXT_NEW_USER_BASEPTR names pt_base);
    the user's last syscall (rax 1) tells the kernel to power off."""
    from .pvlib import emit_enter_user_mode, emit_syscall_callback
    p = PVProgram(guest_os="trapless-bench-syscall-bounce")
    a = p.a
    emit_enter_user_mode(p, "user_loop")

    a.label("user_loop")                            # guest user mode
    a.mov(r12, iterations)
    a.label("user_loop.next")
    a.xor(eax, eax)
    a.syscall()
    a.dec(r12)
    a.jne("user_loop.next")
    a.mov(eax, 1)
    a.syscall()

    emit_syscall_callback(p, "on_syscall", "main_rsp")      # on kernel_stack_top

    a.section(".data")
    a.align(8)
    a.label("user_base")                            # struct mmuext_op
    a.dd(C.MMUEXT_NEW_USER_BASEPTR, 0)
    a.dq(0, 0)
    a.label("syscall_callback")                     # struct callback_register
    a.dw(C.CALLBACKTYPE_syscall, C.CALLBACKF_mask_events)
    a.dd(0)
    a.dq("on_syscall")
    a.label("main_rsp")
    a.dq(0)
    a.section(".bss")
    a.align(16)
    a.reserve(4096)
    a.label("kernel_stack_top")
    a.reserve(4096)
    a.label("user_stack_top")
    a.section(".text")
    return p.elf()


def _measuring_program(name: str, samples: int) -> PVProgram:
    """A PV program with traps, events and the PV clock set up, and a `samples` array."""
    from .pvlib import emit_events, emit_pvclock, emit_traps
    p = PVProgram(guest_os=f"trapless-bench-{name}")
    p.a.call("traps_init")
    p.a.call("events_init")
    p.a.section(".bss")
    p.a.align(8)
    p.a.label("samples")
    p.a.reserve(8 * samples)
    p.a.section(".data")
    p.a.label("sample_index")
    p.a.dq(0)
    p.a.label("mark")
    p.a.dq(0)
    p.a.section(".text")
    p._late_emitters = (emit_traps, emit_events, emit_pvclock)
    return p


def _finish(p: PVProgram) -> bytes:
    p.a.xor(eax, eax)
    p.a.ret()
    for emit in p._late_emitters:
        emit(p)
    return p.elf()


def _record_since_mark(p: PVProgram) -> None:
    """samples[sample_index++] = pvclock now - mark (in a handler: caller-saved only)."""
    a = p.a
    a.call("pvclock_read")
    a.sub(rax, qword["mark"])
    a.mov(rcx, qword["sample_index"])
    a.lea(rdx, ptr["samples"])
    a.mov(qword[rdx + rcx * 8], rax)
    a.inc(qword["sample_index"])


def timer_lateness(samples: int, delay_ns: int = 1_000_000) -> bytes:
    """`samples` one-shot timers, each `delay_ns` ahead; samples[i] = delivery - deadline."""
    from .pvlib import UPCALL_MASK, emit_block_until, emit_events_on, set_port_handler
    p = _measuring_program("timer-lateness", samples)
    a = p.a
    a.mov(edi, C.VIRQ_TIMER)
    a.call("bind_virq")
    a.mov(rbx, rax)
    set_port_handler(p, rbx, "on_timer")
    emit_events_on(p)
    a.mov(r12, samples)
    a.label("next")
    a.mov(byte[rip + "shared_info" + UPCALL_MASK], 1)   # the timer may fire at once
    a.mov(r13, qword["sample_index"])
    a.call("pvclock_read")
    a.add(rax, delay_ns)
    a.mov(qword["mark"], rax)
    p.hypercall("set_timer_op", rax)

    def timer_seen():
        a.cmp(qword["sample_index"], r13)
        a.jne("wait.done")
    emit_block_until(p, timer_seen, "wait.done")
    a.label("wait.done")
    a.dec(r12)
    a.jne("next")
    a.jmp("done")
    a.label("on_timer")
    _record_since_mark(p)
    a.ret()
    a.label("done")
    return _finish(p)


def upcall_latency(samples: int) -> bytes:
    """EVTCHNOP_send on an IPI port to self; samples[i] = handler entry - just before send."""
    from .pvlib import emit_events_on, set_port_handler
    p = _measuring_program("upcall-latency", samples)
    a = p.a
    p.hypercall("event_channel_op", C.EVTCHNOP_bind_ipi, "ipi_arg")
    a.mov(ebx, dword[rip + "ipi_arg" + offsetof("evtchn_bind_ipi", "port")])
    a.mov(dword[rip + "send_arg" + offsetof("evtchn_send", "port")], ebx)
    set_port_handler(p, rbx, "on_ipi")
    emit_events_on(p)
    a.mov(r12, samples)
    a.label("next")
    a.call("pvclock_read")
    a.mov(qword["mark"], rax)
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "send_arg")
    a.dec(r12)
    a.jne("next")
    a.jmp("done")
    a.label("on_ipi")
    _record_since_mark(p)
    a.ret()
    a.label("done")
    a.section(".data")
    a.label("ipi_arg")
    a.dd(0, 0)
    a.label("send_arg")
    a.dd(0)                             # the IPI's port, once bound
    a.section(".text")
    return _finish(p)


def clock_read_cost(samples: int) -> bytes:
    """samples[i] = the PV-clock difference of two back-to-back reads: what one read
    costs, so the latencies above can be read net of their own measuring."""
    p = _measuring_program("clock-read", samples)
    a = p.a
    a.mov(r12, samples)
    a.label("next")
    a.call("pvclock_read")
    a.mov(qword["mark"], rax)
    _record_since_mark(p)
    a.dec(r12)
    a.jne("next")
    return _finish(p)


def mmu_update_batch(batched: bool, entries: int = 512) -> bytes:
    """Fill a spare page-table frame with `entries` PTEs: one mmu_update carrying them
    all (batched) or one mmu_update per entry. samples[0] = the ns it took."""
    p = _measuring_program("mmu-batch" if batched else "mmu-single", 1)
    a = p.a
    a.section(".bss")
    a.align(4096)
    a.label("reqs")
    a.reserve(16 * entries)
    a.section(".text")
    # the pool's last (spare, unused) frame takes the entries; frames from nr_pages/2 on
    a.mov(rax, qword["start_info_ptr"])
    a.mov(r12, qword[rax + offsetof("start_info", "pt_base")])
    a.mov(rcx, qword[rax + offsetof("start_info", "nr_pt_frames")])
    a.shl(rcx, 12)
    a.add(r12, rcx)
    a.sub(r12, 4096)
    a.mov(r13, qword[rax + offsetof("start_info", "nr_pages")])
    a.shr(r13, 1)
    a.shl(r13, 12)
    a.or_(r13, 0x63)                    # present, writable, accessed, dirty
    a.lea(rdi, ptr["reqs"])
    a.mov(ecx, entries)
    a.label("fill")
    a.mov(qword[rdi], r12)
    a.mov(qword[rdi + 8], r13)
    a.add(rdi, 16)
    a.add(r12, 8)
    a.add(r13, 4096)
    a.dec(ecx)
    a.jne("fill")
    a.call("pvclock_read")
    a.mov(qword["mark"], rax)
    if batched:
        p.hypercall("mmu_update", "reqs", entries, 0, C.DOMID_SELF)
    else:
        a.lea(rbx, ptr["reqs"])
        a.mov(r12, entries)
        a.label("one_by_one")
        p.hypercall("mmu_update", rbx, 1, 0, C.DOMID_SELF)
        a.add(rbx, 16)
        a.dec(r12)
        a.jne("one_by_one")
    _record_since_mark(p)
    return _finish(p)
