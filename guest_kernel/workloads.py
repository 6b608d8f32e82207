"""Guests that measure: each does one thing N times, then powers off.

The hypercall loop and the bare-exit loop have the same shape (a counted loop around
one exit), so timing both with the same C run loop isolates what our hypercall
dispatch adds to the hardware's own exit round trip.
"""
from __future__ import annotations

from abi import C

from .asm import eax, edi, esi, r12
from .runtime import PVProgram

UNCLAIMED_PORT = 0x80  # the POST-code port: no device model claims it


def hypercall_loop(iterations: int) -> bytes:
    """xen_version(XENVER_version) `iterations` times."""
    p = PVProgram(guest_os="trapless-bench-hypercall")
    a = p.a
    a.mov(r12, iterations)
    a.label("loop")
    a.mov(edi, C.XENVER_version)
    a.xor(esi, esi)
    a.call("hypercall_xen_version")
    a.dec(r12)
    a.jne("loop")
    a.xor(eax, eax)
    a.ret()
    return p.elf()


def bare_exit_loop(iterations: int) -> bytes:
    """`out` to a port nobody claims, `iterations` times: the bare exit.

    The `out` sits in a stub on a page of its own that the loop calls, exactly as the
    hypercall loop calls its stub on the hypercall page, so both guests touch the same
    pages between exits and differ only in what the VMM does with the exit.
    """
    p = PVProgram(guest_os="trapless-bench-bare-exit")
    a = p.a
    a.mov(r12, iterations)
    a.label("loop")
    a.mov(edi, C.XENVER_version)
    a.xor(esi, esi)
    a.call("bare_exit_stub")
    a.dec(r12)
    a.jne("loop")
    a.xor(eax, eax)
    a.ret()
    a.align(4096)
    a.label("bare_exit_stub")
    a.mov(eax, C.__HYPERVISOR_xen_version)
    a.out(UNCLAIMED_PORT, eax)
    a.ret()
    return p.elf()



