"""mmuext_op (26): pinning and unpinning tables, switching the base table, TLB flushes,
clearing and copying pages; bad frames, bad commands, bad lists."""
import struct

from abi import C

from guest_kernel.asm import cr3, dword, ptr, qword, r12, rax, rcx
from guest_kernel.conformance import NON_CANONICAL, NULL
from hypervisor.builder import XEN_PV

from mm_guest import (FIRST_FREE_SLOT, PAGE, PTE_A, PTE_P, PTE_RW, PTE_US, UNTOUCHED, Layout, MMGuest,
                      audit, l2_slot_va, u64)

EACCES, EBUSY, EFAULT, EINVAL, ENOSYS, EOPNOTSUPP, ESRCH = (
    -C.XEN_EACCES, -C.XEN_EBUSY, -C.XEN_EFAULT, -C.XEN_EINVAL, -C.XEN_ENOSYS,
    -C.XEN_EOPNOTSUPP, -C.XEN_ESRCH)
NR_PAGES = (64 << 20) // PAGE
FREE, FREE2, UNPOPULATED = 0x80_0000, 0x80_1000, 0x90_0000
PRW = PTE_P | PTE_RW
SLOT = FIRST_FREE_SLOT
PIN = {1: C.MMUEXT_PIN_L1_TABLE, 2: C.MMUEXT_PIN_L2_TABLE, 3: C.MMUEXT_PIN_L3_TABLE,
       4: C.MMUEXT_PIN_L4_TABLE}
UNPIN = C.MMUEXT_UNPIN_TABLE
SPARE_A, SPARE_B, SPARE_BAD, SPARE_L4EMPTY, SPARE_NEWBASE, SPARE_REMAP = range(6)


def ops_list(g: MMGuest, label: str, ops) -> str:
    g.a.section(".data")
    g.a.align(8)
    g.a.label(label)
    g.a.db(b"".join(struct.pack("<IIQQ", cmd, 0, arg1, arg2) for cmd, arg1, arg2 in ops))
    g.a.section(".text")
    return label


def pin_guest() -> bytes:
    g = MMGuest("mmuext_pin")
    a = g.a
    spare = MMGuest.spare
    l2e = MMGuest.var("mm_l2", SLOT * 8)

    g.mmuext("pin_l1", PIN[1], spare(SPARE_A))
    g.mmuext("pin_l1_again", PIN[1], spare(SPARE_A))
    g.mmuext("pin_l2_of_an_l1", PIN[2], spare(SPARE_A))
    g.mmuext("unpin", UNPIN, spare(SPARE_A))
    g.mmuext("unpin_again", UNPIN, spare(SPARE_A))
    g.mmuext("pin_not_in_pool", PIN[1], FREE // PAGE)
    g.mmuext("pin_beyond_ram", PIN[1], NR_PAGES)
    g.mmuext("unpin_beyond_ram", UNPIN, NR_PAGES)
    g.set_extents([UNPOPULATED // PAGE])
    g.reservation("release", C.XENMEM_decrease_reservation, 1)
    g.mmuext("pin_unpopulated", PIN[1], UNPOPULATED // PAGE)
    g.reservation("repopulate", C.XENMEM_populate_physmap, 1)
    # A table with a bad entry does not validate, and is not pinned.
    g.mmu("write_bad_entry", spare(SPARE_BAD), ("mm_l4", PRW))
    g.mmuext("pin_bad_table", PIN[1], spare(SPARE_BAD))
    g.mmuext("unpin_bad_table", UNPIN, spare(SPARE_BAD))
    # The bootstrap tables: the L4 is pinned already; the others are in use, unpinned.
    g.mmuext("pin_bootstrap_l4", PIN[4], MMGuest.var("mm_l4"))
    g.mmuext("pin_bootstrap_l3", PIN[3], MMGuest.var("mm_l3"))
    g.mmuext("pin_bootstrap_l2_as_l3", PIN[3], MMGuest.var("mm_l2"))
    g.mmuext("unpin_bootstrap_l3", UNPIN, MMGuest.var("mm_l3"))
    g.mmuext("pin_empty_l4", PIN[4], spare(SPARE_L4EMPTY))
    g.mmuext("unpin_empty_l4", UNPIN, spare(SPARE_L4EMPTY))

    # Unpinned, a table keeps its type while an upper table still uses it.
    g.mmuext("pin_b", PIN[1], spare(SPARE_B))
    g.mmu("link_b", l2e, spare(SPARE_B, PRW))
    g.mmuext("unpin_b", UNPIN, spare(SPARE_B))
    g.mmuext("b_still_l1", PIN[2], spare(SPARE_B))
    g.mmu("b_still_validated", spare(SPARE_B), ("mm_l4", PRW))
    g.mmu("unlink_b", l2e, 0)
    g.mmu("b_unused_write", spare(SPARE_B), 0)
    g.mmuext("b_now_l2", PIN[2], spare(SPARE_B))
    g.mmuext("unpin_b_l2", UNPIN, spare(SPARE_B))

    # The bootstrap L4, unpinned, stays in use as the base table.
    g.mmuext("unpin_base", UNPIN, MMGuest.var("mm_l4"))
    g.mmuext("base_still_l4", PIN[1], MMGuest.var("mm_l4"))
    g.mmuext("repin_base", PIN[4], MMGuest.var("mm_l4"))

    # A new base table: an L4 with the bootstrap L4's first entry.
    a.mov(r12, qword["mm_l4"])
    a.mov(r12, qword[r12])
    g.mmu("copy_l4e", spare(SPARE_NEWBASE), r12)
    g.mmuext("new_baseptr", C.MMUEXT_NEW_BASEPTR, spare(SPARE_NEWBASE))
    a.mov(rax, cr3)
    g.report("cr3_new")
    g.mmuext("newbase_in_use", PIN[1], spare(SPARE_NEWBASE))
    # The old L4, unpinned and no longer the base, is an unused frame until used again.
    g.mmuext("unpin_old_base", UNPIN, MMGuest.var("mm_l4"))
    g.mmuext("old_base_back", C.MMUEXT_NEW_BASEPTR, MMGuest.var("mm_l4"))
    a.mov(rax, cr3)
    g.report("cr3_back")
    g.mmuext("repin_old_base", PIN[4], MMGuest.var("mm_l4"))
    g.mmuext("new_baseptr_same", C.MMUEXT_NEW_BASEPTR, MMGuest.var("mm_l4"))
    g.mmuext("new_baseptr_l2", C.MMUEXT_NEW_BASEPTR, MMGuest.var("mm_l2"))
    g.mmuext("new_baseptr_not_in_pool", C.MMUEXT_NEW_BASEPTR, FREE // PAGE)
    g.mmuext("new_baseptr_beyond_ram", C.MMUEXT_NEW_BASEPTR, NR_PAGES)
    g.mmuext("new_baseptr_bad_table", C.MMUEXT_NEW_BASEPTR, spare(SPARE_BAD))
    a.mov(rax, cr3)
    g.report("cr3_end")
    return g.finish()


def test_pinning_and_base_tables(run_cases):
    run = run_cases(pin_guest())
    lay = Layout(run.domain)
    expect = {
        "pin_l1": 0, "pin_l1_again": EINVAL, "pin_l2_of_an_l1": EINVAL, "unpin": 0,
        "unpin_again": EINVAL, "pin_not_in_pool": EINVAL, "pin_beyond_ram": EINVAL,
        "unpin_beyond_ram": EINVAL, "pin_unpopulated": EINVAL,
        "write_bad_entry": 0, "pin_bad_table": EBUSY, "unpin_bad_table": EINVAL,
        "pin_bootstrap_l4": EINVAL, "pin_bootstrap_l3": 0, "pin_bootstrap_l2_as_l3": EINVAL,
        "unpin_bootstrap_l3": 0, "pin_empty_l4": 0, "unpin_empty_l4": 0,
        "pin_b": 0, "link_b": 0, "unpin_b": 0, "b_still_l1": EINVAL,
        "b_still_validated": EBUSY, "unlink_b": 0, "b_unused_write": 0, "b_now_l2": 0,
        "unpin_b_l2": 0,
        "unpin_base": 0, "base_still_l4": EINVAL, "repin_base": 0,
        "copy_l4e": 0, "new_baseptr": 0, "newbase_in_use": EINVAL, "unpin_old_base": 0,
        "old_base_back": 0, "repin_old_base": 0, "new_baseptr_same": 0,
        "new_baseptr_l2": EINVAL, "new_baseptr_not_in_pool": EINVAL,
        "new_baseptr_beyond_ram": EINVAL, "new_baseptr_bad_table": EINVAL,
    }
    if run.domain.pv_model == XEN_PV:
        # any frame of the domain may become a table under Xen's PV model: FREE is
        # mapped nowhere, so it validates as an (empty) L1 and is pinned
        expect["pin_not_in_pool"] = 0
    for case, result in expect.items():
        assert run[case] == result, case
        assert run[f"{case}.done"] == (0 if result else 1), case
    assert (run["release"], run["repopulate"]) == (1, 1)
    assert run["cr3_new"] == lay.spare(SPARE_NEWBASE)
    assert run["cr3_back"] == lay.l4 and run["cr3_end"] == lay.l4
    assert audit(run.domain) == ""


def other_ops_guest() -> bytes:
    g = MMGuest("mmuext_other")
    a = g.a
    a.section(".bss")
    a.align(4096)
    a.label("pagebuf")
    a.reserve(4096)
    a.section(".data")
    a.label("cpumask")
    a.dq(1)
    a.section(".text")
    a.lea(r12, ptr["pagebuf"])
    a.shr(r12, 12)

    va = l2_slot_va(SLOT)
    g.mmuext("tlb_flush_local", C.MMUEXT_TLB_FLUSH_LOCAL)
    g.mmuext("invlpg_local", C.MMUEXT_INVLPG_LOCAL, va)
    g.mmuext("tlb_flush_all", C.MMUEXT_TLB_FLUSH_ALL)
    g.mmuext("invlpg_all", C.MMUEXT_INVLPG_ALL, va)
    g.mmuext("tlb_flush_multi", C.MMUEXT_TLB_FLUSH_MULTI, 0, "cpumask")
    g.mmuext("invlpg_multi", C.MMUEXT_INVLPG_MULTI, va, "cpumask")
    g.mmuext("tlb_flush_multi_null_mask", C.MMUEXT_TLB_FLUSH_MULTI, 0, NULL)

    # Remap a live entry, flush: the guest sees the new frame.
    s = MMGuest.spare(SPARE_REMAP)
    g.mmuext("remap.pin", PIN[1], s)
    g.mmu("remap.e0", s, FREE | PRW)
    g.mmu("remap.e1", MMGuest.spare(SPARE_REMAP, 8), FREE2 | PRW)
    g.mmu("remap.link", MMGuest.var("mm_l2", SLOT * 8), MMGuest.spare(SPARE_REMAP, PRW))
    g.touch_pages(va, 2, 0x11)
    g.mmu("remap", s, FREE2 | PRW)
    g.mmuext("remap.flush", C.MMUEXT_TLB_FLUSH_LOCAL)
    a.mov(rax, qword[va])
    g.report("remap.read")
    # Back to the first frame by the kernel's own store into the live L1 (readable at
    # its physical address): the writable page-table assist applies it from the #PF
    g.call("ptwr.enable", "vm_assist", C.VMASST_CMD_enable, C.VMASST_TYPE_writable_pagetables)
    g.load(rcx, MMGuest.spare(SPARE_REMAP))
    a.mov(rax, FREE | PRW)
    a.mov(qword[rcx], rax)
    g.mmuext("ptwr.flush", C.MMUEXT_TLB_FLUSH_LOCAL)
    a.mov(rax, qword[va])
    g.report("ptwr.read")

    for name in ("FLUSH_CACHE", "MARK_SUPER", "UNMARK_SUPER", "SET_LDT", "NEW_USER_BASEPTR"):
        g.mmuext(name.lower(), getattr(C, f"MMUEXT_{name}"), 0)
    for cmd in (14, 18, 21, 0xFFFFFFFF):
        g.mmuext(f"cmd{cmd}", cmd, 0)

    g.fill("pagebuf", 4096, 0x5A)
    g.mmuext("clear_page", C.MMUEXT_CLEAR_PAGE, r12)
    g.dump("clear_page", "pagebuf", 16)
    g.mmuext("clear_page_table", C.MMUEXT_CLEAR_PAGE, MMGuest.var("mm_l4"))
    g.mmuext("clear_beyond_ram", C.MMUEXT_CLEAR_PAGE, NR_PAGES)
    g.mmuext("copy_page", C.MMUEXT_COPY_PAGE, r12, MMGuest.var("mm_l4"))
    g.dump("copy_page", "pagebuf", 8)
    g.mmuext("copy_into_page_table", C.MMUEXT_COPY_PAGE, MMGuest.var("mm_l3"), r12)
    g.mmuext("copy_from_beyond_ram", C.MMUEXT_COPY_PAGE, r12, NR_PAGES)

    # Lists: stop at the first failure; bad pointers; whose tables.
    ops = ops_list(g, "ops3", [(C.MMUEXT_TLB_FLUSH_LOCAL, 0, 0), (PIN[1], NR_PAGES, 0),
                               (C.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)])
    for case, where, count, domid in (
            ("list_middle_fails", ops, 3, C.DOMID_SELF),
            ("list_first_only", ops, 1, C.DOMID_SELF),
            ("list_null", NULL, 1, C.DOMID_SELF),
            ("list_noncanonical", NON_CANONICAL, 1, C.DOMID_SELF),
            ("list_count_zero", NULL, 0, C.DOMID_SELF),
            ("domid_own_number", ops, 1, 1),
            ("domid_other", ops, 1, 7),
            ("pt_owner_self", ops, 1, (2 << 16) | C.DOMID_SELF)):
        a.mov(dword["mm_done"], UNTOUCHED)
        g.call(case, "mmuext_op", where, count, "mm_done", domid)
        g._done(case)
    return g.finish()


def test_flushes_and_other_commands(run_cases):
    run = run_cases(other_ops_guest())
    lay = Layout(run.domain)
    for case in ("tlb_flush_local", "invlpg_local", "tlb_flush_all", "invlpg_all",
                 "tlb_flush_multi", "invlpg_multi"):
        assert (run[case], run[f"{case}.done"]) == (0, 1), case
    assert run["tlb_flush_multi_null_mask"] == EINVAL
    for case in ("remap.pin", "remap.e0", "remap.e1", "remap.link", "remap", "remap.flush"):
        assert run[case] == 0, case
    assert run["remap.read"] == 0x12        # the second page's frame, through the first page
    assert (run["ptwr.enable"], run["ptwr.flush"]) == (0, 0)
    assert run["ptwr.read"] == 0x11         # the first page's frame again
    assert run["flush_cache"] == EACCES
    assert run["mark_super"] == EOPNOTSUPP and run["unmark_super"] == EOPNOTSUPP
    # a kernel under Xen's PV model has a user L4: frame 0 clears it, as in Xen
    assert (run["new_user_baseptr"], run["new_user_baseptr.done"]) == (0, 1)
    # MMUEXT_SET_LDT with no LDT (a null base, 0 entries) is a Xen-model kernel's own
    # command (test_descriptors.py covers it); a ring-0 kernel does not have it
    set_ldt = 0 if run.domain.pv_model == XEN_PV else ENOSYS
    assert (run["set_ldt"], run["set_ldt.done"]) == (set_ldt, 1 if set_ldt == 0 else 0)
    for case in ("cmd14", "cmd18", "cmd21", "cmd4294967295"):
        assert (run[case], run[f"{case}.done"]) == (ENOSYS, 0), case
    assert run["clear_page"] == 0 and run.dumps["clear_page"] == bytes(16)
    assert run["clear_page_table"] == EINVAL and run["clear_beyond_ram"] == EINVAL
    assert run["copy_page"] == 0
    # the bootstrap L4[0], user-accessible as Xen makes every entry of a ring-3 kernel's
    assert u64(run.dumps["copy_page"]) == lay.l3 | PRW | PTE_US | PTE_A
    assert run["copy_into_page_table"] == EINVAL and run["copy_from_beyond_ram"] == EINVAL
    assert (run["list_middle_fails"], run["list_middle_fails.done"]) == (EINVAL, 1)
    assert (run["list_first_only"], run["list_first_only.done"]) == (0, 1)
    assert (run["list_null"], run["list_null.done"]) == (EFAULT, 0)
    assert (run["list_noncanonical"], run["list_noncanonical.done"]) == (EFAULT, UNTOUCHED)
    assert (run["list_count_zero"], run["list_count_zero.done"]) == (0, 0)
    for case in ("domid_own_number", "domid_other"):
        assert (run[case], run[f"{case}.done"]) == (ESRCH, UNTOUCHED), case
    assert (run["pt_owner_self"], run["pt_owner_self.done"]) == (0, 1)
    assert audit(run.domain) == ""
