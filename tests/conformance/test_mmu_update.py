"""mmu_update (1): page-table updates validated as Xen validates them, one entry at a time.

Every rejected update must leave the entry as it was (the guest reads its tables
read-only at their physical address and dumps the entry after each call), stop the
batch, and report how many requests were done.
"""
import struct

from abi import C

from guest_kernel.asm import qword, rax
from guest_kernel.conformance import MAPPED_END, NON_CANONICAL, NULL, UNMAPPED
from hypervisor.builder import XEN_PV

from mm_guest import (FIRST_FREE_SLOT, FORCED, PAGE, PTE_G, PTE_NX, PTE_P, PTE_PCD, PTE_PS,
                      PTE_PWT, PTE_RW, UNTOUCHED, Layout, MMGuest, audit, guest_ram, l2_slot_va,
                      rip_plus, stored, u64)

EBUSY, EFAULT, EINVAL, EPERM, ESRCH = (-C.XEN_EBUSY, -C.XEN_EFAULT, -C.XEN_EINVAL,
                                      -C.XEN_EPERM, -C.XEN_ESRCH)
NR_PAGES = (64 << 20) // PAGE       # the default 64 MiB domain
RAM_END = NR_PAGES * PAGE
FREE = 0x80_0000                    # frames above the start-of-day region: plain RAM
FREE2 = FREE + PAGE
UNPOPULATED = 0x90_0000
PRW = PTE_P | PTE_RW
SLOT = FIRST_FREE_SLOT              # the L2 slot the guest links its new L1 into
SPARE_L1 = 0                        # spare table frames used below, by role
SPARE_L2 = 1
SPARE_BAD = 2
SPARE_L3_CHILD = 3
SPARE_L4_CHILD = 4
SPARE_UNUSED = 5

# S0[1]: the entry of the guest's own L1 that the L1 cases write.
L1_CASES = [  # (case, value, expected result); a rejected value leaves the entry at 0
    ("outside_ram", RAM_END | PTE_P, EPERM),
    ("addr_bit51", (1 << 51) | PTE_P, EPERM),
    ("pool_rw", ("mm_l4", PRW), EBUSY),
    # a spare frame no table uses is an ordinary frame under Xen's model: writable
    ("unused_table_rw", MMGuest.spare(SPARE_UNUSED, PRW), 0),
    ("pool_ro", ("mm_l4", PTE_P), 0),
    ("pwt", FREE2 | PTE_P | PTE_PWT, EINVAL),
    ("pcd", FREE2 | PTE_P | PTE_PCD, EINVAL),
    ("pat", FREE2 | PTE_P | PTE_PS, EINVAL),
    ("global", FREE2 | PTE_P | PTE_G, 0),
    ("nx", FREE2 | PRW | PTE_NX, 0),
    ("avail", FREE2 | PTE_P | (0x7 << 9) | (0x7FF << 52), 0),
    ("unpopulated", UNPOPULATED | PTE_P, EBUSY),
    ("not_present_anything", 0xFFFF_FFFF_FFFF_FFFE, 0),
]

L2_CASES = [  # L2[SLOT + 1]
    ("l2_to_ram", FREE | PRW, EINVAL),
    ("l2_to_l4", ("mm_l4", PRW), EINVAL),
    ("l2_to_itself", ("mm_l2", PRW), EINVAL),
    ("l2_beyond_ram", RAM_END | PRW, EINVAL),
    ("l2_superpage", MMGuest.spare(SPARE_L2, PRW | PTE_PS), EINVAL),
    ("l2_pcd", MMGuest.spare(SPARE_L2, PRW | PTE_PCD), EINVAL),
    ("l2_global", MMGuest.spare(SPARE_L2, PRW | PTE_G), EINVAL),
    ("l2_bad_table", MMGuest.spare(SPARE_BAD, PRW), EBUSY),
    ("l2_to_l1_in_use_ro", MMGuest.spare(SPARE_L1, PTE_P), 0),
]


def reject_guest() -> bytes:
    g = MMGuest("mmu_update")
    a = g.a
    s0 = MMGuest.spare(SPARE_L1)
    e1 = MMGuest.spare(SPARE_L1, 8)
    l2e = MMGuest.var("mm_l2", SLOT * 8)
    l2e_next = MMGuest.var("mm_l2", (SLOT + 1) * 8)
    va = l2_slot_va(SLOT)

    # A frame not in use as a table takes any write; it is checked when it is used.
    g.mmu("unused_write", s0, FREE | PRW)
    g.pte("unused_write", s0)
    g.mmu("bad_entry_in_unused", MMGuest.spare(SPARE_BAD), ("mm_l4", PRW))
    # A list running off the mapped region (before SLOT maps what
    # follows it): the first request is done, then -EFAULT.
    g.load(rax, e1)
    a.mov(qword[MAPPED_END - 16], rax)
    a.mov(rax, FREE | PTE_P)
    a.mov(qword[MAPPED_END - 8], rax)
    g.mmu_batch("straddles_end", 2, reqs=MAPPED_END - 16)
    g.pte("straddles_end", e1)
    g.mmu("straddles_end.reset", e1, 0)
    g.mmu("link", l2e, MMGuest.spare(SPARE_L1, PRW))
    g.pte("link", l2e)
    g.touch_pages(va, 1, 0x1234)
    g.check_pages("through_mapping", va, 1, 0x1234)

    g.set_extents([UNPOPULATED // PAGE])
    g.reservation("release_for_unpopulated", C.XENMEM_decrease_reservation, 1)
    for case, val, expected in L1_CASES:
        g.mmu(case, e1, val)
        g.pte(case, e1)
        if expected == 0:
            g.mmu(f"{case}.reset", e1, 0)
    g.reservation("repopulate", C.XENMEM_populate_physmap, 1)

    # The address of the entry.
    g.mmu("ptr_not_a_table", FREE, 0)
    g.mmu("ptr_misaligned", MMGuest.spare(SPARE_L1, 4), 0)
    g.mmu("ptr_beyond_ram", RAM_END, 0)

    # Upper levels: the next level down, in the pool, with table flags only.
    for case, val, expected in L2_CASES:
        g.mmu(case, l2e_next, val)
        g.pte(case, l2e_next)
        if expected == 0:
            g.mmu(f"{case}.reset", l2e_next, 0)
    g.mmu("l3_link_new_l2", MMGuest.var("mm_l3", 8), MMGuest.spare(SPARE_L3_CHILD, PRW))
    g.pte("l3_link_new_l2", MMGuest.var("mm_l3", 8))
    g.mmu("l3_unlink", MMGuest.var("mm_l3", 8), 0)
    g.mmu("l3_to_l1_in_use", MMGuest.var("mm_l3", 8), MMGuest.spare(SPARE_L1, PRW))
    g.mmu("l4_link_new_l3", MMGuest.var("mm_l4", 8), MMGuest.spare(SPARE_L4_CHILD, PRW))
    g.mmu("l4_unlink", MMGuest.var("mm_l4", 8), 0)
    g.mmu("l4_linear", MMGuest.var("mm_l4", 8), ("mm_l4", PTE_P))
    g.mmu("l4_pwt", MMGuest.var("mm_l4", 8), MMGuest.spare(SPARE_L4_CHILD, PRW | PTE_PWT))
    g.pte("l4_after", MMGuest.var("mm_l4", 8))

    # Commands in the low bits of ptr.
    g.mmu("preserve_ad", e1, FREE2 | PTE_P, cmd=C.MMU_PT_UPDATE_PRESERVE_AD)
    g.pte("preserve_ad", e1)
    g.mmu("no_translate", e1, 0, cmd=C.MMU_PT_UPDATE_NO_TRANSLATE)
    g.pte("no_translate", e1)
    g.mmu("machphys_identity", FREE, FREE // PAGE, cmd=C.MMU_MACHPHYS_UPDATE)
    g.mmu("machphys_other", FREE, FREE // PAGE + 1, cmd=C.MMU_MACHPHYS_UPDATE)
    g.mmu("machphys_beyond_ram", RAM_END, NR_PAGES, cmd=C.MMU_MACHPHYS_UPDATE)

    # Whose tables: only the domain itself.
    g.mmu("domid_own_number", e1, 0, domid=1)
    g.mmu("domid_io", e1, 0, domid=C.DOMID_IO)
    g.mmu("domid_other", e1, 0, domid=2)
    g.mmu("pt_owner_self", e1, 0, domid=(2 << 16) | C.DOMID_SELF)
    g.mmu("pt_owner_other", e1, 0, domid=(3 << 16) | C.DOMID_SELF)

    # The request list and the success count.
    for case, reqs in (("reqs_null", NULL), ("reqs_noncanonical", NON_CANONICAL),
                       ("reqs_unmapped", UNMAPPED)):
        g.mmu_batch(case, 1, reqs=reqs)
    g.mmu_batch("count_zero", 0, reqs=NULL)
    g.call("done_null", "mmu_update", "mm_reqs", 1, NULL, C.DOMID_SELF)
    g.load(rax, ("mm_l4", 0))
    g.call("done_in_page_table", "mmu_update", "mm_reqs", 1, rax, C.DOMID_SELF)
    # A bad request in the middle of a batch: the first is done, the rest is not.
    g.fill_reqs(3, e1, FREE2 | PRW)
    g.load(rax, ("mm_l4", PRW))
    a.mov(qword[rip_plus("mm_reqs", 16 + 8)], rax)
    g.mmu_batch("middle_fails", 3)
    for i in range(3):
        g.pte(f"middle_fails.{i}", MMGuest.spare(SPARE_L1, 8 * (i + 1)))

    # A mapped frame cannot be ballooned out; unmapped, it can.
    g.mmu("clear_entries", e1, 0)
    g.set_extents([FREE // PAGE])
    g.reservation("decrease_mapped", C.XENMEM_decrease_reservation, 1)
    g.mmu("unlink", l2e, 0)
    g.mmuext("flush", C.MMUEXT_TLB_FLUSH_LOCAL)
    g.reservation("decrease_unmapped", C.XENMEM_decrease_reservation, 1)
    g.reservation("populate_again", C.XENMEM_populate_physmap, 1)
    return g.finish()


def test_mmu_update_validates_every_entry(run_cases):
    run = run_cases(reject_guest())
    lay = Layout(run.domain)
    pte = {case: u64(data) for case, data in run.dumps.items()}

    assert (run["unused_write"], run["unused_write.done"]) == (0, 1)
    assert pte["unused_write"] == stored(0, FREE | PRW)
    assert run["bad_entry_in_unused"] == 0
    assert (run["link"], pte["link"]) == (0, stored(2, lay.spare(SPARE_L1) | PRW))
    assert run["through_mapping"] == 0
    assert run["release_for_unpopulated"] == 1 and run["repopulate"] == 1

    values = {"pool_ro": stored(1, lay.l4 | PTE_P),
              "unused_table_rw": stored(1, lay.spare(SPARE_UNUSED) | PRW)}
    for case, val, expected in L1_CASES:
        assert run[case] == expected, case
        assert run[f"{case}.done"] == (1 if expected == 0 else 0), case
        if expected:
            assert pte[case] == 0, f"{case}: a rejected update changed the entry"
        elif case in values:
            assert pte[case] == values[case], case
        elif val & PTE_P:
            assert pte[case] == stored(1, val), case
        else:
            assert pte[case] == val, case

    # Under Xen's PV model any frame may hold a table, and an update aimed at a frame
    # that is not one is a plain store (do_mmu_update's PGT_writable_page case); a
    # ring-0 kernel's tables live in the pool only.
    if run.domain.pv_model == XEN_PV:
        assert (run["ptr_not_a_table"], run["ptr_not_a_table.done"]) == (0, 1)
    else:
        assert (run["ptr_not_a_table"], run["ptr_not_a_table.done"]) == (EINVAL, 0)
    for case in ("ptr_misaligned", "ptr_beyond_ram"):
        assert (run[case], run[f"{case}.done"]) == (EINVAL, 0), case

    for case, val, expected in L2_CASES:
        assert run[case] == expected, case
        assert pte[case] == (0 if expected else stored(2, lay.spare(SPARE_L1) | PTE_P)), case
    assert run["l3_link_new_l2"] == 0
    assert pte["l3_link_new_l2"] == stored(3, lay.spare(SPARE_L3_CHILD) | PRW)
    assert run["l3_unlink"] == 0
    assert run["l3_to_l1_in_use"] == EINVAL
    assert (run["l4_link_new_l3"], run["l4_unlink"]) == (0, 0)
    assert run["l4_linear"] == EINVAL           # no linear page tables
    assert run["l4_pwt"] == EINVAL
    assert pte["l4_after"] == 0

    assert run["preserve_ad"] == 0 and pte["preserve_ad"] == stored(1, FREE2 | PTE_P)
    assert run["no_translate"] == 0 and pte["no_translate"] == 0
    assert run["machphys_identity"] == 0
    assert run["machphys_other"] == EINVAL and run["machphys_beyond_ram"] == EINVAL

    for case in ("domid_own_number", "domid_io", "domid_other", "pt_owner_other"):
        assert (run[case], run[f"{case}.done"]) == (ESRCH, UNTOUCHED), case
    assert (run["pt_owner_self"], run["pt_owner_self.done"]) == (0, 1)

    assert (run["reqs_null"], run["reqs_null.done"]) == (EFAULT, 0)
    assert (run["reqs_noncanonical"], run["reqs_noncanonical.done"]) == (EFAULT, UNTOUCHED)
    assert (run["reqs_unmapped"], run["reqs_unmapped.done"]) == (EFAULT, 0)
    assert (run["count_zero"], run["count_zero.done"]) == (0, 0)
    assert run["done_null"] == 0 and run["done_in_page_table"] == 0
    assert (run["straddles_end"], run["straddles_end.done"]) == (EFAULT, 1)
    assert pte["straddles_end"] == stored(0, FREE | PTE_P)      # before the table is in use
    assert (run["middle_fails"], run["middle_fails.done"]) == (EBUSY, 1)
    assert [pte[f"middle_fails.{i}"] for i in range(3)] == [stored(1, FREE2 | PRW), 0, 0]

    assert run["decrease_mapped"] == 0
    assert (run["unlink"], run["flush"]) == (0, 0)
    assert run["decrease_unmapped"] == 1 and run["populate_again"] == 1
    assert audit(run.domain) == ""


def batch_guest() -> bytes:
    """512 updates in one call fill a spare L1; the guest links it and writes through it."""
    g = MMGuest("mmu_update_batch")
    s = MMGuest.spare(SPARE_L1)
    g.mmuext("pin", C.MMUEXT_PIN_L1_TABLE, s)
    g.fill_reqs(512, s, FREE | PRW)
    g.mmu_batch("batch512", 512)
    g.mmu("link", MMGuest.var("mm_l2", SLOT * 8), MMGuest.spare(SPARE_L1, PRW))
    g.touch_pages(l2_slot_va(SLOT), 512, 0x5000)
    g.check_pages("read_back", l2_slot_va(SLOT), 512, 0x5000)
    g.pte("first", s)
    g.pte("last", MMGuest.spare(SPARE_L1, 511 * 8))
    # Every frame now mapped is held: none can be ballooned out.
    g.set_extents([FREE // PAGE + 511])
    g.reservation("decrease_mapped", C.XENMEM_decrease_reservation, 1)
    return g.finish()


def test_a_512_entry_batch_maps_a_whole_table(run_cases):
    run = run_cases(batch_guest())
    assert run["pin"] == 0
    assert (run["batch512"], run["batch512.done"]) == (0, 512)
    assert run["link"] == 0
    assert run["read_back"] == 0
    assert u64(run.dumps["first"]) == stored(1, FREE | PRW)
    assert u64(run.dumps["last"]) == stored(1, (FREE + 511 * PAGE) | PRW)
    # The guest wrote where the entries said: guest-physical FREE + i pages.
    ram = guest_ram(run.domain)
    assert [u64(ram[FREE + i * PAGE:]) for i in range(512)] == [0x5000 + i for i in range(512)]
    assert run["decrease_mapped"] == 0
    assert audit(run.domain) == ""


def test_bootstrap_tables_are_typed_and_checked(engine):
    """hv_mm_init (run by Domain) types the builder's tables from cr3; it refuses a cr3
    that is no frame of the domain and tables that map a page table writable. (Under
    Xen's model the bootstrap tables are ordinary frames, as any frame may be a table.)"""
    from hypervisor._hv import ffi, lib
    from hypervisor.domain import Domain

    dom = Domain(MMGuest("bootstrap").finish(), memory_mib=64, engine=engine)
    try:
        lay, err = Layout(dom), ffi.new("char[256]")
        assert audit(dom) == ""
        for cr3 in (64 << 20, FREE | 8):          # beyond RAM; not page-aligned
            assert lib.hv_mm_init(dom._dom, cr3, err, len(err)) == -1
            assert "is not a frame that may hold the bootstrap page tables" in \
                ffi.string(err).decode()
        # A bootstrap L1 entry turned into a writable mapping of the L4 itself.
        ram = guest_ram(dom)
        l1 = u64(ram[lay.l2:lay.l2 + 8]) & ~0xFFF & ((1 << 52) - 1)
        slot = next(i for i in range(512) if u64(ram[l1 + 8 * i:l1 + 8 * i + 8]) & PTE_P)
        saved = bytes(ram[l1 + 8 * slot:l1 + 8 * slot + 8])
        ram[l1 + 8 * slot:l1 + 8 * slot + 8] = struct.pack("<Q", lay.l4 | PRW | FORCED)
        assert lib.hv_mm_init(dom._dom, lay.l4, err, len(err)) == -1
        assert "invalid (Xen errno 16)" in ffi.string(err).decode()
        ram[l1 + 8 * slot:l1 + 8 * slot + 8] = saved
        assert lib.hv_mm_init(dom._dom, lay.l4, err, len(err)) == 0
        assert audit(dom) == ""
    finally:
        dom.destroy()
