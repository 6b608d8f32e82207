"""The trapless PV kernel (a Mini-OS in spirit), emitted instruction by instruction.

v0: prints a banner with the version xen_version reports (major.minor and
extraversion), prints its command line from start_info, and powers off.
"""
from __future__ import annotations

from abi import C, offsetof

from .asm import byte, edi, qword, rax, rbx, rdi, rip
from .runtime import PVProgram

EXTRAVERSION_BUF = "scratch"


def emit_banner(p: PVProgram) -> None:
    a = p.a
    p.hypercall("xen_version", C.XENVER_version, 0)
    a.mov(rbx, rax)                                 # major << 16 | minor
    p.print("trapless PV kernel: Xen ")
    a.mov(rdi, rbx)
    a.shr(rdi, 16)
    a.call("print_dec")
    p.print(".")
    a.mov(rdi, rbx)
    a.and_(edi, 0xFFFF)
    a.call("print_dec")
    p.hypercall("xen_version", C.XENVER_extraversion, EXTRAVERSION_BUF)
    a.mov(byte[rip + EXTRAVERSION_BUF + (C.XEN_EXTRAVERSION_LEN - 1)], 0)  # never trust the terminator
    p.load_arg(rdi, EXTRAVERSION_BUF)
    a.call("print_cstr")
    p.print("\n")


def emit_cmdline(p: PVProgram) -> None:
    a = p.a
    p.print("command line: ")
    a.mov(rdi, qword["start_info_ptr"])
    a.add(rdi, offsetof("start_info", "cmd_line"))
    a.call("print_cstr")
    p.print("\n")


def build_pv_kernel() -> bytes:
    """The PV kernel's ELF image."""
    p = PVProgram(guest_os="trapless-pv-kernel")
    emit_banner(p)
    emit_cmdline(p)
    p.print("powering off\n")
    p.a.mov(rax, C.SHUTDOWN_poweroff)
    p.a.ret()
    return p.elf()
