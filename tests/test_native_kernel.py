"""The native guest end to end: the compare workloads in small sizes, as PV and native
guests on every engine, with their exact exit counts and identical results; and native
guests that misbehave with devices and page tables."""
from __future__ import annotations

import datetime
import re
import struct

import pytest

from abi import C
from guest_kernel import compare_workloads as cw
from guest_kernel import native_kernel as nk
from guest_kernel.asm import (al, ax, byte, cr0, cr3, dx, eax, edi, edx, ptr, qword, r12,
                              rax, rbx, rcx, rdi, rdx, rsi)
from hypervisor._hv import ffi, lib
from hypervisor.domain import Domain
from hypervisor.image import load_image

from helpers import hv

MEMORY_MIB = 64
FROZEN_WALL_NS = 1709251198 * 1_000_000_000 + 500_000_000   # half a second from any update


@pytest.fixture
def run(engine):
    """run(image, native, freeze_clock=False) -> (stop, exits by reason, report line,
    console bytes, domain); the domains live until the test ends."""
    domains = []

    def run_one(image: bytes, native: bool, freeze_clock: bool = False):
        dom = Domain(image, memory_mib=MEMORY_MIB, engine=engine, native=native)
        domains.append(dom)
        if freeze_clock:
            # The RTC's update-in-progress window would make retries (and exits) depend
            # on the moment; a frozen wall clock has none.
            lib.hv_devices_set_clock(dom._dom, 1_000_000_000, FROZEN_WALL_NS)
        stop = dom.run(timeout=60)
        symbols = load_image(image, MEMORY_MIB << 20).symbols
        report = ""
        if "report" in symbols:
            report = dom.read_guest(symbols["report"], cw.REPORT_SIZE).split(b"\0")[0].decode()
        exits = {k: v for k, v in dom.counters().exits.items() if v}
        return stop, exits, report, bytes(dom.console_output), dom

    yield run_one
    for dom in domains:
        dom.destroy()


@pytest.fixture
def both(run):
    """both(workload, size) -> {guest: (exits, report, console, domain)}; both powered off."""
    def run_both(workload: str, size: int, freeze_clock: bool = False):
        out = {}
        for guest in cw.GUESTS:
            stop, exits, report, console, dom = run(cw.build(workload, guest, size),
                                                    guest == "native", freeze_clock)
            assert (stop.kind, stop.reason) == ("shutdown", 0), (guest, stop)
            out[guest] = exits, report, console, dom
        return out
    return run_both


def without(exits: dict, *reasons: str) -> dict:
    """Exit counts minus reasons that depend on timing (kicks, windows) or on the engine's
    own bookkeeping (priv_insn: instructions a translator hands to the VMM)."""
    return {k: v for k, v in exits.items() if k not in reasons}


VARIABLE = ("intr", "irq_window", "priv_insn")


def test_console_64_lines(both):
    r = both("console", 4096)
    (pv, pv_report, pv_console, _), (nat, nat_report, nat_console, dom) = r["pv"], r["native"]
    assert pv_console == nat_console == cw.console_text(4096)
    assert pv_report == nat_report == "console: 4096 bytes"
    # set_trap_table; the console ring's port notified when full and at the end; shutdown
    assert without(pv, *VARIABLE) == {"hypercall": 1 + 2 + 1}
    # UART set-up (7), LSR poll + THR write per byte, the exit port
    assert without(nat, *VARIABLE) == {"io": 7 + 2 * 4096 + 1}
    assert dom.device_stats()["uart_tx_bytes"] == 4096


def test_console_pv_notifies_once_per_ring_full(both):
    r = both("console", 65536)
    assert r["pv"][2] == r["native"][2] == cw.console_text(65536)
    # 32 rings of 2 KiB, each taken by the backend on one EVTCHNOP_send
    assert without(r["pv"][0], *VARIABLE) == {"hypercall": 1 + 32 + 1}
    assert without(r["native"][0], *VARIABLE)["io"] >= 131_072


def test_page_tables(both):
    entries = 1000                                  # two tables: one full, one in part
    r = both("page_tables", entries)
    (pv, pv_report, _, pv_dom), (nat, nat_report, _, nat_dom) = r["pv"], r["native"]
    window = pv_dom.layout.region_end               # the first free L2 slot maps from here
    assert nat_dom.layout.region_end == window
    expected = (f"page tables: {entries} entries, checksum "
                f"{cw.page_table_checksum(window, entries):#x}, window ok")
    assert pv_report == nat_report == expected
    assert without(pv, *VARIABLE) == {"hypercall": 1 + 1 + 1}   # trap table, multicall, shutdown
    # two links into the L2, then every entry: each a trapped store; the exit port
    assert without(nat, *VARIABLE) == {"mmio": 2 + entries, "io": 1}
    assert nat_dom.device_stats()["pte_writes"] == 2 + entries


def test_clock(both):
    reads = 50
    r = both("clock", reads, freeze_clock=True)
    assert r["pv"][1] == r["native"][1] == f"clock: {reads} reads, 0 backwards"
    # PV: the trap table, shared_info placed and the event and failsafe callbacks
    # registered (3), shutdown; reads: no exit
    assert without(r["pv"][0], *VARIABLE) == {"hypercall": 1 + 3 + 1}
    # register B once (2); per read: UIP, hours, minutes, seconds (index + data each)
    assert without(r["native"][0], *VARIABLE) == {"io": 2 + 8 * reads + 1}


def test_ticks(both):
    count = 20
    r = both("ticks", count)
    assert r["pv"][1] == r["native"][1] == f"ticks: {count} at 1000 Hz"
    # PV: the trap table, events set up (3), bind VIRQ_TIMER, start and stop the
    # periodic timer, one SCHEDOP_block per tick, an iret per upcall, shutdown. A tick
    # that lands while the upcall handler still runs is taken by the same upcall,
    # without a block of its own (a loaded host).
    counters = r["pv"][3].counters()
    blocks, upcalls = counters.blocks, counters.upcalls
    assert count // 2 <= blocks <= count and count // 2 <= upcalls <= count
    assert without(r["pv"][0], *VARIABLE) == {
        "hypercall": 1 + 3 + 1 + 1 + blocks + upcalls + 1 + 1}
    # native: PIC init (10), PIT start (3), unmask, an EOI per tick, mask, PIT stop,
    # exit port; a hlt per tick, except that a tick already pending when the guest comes
    # back to its hlt (a loaded host delivers late ticks back to back) is taken without
    # one, as on the PV side
    native = without(r["native"][0], *VARIABLE)
    hlts = native.pop("hlt")
    assert count // 2 <= hlts <= count
    assert native == {"io": 10 + 3 + 1 + count + 1 + 1 + 1}
    stats = r["native"][3].device_stats()
    assert stats["irqs_delivered"] == stats["eois"] == count
    assert stats["pit_edges"] >= count


def test_compute(both):
    rounds = 3000
    r = both("compute", rounds)
    expected = f"compute: {rounds} rounds, checksum {cw.compute_checksum(rounds):#x}"
    assert r["pv"][1] == r["native"][1] == expected
    assert without(r["pv"][0], *VARIABLE) == {"hypercall": 1 + 1}   # trap table, shutdown
    assert without(r["native"][0], *VARIABLE) == {"io": 1}


# ---- native guests doing odd things ------------------------------------------

def native(body, *drivers) -> bytes:
    """A native guest: IDT set up, then body(p); main returns rax. drivers: emit_* of
    native_kernel the body calls."""
    p = nk.NativeProgram(guest_os="trapless-native-test")
    p.a.call("idt_init")
    body(p)
    p.a.ret()
    nk.emit_native_traps(p)
    for emit in drivers:
        emit(p)
    return p.elf()


@pytest.mark.parametrize("value,reason", [(0, "poweroff"), (1, "reboot"), (3, "crash"),
                                          (0x42, "crash")])
def test_the_exit_port_value_is_the_shutdown_reason(run, value, reason):
    def body(p):
        p.print("bye\n")
        p.a.mov(edx, nk.EXIT_PORT)
        p.a.mov(eax, value)
        p.a.out(dx, eax)
    stop, _, _, console, dom = run(native(body), True)
    assert (stop.kind, stop.shutdown_name) == ("shutdown", reason)
    assert console == b"bye\n"
    assert dom.device_stats()["exit_value"] == value


def test_odd_port_accesses_float_high_and_the_guest_goes_on(run):
    """Unclaimed ports and 16/32-bit accesses to 8-bit registers: reads are all-ones,
    writes vanish, both are counted; the guest sees exactly that and carries on."""
    def body(p):
        a = p.a
        a.in_(al, 0x80)                     # POST-code port: no device
        a.movzx(edi, al)
        a.mov(edx, 0xCF8)                   # PCI configuration address: no device
        a.in_(eax, dx)
        a.add(rdi, rax)
        a.mov(edx, nk.UART_LSR)
        a.in_(ax, dx)                       # 16-bit read of an 8-bit register
        a.movzx(eax, ax)
        a.add(rdi, rax)
        a.mov(edx, nk.UART_THR)
        a.mov(eax, 0x41414141)
        a.out(dx, eax)                      # 32-bit write to THR: sends nothing
        a.out(0x80, al)
        a.mov(qword["sum"], rdi)
        p.print("still here\n")
        a.xor(eax, eax)
        a.section(".data")
        a.label("sum")
        a.dq(0)
        a.section(".text")
    image = native(body)
    stop, exits, _, console, dom = run(image, True)
    assert (stop.kind, stop.reason) == ("shutdown", 0)
    assert console == b"still here\n"
    total = struct.unpack("<Q", dom.read_guest(load_image(image, MEMORY_MIB << 20).symbols["sum"], 8))[0]
    assert total == 0xFF + 0xFFFFFFFF + 0xFFFF
    assert dom.counters().unknown_port_io == 3
    assert dom.device_stats()["bad_width"] == 2


def test_interrupt_driven_uart_console(run):
    """A driver that sends each byte from the THRE interrupt (IRQ4 through the PIC)."""
    text = b"sent from IRQ4\n"

    def body(p):
        a = p.a
        a.call("pic_init")
        a.call("uart_init")
        a.mov(edi, nk.PIC1_VECTOR + 4)
        a.lea(rsi, ptr["com1_irq"])
        a.call("idt_set_gate")
        a.mov(edi, 0xEB)                    # IRQ4 and the cascade unmasked
        a.call("pic_mask")
        a.mov(edx, nk.UART_IER)
        a.mov(al, 0x02)                     # THRE interrupt: due at once, THR is empty
        a.out(dx, al)
        a.label("wait")
        a.cli()
        a.cmp(qword["sent"], len(text))
        a.jae("done")
        a.sti()
        a.hlt()
        a.jmp("wait")
        # IRQ4: read IIR (acknowledges THRE), send the next byte; before the last one,
        # turn the interrupt off so that nothing follows it
        a.label("com1_irq")
        a.push(rax)
        a.push(rcx)
        a.push(rdx)
        a.mov(edx, nk.UART + 2)
        a.in_(al, dx)
        a.mov(rcx, qword["sent"])
        a.cmp(rcx, len(text) - 1)
        a.jb("com1_irq.send")
        a.mov(edx, nk.UART_IER)
        a.mov(al, 0)
        a.out(dx, al)
        a.label("com1_irq.send")
        a.lea(rdx, ptr["message"])
        a.mov(al, byte[rdx + rcx])
        a.mov(edx, nk.UART_THR)
        a.out(dx, al)
        a.inc(qword["sent"])
        a.mov(al, nk.EOI)
        a.out(nk.PIC1, al)
        a.pop(rdx)
        a.pop(rcx)
        a.pop(rax)
        a.iretq()
        a.label("done")
        a.sti()
        a.xor(eax, eax)
        a.section(".data")
        a.label("sent")
        a.dq(0)
        a.label("message")
        a.db(text)
        a.section(".text")

    stop, _, _, console, dom = run(native(body, nk.emit_pic, nk.emit_uart_init), True)
    assert (stop.kind, stop.reason) == ("shutdown", 0), stop
    assert console == text
    stats = dom.device_stats()
    assert stats["irqs_delivered"] == stats["eois"] == len(text)
    assert stats["uart_tx_bytes"] == len(text)


def pte_guest(second_value_of) -> bytes:
    """Clear CR0.WP; map virtual page 1 to frame 8 MiB with a direct store to the first
    L1 (a trap), use it; then store second_value_of(p) (rdx, with rbx = L4) to slot 2."""
    def body(p):
        a = p.a
        a.mov(rax, cr0)
        a.and_(eax, ~nk.CR0_WP & 0xFFFFFFFF)
        a.mov(cr0, rax)
        a.mov(rax, cr3)
        a.mov(rbx, rax)
        a.mov(rcx, cw.ADDR_MASK)
        for _ in range(3):                  # L4 -> L3 -> L2 -> the first L1
            a.mov(rax, qword[rax])
            a.and_(rax, rcx)
        a.mov(r12, rax)
        a.mov(rdx, (8 << 20) | 0x3)
        a.mov(qword[r12 + 8], rdx)          # traps: validated, applied
        a.invlpg(ptr[0x1000])
        a.mov(rax, 0x1234)
        a.mov(qword[0x1000], rax)
        second_value_of(p)
        a.mov(qword[r12 + 16], rdx)
        p.print("after the second store\n")
        a.xor(eax, eax)
    return native(body)


def test_a_native_guest_maps_a_page_with_a_direct_store(run):
    def harmless(p):
        p.a.xor(edx, edx)                   # clearing an empty entry: valid
    stop, exits, _, console, dom = run(pte_guest(harmless), True)
    assert (stop.kind, stop.reason) == ("shutdown", 0), stop
    assert console == b"after the second store\n"
    ram = ffi.buffer(lib.hv_domain_ram(dom._dom), MEMORY_MIB << 20)
    assert struct.unpack_from("<Q", ram, 8 << 20)[0] == 0x1234     # written through the mapping
    assert dom.device_stats()["pte_writes"] == 2
    assert exits.get("mmio") == 2


def test_a_native_guest_cannot_map_its_page_tables_writable(run):
    def l4_writable(p):
        p.a.mov(rdx, rbx)
        p.a.or_(rdx, 0x3)                   # the L4 itself, present and writable
    stop, _, _, console, dom = run(pte_guest(l4_writable), True)
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "crash")
    assert console == b""                   # it never got past the store
    stats = dom.device_stats()
    l1 = stats["pte_last_gpa"] - 16
    assert stop.message == (f"page-table store refused: {dom.layout.pt_start | 3:#x} at "
                            f"guest-physical {stats['pte_last_gpa']:#x} (Xen errno {-C.XEN_EBUSY})")
    ram = ffi.buffer(lib.hv_domain_ram(dom._dom), MEMORY_MIB << 20)
    assert struct.unpack_from("<Q", ram, l1 + 16)[0] == 0                   # not made
    assert struct.unpack_from("<Q", ram, l1 + 8)[0] == (8 << 20) | 0x63     # the good one was
    err = ffi.new("char[256]")
    assert lib.hv_mm_audit(dom._dom, err, len(err)) == 0, ffi.string(err).decode()


# ---- the command line ----------------------------------------------------------

def test_the_native_kernel_boots_from_the_command_line(engine):
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    r = hv("run", "--native", "--engine", engine, "--cmdline", "ticks=20")
    after = datetime.datetime.now(datetime.timezone.utc)
    assert (r.returncode, r.stderr) == (0, "")
    lines = r.stdout.splitlines()
    assert lines[0] == "trapless native kernel: no hypercalls, PC hardware only"
    m = re.fullmatch(r"wall clock: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC \(CMOS\)", lines[1])
    assert m, lines[1]
    shown = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").replace(
        tzinfo=datetime.timezone.utc)
    assert before <= shown <= after
    assert lines[2:] == ["tick 10", "tick 20",
                         "20 ticks at 100 Hz (PIT channel 0 on IRQ0, an EOI each)",
                         "powering off"]


def test_a_refused_page_table_store_is_one_line(engine, tmp_path):
    def l4_writable(p):
        p.a.mov(rdx, rbx)
        p.a.or_(rdx, 0x3)
    image = tmp_path / "bad-pte.elf"
    image.write_bytes(pte_guest(l4_writable))
    r = hv("run", "--native", "--engine", engine, image)
    assert r.returncode == 5                        # crash
    assert r.stdout == ""
    assert re.fullmatch(r"trapless: d1 shut down: crash \(page-table store refused: 0x[0-9a-f]+3 "
                        r"at guest-physical 0x[0-9a-f]+ \(Xen errno -16\)\)\n", r.stderr), r.stderr


def test_an_exception_in_a_native_guest_is_reported_on_its_uart(run):
    def body(p):
        p.a.label("fault_here")
        p.a.ud2()
    image = native(body)
    stop, _, _, console, _ = run(image, True)
    rip = load_image(image, MEMORY_MIB << 20).symbols["fault_here"]
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "crash")
    assert console == f"\nnative kernel: exception 6 error 0x0 at rip {rip:#x}\n".encode()


@pytest.mark.parametrize("alias_nx", [False, True], ids=["alias-exec", "alias-nx"])
def test_code_changed_through_another_mapping_runs_as_changed(run, alias_nx):
    """The guest runs code in a page of its own through its usual mapping, rewrites it
    through a second mapping of the frame (virtual page 1, whose TLB entry has already
    taken stores), and runs it again: the new code runs (bt must drop its translation).
    The second mapping may forbid execute (as Linux's direct map does), so that bt
    cannot keep its stores checked by letting its entry fetch."""
    code_one = int.from_bytes(b"\xb8\x01\x00\x00\x00\xc3\x00\x00", "little")    # mov eax, 1; ret
    code_two = int.from_bytes(b"\xb8\x02\x00\x00\x00\xc3\x00\x00", "little")    # mov eax, 2; ret

    def body(p):
        a = p.a
        a.mov(rax, cr0)
        a.and_(eax, ~nk.CR0_WP & 0xFFFFFFFF)
        a.mov(cr0, rax)
        a.mov(rax, cr3)
        a.mov(rcx, cw.ADDR_MASK)
        for _ in range(3):                  # L4 -> L3 -> L2 -> the first L1
            a.mov(rax, qword[rax])
            a.and_(rax, rcx)
        a.lea(rdi, ptr["code_page"])
        a.lea(rdx, ptr[rdi + 0x3])
        if alias_nx:
            a.mov(rsi, 1 << 63)
            a.or_(rdx, rsi)                 # NX
        a.mov(qword[rax + 8], rdx)          # virtual page 1 -> the frame of code_page
        a.mov(rbx, 0x1000)
        a.mov(rax, code_one)
        a.mov(qword[rbx], rax)              # the code, through page 1
        a.call(rdi)                         # run through the usual mapping
        a.mov(qword[rbx + 0x100], rax)
        a.mov(rax, code_two)
        a.mov(qword[rbx], rax)              # changed through page 1
        a.call(rdi)
        a.mov(qword[rbx + 0x108], rax)
        a.xor(eax, eax)
        a.section(".data")
        a.align(4096)
        a.label("code_page")
        a.db(*bytes(4096))
        a.section(".text")

    stop, _, _, console, dom = run(native(body), True)
    assert (stop.kind, stop.reason) == ("shutdown", 0), (stop, console)
    page = load_image(native(body), MEMORY_MIB << 20).symbols["code_page"]
    assert struct.unpack("<QQ", dom.read_guest(page + 0x100, 16)) == (1, 2)
