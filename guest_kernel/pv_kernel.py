"""The trapless PV kernel (a Mini-OS in spirit), emitted instruction by instruction.

It prints a banner with the version xen_version reports and its command line; sets
up its IDT; maps shared_info and registers its upcall vector; binds VIRQ_TIMER and
runs a 100 Hz tick for `ticks=N` ticks (default 10), blocking between ticks and
timing them with the PV clock; balloons 1 MiB out and back in, maps it through
mmu_update batched in one multicall, uses it and gives it back; then powers off.
With `interactive` on its command line it runs a console shell instead, after the
banner (pv_interactive.py): a person talks to it through `console DOM`. With `blkfront`
it uses its first disk through Xen's block device instead (blkfront.py).
"""
from __future__ import annotations

from abi import C, offsetof

from .asm import (byte, dl, dword, eax, ecx, edi, edx, esi, ptr, qword, r12, r13, rax, rbx,
                  rcx, rdi, rdx, rip, rsi)
from .blkfront import emit_blkfront, emit_blkfront_check
from .netfront import emit_netfront, emit_netfront_check
from .pv_interactive import emit_interactive, emit_interactive_check
from .pvlib import (UPCALL_MASK, UPCALL_VECTOR, crash_unless, emit_block_until, emit_events,
                    emit_events_on, emit_pvclock, emit_traps, set_port_handler)
from .pv_memory import emit_memory_demo
from .runtime import PVProgram

TICK_NS = 10_000_000            # 100 Hz
DEFAULT_TICKS = 10


def emit_cmdline_helpers(p: PVProgram) -> None:
    """cmdline_number(rdi = "key=" cstr) -> rax = its decimal value, or -1 if absent."""
    a = p.a
    a.label("cmdline_number")
    a.mov(rsi, qword["start_info_ptr"])
    a.add(rsi, offsetof("start_info", "cmd_line"))
    a.label("cmdline_number.scan")      # try the key at every position of the line
    a.xor(ecx, ecx)
    a.label("cmdline_number.cmp")
    a.movzx(eax, byte[rdi + rcx])
    a.test(eax, eax)
    a.je("cmdline_number.found")
    a.movzx(edx, byte[rsi + rcx])
    a.cmp(eax, edx)
    a.jne("cmdline_number.next")
    a.inc(rcx)
    a.jmp("cmdline_number.cmp")
    a.label("cmdline_number.next")
    a.cmp(byte[rsi], 0)
    a.je("cmdline_number.absent")
    a.inc(rsi)
    a.jmp("cmdline_number.scan")
    a.label("cmdline_number.found")
    a.add(rsi, rcx)
    a.xor(eax, eax)
    a.label("cmdline_number.digit")
    a.movzx(edx, byte[rsi])
    a.sub(edx, ord("0"))
    a.cmp(edx, 9)
    a.ja("cmdline_number.done")
    a.imul(rax, rax, 10)
    a.add(rax, rdx)
    a.inc(rsi)
    a.jmp("cmdline_number.digit")
    a.label("cmdline_number.done")
    a.ret()
    a.label("cmdline_number.absent")
    a.mov(rax, -1)
    a.ret()

    # print_ms(rdi = ns): "<ms>.<3 digits>"
    a.label("print_ms")
    a.mov(rax, rdi)
    a.xor(edx, edx)
    a.mov(ecx, 1_000_000)
    a.div(rcx)
    a.push(rdx)
    a.mov(rdi, rax)
    a.call("print_dec")
    a.lea(rdi, ptr["dot"])
    a.mov(esi, 1)
    a.call("print")
    a.pop(rax)                          # remainder in ns: three digits of µs
    a.xor(edx, edx)
    a.mov(ecx, 1000)
    a.div(rcx)
    a.add(rax, 1000)                    # print 1xyz, then drop the leading 1
    a.lea(rdi, ptr["numbuf_end"])
    a.mov(ecx, 10)
    for _ in range(3):
        a.xor(edx, edx)
        a.div(rcx)
        a.add(dl, ord("0"))
        a.dec(rdi)
        a.mov(byte[rdi], dl)
    a.mov(esi, 3)
    a.jmp("print")
    a.section(".rodata")
    a.label("dot")
    a.ascii(".")
    a.section(".text")


def emit_ticks_wanted(p: PVProgram, default: int) -> None:
    """Emit, in main: ticks_wanted = N of `ticks=N` on the command line, or default.
    Defines the counters ticks_wanted and ticks_seen (the PV and native tick demos')."""
    a = p.a
    p.load_arg(rdi, p.string("ticks="))
    a.call("cmdline_number")
    a.test(rax, rax)
    a.jns("ticks.have")
    a.mov(eax, default)
    a.label("ticks.have")
    a.mov(qword["ticks_wanted"], rax)
    a.section(".data")
    a.align(8)
    a.label("ticks_wanted")
    a.dq(0)
    a.label("ticks_seen")
    a.dq(0)
    a.section(".text")


def emit_count_tick(p: PVProgram) -> None:
    """Emit, in a tick handler: ticks_seen += 1, and "tick N" every 10 ticks."""
    a = p.a
    a.inc(qword["ticks_seen"])
    a.mov(rax, qword["ticks_seen"])
    a.xor(edx, edx)
    a.mov(ecx, 10)
    a.div(rcx)
    a.test(rdx, rdx)
    a.jne("count_tick.quiet")
    p.print("tick ")
    a.mov(rdi, qword["ticks_seen"])
    a.call("print_dec")
    p.print("\n")
    a.label("count_tick.quiet")


def emit_print_xen_version(p: PVProgram) -> None:
    """Print "major.minor<extraversion>" as xen_version reports them (e.g. 4.19.0-trapless)."""
    a = p.a
    p.hypercall("xen_version", C.XENVER_version, 0)
    a.mov(rbx, rax)                                 # major << 16 | minor
    a.mov(rdi, rbx)
    a.shr(rdi, 16)
    a.call("print_dec")
    p.print(".")
    a.mov(rdi, rbx)
    a.and_(edi, 0xFFFF)
    a.call("print_dec")
    p.hypercall("xen_version", C.XENVER_extraversion, "scratch")
    a.mov(byte[rip + "scratch" + (C.XEN_EXTRAVERSION_LEN - 1)], 0)  # never trust the terminator
    p.load_arg(rdi, "scratch")
    a.call("print_cstr")


def emit_banner(p: PVProgram) -> None:
    a = p.a
    p.print("trapless PV kernel: Xen ")
    emit_print_xen_version(p)
    p.print("\ncommand line: ")
    a.mov(rdi, qword["start_info_ptr"])
    a.add(rdi, offsetof("start_info", "cmd_line"))
    a.call("print_cstr")
    p.print("\n")


def emit_events_and_ticks(p: PVProgram) -> None:
    a = p.a
    a.call("traps_init")
    crash_unless(p, "je", "traps_init failed: ")
    a.call("events_init")
    crash_unless(p, "je", "events_init failed: ")
    if p.xen_pv:
        p.print("events: shared_info mapped, upcalls through the event callback\n")
    else:
        p.print(f"events: shared_info mapped, upcalls on vector {UPCALL_VECTOR:#x}\n")
    # Wall clock: boot time of the host's epoch clock plus system time.
    p.print("wall clock: ")
    a.call("pvclock_read")
    a.xor(edx, edx)
    a.mov(ecx, 1_000_000_000)
    a.div(rcx)
    a.mov(edi, dword[rip + "shared_info" + offsetof("shared_info", "wc_sec")])
    a.add(rdi, rax)
    a.call("print_dec")
    p.print(" s since the epoch\n")

    a.mov(edi, C.VIRQ_TIMER)
    a.call("bind_virq")
    a.mov(r12, rax)
    a.test(rax, rax)
    a.jns("ticks.bound")
    crash_unless(p, "je", "bind_virq failed: ")
    a.label("ticks.bound")
    set_port_handler(p, r12, "timer_tick")
    p.print("VIRQ_TIMER bound to port ")
    a.mov(rdi, r12)
    a.call("print_dec")
    p.print("\n")

    emit_ticks_wanted(p, DEFAULT_TICKS)
    emit_events_on(p)
    a.call("pvclock_read")
    a.mov(r13, rax)
    p.hypercall("vcpu_op", C.VCPUOP_set_periodic_timer, 0, "tick_period")
    crash_unless(p, "je", "set_periodic_timer failed: ")
    def enough_ticks():
        a.mov(rax, qword["ticks_seen"])
        a.cmp(rax, qword["ticks_wanted"])
        a.jae("ticks.done")
    emit_block_until(p, enough_ticks, "ticks.done")
    a.label("ticks.done")
    a.mov(byte[rip + "shared_info" + UPCALL_MASK], 0)
    if not p.xen_pv:
        a.sti()                         # a ring-0 kernel's wait ends with interrupts off
    p.hypercall("vcpu_op", C.VCPUOP_stop_periodic_timer, 0, 0)
    a.call("pvclock_read")
    a.sub(rax, r13)
    a.mov(rbx, rax)
    a.mov(rdi, qword["ticks_seen"])
    a.call("print_dec")
    p.print(" ticks at 100 Hz in ")
    a.mov(rdi, rbx)
    a.call("print_ms")
    p.print(" ms of PV-clock time\n")

    # timer_tick(rdi = port): count, and say so every 10 ticks
    a.jmp("ticks.after_handler")
    a.label("timer_tick")
    emit_count_tick(p)
    a.ret()
    a.label("ticks.after_handler")

    a.section(".data")
    a.align(8)
    a.label("tick_period")
    a.dq(TICK_NS)
    a.section(".text")


def build_pv_kernel(xen_pv: bool = True) -> bytes:
    """The PV kernel's ELF image: for Xen's PV CPU model (ring 3), or with xen_pv=False
    a kernel that requires supervisor_mode_kernel (trapless's ring-0 PV model)."""
    p = PVProgram(guest_os="trapless-pv-kernel", xen_pv=xen_pv)
    a = p.a
    emit_banner(p)
    emit_interactive_check(p)       # `interactive`: a console shell instead of the tick demo
    emit_blkfront_check(p)          # `blkfront`: its disk through Xen's block device
    emit_netfront_check(p)          # `netfront`: ping through Xen's network card
    emit_events_and_ticks(p)
    emit_memory_demo(p)
    p.print("powering off\n")
    a.mov(rax, C.SHUTDOWN_poweroff)
    a.ret()
    emit_cmdline_helpers(p)
    emit_traps(p)
    emit_events(p)
    emit_pvclock(p)
    emit_interactive(p)
    emit_blkfront(p)
    emit_netfront(p)                # after blkfront: it uses blkfront's xenstore client
    return p.elf()
