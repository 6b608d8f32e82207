"""The workloads of `make compare`, each written once and built for both kinds of guest.

A workload is a function that emits its work through a *platform*: the object that
knows how this kind of guest does the privileged parts. Everything else (generating
text, walking page tables, counting, checksums) is the same instructions in both
guests.

| platform call          | PV guest (hypercalls, shared memory)       | native guest (hardware, traps)      |
|------------------------|--------------------------------------------|-------------------------------------|
| console_write          | the PV console ring, a notify per 2 KiB    | per byte: poll LSR, write THR       |
| tick_start / tick_stop | VIRQ_TIMER bound, VCPUOP_set_periodic_timer | PIC init + unmask, PIT mode 2      |
| irq_off / idle         | upcall mask / SCHEDOP_block                | cli / sti; hlt                      |
| (tick handler)         | event-channel upcall                       | IRQ0 handler, EOI to the PIC        |
| pte_write / pte_commit | queued; one multicall (mmu_update + flush) | mov to the entry (traps); cr3 reload|
| clock_read             | PV clock (rdtsc + vcpu_time_info), no exit | CMOS: UIP, hours, minutes, seconds  |
| (power off)            | SCHEDOP_shutdown                           | exit port                           |

Each guest leaves a one-line result in its `report` buffer (read by the host through
the image's symbol), so printing results costs neither guest an exit; the console
workload's output is its console stream. Results are identical for both guests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from abi import C, offsetof
from hypervisor.builder import SPARE_PT_FRAMES

from . import native_kernel as nk
from .asm import (al, byte, cr0, cr3, dl, dword, eax, ebx, ecx, edi, edx, esi, ptr, qword,
                  r12, r13, r14, r15, rax, rbx, rcx, rdi, rdx, rip, rsi)
from .native_kernel import NativeProgram
from .pvlib import (UPCALL_MASK, emit_events, emit_events_on, emit_pvclock, emit_traps,
                    set_port_handler)
from .runtime import PVProgram

PAGE = 4096
ADDR_MASK = 0x000F_FFFF_FFFF_F000
PTE_P, PTE_RW = 1, 2
ENTRIES_PER_TABLE = 512
REPORT_SIZE = 256
PTE_QUEUE_CAPACITY = 8192           # PV: updates queued before a multicall
LINE_BYTES = 64                     # the console workload's line length
TICK_HZ = 1000
SECONDS_PER_DAY = 86400


# ---------------------------------------------------------------------------
# Platforms
# ---------------------------------------------------------------------------

class Platform:
    """The privileged parts of the workloads for one kind of guest. Each method emits
    code at the current position; all of them preserve rbx, rbp and r12-r15."""

    kind = ""

    def __init__(self, program: PVProgram):
        self.p, self.a = program, program.a
        self._set_up: set[str] = set()
        self._late: list[Callable] = []

    def _once(self, what: str) -> bool:
        """True the first time `what` is asked for."""
        if what in self._set_up:
            return False
        self._set_up.add(what)
        return True

    def start_info_field(self, reg, field: str) -> None:
        """reg <- a field of the boot information block (start_info), as both kernels
        find their page-table pool's size there."""
        self.a.mov(reg, qword["start_info_ptr"])
        self.a.mov(reg, qword[reg + offsetof("start_info", field)])

    def finish(self) -> bytes:
        """main returns 0 (power off); emit what the program used; the ELF image."""
        a = self.a
        a.xor(eax, eax)
        a.ret()
        for emit in self._late:
            emit(self.p)
        emit_report(self.p)
        return self.p.elf()


class PVPlatform(Platform):
    kind = "pv"

    def __init__(self):
        # A kernel for Xen's PV CPU model: its own code runs in ring 3
        super().__init__(PVProgram(guest_os="trapless-compare-pv"))
        self._late.append(emit_traps)
        self.a.call("traps_init")

    def _events(self) -> None:
        if self._once("events"):
            self._late.append(emit_events)
            self.a.call("events_init")

    # console
    def console_setup(self) -> None:
        pass

    def console_write(self, buf: str, length: int) -> None:
        # the runtime's print: into the console ring, as a Xen domU's hvc console
        self.a.lea(rdi, ptr[buf])
        self.a.mov(esi, length)
        self.a.call("print")

    # ticks
    def interrupts_setup(self) -> None:
        self._events()

    def tick_start(self, hz: int, counter: str) -> None:
        a = self.a
        a.mov(edi, C.VIRQ_TIMER)
        a.call("bind_virq")
        set_port_handler(self.p, rax, "pv_tick")
        emit_events_on(self.p)
        self.p.hypercall("vcpu_op", C.VCPUOP_set_periodic_timer, 0, "pv_tick_period")

        def late(p, period=1_000_000_000 // hz):
            p.a.label("pv_tick")                # port handler: rdi = port
            p.a.inc(qword[counter])
            p.a.ret()
            p.a.section(".data")
            p.a.align(8)
            p.a.label("pv_tick_period")
            p.a.dq(period)
            p.a.section(".text")
        self._late.append(late)

    def irq_off(self) -> None:
        self.a.mov(byte[rip + "shared_info" + UPCALL_MASK], 1)

    def irq_on(self) -> None:
        self.a.mov(byte[rip + "shared_info" + UPCALL_MASK], 0)

    def idle(self) -> None:
        self.p.hypercall("sched_op", C.SCHEDOP_block, 0)    # unmasks, sleeps until an event

    def tick_stop(self) -> None:
        self.p.hypercall("vcpu_op", C.VCPUOP_stop_periodic_timer, 0, 0)

    # page tables
    def page_tables_setup(self) -> None:
        if self._once("pte"):
            self._late.append(emit_pv_pte_queue)

    def load_l4(self, reg) -> None:
        self.start_info_field(reg, "pt_base")

    def pte_write(self, addr, val) -> None:
        a = self.a
        a.mov(rdi, addr)
        a.mov(rsi, val)
        a.call("pte_queue_add")

    def pte_commit(self) -> None:
        self.a.call("pte_queue_commit")

    # clock
    def clock_setup(self) -> None:
        self._events()
        if self._once("clock"):
            self._late.extend([emit_pvclock, emit_pv_seconds_of_day])

    def clock_read(self) -> None:
        self.a.call("pv_seconds_of_day")


class NativePlatform(Platform):
    kind = "native"

    def __init__(self):
        super().__init__(NativeProgram(guest_os="trapless-compare-native"))
        self._late.append(nk.emit_native_traps)
        self.a.call("idt_init")

    # console
    def console_setup(self) -> None:
        if self._once("uart"):
            self._late.append(nk.emit_uart_init)
            self.a.call("uart_init")

    def console_write(self, buf: str, length: int) -> None:
        self.a.lea(rdi, ptr[buf])
        self.a.mov(esi, length)
        self.a.call("print")

    # ticks
    def interrupts_setup(self) -> None:
        if self._once("pic"):
            self._late.extend([nk.emit_pic, nk.emit_pit])
            self.a.call("pic_init")

    def tick_start(self, hz: int, counter: str) -> None:
        a = self.a
        a.mov(edi, nk.PIC1_VECTOR)
        a.lea(rsi, ptr["irq0"])
        a.call("idt_set_gate")
        a.mov(edi, round(nk.PIT_HZ / hz))
        a.call("pit_start")
        a.mov(edi, 0xFA)                    # IRQ0 and the cascade unmasked
        a.call("pic_mask")
        a.sti()
        self._late.append(lambda p: nk.emit_irq0_handler(p, counter))

    def irq_off(self) -> None:
        self.a.cli()

    def irq_on(self) -> None:
        self.a.sti()

    def idle(self) -> None:
        self.a.sti()                        # sti's shadow covers hlt: no lost wake-up
        self.a.hlt()

    def tick_stop(self) -> None:
        self.a.mov(edi, 0xFB)
        self.a.call("pic_mask")
        self.a.call("pit_stop")

    # page tables
    def page_tables_setup(self) -> None:
        # The builder maps the page-table pool read-only, as for a PV guest. A native
        # kernel's ring 0 writes it anyway with CR0.WP clear (as kernels ran before WP);
        # the store then reaches the read-only memslot and traps to the VMM.
        a = self.a
        if self._once("wp"):
            a.mov(rax, cr0)
            a.and_(eax, ~nk.CR0_WP & 0xFFFFFFFF)
            a.mov(cr0, rax)

    def load_l4(self, reg) -> None:
        self.a.mov(reg, cr3)                # VIRT_BASE 0: virtual == guest-physical

    def pte_write(self, addr, val) -> None:
        self.a.mov(qword[addr], val)        # traps: the VMM validates and applies it

    def pte_commit(self) -> None:
        self.a.mov(rax, cr3)
        self.a.mov(cr3, rax)                # flush the TLB

    # clock
    def clock_setup(self) -> None:
        if self._once("rtc"):
            self._late.append(nk.emit_rtc)
            self.a.call("rtc_init")

    def clock_read(self) -> None:
        self.a.call("rtc_seconds_of_day")


PLATFORMS = {"pv": PVPlatform, "native": NativePlatform}


# ---------------------------------------------------------------------------
# Routines the platforms and workloads share
# ---------------------------------------------------------------------------

def emit_pv_pte_queue(p: PVProgram) -> None:
    """pte_queue_add(rdi = entry address, rsi = value): queue one MMU_NORMAL_PT_UPDATE
    (committing first if the queue is full); pte_queue_commit: one multicall of
    mmu_update(queue) and mmuext_op(TLB_FLUSH_LOCAL): one exit for the whole batch."""
    a = p.a
    a.section(".bss")
    a.align(16)
    a.label("pte_queue")
    a.reserve(PTE_QUEUE_CAPACITY * 16)
    a.section(".data")
    a.align(8)
    a.label("pte_queued")
    a.dq(0)
    a.label("pte_flush_op")                 # struct mmuext_op
    a.dd(C.MMUEXT_TLB_FLUSH_LOCAL, 0)
    a.dq(0, 0)
    a.label("pte_multicall")                # struct multicall_entry[2]
    a.dq(C.__HYPERVISOR_mmu_update, 0, "pte_queue", 0, 0, C.DOMID_SELF, 0, 0)
    a.dq(C.__HYPERVISOR_mmuext_op, 0, "pte_flush_op", 1, 0, C.DOMID_SELF, 0, 0)
    a.section(".text")

    a.label("pte_queue_add")
    a.mov(rax, qword["pte_queued"])
    a.cmp(rax, PTE_QUEUE_CAPACITY)
    a.jb("pte_queue_add.room")
    a.push(rdi)
    a.push(rsi)
    a.call("pte_queue_commit")
    a.pop(rsi)
    a.pop(rdi)
    a.xor(eax, eax)
    a.label("pte_queue_add.room")
    a.shl(rax, 4)
    a.lea(rcx, ptr["pte_queue"])
    a.mov(qword[rcx + rax], rdi)            # ptr (low bits 0: a normal update)
    a.mov(qword[rcx + rax + 8], rsi)
    a.inc(qword["pte_queued"])
    a.ret()

    a.label("pte_queue_commit")
    a.mov(rax, qword["pte_queued"])
    a.mov(qword[rip + "pte_multicall" + (offsetof("multicall_entry", "args") + 8)], rax)
    a.lea(rdi, ptr["pte_multicall"])
    a.mov(esi, 2)
    a.call("hypercall_multicall")
    a.mov(qword["pte_queued"], 0)
    a.ret()


def emit_pv_seconds_of_day(p: PVProgram) -> None:
    """pv_seconds_of_day -> rax: (boot wall clock + PV-clock system time) mod one day,
    from shared memory only (the boot wall clock is fixed: read it, no version loop)."""
    si = offsetof("shared_info", "wc_sec"), offsetof("shared_info", "wc_nsec")
    a = p.a
    a.label("pv_seconds_of_day")
    a.call("pvclock_read")                  # rax = system time, ns
    a.mov(ecx, dword[rip + "shared_info" + si[1]])
    a.add(rax, rcx)
    a.xor(edx, edx)
    a.mov(ecx, 1_000_000_000)
    a.div(rcx)
    a.mov(ecx, dword[rip + "shared_info" + si[0]])
    a.add(rax, rcx)
    a.xor(edx, edx)
    a.mov(ecx, SECONDS_PER_DAY)
    a.div(rcx)
    a.mov(rax, rdx)
    a.ret()


def emit_report(p: PVProgram) -> None:
    """report_cstr(rdi), report_dec(rdi), report_hex(rdi): append to the `report` line."""
    a = p.a
    a.section(".data")
    a.align(8)
    a.label("report_pos")
    a.dq(0)
    a.label("report")
    a.reserve(REPORT_SIZE)
    a.section(".text")

    a.label("report_cstr")
    a.mov(rsi, qword["report_pos"])
    a.lea(rdx, ptr["report"])
    a.label("report_cstr.loop")
    a.mov(al, byte[rdi])
    a.test(al, al)
    a.je("report_cstr.done")
    a.cmp(rsi, REPORT_SIZE - 1)             # keep the last byte: the line's NUL
    a.jae("report_cstr.done")
    a.mov(byte[rdx + rsi], al)
    a.inc(rsi)
    a.inc(rdi)
    a.jmp("report_cstr.loop")
    a.label("report_cstr.done")
    a.mov(qword["report_pos"], rsi)
    a.ret()

    # the numbers are formatted by the runtime's format_dec/format_hex (into numbuf)
    a.label("report_dec")
    a.call("format_dec")
    a.mov(rdi, rsi)
    a.jmp("report_cstr")

    a.label("report_hex")
    a.call("format_hex")
    a.mov(rdi, rsi)
    a.jmp("report_cstr")


def report(pf: Platform, text: str) -> None:
    pf.p.load_arg(rdi, pf.p.string(text))
    pf.a.call("report_cstr")


def report_number(pf: Platform, reg, hex_: bool = False) -> None:
    pf.a.mov(rdi, reg)
    pf.a.call("report_hex" if hex_ else "report_dec")


# ---------------------------------------------------------------------------
# The workloads: the same instructions for both guests, privileged parts via pf
# ---------------------------------------------------------------------------

def console_text(size: int) -> bytes:
    """What the console workload prints: size / 64 lines of 64 bytes."""
    lines = []
    for n in range(size // LINE_BYTES):
        letters = "".join(chr(ord("a") + (n + i) % 26) for i in range(LINE_BYTES - 7))
        lines.append(f"{n:05d} {letters}\n")
    return "".join(lines).encode()


def console(pf: Platform, size: int) -> None:
    """Print `size` bytes of text (console_text): built in memory, then written out."""
    if size <= 0 or size % LINE_BYTES:
        raise ValueError(f"console size {size}: must be a positive multiple of {LINE_BYTES}")
    a = pf.a
    a.section(".bss")
    a.align(4096)
    a.label("console_text")
    a.reserve(size)
    a.section(".text")

    pf.console_setup()
    a.lea(rdi, ptr["console_text"])
    a.xor(r12, r12)                         # line number
    a.label("console.line")
    a.mov(rax, r12)                         # five digits, then a space
    a.mov(ecx, 10)
    for pos in range(4, -1, -1):
        a.xor(edx, edx)
        a.div(rcx)
        a.add(dl, ord("0"))
        a.mov(byte[rdi + pos], dl)
    a.mov(byte[rdi + 5], ord(" "))
    a.xor(r13, r13)                         # then letters: 'a' + (line + i) % 26
    a.label("console.letter")
    a.lea(rax, ptr[r12 + r13])
    a.xor(edx, edx)
    a.mov(ecx, 26)
    a.div(rcx)
    a.add(dl, ord("a"))
    a.mov(byte[rdi + r13 + 6], dl)
    a.inc(r13)
    a.cmp(r13, LINE_BYTES - 7)
    a.jne("console.letter")
    a.mov(byte[rdi + LINE_BYTES - 1], ord("\n"))
    a.add(rdi, LINE_BYTES)
    a.inc(r12)
    a.cmp(r12, size // LINE_BYTES)
    a.jne("console.line")
    pf.console_write("console_text", size)
    report(pf, "console: ")
    a.mov(rax, r12)
    a.shl(rax, 6)
    report_number(pf, rax)
    report(pf, " bytes")


def ticks(pf: Platform, count: int) -> None:
    """Take `count` timer interrupts at 1 kHz, idle in between."""
    a = pf.a
    a.section(".data")
    a.align(8)
    a.label("ticks_seen")
    a.dq(0)
    a.label("ticks_counted")
    a.dq(0)
    a.section(".text")

    pf.interrupts_setup()
    pf.tick_start(TICK_HZ, "ticks_seen")
    a.label("ticks.loop")
    pf.irq_off()                            # check and sleep without losing a tick
    a.cmp(qword["ticks_seen"], count)
    a.jae("ticks.done")
    pf.idle()
    a.jmp("ticks.loop")
    a.label("ticks.done")
    # The count as the loop saw it: a tick already due when the loop ended still
    # arrives once interrupts are on again (a late timer, a loaded host).
    a.mov(rax, qword["ticks_seen"])
    a.mov(qword["ticks_counted"], rax)
    pf.irq_on()
    pf.tick_stop()
    report(pf, "ticks: ")
    report_number(pf, qword["ticks_counted"])
    report(pf, f" at {TICK_HZ} Hz")


def page_tables(pf: Platform, entries: int) -> None:
    """Map `entries` pages through new L1 tables: link spare tables of the pool into
    the first free L2 slots, fill their entries (frame i at the window's i-th page),
    make it take effect, write through the window, checksum the entries."""
    tables = -(-entries // ENTRIES_PER_TABLE)
    if not 0 < tables <= SPARE_PT_FRAMES:
        raise ValueError(f"{entries} entries need {tables} tables; "
                         f"the pool has {SPARE_PT_FRAMES} spare")
    a = pf.a
    pf.page_tables_setup()
    pf.load_l4(rax)
    a.mov(r14, rax)
    a.mov(rcx, ADDR_MASK)
    a.mov(rax, qword[rax])                  # L4[0] -> L3
    a.and_(rax, rcx)
    a.mov(rax, qword[rax])                  # L3[0] -> L2 (the first GiB)
    a.and_(rax, rcx)
    a.mov(r12, rax)
    pf.start_info_field(rcx, "nr_pt_frames")    # the pool starts with the L4
    a.shl(rcx, 12)
    a.add(r14, rcx)                         # r14 = end of the pool: spares count down
    a.xor(ebx, ebx)                         # the first free L2 slot
    a.label("pte.scan")
    a.test(byte[r12 + rbx * 8], PTE_P)
    a.je("pte.found")
    a.inc(rbx)
    a.jmp("pte.scan")
    a.label("pte.found")
    a.mov(r13, rbx)
    a.shl(r13, 21)                          # r13 = window base (virtual == its first frame)
    for t in range(tables):                 # link spare table t into slot + t
        a.lea(rcx, ptr[r12 + rbx * 8 + 8 * t])
        a.lea(rdx, ptr[r14 - (t + 1) * PAGE + (PTE_P | PTE_RW)])
        pf.pte_write(rcx, rdx)
    a.xor(r15, r15)                         # entry j of table j / 512 maps frame base + j
    a.label("pte.fill")
    _entry_address(pf, rcx)
    a.mov(rdx, r15)
    a.shl(rdx, 12)
    a.add(rdx, r13)
    a.or_(rdx, PTE_P | PTE_RW)
    pf.pte_write(rcx, rdx)
    a.inc(r15)
    a.cmp(r15, entries)
    a.jb("pte.fill")
    pf.pte_commit()

    a.xor(ebx, ebx)                         # write through the window, read it back
    for t in range(tables):
        a.lea(rcx, ptr[r13 + t * ENTRIES_PER_TABLE * PAGE])
        a.mov(qword[rcx], t + 1)
    for t in range(tables):
        a.lea(rcx, ptr[r13 + t * ENTRIES_PER_TABLE * PAGE])
        a.cmp(qword[rcx], t + 1)
        a.je(f"pte.touch{t}")
        a.inc(rbx)
        a.label(f"pte.touch{t}")

    a.mov(r12, FNV_OFFSET)                  # checksum: FNV-1a over the 64-bit entries,
    a.xor(r15, r15)                         # what the kernel wrote of them
    a.label("pte.sum")
    _entry_address(pf, rcx)
    a.mov(rax, ADDR_MASK | PTE_P | PTE_RW)
    a.and_(rax, qword[rcx])
    a.xor(r12, rax)
    a.mov(rax, FNV_PRIME)
    a.imul(r12, rax)
    a.inc(r15)
    a.cmp(r15, entries)
    a.jb("pte.sum")
    report(pf, f"page tables: {entries} entries, checksum ")
    report_number(pf, r12, hex_=True)
    a.test(rbx, rbx)
    a.jne("pte.bad")
    report(pf, ", window ok")
    a.jmp("pte.out")
    a.label("pte.bad")
    report(pf, ", window bad")
    a.label("pte.out")


def _entry_address(pf: Platform, reg) -> None:
    """reg <- address of entry r15: table r15 / 512 (counted down from r14), slot r15 % 512."""
    a = pf.a
    a.mov(rax, r15)
    a.shr(rax, 9)
    a.inc(rax)
    a.shl(rax, 12)
    a.mov(reg, r14)
    a.sub(reg, rax)
    a.mov(rax, r15)
    a.and_(eax, ENTRIES_PER_TABLE - 1)
    a.lea(reg, ptr[reg + rax * 8])


FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


def page_table_checksum(window_base: int, entries: int) -> int:
    """The checksum page_tables reports, computed on the host: of each entry, the
    frame and the flags the kernel wrote (present, writable). The other bits are the
    hypervisor's and differ between the guests: the VMM that emulates a native kernel's
    stores sets accessed and dirty; under Xen's PV model the CPU's walk sets them on the
    pages touched, and trapless adds user and Xen's guest-kernel bit (52) to the mappings
    of a kernel that runs in ring 3, as Xen's adjust_guest_l1e does."""
    chk = FNV_OFFSET
    for j in range(entries):
        chk ^= (window_base + j * PAGE) | PTE_P | PTE_RW
        chk = (chk * FNV_PRIME) & (2**64 - 1)
    return chk


def clock(pf: Platform, reads: int) -> None:
    """Read the time of day (UTC seconds) `reads` times; count steps backwards (a
    step back over midnight is not one)."""
    if reads < 2:
        raise ValueError("clock: at least 2 reads")
    a = pf.a
    pf.clock_setup()
    pf.clock_read()
    a.mov(r13, rax)                         # the previous reading
    a.xor(ebx, ebx)
    a.mov(r12, reads - 1)
    a.label("clock.loop")
    pf.clock_read()
    a.cmp(rax, r13)
    a.jae("clock.ok")
    a.mov(rcx, r13)
    a.sub(rcx, rax)
    a.cmp(rcx, SECONDS_PER_DAY // 2)
    a.ja("clock.ok")
    a.inc(rbx)
    a.label("clock.ok")
    a.mov(r13, rax)
    a.dec(r12)
    a.jne("clock.loop")
    report(pf, f"clock: {reads} reads, ")
    report_number(pf, rbx)
    report(pf, " backwards")


COMPUTE_SEED = 0x9E3779B97F4A7C15


def emit_xorshift_rounds(a, rounds: int, loop: str) -> None:
    """rbx = the sum of the xorshift64 states over `rounds` rounds from COMPUTE_SEED:
    registers only (rax, rbx, rcx, r12), no exit. Also the bench's compute guest."""
    a.mov(rax, COMPUTE_SEED)
    a.mov(r12, rounds)
    a.xor(ebx, ebx)
    a.label(loop)
    for shift, left in ((13, True), (7, False), (17, True)):
        a.mov(rcx, rax)
        (a.shl if left else a.shr)(rcx, shift)
        a.xor(rax, rcx)
    a.add(rbx, rax)
    a.dec(r12)
    a.jne(loop)


def compute(pf: Platform, rounds: int) -> None:
    """xorshift64 `rounds` times, summing the states: registers only, no exit."""
    emit_xorshift_rounds(pf.a, rounds, "compute.loop")
    report(pf, f"compute: {rounds} rounds, checksum ")
    report_number(pf, rbx, hex_=True)


def compute_checksum(rounds: int) -> int:
    """What compute reports, computed on the host."""
    mask, x, total = 2**64 - 1, COMPUTE_SEED, 0
    for _ in range(rounds):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        total = (total + x) & mask
    return total


@dataclass(frozen=True)
class Workload:
    name: str
    emit: Callable[[Platform, int], None]
    size: int                               # what `make compare` runs
    unit: str
    what: str


WORKLOADS = {w.name: w for w in (
    Workload("console", console, 65536, "bytes", "print 64 KiB of text"),
    Workload("ticks", ticks, 1000, "ticks", "1,000 timer ticks at 1 kHz"),
    Workload("page_tables", page_tables, 4096, "entries", "update 4,096 page-table entries"),
    Workload("clock", clock, 100_000, "reads", "read the clock 100,000 times"),
    Workload("compute", compute, 200_000, "rounds", "a compute loop (the control)"),
)}
GUESTS = tuple(PLATFORMS)


def build(workload: str, guest: str, size: int | None = None) -> bytes:
    """The ELF image of one workload for one kind of guest ("pv" or "native")."""
    w = WORKLOADS[workload]
    pf = PLATFORMS[guest]()
    w.emit(pf, w.size if size is None else size)
    return pf.finish()
