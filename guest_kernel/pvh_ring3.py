"""A PVH guest whose kernel runs code in ring 3 and takes events from there back into
ring 0, recording the frame each one leaves.

It boots like guest_kernel/pvh_guest.py (32-bit entry, then long mode), on a GDT with
user segments and a TSS of its own, an IDT whose gates for int3 and int 0x80 let ring
3 in (int 0x80 a trap gate) and whose #UD gate names IST 1, and syscall set up through
EFER.SCE, STAR, LSTAR and FMASK. Each case drops to ring 3 with iretq at a piece of
user code that faults, traps, calls or spins (the upcall, pending before the iretq
with interrupts off in the kernel, must arrive as soon as iretq sets IF); the handler
records where the frame is, the frame, rflags, CS and SS inside the handler and cr2,
then returns to the kernel's context. The kernel prints one line per case:

    <case> at=<rsp in the handler> w0..w5=<the six qwords there> fl=<rflags> cs=<cs>
    ss=<ss> cr2=<cr2>

(print_hex numbers), which tests/test_pvh_ring3.py checks against the architecture.
"""
from __future__ import annotations

from abi import C

from .asm import byte, dword, ptr, qword, rip
from .asm import cr2, eax, ecx, edi, edx, rax, rcx, rdi, rdx, rsi, rsp, r11
from .elf import build_elf
from .pvh_guest import _entry32, emit_entry32_data, emit_first_gib_tables, emit_start64
from .pvlib import UPCALL_MASK, UPCALL_PENDING, UPCALL_VECTOR, emit_events, emit_pvclock, emit_traps
from .runtime import PVProgram

KERNEL_CS, KERNEL_DS, USER_DS, USER_CS, TSS_SEL = 0x08, 0x10, 0x23, 0x2B, 0x30
# null, kernel code64, kernel data, user code32 (STAR's sysret base), user data,
# user code64, then the TSS (filled at run time: its base is a label)
GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFFB000000FFFF,
       0x00CFF3000000FFFF, 0x00AFFB000000FFFF, 0, 0)
SUPERVISOR_PAGE = 0x0200_0000           # the 2 MiB page at 32 MiB: U clear
SUPERVISOR_ADDR = SUPERVISOR_PAGE + 0x123
USER_STACK_TOP = "user_stack_top"
FMASK = 0x4700                          # TF, IF, DF, NT
INT_GP_VECTOR = 0x81                    # a gate of DPL 0: int 0x81 from ring 3 is #GP
CASES = ("pf", "ud", "int3", "int80", "int81", "syscall", "after_sysret", "io", "event")
# the TSS's I/O bitmap (at 0x68) lets ring 3 at ports 0-0x7f; its last byte (0xff) is
# the TSS limit, so any other port is beyond it: #GP(0)
TSS_LIMIT, IO_BITMAP, IO_PORT_OK, IO_PORT_DENIED = 0x78, 0x68, 0x70, 0x3F8
WORDS = 6


def emit_load_tss(a, limit: int, selector: int) -> None:
    """The descriptor of the guest's `tss` (limit, type 9: an available 64-bit TSS,
    present, base = tss) in its `gdt` at selector, then `ltr`. Uses rax, rcx, rdx."""
    a.lea(rdx, ptr["tss"])
    a.mov(rax, rdx)
    a.and_(eax, 0xFFFFFF)
    a.shl(rax, 16)
    a.or_(rax, limit)
    a.mov(rcx, 0x89 << 40)
    a.or_(rax, rcx)
    a.mov(rcx, rdx)
    a.shr(rcx, 24)
    a.and_(ecx, 0xFF)
    a.shl(rcx, 56)
    a.or_(rax, rcx)
    a.mov(qword[rip + "gdt" + selector], rax)
    a.shr(rdx, 32)
    a.mov(qword[rip + "gdt" + selector + 8], rdx)
    a.mov(eax, selector)
    a.db(0x0F, 0x00, 0xD8)                          # ltr ax


def build_pvh_ring3_guest(with_io: bool = True) -> tuple[bytes, dict[str, int]]:
    """The ELF image and its symbols (the test computes the expected frames from them).
    with_io: run the io case (bt does not check ring 3's port accesses yet)."""
    cases = CASES if with_io else tuple(c for c in CASES if c != "io")
    p = PVProgram(guest_os="trapless-pvh-ring3", xen_pv=False, console_ring=False)
    a = p.a

    # ---- main: the CPU set-up ----
    # TR first: on kvm trapless finds the TSS (and takes its page from KVM, cext/kvm.c)
    # at an exit after the ltr, here events_init's hypercalls
    # the TSS: RSP0 and IST1 deliberately 8 bytes off 16 (the CPU aligns them down)
    a.lea(rax, ptr["kstack_top"])
    a.sub(rax, 8)
    a.mov(qword[rip + "tss" + 4], rax)
    a.lea(rax, ptr["ist_top"])
    a.sub(rax, 8)
    a.mov(qword[rip + "tss" + 0x24], rax)
    a.mov(dword[rip + "tss" + 0x64], IO_BITMAP << 16)
    a.mov(byte[rip + "tss" + TSS_LIMIT], 0xFF)
    emit_load_tss(a, TSS_LIMIT, TSS_SEL)
    a.call("idt_init")
    a.call("events_init")
    a.test(rax, rax)
    a.jne("fail")
    # the gates: (vector, handler, type and DPL, IST)
    for vector, handler, attr, ist in ((14, "on_pf", 0x8E, 0), (6, "on_ud", 0x8E, 1),
                                       (3, "on_int3", 0xEE, 0), (0x80, "on_int80", 0xEF, 0),
                                       (INT_GP_VECTOR, "on_bad", 0x8E, 0), (13, "on_gp", 0x8E, 0),
                                       (UPCALL_VECTOR, "on_event", 0x8E, 0)):
        a.mov(edi, vector)
        a.lea(rsi, ptr[handler])
        a.call("idt_set_gate")
        a.mov(byte[rip + "idt" + vector * 16 + 4], ist)
        a.mov(byte[rip + "idt" + vector * 16 + 5], attr)
    # syscall: EFER.SCE, STAR (kernel CS 0x08, sysret base 0x18), LSTAR, FMASK
    a.mov(ecx, 0xC0000080)
    a.rdmsr()
    a.or_(eax, 1)
    a.wrmsr()
    a.mov(ecx, 0xC0000081)
    a.xor(eax, eax)
    a.mov(edx, (0x18 << 16) | KERNEL_CS)
    a.wrmsr()
    a.mov(ecx, 0xC0000082)
    a.lea(rax, ptr["on_syscall"])
    a.mov(rdx, rax)
    a.shr(rdx, 32)
    a.wrmsr()
    a.mov(ecx, 0xC0000084)
    a.mov(eax, FMASK)
    a.xor(edx, edx)
    a.wrmsr()

    # ---- the cases ----
    a.mov(byte[rip + "shared_info" + UPCALL_MASK], 1)   # no upcall until the event case
    # syscall before int81: on kvm it stays in ring 3 and its sysretq faults, which
    # on_gp records as int81's until int81 writes its own
    for case in ("pf", "ud", "int3", "int80", "syscall", "int81"):
        if case == "int3":
            # a new RSP0 from here on, written while the TSS is in use (on kvm its page
            # is out of KVM's reach by now: the write is an MMIO exit)
            a.lea(rax, ptr["kstack2_top"])
            a.sub(rax, 8)
            a.mov(qword[rip + "tss" + 4], rax)
        a.lea(rdi, ptr[f"u_{case}"])
        a.call("enter_user")
    if with_io:
        a.lea(rax, ptr["on_gp.io"])
        a.mov(qword[rip + "gp_record"], rax)
        a.lea(rdi, ptr["u_io"])
        a.call("enter_user")
    # an upcall while ring 3 spins: VIRQ_TIMER one-shot 1 ms ahead, upcalls unmasked
    a.mov(edi, C.VIRQ_TIMER)
    a.call("bind_virq")
    a.test(rax, rax)
    a.js("fail")
    a.mov(byte[rip + "shared_info" + UPCALL_MASK], 0)
    a.call("pvclock_read")
    a.add(rax, 1_000_000)
    a.mov(qword["sshot"], rax)
    p.hypercall("vcpu_op", C.VCPUOP_set_singleshot_timer, 0, "sshot")
    # wait (interrupts off) until the upcall is pending: it waits for iretq's IF
    a.label("event.wait")
    a.cmp(byte[rip + "shared_info" + UPCALL_PENDING], 0)
    a.je("event.wait")
    a.lea(rdi, ptr["u_event"])
    a.call("enter_user")
    a.mov(byte[rip + "shared_info" + UPCALL_MASK], 1)

    for case in cases:
        p.print(f"{case} at=")
        a.mov(rdi, qword[rip + f"rec_{case}"])
        a.call("print_hex")
        for i in range(WORDS):
            p.print(f" w{i}=")
            a.mov(rdi, qword[rip + f"rec_{case}" + 8 * (i + 1)])
            a.call("print_hex")
        for i, name in enumerate(("fl", "cs", "ss", "cr2")):
            p.print(f" {name}=")
            a.mov(rdi, qword[rip + f"rec_{case}" + 8 * (WORDS + 1 + i)])
            a.call("print_hex")
        p.print("\n")
    a.xor(eax, eax)
    a.ret()
    a.label("fail")
    p.print("ring-3 guest: set-up failed\n")
    a.mov(eax, 1)
    a.ret()

    # enter_user(rdi = user code): iretq to ring 3 (IF on); a handler comes back here
    a.label("enter_user")
    a.mov(qword["kernel_rsp"], rsp)
    a.push(USER_DS)
    a.lea(rax, ptr[USER_STACK_TOP])
    a.push(rax)
    a.push(0x202)
    a.push(USER_CS)
    a.push(rdi)
    a.iretq()

    # the handlers: record, then back to enter_user's caller
    def recorder(label: str, case: str) -> None:
        a.label(label)
        a.mov(qword[rip + f"rec_{case}"], rsp)
        for i in range(WORDS):
            a.mov(rax, qword[rsp + 8 * i])
            a.mov(qword[rip + f"rec_{case}" + 8 * (i + 1)], rax)
        a.db(0x9C)                                  # pushfq
        a.pop(rax)
        a.mov(qword[rip + f"rec_{case}" + 8 * (WORDS + 1)], rax)
        a.xor(eax, eax)
        a.db(0x8C, 0xC8)                            # mov eax, cs
        a.mov(qword[rip + f"rec_{case}" + 8 * (WORDS + 2)], rax)
        a.xor(eax, eax)
        a.db(0x8C, 0xD0)                            # mov eax, ss
        a.mov(qword[rip + f"rec_{case}" + 8 * (WORDS + 3)], rax)
        a.mov(rax, cr2)
        a.mov(qword[rip + f"rec_{case}" + 8 * (WORDS + 4)], rax)
        a.mov(rsp, qword["kernel_rsp"])
        a.cli()                                     # the kernel runs with interrupts off
        a.ret()

    for label, case in (("on_pf", "pf"), ("on_ud", "ud"), ("on_int3", "int3"),
                        ("on_event", "event")):
        recorder(label, case)
    # #GP is int 0x81's, or the denied port's in the io case: gp_record says which
    # (a jump through memory keeps the handler's rflags for the record)
    a.label("on_gp")
    a.jmp(qword[rip + "gp_record"])
    recorder("on_gp.int81", "int81")
    recorder("on_gp.io", "io")
    # int 0x80 is recorded once from the plain case and once after sysretq
    a.label("on_int80")
    a.cmp(qword["sysret_done"], 0)
    a.jne("on_int80.after_sysret")
    a.jmp("on_int80.plain")
    recorder("on_int80.plain", "int80")
    recorder("on_int80.after_sysret", "after_sysret")
    a.label("on_bad")                               # int 0x81 must not get here
    p.print("ring-3 guest: int 0x81 went through a DPL-0 gate\n")
    a.mov(edi, C.SHUTDOWN_crash)
    a.call("shutdown")

    # syscall: record rcx, r11, rsp, rflags, CS and SS as the CPU left them, then
    # sysretq to the user code, which says where it is with int 0x80
    a.label("on_syscall")
    a.mov(qword[rip + "rec_syscall" + 8], rcx)
    a.mov(qword[rip + "rec_syscall" + 16], r11)
    a.mov(qword[rip + "rec_syscall"], rsp)
    a.db(0x9C)                                      # pushfq
    a.pop(rax)
    a.mov(qword[rip + "rec_syscall" + 8 * (WORDS + 1)], rax)
    a.xor(eax, eax)
    a.db(0x8C, 0xC8)                                # mov eax, cs
    a.mov(qword[rip + "rec_syscall" + 8 * (WORDS + 2)], rax)
    a.xor(eax, eax)
    a.db(0x8C, 0xD0)                                # mov eax, ss
    a.mov(qword[rip + "rec_syscall" + 8 * (WORDS + 3)], rax)
    a.mov(qword["sysret_done"], 1)
    a.sysretq()

    # ---- user code (ring 3; the identity map is user-accessible but for one page) ----
    a.label("u_pf")
    a.label("u_pf.at")
    a.mov(rax, qword[SUPERVISOR_ADDR])
    a.label("u_ud")
    a.label("u_ud.at")
    a.ud2()
    a.label("u_int3")
    a.int3()
    a.label("u_int3.after")
    a.label("u_int80")
    a.int_(0x80)
    a.label("u_int80.after")
    a.label("u_int81")
    a.label("u_int81.at")
    a.int_(INT_GP_VECTOR)
    a.label("u_syscall")
    a.mov(r11, 0)
    a.label("u_syscall.at")
    a.syscall()
    a.label("u_syscall.after")
    a.int_(0x80)
    a.label("u_syscall.int80_after")
    a.label("u_io")
    a.db(0xE4, IO_PORT_OK)                          # in al, IO_PORT_OK
    a.mov(edx, IO_PORT_DENIED)
    a.label("u_io.at")
    a.db(0xEC)                                      # in al, dx
    a.label("u_event")
    a.label("u_event.spin")
    a.jmp("u_event.spin")

    emit_start64(a, KERNEL_DS)

    a.section(".data")
    emit_entry32_data(a)
    a.align(8)
    a.label("kernel_rsp")
    a.dq(0)
    a.label("sysret_done")
    a.dq(0)
    a.label("gp_record")
    a.dq("on_gp.int81")
    a.label("sshot")                    # struct vcpu_set_singleshot_timer
    a.dq(0)
    a.dd(0, 0)
    for case in CASES:
        a.label(f"rec_{case}")
        a.dq(*([0] * (WORDS + 5)))
    a.align(16)
    a.label("gdt")
    a.dq(*GDT)
    a.label("gdt_desc")
    a.dw(len(GDT) * 8 - 1)
    a.dd("gdt")
    # the TSS on a page of its own, as Linux keeps it: on kvm trapless keeps that page
    # from KVM (cext/kvm.c, events from ring 3), which must not take the GDT with it
    a.align(4096)
    a.label("tss")
    a.db(*([0] * (TSS_LIMIT + 1)))
    emit_first_gib_tables(a, user=True, supervisor_page=SUPERVISOR_PAGE)
    a.section(".bss")
    a.align(16)
    a.reserve(4096)
    a.label("kstack_top")
    a.reserve(4096)
    a.label("kstack2_top")
    a.reserve(4096)
    a.label("ist_top")
    a.reserve(4096)
    a.label(USER_STACK_TOP)

    emit_traps(p, "ring-3 guest")
    emit_events(p)
    emit_pvclock(p)

    a.section(".text32", "rx")
    _entry32(a)

    img = p.image()
    notes = [(C.XEN_ELFNOTE_GUEST_OS, "trapless-pvh-ring3"),
             (C.XEN_ELFNOTE_PHYS32_ENTRY, img.symbols["_start32"])]
    return build_elf(img.sections, img.symbols, img.symbols["_start32"], notes), img.symbols
