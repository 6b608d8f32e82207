"""Kernel services a PV guest builds on: traps, event channels, the PV clock, timers.

Each `emit_*` adds routines to a PVProgram; call the ones a guest needs once, then
use the labels they define:

  emit_traps      traps_init: every exception vector prints what happened and crashes
                  the domain. Under Xen's PV CPU model (the default) that is a trap
                  table given to set_trap_table, whose handlers take Xen's bounce
                  frame; a ring-0 kernel (xen_pv=False) loads an IDT of its own
                  (idt_init, idt_set_gate(rdi = vector, rsi = handler)).
  emit_events     events_init: shared_info placed with XENMEM_add_to_physmap, the
                  upcall wired (Xen's model: the event and failsafe callbacks; ring 0:
                  a callback vector in the IDT); bind_virq(rdi = virq) -> rax = port
                  (or -errno); port_handlers[port] = routine called with rdi = port
  emit_events_on  (inline) events on: Xen's model clears the upcall mask, ring 0 sti
  emit_pvclock    pvclock_read -> rax = system time in ns, from rdtsc and
                  vcpu_time_info, with no exit

Upcalls arrive while events are on and the vcpu_info upcall mask is clear;
SCHEDOP_block clears the mask and sleeps until an event is pending. Xen's rule for
waiting: set the mask, check the condition, then SCHEDOP_block (emit_block_until). An
upcall that lands between an unmasked check and the block is handled before the block,
which then sleeps for an event that already came. A ring-0 kernel waits with cli, the
check, then sti; hlt: a PVH vCPU's callback vector ignores the mask.

Under Xen's model the guest kernel runs in ring 3: an exception or an upcall arrives as
a bounce frame on its stack (rcx, r11, [error code], rip, cs with the saved upcall mask,
rflags, rsp, ss), and the handler returns through the iret hypercall, which restores the
upcall mask from the frame's IF (XEN-ABI-FACTS §19-§21).
"""
from __future__ import annotations

import itertools

from abi import C, offsetof

from .asm import (ax, byte, cl, dword, eax, ebx, ecx, edi, edx, ptr, qword, r8, r8d, r9, r10,
                  r11, r12, r13, r14, rax, rbx, rcx, rdi, rdx, rip, rsi, rsp, word)
from .runtime import PVProgram

UPCALL_VECTOR = 0xF3            # as Linux's HYPERVISOR_CALLBACK_VECTOR
MAX_HANDLED_PORTS = 256         # ports with an entry in port_handlers[]
ERROR_CODE_VECTORS = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}
CALLER_SAVED = (rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11)

VI = offsetof("shared_info", "vcpu_info")           # vcpu_info[0]
UPCALL_PENDING = VI + offsetof("vcpu_info", "evtchn_upcall_pending")
UPCALL_MASK = VI + offsetof("vcpu_info", "evtchn_upcall_mask")
PENDING_SEL = VI + offsetof("vcpu_info", "evtchn_pending_sel")
TIME = VI + offsetof("vcpu_info", "time")
EVTCHN_PENDING = offsetof("shared_info", "evtchn_pending")
EVTCHN_MASK = offsetof("shared_info", "evtchn_mask")


def emit_traps(p: PVProgram, who: str = "trapless PV kernel") -> None:
    """traps_init; every exception prints "<who>: exception N error E at rip R" and
    crashes the domain (a native kernel passes its own name: its shutdown is the exit
    port). Xen's model: a trap table; ring 0: an IDT (idt_init, idt_set_gate)."""
    if p.xen_pv:
        _emit_trap_table(p, who)
    else:
        _emit_idt(p, who)


def _emit_exception_report(p: PVProgram, who: str) -> None:
    """exception_common, entered with the stack: vector, error code, rip, cs, rflags,
    rsp, ss: print them and crash the domain."""
    a = p.a
    a.label("exception_common")
    a.mov(rbx, rsp)
    p.print(f"\n{who}: exception ")
    a.mov(rdi, qword[rbx])
    a.call("print_dec")
    p.print(" error ")
    a.mov(rdi, qword[rbx + 8])
    a.call("print_hex")
    p.print(" at rip ")
    a.mov(rdi, qword[rbx + 16])
    a.call("print_hex")
    p.print("\n")
    a.mov(edi, C.SHUTDOWN_crash)
    a.call("shutdown")


def emit_trap_info(a, label: str, entries) -> None:
    """A struct trap_info[] at label, for set_trap_table: (vector, flags, handler label
    or address) entries, each on Xen's flat kernel CS (flags: the DPL `int n` needs, 4 to
    mask events), then the terminator Xen stops at (address 0)."""
    a.label(label)
    for vector, flags, handler in entries:
        a.db(vector, flags)
        a.dw(C.FLAT_KERNEL_CS)
        a.dd(0)
        a.dq(handler)
    a.dq(0, 0)


def _emit_trap_table(p: PVProgram, who: str) -> None:
    """Xen's model: traps_init -> rax = set_trap_table's result, for vectors 0-31."""
    a = p.a
    a.section(".data")
    a.align(16)
    # flags 0: DPL 0 (no `int n`), events as they are
    emit_trap_info(a, "trap_table", [(vector, 0, f"exception_{vector}") for vector in range(32)])
    a.section(".text")

    a.label("traps_init")
    p.hypercall("set_trap_table", "trap_table")
    a.ret()

    # The bounce frame: rcx, r11, [error code], rip, ... Restore rcx and r11, then push
    # what the ring-0 stubs push, so one report serves both models.
    for vector in range(32):
        a.label(f"exception_{vector}")
        a.pop(rcx)
        a.pop(r11)
        if vector not in ERROR_CODE_VECTORS:
            a.push(0)
        a.push(vector)
        a.jmp("exception_common")
    _emit_exception_report(p, who)


def _emit_idt(p: PVProgram, who: str) -> None:
    """A ring-0 kernel's own IDT: idt_init (also traps_init), idt_set_gate."""
    a = p.a
    a.section(".data")
    a.align(16)
    a.label("idtr")
    a.dw(256 * 16 - 1)
    a.dq("idt")
    a.section(".bss")
    a.align(4096)
    a.label("idt")
    a.reserve(256 * 16)
    a.section(".text")

    # idt_set_gate(rdi = vector, rsi = handler): a present 64-bit interrupt gate, ring 0
    a.label("idt_set_gate")
    a.lea(rax, ptr["idt"])
    a.shl(rdi, 4)
    a.add(rdi, rax)
    a.mov(rax, rsi)
    a.mov(word[rdi], ax)
    a.mov(word[rdi + 2], 0x08)
    a.mov(byte[rdi + 4], 0)
    a.mov(byte[rdi + 5], 0x8E)
    a.shr(rax, 16)
    a.mov(word[rdi + 6], ax)
    a.shr(rax, 16)
    a.mov(dword[rdi + 8], eax)
    a.mov(dword[rdi + 12], 0)
    a.ret()

    # one stub per exception vector: push a dummy error code where the CPU pushes none
    for vector in range(32):
        a.label(f"exception_{vector}")
        if vector not in ERROR_CODE_VECTORS:
            a.push(0)
        a.push(vector)
        a.jmp("exception_common")
    # stack: vector, error code, rip, cs, rflags, rsp, ss
    _emit_exception_report(p, who)

    a.label("traps_init")
    a.label("idt_init")
    a.push(rbx)
    a.xor(ebx, ebx)
    a.label("idt_init.loop")
    a.mov(rdi, rbx)
    a.lea(rsi, ptr["exception_table"])
    a.mov(rsi, qword[rsi + rbx * 8])
    a.call("idt_set_gate")
    a.inc(rbx)
    a.cmp(rbx, 32)
    a.jne("idt_init.loop")
    a.pop(rbx)
    a.lidt(ptr["idtr"])
    a.xor(eax, eax)
    a.ret()

    a.section(".rodata")
    a.align(8)
    a.label("exception_table")
    for vector in range(32):
        a.dq(f"exception_{vector}")
    a.section(".text")


_ok_labels = itertools.count()         # crash_unless is emitted many times per program


def crash_unless(p: PVProgram, ok_jump: str, message: str) -> None:
    """Emit: test rax, rax; unless the jump `ok_jump` ("je": rax == 0, "jns": rax >= 0)
    is taken, print message and rax (signed: an errno) and crash the domain."""
    a = p.a
    ok = f"crash_unless.ok{next(_ok_labels)}"
    a.test(rax, rax)
    getattr(a, ok_jump)(ok)
    a.mov(rbx, rax)
    p.print(message)
    a.mov(rdi, rbx)
    a.call("print_sdec")
    p.print("\n")
    a.mov(edi, C.SHUTDOWN_crash)
    a.call("shutdown")
    a.label(ok)


def emit_events(p: PVProgram) -> None:
    """Requires emit_traps. Defines events_init, bind_virq, the upcall handler."""
    a = p.a
    a.section(".bss")
    a.align(4096)
    a.label("shared_info")
    a.reserve(4096)
    a.section(".data")
    a.align(8)
    a.label("xatp")                     # struct xen_add_to_physmap
    a.dw(C.DOMID_SELF, 0)
    a.dd(C.XENMAPSPACE_shared_info)
    a.dq(0, 0)
    if p.xen_pv:
        for kind, handler in ((C.CALLBACKTYPE_event, "upcall_entry"),
                              (C.CALLBACKTYPE_failsafe, "failsafe_entry")):
            a.label(f"callback_{kind}")     # struct callback_register
            a.dw(kind, 0)                   # the event callback always masks events
            a.dd(0)
            a.dq(handler)
    else:
        a.label("callback_param")           # struct xen_hvm_param
        a.dw(C.DOMID_SELF, 0)
        a.dd(C.HVM_PARAM_CALLBACK_IRQ)
        a.dq((C.HVM_PARAM_CALLBACK_TYPE_VECTOR << C.HVM_PARAM_CALLBACK_TYPE_SHIFT)
             | UPCALL_VECTOR)
    a.label("bind_virq_arg")            # struct evtchn_bind_virq
    a.dd(0, 0, 0)
    a.section(".bss")
    a.align(8)
    a.label("port_handlers")
    a.reserve(MAX_HANDLED_PORTS * 8)
    a.section(".text")

    # events_init -> rax = 0 or -errno of the first call that failed
    a.label("events_init")
    a.lea(rax, ptr["shared_info"])
    a.shr(rax, 12)
    a.mov(qword[rip + "xatp" + offsetof("xen_add_to_physmap", "gpfn")], rax)
    p.hypercall("memory_op", C.XENMEM_add_to_physmap, "xatp")
    a.test(rax, rax)
    a.jne("events_init.out")
    emit_mask_console_port(p)
    if p.xen_pv:
        for kind in (C.CALLBACKTYPE_event, C.CALLBACKTYPE_failsafe):
            p.hypercall("callback_op", C.CALLBACKOP_register, f"callback_{kind}")
            a.test(rax, rax)
            a.jne("events_init.out")
    else:
        p.hypercall("hvm_op", C.HVMOP_set_param, "callback_param")
        a.test(rax, rax)
        a.jne("events_init.out")
        a.mov(edi, UPCALL_VECTOR)
        a.lea(rsi, ptr["upcall_entry"])
        a.call("idt_set_gate")
    a.xor(eax, eax)
    a.label("events_init.out")
    a.ret()

    # bind_virq(rdi = virq) -> rax = port, or -errno
    a.label("bind_virq")
    a.mov(dword["bind_virq_arg"], edi)
    a.mov(dword[rip + "bind_virq_arg" + 4], 0)
    p.hypercall("event_channel_op", C.EVTCHNOP_bind_virq, "bind_virq_arg")
    a.test(rax, rax)
    a.jne("bind_virq.out")
    a.mov(eax, dword[rip + "bind_virq_arg" + 8])
    a.label("bind_virq.out")
    a.ret()

    a.label("upcall_entry")
    if p.xen_pv:
        # Xen's bounce frame, with the upcall mask set: take rcx and r11 back, and leave
        # through the iret hypercall, which unmasks again from the frame's IF.
        a.pop(rcx)
        a.pop(r11)
        for reg in CALLER_SAVED:
            a.push(reg)
        a.call("evtchn_do_upcall")
        for reg in reversed(CALLER_SAVED):
            a.pop(reg)
        emit_iret(p)
        # The failsafe callback: Xen could not load a segment register of ours on the
        # way back to us. We load none, so it means something is badly wrong.
        a.label("failsafe_entry")
        p.print("\ntrapless PV kernel: failsafe callback\n")
        a.mov(edi, C.SHUTDOWN_crash)
        a.call("shutdown")
    else:
        # An interrupt gate, so interrupts stay off until iretq.
        for reg in CALLER_SAVED:
            a.push(reg)
        a.call("evtchn_do_upcall")
        for reg in reversed(CALLER_SAVED):
            a.pop(reg)
        a.iretq()

    # The 2-level scan: selector word by word, pending & ~mask bit by bit.
    a.label("evtchn_do_upcall")
    a.push(rbx)
    a.push(r12)
    a.push(r13)
    a.push(r14)
    a.lea(rbx, ptr["shared_info"])
    a.label("upcall.again")
    a.mov(byte[rbx + UPCALL_PENDING], 0)
    a.xor(eax, eax)
    a.xchg(qword[rbx + PENDING_SEL], rax)
    a.mov(r12, rax)
    a.label("upcall.next_word")
    a.test(r12, r12)
    a.je("upcall.check")
    a.bsf(r13, r12)
    a.lea(rax, qword[r12 - 1])
    a.and_(r12, rax)
    a.label("upcall.next_bit")
    a.mov(rax, qword[rbx + r13 * 8 + EVTCHN_PENDING])
    a.mov(rcx, qword[rbx + r13 * 8 + EVTCHN_MASK])
    a.not_(rcx)
    a.and_(rax, rcx)
    a.je("upcall.next_word")
    a.bsf(r14, rax)
    a.mov(rcx, r14)
    a.mov(edx, 1)
    a.shl(rdx, cl)
    a.not_(rdx)
    a.lock()
    a.and_(qword[rbx + r13 * 8 + EVTCHN_PENDING], rdx)
    a.mov(rdi, r13)
    a.shl(rdi, 6)
    a.add(rdi, r14)
    a.cmp(rdi, MAX_HANDLED_PORTS)
    a.jae("upcall.next_bit")
    a.lea(rax, ptr["port_handlers"])
    a.mov(rax, qword[rax + rdi * 8])
    a.test(rax, rax)
    a.je("upcall.next_bit")
    a.call(rax)
    a.jmp("upcall.next_bit")
    a.label("upcall.check")
    a.cmp(byte[rbx + UPCALL_PENDING], 0)
    a.jne("upcall.again")
    a.pop(r14)
    a.pop(r13)
    a.pop(r12)
    a.pop(rbx)
    a.ret()


def emit_mask_console_port(p: PVProgram, shared_info: str = "shared_info") -> None:
    """Inline, once shared_info is placed: mask the console ring's port. print writes
    the ring and waits for nothing, so the backend's "there is room again"
    notifications need not cost an upcall each. Clobbers rax, rcx, rdx, rsi."""
    a = p.a
    if not p.console_ring:
        return
    done = f"mask_console.{next(_block_ids)}"
    a.mov(rax, qword["start_info_ptr"])
    a.cmp(qword[rax + offsetof("start_info", "console_mfn")], 0)
    a.je(done)
    a.mov(eax, dword[rax + offsetof("start_info", "console_evtchn")])
    a.mov(ecx, eax)
    a.and_(ecx, 63)
    a.mov(edx, 1)
    a.shl(rdx, cl)                              # the port's bit in its mask word
    a.shr(eax, 6)
    a.lea(rsi, ptr[shared_info])
    a.lock()
    a.or_(qword[rsi + rax * 8 + EVTCHN_MASK], rdx)
    a.label(done)


def emit_iret(p: PVProgram) -> None:
    """Return from the iret frame at rsp (rip, cs, rflags, rsp, ss) through Xen's iret
    hypercall: push its flags word (0: restore rcx and r11 too) and jump to stub 23,
    which pushes rcx, r11 and rax, as Linux and XTF return."""
    p.a.push(0)
    p.a.jmp("hypercall_iret")


def emit_syscall_callback(p: PVProgram, label: str, main_rsp: str, body=None) -> None:
    """A syscall callback at label (on the kernel stack: rcx, r11, then the iret frame)
    for guests whose user mode ends with `syscall` and rax 1: that returns from the
    kernel's main (rsp from main_rsp, rax 0); any other runs body() and goes back to user
    mode with the frame as it is, through iret with VGCF_in_syscall (rcx and r11 the
    user may lose, as after Xen's sysret)."""
    a = p.a
    a.label(label)
    a.cmp(eax, 1)
    a.je(f"{label}.done")
    if body:
        body()
    a.add(rsp, 16)
    a.push(C.VGCF_in_syscall)
    a.jmp("hypercall_iret")
    a.label(f"{label}.done")
    a.mov(rsp, qword[main_rsp])
    a.xor(eax, eax)
    a.ret()


def emit_bounce_return(p: PVProgram) -> None:
    """Return from a bounce frame without an error code at rsp (rcx, r11, then the iret
    frame): take rcx and r11 back and leave through emit_iret."""
    p.a.pop(rcx)
    p.a.pop(r11)
    emit_iret(p)


def emit_events_on(p: PVProgram) -> None:
    """Let upcalls in. Xen's model: clear the upcall mask (sti would be #GP in ring 3),
    and if an event came while masked, make a hypercall so that Xen delivers it on the
    way back, as Linux's xen_irq_enable does. Ring 0: sti. Clobbers rax, rdi, rsi."""
    a = p.a
    if not p.xen_pv:
        a.sti()
        return
    done = f"events_on.{next(_block_ids)}"
    a.mov(byte[rip + "shared_info" + UPCALL_MASK], 0)
    a.cmp(byte[rip + "shared_info" + UPCALL_PENDING], 0)
    a.je(done)
    p.hypercall("xen_version", C.XENVER_version, 0)
    a.label(done)


def emit_block_until(p: PVProgram, check, done: str, window=None) -> None:
    """Sleep until a condition holds, losing no event: with events off, check() emits a
    test that jumps to `done` when the condition holds; then the wait, which returns at
    once if an event is pending; the upcall runs; repeat. Events are off again at `done`
    (the caller turns them on with emit_events_on when it wants them). window(), if
    given, emits code to run between the check and the sleep (a test widens there the
    window an event may land in).

    Xen's model: the upcall mask holds upcalls off and SCHEDOP_block clears it as it
    sleeps. Ring 0: cli, then sti; hlt, whose one-instruction interrupt shadow lets the
    hlt begin before an interrupt held since the check arrives and ends it. The upcall
    mask cannot do that there: the callback vector of a PVH vCPU ignores it (RFLAGS.IF
    alone gates it, as in Xen's hvm_vcpu_has_pending_irq), so an upcall taken between
    the check and a SCHEDOP_block would leave the block waiting for an event that
    already came. The mask is cleared before the sti for a ring-0 PV kernel, whose
    upcalls it gates as well as IF."""
    a = p.a
    loop = f"block_until.{next(_block_ids)}"
    a.label(loop)
    if p.xen_pv:
        a.mov(byte[rip + "shared_info" + UPCALL_MASK], 1)
    else:
        a.cli()
    check()
    if window:
        window()
    if p.xen_pv:
        p.hypercall("sched_op", C.SCHEDOP_block, 0)
    else:
        a.mov(byte[rip + "shared_info" + UPCALL_MASK], 0)
        a.sti()
        a.hlt()
    a.jmp(loop)


_block_ids = itertools.count()


def emit_enter_user_mode(p: PVProgram, code: str, prefix: str = "") -> None:
    """From a Xen-model PV kernel whose one L4 serves both modes, its first entry to
    guest user mode: pt_base named the user L4 (MMUEXT_NEW_USER_BASEPTR, through the
    mmuext_op struct at {prefix}user_base), the kernel stack for entries from user mode
    ({prefix}kernel_stack_top), the syscall callback ({prefix}syscall_callback), rsp kept
    in {prefix}main_rsp; then user code at `code` on {prefix}user_stack_top."""
    a = p.a
    a.mov(rax, qword["start_info_ptr"])
    a.mov(rax, qword[rax + offsetof("start_info", "pt_base")])
    a.shr(rax, 12)                                  # VIRT_BASE 0: VA = PA
    a.mov(qword[rip + f"{prefix}user_base" + 8], rax)
    p.hypercall("mmuext_op", f"{prefix}user_base", 1, 0, C.DOMID_SELF)
    p.hypercall("stack_switch", C.FLAT_KERNEL_SS, f"{prefix}kernel_stack_top")
    p.hypercall("callback_op", C.CALLBACKOP_register, f"{prefix}syscall_callback")
    a.mov(qword[f"{prefix}main_rsp"], rsp)
    emit_iret_to_user(a, f"{prefix}user_stack_top", code)


def emit_iret_to_user(a, stack_top: str, code: str, cs: int = C.FLAT_RING3_CS64) -> None:
    """From the guest kernel, under Xen's PV model: into guest user mode at `code`, on
    the stack ending at `stack_top`, with code selector cs (Xen's flat ring-3 ones) and
    events on, through the iret hypercall (its frame: rip, cs, rflags, rsp, ss above a
    zero flags word)."""
    a.push(C.FLAT_RING3_SS64)
    a.lea(rax, ptr[stack_top])
    a.push(rax)
    a.push(0x202)
    a.push(cs)
    a.lea(rax, ptr[code])
    a.push(rax)
    a.push(0)
    a.jmp("hypercall_iret")


def set_port_handler(p: PVProgram, port_reg, handler: str) -> None:
    """port_handlers[port_reg] = handler (port_reg holds a port below 256)."""
    a = p.a
    a.lea(rcx, ptr["port_handlers"])
    a.lea(rdx, ptr[handler])
    a.mov(qword[rcx + port_reg * 8], rdx)


def emit_pvclock(p: PVProgram, shared_info_at: str | None = None) -> None:
    """pvclock_read -> rax = ns of system time. Clobbers rcx, rdx, rsi, r8. The clock is
    read from the page at the label shared_info, or from the page whose address the
    qword at label shared_info_at holds."""
    a = p.a
    t = TIME
    a.label("pvclock_read")
    if shared_info_at:
        a.mov(rsi, qword[shared_info_at])
    else:
        a.lea(rsi, ptr["shared_info"])
    a.label("pvclock_read.retry")
    a.mov(r8d, dword[rsi + t + offsetof("vcpu_time_info", "version")])
    a.test(r8d, 1)
    a.jne("pvclock_read.retry")
    a.lfence()
    a.rdtsc()
    a.shl(rdx, 32)
    a.or_(rax, rdx)
    a.sub(rax, qword[rsi + t + offsetof("vcpu_time_info", "tsc_timestamp")])
    a.movsx(ecx, byte[rsi + t + offsetof("vcpu_time_info", "tsc_shift")])
    a.test(ecx, ecx)
    a.js("pvclock_read.right")
    a.shl(rax, cl)
    a.jmp("pvclock_read.scale")
    a.label("pvclock_read.right")
    a.neg(ecx)
    a.shr(rax, cl)
    a.label("pvclock_read.scale")
    a.mov(ecx, dword[rsi + t + offsetof("vcpu_time_info", "tsc_to_system_mul")])
    a.mul(rcx)                          # rdx:rax = delta * mul
    a.shr(rax, 32)
    a.shl(rdx, 32)
    a.or_(rax, rdx)                     # (delta * mul) >> 32
    a.add(rax, qword[rsi + t + offsetof("vcpu_time_info", "system_time")])
    a.lfence()
    a.cmp(r8d, dword[rsi + t + offsetof("vcpu_time_info", "version")])
    a.jne("pvclock_read.retry")
    a.ret()

