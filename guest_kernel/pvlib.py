"""Kernel services a PV guest builds on: traps, event channels, the PV clock, timers.

Each `emit_*` adds routines to a PVProgram; call the ones a guest needs once, then
use the labels they define:

  emit_traps      idt_init: an IDT whose exception vectors print what happened and
                  crash the domain; idt_set_gate(rdi = vector, rsi = handler)
  emit_events     events_init: shared_info placed with XENMEM_add_to_physmap, the
                  callback vector registered, the upcall handler installed;
                  bind_virq(rdi = virq) -> rax = port (or -errno);
                  port_handlers[port] = routine called with rdi = port
  emit_pvclock    pvclock_read -> rax = system time in ns, from rdtsc and
                  vcpu_time_info, with no exit

Upcalls arrive while the guest has interrupts on (sti) and its vcpu_info upcall mask
clear; SCHEDOP_block clears the mask and sleeps until an event is pending. Xen's rule for
waiting: set the mask, check the condition, then SCHEDOP_block (emit_block_until). An
upcall that lands between an unmasked check and the block is handled before the block,
which then sleeps for an event that already came.
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
    """idt_init, idt_set_gate; every exception prints "<who>: exception N error E at rip R"
    and crashes the domain (a native kernel passes its own name: its shutdown is the exit port)."""
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
    a.label("callback_param")           # struct xen_hvm_param
    a.dw(C.DOMID_SELF, 0)
    a.dd(C.HVM_PARAM_CALLBACK_IRQ)
    a.dq((C.HVM_PARAM_CALLBACK_TYPE_VECTOR << C.HVM_PARAM_CALLBACK_TYPE_SHIFT) | UPCALL_VECTOR)
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

    # The upcall: an interrupt gate, so interrupts stay off until iretq.
    a.label("upcall_entry")
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


def emit_block_until(p: PVProgram, check, done: str) -> None:
    """Sleep in SCHEDOP_block until a condition holds, losing no event: with upcalls
    masked, check() emits a test that jumps to `done` when the condition holds; the
    block unmasks and returns at once if an event is pending; the upcall runs; repeat.
    Upcalls are masked again at `done` (the caller unmasks when it wants them)."""
    a = p.a
    loop = f"block_until.{next(_block_ids)}"
    a.label(loop)
    a.mov(byte[rip + "shared_info" + UPCALL_MASK], 1)
    check()
    p.hypercall("sched_op", C.SCHEDOP_block, 0)
    a.jmp(loop)


_block_ids = itertools.count()


def set_port_handler(p: PVProgram, port_reg, handler: str) -> None:
    """port_handlers[port_reg] = handler (port_reg holds a port below 256)."""
    a = p.a
    a.lea(rcx, ptr["port_handlers"])
    a.lea(rdx, ptr[handler])
    a.mov(qword[rcx + port_reg * 8], rdx)


def emit_pvclock(p: PVProgram) -> None:
    """pvclock_read -> rax = ns of system time. Clobbers rcx, rdx, rsi, r8."""
    a = p.a
    t = TIME
    a.label("pvclock_read")
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

