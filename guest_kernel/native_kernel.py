"""The native (unmodified) kernel: a guest that knows nothing of hypercalls and drives the
emulated PC hardware with privileged instructions, each of which traps to the VMM.

`NativeProgram` is the runtime every native guest shares: the same entry, stack and
string table as a PV program (it is built by the same domain builder, 64-bit, page
tables in the read-only pool), but its console is a polled 16550 UART, it powers off by
writing the exit port, and it has no hypercall page. The `emit_*` functions add the
drivers a kernel needs:

  emit_native_traps   idt_init / idt_set_gate(rdi = vector, rsi = handler); exceptions
                      print what happened and crash the domain
  emit_uart_init      uart_init: 115200 8N1, FIFOs on, OUT2 set, interrupts off
  emit_pic            pic_init: both 8259s remapped to vectors 0x20 / 0x28, all masked
                      but the cascade; pic_mask(rdi = master mask)
  emit_pit            pit_start(rdi = reload, mode 2 on channel 0) / pit_stop
  emit_rtc            rtc_init (reads register B's format once) and
                      rtc_seconds_of_day -> rax (waits out update-in-progress, reads
                      hours, minutes, seconds)

Register conventions are the PV runtime's: helpers may clobber rax, rcx, rdx, rsi, rdi,
r8-r11 and preserve the rest.
"""
from __future__ import annotations

from hypervisor._hv import lib

from .asm import (al, byte, dx, eax, ebx, ecx, edi, edx, ptr, qword, r8, r9, rax, rbx, rcx, rdi,
                  rdx, rsi)
from .pvlib import emit_traps
from .runtime import PVProgram

UART = lib.HV_UART_PORT
UART_THR, UART_IER, UART_FCR, UART_LCR, UART_MCR, UART_LSR = (UART + i for i in (0, 1, 2, 3, 4, 5))
LSR_THRE = 0x20
PIC1, PIC2 = lib.HV_PIC_MASTER_PORT, lib.HV_PIC_SLAVE_PORT
PIC1_VECTOR, PIC2_VECTOR = 0x20, 0x28           # past the 32 exception vectors
EOI = 0x20
PIT = lib.HV_PIT_PORT
PIT_HZ = lib.HV_PIT_HZ
RTC_INDEX, RTC_DATA = lib.HV_RTC_PORT, lib.HV_RTC_PORT + 1
EXIT_PORT = lib.HV_EXIT_PORT
CR0_WP = 1 << 16


class NativeProgram(PVProgram):
    """An unmodified kernel's runtime: UART console, exit-port shutdown, no hypercalls.

    It reuses PVProgram's entry (own stack; rsi, the boot information block, saved in
    start_info_ptr), its string table and print()/string()/load_arg(); every helper that
    would reach the hypervisor is replaced by one that reaches hardware.
    """

    def __init__(self, guest_os: str = "trapless-native"):
        super().__init__(guest_os=guest_os, xen_pv=False)

    def hypercall(self, name: str, *args) -> None:
        raise TypeError(f"a native kernel makes no hypercalls (asked for {name})")

    hypercall_nr = hypercall

    def _emit_print(self) -> None:
        """print(rdi = buffer, rsi = length): each byte waits for LSR.THRE, then goes to
        THR (two port accesses, two exits, per byte: the polled console of every PC kernel)."""
        a = self.a
        a.label("print")
        a.test(rsi, rsi)
        a.je("print.done")
        a.mov(r8, rdi)
        a.lea(r9, ptr[rdi + rsi])
        a.label("print.next")
        a.mov(edx, UART_LSR)
        a.label("print.wait")
        a.in_(al, dx)
        a.test(al, LSR_THRE)
        a.je("print.wait")
        a.mov(edx, UART_THR)
        a.mov(al, byte[r8])
        a.out(dx, al)
        a.inc(r8)
        a.cmp(r8, r9)
        a.jne("print.next")
        a.label("print.done")
        a.ret()

    def _emit_shutdown(self) -> None:
        """shutdown(rdi = Xen shutdown reason): the exit port; the VMM stops the vCPU there."""
        a = self.a
        a.label("shutdown")
        a.mov(eax, edi)
        a.mov(edx, EXIT_PORT)
        a.out(dx, eax)
        a.label("shutdown.hang")
        a.jmp("shutdown.hang")

    def image(self):
        """Finish the program (no hypercall page); returns the assembled Image."""
        self._emit_data()
        return self.a.assemble()


def emit_native_traps(p: NativeProgram) -> None:
    """idt_init, idt_set_gate; every exception prints its vector, error code and rip and
    crashes the domain through the exit port."""
    emit_traps(p, "native kernel")


def _outb(p: NativeProgram, port: int, value: int) -> None:
    """outb: one port write (one exit). Ports above 0xff go through dx."""
    a = p.a
    a.mov(al, value)
    if port <= 0xFF:
        a.out(port, al)
    else:
        a.mov(edx, port)
        a.out(dx, al)


def emit_uart_init(p: NativeProgram) -> None:
    """uart_init: 115200 baud 8N1, FIFOs on, DTR/RTS/OUT2, no interrupts (7 writes)."""
    a = p.a
    a.label("uart_init")
    _outb(p, UART_IER, 0x00)
    _outb(p, UART_LCR, 0x80)            # DLAB: the next two are the divisor
    _outb(p, UART_THR, 0x01)            # divisor 1: 115200 baud
    _outb(p, UART_IER, 0x00)
    _outb(p, UART_LCR, 0x03)            # 8 data bits, no parity, 1 stop bit
    _outb(p, UART_FCR, 0xC7)            # FIFOs on and cleared, 14-byte trigger
    _outb(p, UART_MCR, 0x0B)            # DTR, RTS, OUT2 (gates the IRQ on a PC)
    a.ret()


def emit_pic(p: NativeProgram) -> None:
    """pic_init: ICW1-ICW4 on both chips (vectors 0x20 and 0x28, slave on IR2), then
    every input masked but the cascade; pic_mask(dil = master mask)."""
    a = p.a
    a.label("pic_init")
    for port, icws in ((PIC1, (0x11, PIC1_VECTOR, 0x04, 0x01)),
                       (PIC2, (0x11, PIC2_VECTOR, 0x02, 0x01))):
        _outb(p, port, icws[0])         # ICW1: initialise, cascade, ICW4 follows
        for icw in icws[1:]:
            _outb(p, port + 1, icw)     # ICW2 vector base, ICW3 wiring, ICW4 8086 mode
    _outb(p, PIC2 + 1, 0xFF)
    a.mov(edi, 0xFB)                    # all but IR2, the slave's line
    a.label("pic_mask")
    a.mov(eax, edi)
    a.out(PIC1 + 1, al)
    a.ret()


def emit_pit(p: NativeProgram) -> None:
    """pit_start(rdi = reload): channel 0, lo/hi, mode 2 (rate generator); pit_stop:
    a new control word and no count stops channel 0."""
    a = p.a
    a.label("pit_start")
    _outb(p, PIT + 3, 0x34)             # channel 0, lo then hi, mode 2, binary
    a.mov(eax, edi)
    a.out(PIT, al)
    a.shr(eax, 8)
    a.out(PIT, al)
    a.ret()
    a.label("pit_stop")
    _outb(p, PIT + 3, 0x30)             # channel 0, mode 0, waiting for a count
    a.ret()


def emit_irq0_handler(p: NativeProgram, counter: str) -> None:
    """irq0: the timer interrupt: counter += 1, then EOI to the master PIC."""
    a = p.a
    a.label("irq0")
    a.push(rax)
    a.inc(qword[counter])
    a.mov(al, EOI)
    a.out(PIC1, al)                     # non-specific EOI: IRQ0 leaves in-service
    a.pop(rax)
    a.iretq()


def emit_rtc(p: NativeProgram) -> None:
    """rtc_init: read register B once (binary or BCD). rtc_seconds_of_day -> rax:
    wait while update-in-progress, then hours*3600 + minutes*60 + seconds (UTC).
    Each register read is an index write and a data read: two exits."""
    a = p.a
    a.section(".data")
    a.label("rtc_binary")
    a.dq(0)
    a.section(".text")

    a.label("rtc_read")                 # rtc_read(dil = register) -> rax, decoded
    a.mov(eax, edi)
    a.out(RTC_INDEX, al)
    a.in_(al, RTC_DATA)
    a.movzx(eax, al)
    a.cmp(qword["rtc_binary"], 0)
    a.jne("rtc_read.out")
    a.mov(ecx, eax)                     # BCD: tens in the high nibble
    a.shr(ecx, 4)
    a.and_(eax, 15)
    a.imul(ecx, ecx, 10)
    a.add(eax, ecx)
    a.label("rtc_read.out")
    a.ret()

    a.label("rtc_init")
    a.mov(al, 0x0B)
    a.out(RTC_INDEX, al)
    a.in_(al, RTC_DATA)
    a.and_(eax, 0x04)                   # register B, DM: binary
    a.mov(qword["rtc_binary"], rax)
    a.ret()

    a.label("rtc_seconds_of_day")
    a.push(rbx)
    a.label("rtc_seconds_of_day.uip")
    a.mov(al, 0x0A)
    a.out(RTC_INDEX, al)
    a.in_(al, RTC_DATA)
    a.test(al, 0x80)                    # update in progress: the registers may be torn
    a.jne("rtc_seconds_of_day.uip")
    a.mov(edi, 0x04)
    a.call("rtc_read")
    a.imul(ebx, eax, 3600)
    a.mov(edi, 0x02)
    a.call("rtc_read")
    a.imul(eax, eax, 60)
    a.add(ebx, eax)
    a.mov(edi, 0x00)
    a.call("rtc_read")
    a.add(eax, ebx)
    a.pop(rbx)
    a.ret()


DEMO_TICK_HZ = 100
DEMO_TICKS = 10


def emit_rtc_datetime(p: NativeProgram) -> None:
    """print_rtc_datetime: "YYYY-MM-DD HH:MM:SS" from the CMOS clock (needs emit_rtc)."""
    a = p.a
    a.label("print_2d")                 # print_2d(rdi < 100): two digits
    a.cmp(rdi, 10)
    a.jae("print_dec")
    a.push(rdi)
    p.print("0")
    a.pop(rdi)
    a.jmp("print_dec")

    a.label("print_rtc_datetime")
    a.label("print_rtc_datetime.uip")
    a.mov(al, 0x0A)
    a.out(RTC_INDEX, al)
    a.in_(al, RTC_DATA)
    a.test(al, 0x80)
    a.jne("print_rtc_datetime.uip")
    for reg, after in ((0x32, None), (0x09, "-"), (0x08, "-"), (0x07, " "), (0x04, ":"),
                       (0x02, ":"), (0x00, None)):
        a.mov(edi, reg)
        a.call("rtc_read")
        a.mov(rdi, rax)
        a.call("print_2d")
        if after:
            p.print(after)
    a.ret()


def build_native_kernel() -> bytes:
    """The native kernel's ELF image: the PV kernel's start of day done with hardware.

    It prints a banner and the wall clock (CMOS), takes `ticks=N` timer interrupts
    (default 10) at 100 Hz from PIT channel 0 through the PIC, idling in hlt and
    acknowledging each with an EOI, and powers off through the exit port. The command
    line comes from the boot information block, as a boot loader would hand it over.
    """
    from .pv_kernel import emit_cmdline_helpers, emit_count_tick, emit_ticks_wanted
    p = NativeProgram(guest_os="trapless-native-kernel")
    a = p.a
    a.call("idt_init")
    a.call("uart_init")
    p.print("trapless native kernel: no hypercalls, PC hardware only\n")
    a.call("rtc_init")
    p.print("wall clock: ")
    a.call("print_rtc_datetime")
    p.print(" UTC (CMOS)\n")

    emit_ticks_wanted(p, DEMO_TICKS)
    a.call("pic_init")
    a.mov(edi, PIC1_VECTOR)
    a.lea(rsi, ptr["kernel_tick"])
    a.call("idt_set_gate")
    a.mov(edi, round(PIT_HZ / DEMO_TICK_HZ))
    a.call("pit_start")
    a.mov(edi, 0xFA)                    # IRQ0 and the cascade
    a.call("pic_mask")
    a.label("kernel.idle")
    a.cli()
    a.mov(rax, qword["ticks_seen"])
    a.cmp(rax, qword["ticks_wanted"])
    a.jae("kernel.done")
    a.sti()
    a.hlt()
    a.jmp("kernel.idle")
    a.label("kernel.done")
    a.sti()
    a.mov(edi, 0xFB)
    a.call("pic_mask")
    a.call("pit_stop")
    a.mov(rdi, qword["ticks_seen"])
    a.call("print_dec")
    p.print(f" ticks at {DEMO_TICK_HZ} Hz (PIT channel 0 on IRQ0, an EOI each)\n")
    p.print("powering off\n")
    a.xor(eax, eax)
    a.ret()

    # IRQ0: count; say so every 10 ticks; EOI
    a.label("kernel_tick")
    for reg in (rax, rcx, rdx, rsi, rdi, r8, r9):
        a.push(reg)
    emit_count_tick(p)
    a.mov(al, EOI)
    a.out(PIC1, al)
    for reg in (r9, r8, rdi, rsi, rdx, rcx, rax):
        a.pop(reg)
    a.iretq()

    emit_cmdline_helpers(p)
    emit_native_traps(p)
    emit_uart_init(p)
    emit_pic(p)
    emit_pit(p)
    emit_rtc(p)
    emit_rtc_datetime(p)
    return p.elf()
