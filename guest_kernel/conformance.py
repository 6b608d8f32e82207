"""Guest side of the conformance suite (XTF in spirit): one way to report.

A conformance guest calls hypercalls with good and bad arguments and reports every
result on its console as one line, which the host parses and checks:

    result <case> <rax as signed decimal>
    bytes <case> <hex of a guest buffer>

Expectations live on the host side (tests/conformance), next to the case.
"""
from __future__ import annotations

import re

from abi import C, CONSTANTS, HYPERCALL_NAMES, ffi, offsetof

from .asm import byte, eax, ecx, esi, ptr, qword, r12, r13, rax, rbx, rdi, rsi
from .runtime import PVProgram

RESULT_RE = re.compile(r"^result (\S+) (-?\d+)$", re.M)
BYTES_RE = re.compile(r"^bytes (\S+) ([0-9a-f]*)$", re.M)


# Guest-virtual addresses a conformance case aims bad pointers at. The start-of-day
# region of a small guest in 64 MiB ends at 4 MiB (hosts assert it via Domain.layout).
NULL = 0
NON_CANONICAL = 0x0000_8000_0000_0000
UNMAPPED = 0x4000_0000
MAPPED_END = 0x40_0000


class ConformanceGuest(PVProgram):
    """A PV program with reporting helpers."""

    def __init__(self, name: str, events: bool = False, xen_pv: bool = True):
        """events=True: the trap table (or IDT), shared_info, the upcall and the PV clock
        are set up first. xen_pv: a guest for Xen's PV CPU model, a kernel in ring 3
        (False: one that requires supervisor_mode_kernel, trapless's ring-0 model)."""
        super().__init__(guest_os=f"trapless-conformance-{name}", xen_pv=xen_pv)
        self.cases: dict[str, tuple[str, str]] = {}
        self._emit_report_helpers()
        if xen_pv:
            # Xen's builder maps a kernel's start-of-day region from its VIRT_BASE, here
            # 0: unmap the NULL page, as XTF does, so that a null pointer stays a bad
            # one (where nothing is mapped there, this changes nothing)
            self.hypercall("update_va_mapping", NULL, 0, C.UVMF_INVLPG)
        if events:
            from .pvlib import emit_events, emit_pvclock, emit_traps
            self.a.call("traps_init")
            self.a.call("events_init")
            self.report("events_init")
            self._emit_later = (emit_traps, emit_events, emit_pvclock)
        else:
            self._emit_later = ()

    def events_on(self) -> None:
        """Let upcalls in (needs events=True): the upcall mask cleared, or sti in ring 0."""
        from .pvlib import emit_events_on
        emit_events_on(self)

    def struct(self, label: str, struct: str, **fields) -> str:
        """A `struct <struct>` in .data at label, laid out by the ABI header."""
        raw = bytes(ffi.buffer(ffi.new(f"struct {struct} *", fields)))
        self.a.section(".data")
        self.a.align(8)
        self.a.label(label)
        self.a.db(raw)
        self.a.section(".text")
        return label

    def _emit_report_helpers(self) -> None:
        a = self.a
        a.jmp("after_report_helpers")
        a.label("print_hexbytes")   # rdi = buffer, rsi = length
        a.push(rbx)
        a.push(r12)
        a.push(r13)
        a.mov(rbx, rdi)
        a.mov(r12, rsi)
        a.label("print_hexbytes.loop")
        a.test(r12, r12)
        a.je("print_hexbytes.done")
        a.movzx(r13, byte[rbx])
        a.mov(rdi, r13)
        a.shr(rdi, 4)
        a.call("print_nibble")
        a.mov(rdi, r13)
        a.and_(rdi, 15)
        a.call("print_nibble")
        a.inc(rbx)
        a.dec(r12)
        a.jmp("print_hexbytes.loop")
        a.label("print_hexbytes.done")
        a.pop(r13)
        a.pop(r12)
        a.pop(rbx)
        a.ret()
        a.label("print_nibble")     # rdi = 0..15
        a.lea(rsi, ptr["hexdigits"])
        a.add(rdi, rsi)
        a.mov(esi, 1)
        a.jmp("print")
        a.label("after_report_helpers")

    def start_info_field(self, reg, field: str) -> None:
        """reg <- start_info.field (a 64-bit field)."""
        self.a.mov(reg, qword["start_info_ptr"])
        self.a.mov(reg, qword[reg + offsetof("start_info", field)])

    def fill(self, where: str | int, length: int, value: int) -> None:
        """memset(where, value, length), so a case can show what a failed call left alone."""
        a = self.a
        self.load_arg(rdi, where)
        a.mov(ecx, length)
        a.mov(eax, value)
        a.rep_stosb()

    def report(self, case: str) -> None:
        """Print `result <case> <rax>`; rax is preserved in rbx across the print."""
        a = self.a
        a.mov(rbx, rax)
        self.print(f"result {case} ")
        a.mov(rdi, rbx)
        a.call("print_sdec")
        self.print("\n")
        a.mov(rax, rbx)

    def call(self, case: str, hypercall: str | int, *args, subop: int | None = None) -> None:
        """Make one hypercall and report its result as `case`. The case is filed under
        the hypercall and its sub-op (the first argument, unless subop says otherwise)."""
        if isinstance(hypercall, int):
            self.hypercall_nr(hypercall, *args)
            name = HYPERCALL_NAMES.get(hypercall, f"hypercall_{hypercall}")
        else:
            self.hypercall(hypercall, *args)
            name = hypercall
        if subop is None and args and isinstance(args[0], int):
            subop = args[0]
        self.cases[case] = (name, subop_name(name, subop))
        self.report(case)

    def dump(self, case: str, where: str | int, length: int) -> None:
        """Print `bytes <case> <hex>` of `length` bytes at a label or address."""
        self.print(f"bytes {case} ")
        self.load_arg(rdi, where)
        self.load_arg(rsi, length)
        self.a.call("print_hexbytes")
        self.print("\n")

    def finish(self) -> "GuestImage":
        """Power off after the cases; returns the ELF image (which knows its cases)."""
        self.a.xor(rax, rax)
        self.a.ret()
        for emit in self._emit_later:
            emit(self)
        image = GuestImage(self.elf())
        image.cases = dict(self.cases)
        return image


class GuestImage(bytes):
    """An ELF image plus {case: (hypercall, sub-op)} of the calls its cases make."""
    cases: dict[str, tuple[str, str]]


# Sub-op constant prefixes per hypercall, for naming sub-ops in reports.
SUBOP_PREFIX = {
    "console_io": "CONSOLEIO_", "xen_version": "XENVER_", "sched_op": "SCHEDOP_",
    "event_channel_op": "EVTCHNOP_", "hvm_op": "HVMOP_", "vcpu_op": "VCPUOP_",
    "memory_op": "XENMEM_", "mmuext_op": "MMUEXT_", "callback_op": "CALLBACKOP_",
    "grant_table_op": "GNTTABOP_",
}


def subop_name(hypercall: str, subop: int | None) -> str:
    """XENVER_version for (xen_version, 0); "-" for a hypercall without sub-ops."""
    prefix = SUBOP_PREFIX.get(hypercall)
    if prefix is None or subop is None:
        return "-"
    if hypercall == "memory_op":
        subop &= C.XENMEMOP_CMD_MASK
    names = [k for k, v in CONSTANTS.items() if k.startswith(prefix) and v == subop
             and not k.endswith(("_LEN", "_MASK"))]
    return names[0] if names else f"unknown ({subop})"


def parse(console: str) -> tuple[dict[str, int], dict[str, bytes]]:
    """({case: result}, {case: bytes}) from a conformance guest's console output."""
    results = {m.group(1): int(m.group(2)) for m in RESULT_RE.finditer(console)}
    dumps = {m.group(1): bytes.fromhex(m.group(2)) for m in BYTES_RE.finditer(console)}
    return results, dumps

