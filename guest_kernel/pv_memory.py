"""The PV kernel's memory demonstration: balloon out and back in through memory_op,
map the frames through mmu_update batched in one multicall, use them, give them back.

Frames come from the middle of the domain's memory (nr_pages / 2 on), far above the
start-of-day region. The new L1 table is the last spare frame of the page-table pool
(start_info.pt_base + nr_pt_frames pages), linked into the first empty 2 MiB slot of
the bootstrap L2. Page tables are read-only to the guest: every change is a hypercall.
"""
from __future__ import annotations

from abi import C, offsetof, sizeof

from .asm import eax, ptr, qword, r8, r12, r13, r14, r15, rax, rbx, rcx, rdi, rip
from .runtime import PVProgram

PAGES = 256
PTE_P, PTE_RW, PTE_A, PTE_D = 1, 2, 0x20, 0x40
ADDR_MASK = 0x000F_FFFF_FFFF_F000
RESV = "mem_resv"
MC = offsetof("multicall_entry", "args")


def resv_field(name: str):
    return qword[rip + RESV + offsetof("xen_memory_reservation", name)]


def emit_memory_demo(p: PVProgram) -> None:
    a = p.a
    a.section(".data")
    a.align(8)
    a.label("mem_domid")
    a.dw(C.DOMID_SELF, 0, 0, 0)
    a.label(RESV)
    a.db(bytes(sizeof("xen_memory_reservation")))
    a.label("mem_done")
    a.dd(0, 0)
    a.label("mem_multicall")
    a.db(bytes(2 * sizeof("multicall_entry")))
    a.section(".bss")
    a.align(4096)
    a.label("mem_extents")
    a.reserve(8 * PAGES)
    a.label("mem_reqs")
    a.reserve(sizeof("mmu_update") * (PAGES + 1))
    a.section(".text")

    def reservation_now() -> None:
        p.hypercall("memory_op", C.XENMEM_current_reservation, "mem_domid")
        a.mov(rdi, rax)
        a.call("print_dec")
        p.print(" pages\n")

    p.print("memory: ")
    reservation_now()

    # extents[i] = nr_pages / 2 + i; the reservation names them, order 0
    a.mov(r13, qword["start_info_ptr"])
    a.mov(r13, qword[r13 + offsetof("start_info", "nr_pages")])
    a.shr(r13, 1)
    a.lea(rdi, ptr["mem_extents"])
    a.xor(eax, eax)
    a.label("mem.extents")
    a.lea(rcx, qword[r13 + rax])
    a.mov(qword[rdi + rax * 8], rcx)
    a.inc(rax)
    a.cmp(rax, PAGES)
    a.jne("mem.extents")
    a.lea(rax, ptr["mem_extents"])
    a.mov(resv_field("extent_start"), rax)
    a.mov(resv_field("nr_extents"), PAGES)
    a.mov(qword[rip + RESV + offsetof("xen_memory_reservation", "domid")], C.DOMID_SELF)

    def balloon(op: int, before: str, after: str) -> None:
        """memory_op(op) on the reservation; print before <extents done> after <pages now>."""
        p.hypercall("memory_op", op, RESV)
        a.mov(rbx, rax)
        p.print(before)
        a.mov(rdi, rbx)
        a.call("print_dec")
        p.print(after)
        reservation_now()

    balloon(C.XENMEM_decrease_reservation, "balloon: gave back ", " pages (1 MiB): ")
    balloon(C.XENMEM_populate_physmap, "balloon: populated ", " pages again: ")

    # the tables: L4 = pt_base, L3 = L4[0], L2 = L3[0]; the new L1 = the pool's last frame
    a.mov(rax, qword["start_info_ptr"])
    a.mov(r14, qword[rax + offsetof("start_info", "pt_base")])
    a.mov(r15, qword[rax + offsetof("start_info", "nr_pt_frames")])
    a.shl(r15, 12)
    a.add(r15, r14)
    a.sub(r15, 4096)                                # r15 = the new L1 (address = frame)
    a.mov(rcx, ADDR_MASK)
    a.mov(r14, qword[r14])
    a.and_(r14, rcx)
    a.mov(r14, qword[r14])
    a.and_(r14, rcx)                                # r14 = L2
    a.xor(r12, r12)                                 # r12 = first empty L2 slot after a used one
    a.label("mem.find_slot")
    a.inc(r12)
    a.test(qword[r14 + r12 * 8], PTE_P)
    a.jne("mem.find_slot")

    # reqs[i] = {L1 + 8i, frame_i | P RW A D}; reqs[PAGES] = {L2 + 8*slot, L1 | P RW A}
    a.lea(rdi, ptr["mem_reqs"])
    a.xor(eax, eax)
    a.label("mem.reqs")
    a.lea(rcx, qword[r15 + rax * 8])
    a.mov(qword[rdi], rcx)
    a.lea(rcx, qword[r13 + rax])
    a.shl(rcx, 12)
    a.or_(rcx, PTE_P | PTE_RW | PTE_A | PTE_D)
    a.mov(qword[rdi + 8], rcx)
    a.add(rdi, 16)
    a.inc(rax)
    a.cmp(rax, PAGES)
    a.jne("mem.reqs")
    a.lea(rcx, qword[r14 + r12 * 8])
    a.mov(qword[rdi], rcx)
    a.lea(rcx, ptr[r15 + (PTE_P | PTE_RW | PTE_A)])
    a.mov(qword[rdi + 8], rcx)

    # one multicall: mmu_update(256 L1 entries), then mmu_update(the L2 entry)
    size = sizeof("multicall_entry")
    for i, (first, count) in enumerate(((0, PAGES), (PAGES, 1))):
        base = rip + "mem_multicall" + i * size
        a.mov(qword[base], C.__HYPERVISOR_mmu_update)
        a.lea(rax, ptr[rip + "mem_reqs" + first * sizeof("mmu_update")])
        a.mov(qword[base + MC], rax)
        a.mov(qword[base + MC + 8], count)
        a.mov(qword[base + MC + 16], 0)
        a.mov(qword[base + MC + 24], C.DOMID_SELF)
    p.hypercall("multicall", "mem_multicall", 2)
    a.mov(rbx, qword[rip + "mem_multicall" + offsetof("multicall_entry", "result")])
    a.or_(rbx, qword[rip + "mem_multicall" + size + offsetof("multicall_entry", "result")])
    a.or_(rbx, rax)
    p.print("mmu: mapped 256 pages at ")
    a.mov(rdi, r12)
    a.shl(rdi, 21)
    a.call("print_hex")
    p.print(" with one multicall of 2 mmu_updates (257 PTEs): ")
    a.test(rbx, rbx)
    a.jne("mem.map_failed")
    p.print("ok\n")

    # write a different word into every page, then read them all back
    a.mov(rdi, r12)
    a.shl(rdi, 21)
    a.xor(eax, eax)
    a.label("mem.write")
    a.lea(rcx, qword[rax * 8 + 0x1234])
    a.mov(qword[rdi], rcx)
    a.add(rdi, 4096)
    a.inc(rax)
    a.cmp(rax, PAGES)
    a.jne("mem.write")
    a.mov(rdi, r12)
    a.shl(rdi, 21)
    a.xor(eax, eax)
    a.xor(r8, r8)                                   # r8 = pages that read back wrong
    a.label("mem.read")
    a.lea(rcx, qword[rax * 8 + 0x1234])
    a.cmp(qword[rdi], rcx)
    a.je("mem.read_ok")
    a.inc(r8)
    a.label("mem.read_ok")
    a.add(rdi, 4096)
    a.inc(rax)
    a.cmp(rax, PAGES)
    a.jne("mem.read")
    a.mov(rbx, r8)
    p.print("mmu: wrote and read back 256 pages through the new mappings: ")
    a.test(rbx, rbx)
    a.jne("mem.read_failed")
    p.print("ok\n")

    # unlink the table, then the frames can go back
    a.lea(rcx, qword[r14 + r12 * 8])
    a.lea(rdi, ptr["mem_reqs"])
    a.mov(qword[rdi], rcx)
    a.mov(qword[rdi + 8], 0)
    p.hypercall("mmu_update", "mem_reqs", 1, "mem_done", C.DOMID_SELF)
    balloon(C.XENMEM_decrease_reservation, "mmu: unmapped them; balloon: gave back ", " pages: ")
    a.jmp("mem.done")

    a.label("mem.map_failed")
    p.print("FAILED\n")
    a.jmp("mem.done")
    a.label("mem.read_failed")
    a.mov(rdi, rbx)
    a.call("print_dec")
    p.print(" pages wrong\n")
    a.label("mem.done")
