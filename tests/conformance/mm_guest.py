"""Guest side of the memory conformance tests: page-table addresses, one-entry
mmu_update / mmuext_op calls, memory_op reservations, batches and loops over pages.

A conformance guest links at VIRT_BASE 0, so in its start-of-day region a virtual
address equals the pseudo-physical one: the page-table pool at start_info.pt_base is
readable (read-only) at its physical address. The builder puts the bootstrap tables
first (L4, L3, L2, L1s) and SPARE_PT_FRAMES unused frames last; `spare(k)` is the k-th
from the end. New mappings go in L2 slots from MAPPED_END up (2 MiB each), pointing at
frames above the start-of-day region.
"""
from __future__ import annotations

from abi import C, offsetof

from guest_kernel.asm import (dword, eax, ecx, ptr, qword, r8, r9, r11, rax, rbp, rcx, rdi, rdx,
                              rip)
from guest_kernel.conformance import MAPPED_END, ConformanceGuest
from hypervisor.builder import SPARE_PT_FRAMES

PAGE = 4096
PTE_P, PTE_RW, PTE_US, PTE_PWT, PTE_PCD, PTE_A, PTE_D, PTE_PS, PTE_G = (
    1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80, 0x100)
PTE_NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000
FORCED = PTE_A | PTE_D              # what the hypervisor adds to every present entry
XEN_KERNEL_PAGE = 1 << 52           # Xen's _PAGE_GUEST_KERNEL, in an L1 entry's high bits
MAX_BATCH = 512
UNTOUCHED = 0xAAAAAAAA              # the success count before a call writes it


def stored(level: int, value: int) -> int:
    """What a present entry the guest wrote into a table of `level` reads back as: with
    accessed and dirty set, and, as the guests run under Xen's PV CPU model (a kernel
    in ring 3), with user access added where the guest left it out; an L1 entry so
    changed also gets Xen's kernel-page mark (Xen's adjust_guest_l1e / _l2e...).
    level 0: a frame not in use as a table: a plain store (Xen's PGT_writable_page
    case of do_mmu_update), checked when the frame becomes a table."""
    if not value & PTE_P or level == 0:
        return value
    value |= FORCED
    if level and not value & PTE_US:
        value |= PTE_US | (XEN_KERNEL_PAGE if level == 1 else 0)
    return value


def l2_slot_va(slot: int) -> int:
    """Virtual base of the 2 MiB that L2 entry `slot` (first GiB) maps."""
    return slot << 21


FIRST_FREE_SLOT = MAPPED_END >> 21   # the first L2 slot the bootstrap tables leave empty


class MMGuest(ConformanceGuest):
    """A ConformanceGuest that knows where its page tables are."""

    def __init__(self, name: str):
        super().__init__(name)
        self._n = 0
        a = self.a
        a.section(".data")
        a.align(8)
        for label in ("mm_l4", "mm_l3", "mm_l2", "mm_pool_end", "mm_nr_pages"):
            a.label(label)
            a.dq(0)
        a.label("mm_done")
        a.dd(0, 0)
        a.label("mm_domid")
        a.dw(C.DOMID_SELF, 0, 0, 0)
        a.label("mm_resv")                  # struct xen_memory_reservation
        a.dq(0, 0, 0, 0)
        a.label("mm_op")                    # struct mmuext_op
        a.dq(0, 0, 0)
        a.section(".bss")
        a.align(4096)
        a.label("mm_reqs")                  # MAX_BATCH struct mmu_update
        a.reserve(16 * MAX_BATCH)
        a.label("mm_extents")               # MAX_BATCH xen_pfn_t
        a.reserve(8 * MAX_BATCH)
        a.section(".text")
        # Where the tables are: L4 = pt_base, L3 = L4[0], L2 = L3[0].
        self.start_info_field(rax, "pt_base")
        a.mov(qword["mm_l4"], rax)
        self.start_info_field(rcx, "nr_pt_frames")
        a.shl(rcx, 12)
        a.add(rcx, rax)
        a.mov(qword["mm_pool_end"], rcx)
        a.mov(rcx, ADDR_MASK)
        a.mov(rax, qword[rax])
        a.and_(rax, rcx)
        a.mov(qword["mm_l3"], rax)
        a.mov(rax, qword[rax])
        a.and_(rax, rcx)
        a.mov(qword["mm_l2"], rax)
        self.start_info_field(rax, "nr_pages")
        a.mov(qword["mm_nr_pages"], rax)

    def _label(self, what: str) -> str:
        self._n += 1
        return f"mm{self._n}.{what}"

    # ---- addresses ---------------------------------------------------------
    def load(self, reg, value) -> None:
        """reg <- value: an int, a register, a label's address, or (variable, add): the
        contents of a guest variable (mm_l2, mm_pool_end ...) plus a constant."""
        if isinstance(value, tuple):
            name, *rest = value
            self.a.mov(reg, qword[name])
            if rest and rest[0]:
                self.a.mov(r11, rest[0])
                self.a.add(reg, r11)
        else:
            self.load_arg(reg, value)

    @staticmethod
    def spare(k: int, add: int = 0):
        """Physical address (+ add) of the k-th spare table frame, counted from the end."""
        assert 0 <= k < SPARE_PT_FRAMES
        return ("mm_pool_end", -(k + 1) * PAGE + add)

    @staticmethod
    def var(name: str, add: int = 0):
        return (name, add)

    # ---- hypercalls --------------------------------------------------------
    def _done(self, case: str) -> None:
        self.a.mov(eax, dword["mm_done"])
        self.report(f"{case}.done")

    def mmu(self, case: str, where, val, cmd: int = C.MMU_NORMAL_PT_UPDATE,
            domid: int = C.DOMID_SELF) -> None:
        """One mmu_update request {where | cmd, val}; reports case and case.done."""
        a = self.a
        self.load(rax, where)
        if cmd:
            a.or_(rax, cmd)
        a.mov(qword["mm_reqs"], rax)
        self.load(rax, val)
        a.mov(qword[rip_plus("mm_reqs", 8)], rax)
        a.mov(dword["mm_done"], UNTOUCHED)
        self.call(case, "mmu_update", "mm_reqs", 1, "mm_done", domid)
        self._done(case)

    def mmu_batch(self, case: str, count: int, reqs="mm_reqs", done="mm_done",
                  domid: int = C.DOMID_SELF) -> None:
        self.a.mov(dword["mm_done"], UNTOUCHED)
        self.call(case, "mmu_update", reqs, count, done, domid)
        self._done(case)

    def mmuext(self, case: str, cmd: int, arg1=0, arg2=0, domid: int = C.DOMID_SELF) -> None:
        """One mmuext_op; an argument given as (variable, add) is an address and is
        turned into its frame number; reports case and case.done."""
        a = self.a
        a.mov(dword["mm_op"], cmd)
        self.load(rax, arg1)
        if isinstance(arg1, tuple):
            a.shr(rax, 12)
        a.mov(qword[rip_plus("mm_op", 8)], rax)
        self.load(rax, arg2)
        if isinstance(arg2, tuple):
            a.shr(rax, 12)
        a.mov(qword[rip_plus("mm_op", 16)], rax)
        a.mov(dword["mm_done"], UNTOUCHED)
        self.call(case, "mmuext_op", "mm_op", 1, "mm_done", domid, subop=cmd)
        self._done(case)

    def pte(self, case: str, addr) -> None:
        """Dump the 8 bytes at a (pool) address: bytes <case> <little-endian hex>."""
        self.a.push(rbp)
        self.load(rbp, addr)
        self.dump(case, rbp, 8)
        self.a.pop(rbp)

    def reservation(self, case: str, op: int, nr, order: int = 0, extents="mm_extents",
                    domid: int = C.DOMID_SELF, start: int = 0) -> None:
        """memory_op(op | start << 6, &reservation) on nr extents of 2^order frames."""
        a = self.a
        self.load(rax, extents)
        a.mov(qword[rip_plus("mm_resv", offsetof("xen_memory_reservation", "extent_start"))], rax)
        self.load(rax, nr)
        a.mov(qword[rip_plus("mm_resv", offsetof("xen_memory_reservation", "nr_extents"))], rax)
        a.mov(dword[rip_plus("mm_resv", offsetof("xen_memory_reservation", "extent_order"))], order)
        a.mov(dword[rip_plus("mm_resv", offsetof("xen_memory_reservation", "mem_flags"))], 0)
        a.mov(eax, domid)
        a.mov(qword[rip_plus("mm_resv", offsetof("xen_memory_reservation", "domid"))], rax)
        self.call(case, "memory_op", op | (start << 6), "mm_resv")

    def set_extents(self, frames, at: int = 0) -> None:
        """mm_extents[at + i] = frames[i] (ints)."""
        for i, f in enumerate(frames):
            self.a.mov(rax, f)
            self.a.mov(qword[rip_plus("mm_extents", (at + i) * 8)], rax)

    def fill_reqs(self, count: int, first, val, ptr_step: int = 8, val_step: int = PAGE) -> None:
        """mm_reqs[i] = {first + i*ptr_step, val + i*val_step} for i < count."""
        a = self.a
        loop = self._label("fill")
        self.load(rcx, first)
        self.load(rdx, val)
        a.lea(rdi, ptr["mm_reqs"])
        a.mov(r8, count)
        a.label(loop)
        a.mov(qword[rdi], rcx)
        a.mov(qword[rdi + 8], rdx)
        a.add(rdi, 16)
        a.add(rcx, ptr_step)
        a.mov(r9, val_step)
        a.add(rdx, r9)
        a.dec(r8)
        a.jne(loop)

    def touch_pages(self, va: int, count: int, seed: int) -> None:
        """Write (seed + i) into the first qword of each of count pages from va."""
        a = self.a
        loop = self._label("touch")
        a.mov(rdi, va)
        a.mov(rdx, seed)
        a.mov(r8, count)
        a.label(loop)
        a.mov(qword[rdi], rdx)
        a.add(rdi, PAGE)
        a.inc(rdx)
        a.dec(r8)
        a.jne(loop)

    def check_pages(self, case: str, va: int, count: int, seed: int | None,
                    words: int = PAGE // 8) -> None:
        """Report how many of count pages do not hold (seed + i) in their first qword,
        or (seed None) are not zero in their first `words` qwords."""
        a = self.a
        loop, inner, ok, next_ = (self._label(x) for x in ("loop", "inner", "ok", "next"))
        a.mov(rdi, va)
        a.mov(rdx, seed or 0)
        a.mov(r8, count)
        a.xor(eax, eax)
        a.label(loop)
        if seed is None:
            a.xor(ecx, ecx)
            a.label(inner)
            a.mov(r9, qword[rdi + rcx * 8])
            a.test(r9, r9)
            a.jne(ok)                       # a non-zero word: count the page, move on
            a.inc(ecx)
            a.cmp(ecx, words)
            a.jne(inner)
            a.jmp(next_)
            a.label(ok)
            a.inc(rax)
        else:
            a.cmp(qword[rdi], rdx)
            a.je(next_)
            a.inc(rax)
        a.label(next_)
        a.add(rdi, PAGE)
        a.inc(rdx)
        a.dec(r8)
        a.jne(loop)
        self.report(case)

    def wait_for_host(self, checkpoint: str) -> None:
        """Print `checkpoint <name>` and spin on CONSOLEIO_read until the host answers."""
        a = self.a
        loop = self._label("wait")
        self.print(f"checkpoint {checkpoint}\n")
        a.label(loop)
        self.hypercall("console_io", C.CONSOLEIO_read, 1, "scratch")
        a.test(rax, rax)
        a.je(loop)


def rip_plus(label: str, offset: int):
    """A RIP-relative address: label + offset."""
    return rip + label + offset


# ---- host side ---------------------------------------------------------------

def guest_ram(domain) -> memoryview:
    """The domain's guest-physical memory, as the host sees it."""
    from hypervisor._hv import ffi, lib
    return memoryview(ffi.buffer(lib.hv_domain_ram(domain._dom), domain.layout.ram_bytes))


def audit(domain) -> str:
    """'' if every frame's recorded types and counts match a recount from the tables."""
    from hypervisor._hv import ffi, lib
    err = ffi.new("char[256]")
    return "" if lib.hv_mm_audit(domain._dom, err, len(err)) == 0 else ffi.string(err).decode()


def resident_pages(domain) -> int:
    from hypervisor._hv import lib
    return lib.hv_domain_resident_pages(domain._dom)


def u64(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


class Layout:
    """Where the host expects the guest's tables (the builder's order: L4, L3, L2, ...)."""

    def __init__(self, domain):
        ram = guest_ram(domain)
        self.nr_pages = domain.layout.nr_pages
        self.l4 = domain.layout.pt_start
        self.l3 = u64(ram[self.l4:self.l4 + 8]) & ADDR_MASK
        self.l2 = u64(ram[self.l3:self.l3 + 8]) & ADDR_MASK
        self.pool_end = domain.layout.pt_end

    def spare(self, k: int) -> int:
        return self.pool_end - (k + 1) * PAGE
