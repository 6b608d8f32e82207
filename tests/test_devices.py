"""Device models of a native domain, driven port by port through the device bus (as a
vCPU's `in`/`out` reaches them), with the device clock frozen where time matters."""
from __future__ import annotations

import struct
import time

import pytest

from abi import C
from guest_kernel.asm import eax
from guest_kernel.native_kernel import NativeProgram
from hypervisor._hv import ffi, lib
from hypervisor.domain import Domain

UART, PIT, PIC1, PIC2, RTC, EXIT = (lib.HV_UART_PORT, lib.HV_PIT_PORT, lib.HV_PIC_MASTER_PORT,
                                    lib.HV_PIC_SLAVE_PORT, lib.HV_RTC_PORT, lib.HV_EXIT_PORT)
THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = (UART + i for i in range(8))
MS = 1_000_000
T0 = 10 * 1_000_000_000                 # a frozen system time, ns
# 2024-02-29 23:59:58.5 UTC, a Thursday
WALL = 1709251198 * 1_000_000_000 + 500 * MS


def idle_native_image() -> bytes:
    """A native guest that powers off at once: the domain is what the tests drive."""
    p = NativeProgram()
    p.a.xor(eax, eax)
    p.a.ret()
    return p.elf()


class Bus:
    """The device bus of one native domain, as a test drives it."""

    def __init__(self, dom: Domain):
        self.dom, self.d = dom, dom._dom

    def out(self, port: int, value: int, size: int = 1) -> int:
        return lib.hv_devices_port(self.d, port, size, 1, ffi.new("uint32_t *", value))

    def inp(self, port: int, size: int = 1) -> int:
        v = ffi.new("uint32_t *", 0x5A5A5A5A)
        assert lib.hv_devices_port(self.d, port, size, 0, v) in (0, 1)
        return v[0]

    def vector(self) -> int:
        return lib.hv_devices_pending_vector(self.d)

    def ack(self, vector: int) -> None:
        lib.hv_devices_ack_vector(self.d, vector)

    def clock(self, mono_ns: int, wall_ns: int = WALL) -> None:
        lib.hv_devices_set_clock(self.d, mono_ns, wall_ns)

    def wait_vector(self, timeout: float = 2.0) -> int:
        """The timer thread raises PIT edges asynchronously: wait for one to show."""
        end = time.monotonic() + timeout
        while self.vector() < 0 and time.monotonic() < end:
            time.sleep(0.001)
        return self.vector()

    def wait_edges(self, n: int, timeout: float = 2.0) -> None:
        end = time.monotonic() + timeout
        while self.stats()["pit_edges"] < n and time.monotonic() < end:
            time.sleep(0.001)
        assert self.stats()["pit_edges"] == n

    def stats(self) -> dict:
        return self.dom.device_stats()

    def pic_init(self, master_mask: int = 0xFF, slave_mask: int = 0xFF, aeoi: bool = False):
        for port, base, icw3 in ((PIC1, 0x20, 0x04), (PIC2, 0x28, 0x02)):
            self.out(port, 0x11)
            self.out(port + 1, base)
            self.out(port + 1, icw3)
            self.out(port + 1, 0x03 if aeoi else 0x01)
        self.out(PIC1 + 1, master_mask)
        self.out(PIC2 + 1, slave_mask)


@pytest.fixture
def bus(engine):
    dom = Domain(idle_native_image(), memory_mib=16, engine=engine, native=True)
    yield Bus(dom)
    dom.destroy()


def console_after_power_off(bus: Bus) -> bytes:
    """Run the idle guest to its power-off so the console stream is complete."""
    stop = bus.dom.run(timeout=10)
    assert (stop.kind, stop.reason) == ("shutdown", 0), stop
    return bytes(bus.dom.console_output)


# ---- the bus ----------------------------------------------------------------

def test_a_pv_domain_has_no_devices(engine):
    from guest_kernel.runtime import PVProgram
    from guest_kernel.asm import eax
    p = PVProgram()
    p.a.xor(eax, eax)
    p.a.ret()
    with Domain(p.elf(), memory_mib=16, engine=engine) as dom:
        assert dom.device_stats() is None
        assert lib.hv_devices_port(dom._dom, UART, 1, 0, ffi.new("uint32_t *")) == -1


def test_unknown_ports_float_high_and_ignore_writes(bus):
    for port, size, expected in ((0x80, 1, 0xFF), (0x2F8, 2, 0xFFFF), (0xCF8, 4, 0xFFFFFFFF)):
        assert bus.out(port, 0x12345678 & ((1 << 8 * size) - 1), size) == 0
        assert bus.inp(port, size) == expected
    assert bus.stats()["port_io"] == [0] * lib.HV_DEV_NR


def test_wrong_width_reaches_no_register(bus):
    v = ffi.new("uint32_t *")
    assert lib.hv_devices_port(bus.d, LSR, 2, 0, v) == 1 and v[0] == 0xFFFF
    assert bus.out(SCR, 0x41) == 1
    assert bus.out(SCR, 0x4242, size=2) == 1        # ignored
    assert bus.out(THR, 0x43434343, size=4) == 1     # ignored: nothing is sent
    assert bus.inp(SCR) == 0x41
    assert lib.hv_devices_port(bus.d, UART, 3, 0, v) == -1   # not an x86 access size
    s = bus.stats()
    assert (s["bad_width"], s["uart_tx_bytes"]) == (3, 0)
    assert console_after_power_off(bus) == b""


# ---- UART 16550 -------------------------------------------------------------

def test_uart_polled_transmit_reaches_the_console(bus):
    assert bus.inp(LSR) == 0x60                      # THR empty, transmitter empty
    for byte in b"hi\x01\n":
        assert bus.out(THR, byte) == 1
    assert bus.inp(LSR) == 0x60
    assert bus.stats()["uart_tx_bytes"] == 4
    assert console_after_power_off(bus) == b"hi\x01\n"   # a serial line carries any byte


def test_uart_registers_and_the_divisor_latch(bus):
    assert bus.inp(IIR) == 0x01                      # no interrupt pending, FIFOs off
    bus.out(LCR, 0x80)                               # DLAB
    bus.out(THR, 0x01)
    bus.out(IER, 0x00)
    assert (bus.inp(THR), bus.inp(IER)) == (0x01, 0x00)
    bus.out(LCR, 0x03)
    assert bus.inp(LCR) == 0x03
    bus.out(IER, 0xFF)
    assert bus.inp(IER) == 0x0F                      # the upper nibble does not exist
    bus.out(IIR, 0xC7)                               # FCR: FIFOs on
    assert bus.inp(IIR) & 0xC0 == 0xC0
    bus.out(SCR, 0x99)
    bus.out(MCR, 0xFF)
    assert (bus.inp(SCR), bus.inp(MCR), bus.inp(MSR)) == (0x99, 0x1F, 0xB0)
    assert bus.stats()["uart_tx_bytes"] == 0         # THR writes with DLAB set are the divisor


def test_uart_receives_what_the_console_queued(bus):
    assert bus.inp(LSR) & 0x01 == 0
    assert bus.dom.send_input(b"ok") == 2
    assert bus.inp(LSR) & 0x01 == 1                  # data ready
    assert (bus.inp(THR), bus.inp(THR)) == (ord("o"), ord("k"))
    assert bus.inp(LSR) & 0x01 == 0
    assert bus.stats()["uart_rx_bytes"] == 2


def test_uart_receive_interrupt_rises_when_input_arrives(bus):
    """Queued console input raises IRQ4 at once (no port access needed), so a native
    guest idling in hlt with the receive interrupt on wakes for a key."""
    bus.pic_init(master_mask=0xEF)                   # only IRQ4 (COM1) unmasked
    bus.out(IER, 0x01)                               # data-ready interrupt on
    bus.out(MCR, 0x08)                               # OUT2: the line reaches the PIC
    assert bus.vector() == -1                        # nothing received yet
    assert bus.dom.send_input(b"k") == 1
    assert bus.vector() == 0x24
    bus.ack(0x24)
    assert bus.inp(IIR) == 0x04                      # the source: data ready
    assert bus.inp(THR) == ord("k")


def test_uart_thre_interrupt_through_the_pic(bus):
    bus.pic_init(master_mask=0xEF)                   # only IRQ4 (COM1) unmasked
    bus.out(IER, 0x02)                               # THRE interrupt on, THR is empty
    assert bus.vector() == -1                        # OUT2 is off: the line is gated
    bus.out(MCR, 0x08)
    assert bus.vector() == 0x24
    bus.ack(0x24)
    assert bus.inp(IIR) == 0x02                      # the source: THR empty ...
    assert bus.inp(IIR) == 0x01                      # ... acknowledged by reading IIR
    bus.out(PIC1, 0x20)                              # EOI
    bus.out(THR, ord("x"))                           # sent at once: THR empty again
    assert bus.vector() == 0x24
    s = bus.stats()
    assert (s["irqs_delivered"], s["eois"]) == (1, 1)


# ---- PIC 8259 ---------------------------------------------------------------

def test_pic_starts_masked_and_the_icws_set_it_up(bus):
    assert (bus.inp(PIC1 + 1), bus.inp(PIC2 + 1)) == (0xFF, 0xFF)
    bus.pic_init(master_mask=0xFA, slave_mask=0xFF)
    assert (bus.inp(PIC1 + 1), bus.inp(PIC2 + 1)) == (0xFA, 0xFF)
    assert bus.inp(PIC1) == 0x00                     # IRR
    bus.out(PIC1, 0x0B)                              # OCW3: read ISR
    assert bus.inp(PIC1) == 0x00


def start_pit(bus: Bus, count: int, mode: int = 2) -> None:
    bus.out(PIT + 3, 0x30 | (mode << 1))             # channel 0, lo/hi
    bus.out(PIT, count & 0xFF)
    bus.out(PIT, count >> 8)


def test_pic_priority_in_service_and_eoi(bus):
    """IRQ0 (PIT) outranks IRQ4 (UART): it preempts IRQ4 in service, and blocks it
    until its EOI; the rotate commands change who is highest."""
    bus.clock(T0)
    bus.pic_init(master_mask=0xEE)                   # IRQ0 and IRQ4
    bus.out(MCR, 0x08)
    bus.out(IER, 0x02)                               # IRQ4 requested
    assert bus.vector() == 0x24
    bus.ack(0x24)
    start_pit(bus, 1193)
    bus.clock(T0 + 2 * MS)
    assert bus.wait_vector() == 0x20                 # higher priority gets through
    bus.ack(0x20)
    bus.out(PIC1, 0x0B)
    assert bus.inp(PIC1) == 0x11                     # both in service
    bus.out(THR, 0x2E)                               # a new IRQ4 edge, blocked
    assert bus.vector() == -1
    bus.out(PIC1, 0x20)                              # non-specific EOI: the highest, IRQ0
    assert bus.inp(PIC1) == 0x10
    bus.out(PIC1, 0x64)                              # specific EOI of IRQ4
    assert bus.inp(PIC1) == 0x00
    assert bus.vector() == 0x24
    bus.out(PIC1, 0xC3)                              # set priority: IRQ3 lowest, IRQ4 highest
    bus.clock(T0 + 4 * MS)
    bus.wait_edges(4)
    assert bus.vector() == 0x24                      # both pending: IRQ4 wins now
    bus.out(PIC1, 0x0A)                              # OCW3: read IRR
    assert bus.inp(PIC1) & 0x11 == 0x11


def test_pic_auto_eoi_and_poll(bus):
    bus.clock(T0)
    bus.pic_init(master_mask=0xEF, aeoi=True)
    bus.out(MCR, 0x08)
    bus.out(IER, 0x02)
    bus.ack(bus.vector())
    bus.out(PIC1, 0x0B)
    assert bus.inp(PIC1) == 0x00                     # auto-EOI: nothing stays in service
    bus.out(THR, 0x2E)
    bus.out(PIC1, 0x0C)                              # OCW3 poll
    assert bus.inp(PIC1) == 0x84                     # IRQ4, acknowledged by the poll
    assert bus.vector() == -1


# ---- PIT 8254 ---------------------------------------------------------------

def test_pit_counts_down_and_latches(bus):
    bus.clock(T0)
    start_pit(bus, 1000)                             # mode 2, 1000 input ticks per period
    assert (bus.inp(PIT), bus.inp(PIT)) == (1000 & 0xFF, 1000 >> 8)
    bus.clock(T0 + 100_000)                          # 100 µs: 119 ticks
    bus.out(PIT + 3, 0x00)                           # latch channel 0
    bus.clock(T0 + 200_000)                          # the latch holds the old count
    lo, hi = bus.inp(PIT), bus.inp(PIT)
    assert lo | hi << 8 == 1000 - 119
    lo, hi = bus.inp(PIT), bus.inp(PIT)              # unlatched: counting on
    assert lo | hi << 8 == 1000 - 238
    bus.clock(T0 + 1_000_000)                        # 1193 ticks: one reload, 193 in
    bus.out(PIT + 3, 0xD2)                           # read-back: latch channel 0's count
    lo, hi = bus.inp(PIT), bus.inp(PIT)
    assert lo | hi << 8 == 1000 - 193


def test_pit_read_back_status_and_lsb_access(bus):
    bus.clock(T0)
    bus.out(PIT + 3, 0x96)                           # channel 2, lsb only, mode 3
    assert bus.out(PIT + 3, 0xE8) == 1               # read-back status of channel 2
    assert bus.inp(PIT + 2) == 0x40 | 0x10 | (3 << 1) | 0x80   # null count, lsb, mode 3, OUT
    bus.out(PIT + 2, 200)
    bus.clock(T0 + 10_000)                           # 11 ticks: mode 3 counts down by two
    assert bus.inp(PIT + 2) == 200 - 22


def test_pit_channel0_raises_irq0_at_its_rate(bus):
    bus.clock(T0)
    bus.pic_init(master_mask=0xFE)
    start_pit(bus, 1193)                             # ~1 kHz
    bus.clock(T0 + 500_000)
    time.sleep(0.02)
    assert bus.vector() == -1                        # not yet a period
    bus.clock(T0 + 1_000_000)
    assert bus.wait_vector() == 0x20
    bus.ack(0x20)
    bus.out(PIC1, 0x20)                              # EOI
    bus.clock(T0 + 10_500_000)                       # nine more edges, one request bit
    assert bus.wait_vector() == 0x20
    bus.ack(0x20)
    assert bus.vector() == -1
    s = bus.stats()
    assert (s["pit_edges"], s["irqs_delivered"]) == (10, 2)
    bus.out(PIC1, 0x20)
    bus.out(PIT + 3, 0x30)                           # stopped: no more edges
    bus.clock(T0 + 50_000_000)
    time.sleep(0.02)
    assert bus.vector() == -1 and bus.stats()["pit_edges"] == 10


def test_pit_mode0_fires_once(bus):
    bus.clock(T0)
    bus.pic_init(master_mask=0xFE)
    start_pit(bus, 1193, mode=0)
    bus.clock(T0 + 5_000_000)
    assert bus.wait_vector() == 0x20
    bus.ack(0x20)
    bus.out(PIC1, 0x20)
    bus.clock(T0 + 50_000_000)
    time.sleep(0.02)
    assert bus.vector() == -1 and bus.stats()["pit_edges"] == 1


# ---- CMOS RTC ---------------------------------------------------------------

def rtc(bus: Bus, reg: int) -> int:
    bus.out(RTC, reg)
    return bus.inp(RTC + 1)


def test_rtc_reads_the_date_and_time_in_bcd(bus):
    bus.clock(T0)
    regs = {reg: rtc(bus, reg) for reg in (0, 2, 4, 6, 7, 8, 9, 0x32, 0x0A, 0x0B, 0x0D)}
    assert regs == {0: 0x58, 2: 0x59, 4: 0x23, 6: 0x05, 7: 0x29, 8: 0x02, 9: 0x24,
                    0x32: 0x20, 0x0A: 0x26, 0x0B: 0x02, 0x0D: 0x80}
    assert bus.inp(RTC) == 0xFF                      # the index port is write-only
    assert bus.stats()["rtc_reads"] == 11


def test_rtc_binary_and_12_hour_modes(bus):
    bus.clock(T0)
    bus.out(RTC, 0x0B)
    bus.out(RTC + 1, 0x04)                           # binary, 12-hour
    assert (rtc(bus, 0), rtc(bus, 2), rtc(bus, 4)) == (58, 59, 0x80 | 11)   # 11 pm
    bus.clock(T0, WALL - 12 * 3600 * 1_000_000_000)  # 11 am
    assert rtc(bus, 4) == 11
    bus.out(RTC, 0x0B)
    bus.out(RTC + 1, 0x00)                           # BCD, 12-hour
    assert rtc(bus, 4) == 0x11


def test_rtc_update_in_progress_and_nvram(bus):
    bus.clock(T0, WALL + 499_800 * 1000)             # .9998 s: within 244 µs of the update
    assert rtc(bus, 0x0A) == 0xA6
    bus.clock(T0, WALL + 499_700 * 1000)
    assert rtc(bus, 0x0A) == 0x26
    for reg, value in ((0x0E, 0x12), (0x7F, 0x34), (0x00, 0x00), (0x0C, 0xFF), (0x0D, 0x00)):
        bus.out(RTC, reg | 0x80)                     # bit 7: the NMI mask, ignored
        bus.out(RTC + 1, value)
    assert (rtc(bus, 0x0E), rtc(bus, 0x7F)) == (0x12, 0x34)
    assert (rtc(bus, 0x00), rtc(bus, 0x0C), rtc(bus, 0x0D)) == (0x58, 0x00, 0x80)


# ---- trapped page-table writes ----------------------------------------------

def pool_entry(bus: Bus, gpa: int) -> int:
    return struct.unpack("<Q", bytes(ffi.buffer(lib.hv_domain_ram(bus.d) + gpa, 8)))[0]


def free_l1_slot(bus: Bus) -> int:
    """Guest-physical address of L1 entry 0 of the first L1: virtual page 0 (unmapped)."""
    l4 = bus.dom.layout.pt_start
    l3 = pool_entry(bus, l4) & 0x000FFFFFFFFFF000
    l2 = pool_entry(bus, l3) & 0x000FFFFFFFFFF000
    l1 = pool_entry(bus, l2) & 0x000FFFFFFFFFF000
    assert pool_entry(bus, l1) == 0
    return l1


def audit(bus: Bus) -> str:
    err = ffi.new("char[256]")
    return "" if lib.hv_mm_audit(bus.d, err, len(err)) == 0 else ffi.string(err).decode()


def test_a_trapped_pte_store_is_validated_and_applied(bus):
    slot = free_l1_slot(bus)
    frame = 8 << 20                                  # RAM outside the start-of-day region
    assert lib.hv_devices_mmio_write(bus.d, slot, 8, frame | 0x3) == 1
    assert pool_entry(bus, slot) == frame | 0x63     # accessed and dirty forced on
    # A 4-byte store merges into its entry: the high half, then the low half.
    assert lib.hv_devices_mmio_write(bus.d, slot + 4, 4, 0) == 1
    assert lib.hv_devices_mmio_write(bus.d, slot, 4, (frame + 4096) | 0x1) == 1
    assert pool_entry(bus, slot) == (frame + 4096) | 0x61
    assert lib.hv_devices_mmio_write(bus.d, slot, 8, 0) == 1
    assert lib.hv_devices_mmio_write(bus.d, 0x1000, 8, 0) == 0     # not the pool: not ours
    s = bus.stats()
    assert (s["pte_writes"], s["pte_rejected"]) == (4, 0)
    assert audit(bus) == ""


@pytest.mark.parametrize("what,errno", [
    ("frame beyond RAM", -C.XEN_EPERM),
    ("page table writable", -C.XEN_EBUSY),
    ("PAT bit", -C.XEN_EINVAL),                     # cache attributes: not for a PV domU either
])
def test_a_bad_pte_store_is_refused_and_crashes_the_domain(bus, what, errno):
    slot = free_l1_slot(bus)
    value = {"frame beyond RAM": (16 << 20) | 0x1,
             "page table writable": bus.dom.layout.pt_start | 0x3,
             "PAT bit": (8 << 20) | 0x81}[what]
    assert lib.hv_devices_mmio_write(bus.d, slot, 8, value) == 1
    assert pool_entry(bus, slot) == 0                # not made
    s = bus.stats()
    assert (s["pte_writes"], s["pte_rejected"]) == (0, 1)
    assert (s["pte_last_gpa"], s["pte_last_value"], s["pte_last_error"]) == (slot, value, errno)
    assert audit(bus) == ""
    stop = bus.dom.run(timeout=10)                   # the domain crashed over it
    assert (stop.kind, stop.reason) == ("shutdown", C.SHUTDOWN_crash)
    assert stop.message == (f"page-table store refused: {value:#x} at guest-physical "
                            f"{slot:#x} (Xen errno {errno})")


def test_a_store_straddling_two_entries_is_refused(bus):
    slot = free_l1_slot(bus)
    assert lib.hv_devices_mmio_write(bus.d, slot + 4, 8, 0) == 1
    s = bus.stats()
    assert (s["pte_rejected"], s["pte_last_error"]) == (1, -C.XEN_EINVAL)
