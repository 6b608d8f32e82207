"""Page tables in any frame of a Xen-model PV domain (mm.c): a frame of the guest's own
.bss becomes an L1 table when it is pinned, as Linux and XTF pin tables in their
.data. What protects it is its type, as in Xen: it cannot take the type while it is
mapped writable, it cannot be mapped writable while it has it, the guest kernel's own
store to it faults, and it changes only through mmu_update; unpinned, it is plain RAM
again. (trapless's ring-0 kernels keep their tables in the read-only pool.)"""
from abi import C

from guest_kernel.asm import qword, rax, rcx
from guest_kernel.xen_pv import XenPVGuest, rip_

EINVAL, EBUSY = -C.XEN_EINVAL, -C.XEN_EBUSY
P, RW, US, A, D = 1, 2, 4, 0x20, 0x40


def remap(g: XenPVGuest, case: str, label: str, pte_flags: int) -> None:
    """update_va_mapping(label, label's frame | pte_flags, INVLPG); VIRT_BASE 0: VA = PA."""
    a = g.a
    a.lea(rax, g.ptr(label))
    a.or_(rax, pte_flags)
    a.mov(rcx, rax)
    g.load_arg(rax, label)
    g.hypercall_regs(case, "update_va_mapping", rax, rcx, C.UVMF_INVLPG)


def mmuext(g: XenPVGuest, case: str, cmd: int) -> None:
    """One mmuext_op of cmd on the frame of `tbl`."""
    a = g.a
    op = g.struct(f"{case}.op", "mmuext_op", cmd=cmd)
    a.lea(rax, g.ptr("tbl"))
    a.shr(rax, 12)
    a.mov(qword[rip_(op, 8)], rax)                     # arg1: the frame
    g.call(case, "mmuext_op", op, 1, 0, C.DOMID_SELF)


def test_a_pinned_frame_of_the_guest_is_a_protected_table(run_cases):
    g = XenPVGuest("pv_pagetables")
    a = g.a
    a.section(".bss")
    a.align(4096)
    a.label("tbl")
    a.reserve(4096)
    a.label("victim")
    a.reserve(4096)
    a.section(".text")
    g.trap_table("trap_table", [(14, 0, "on_pf")])
    # mapped writable: it cannot become a table
    mmuext(g, "pin_while_writable", C.MMUEXT_PIN_L1_TABLE)
    remap(g, "remap_read_only", "tbl", P | A | D)
    mmuext(g, "pin", C.MMUEXT_PIN_L1_TABLE)
    mmuext(g, "pin_again", C.MMUEXT_PIN_L1_TABLE)
    mmuext(g, "pin_as_l2", C.MMUEXT_PIN_L2_TABLE)
    # a table: never mapped writable
    remap(g, "remap_writable_while_pinned", "tbl", P | RW | A | D)
    # mmu_update writes it: entry 0 maps victim
    upd = g.struct("upd", "mmu_update")
    a.lea(rax, g.ptr("tbl"))
    a.mov(qword[rip_(upd, 0)], rax)                    # ptr: entry 0, a normal update
    a.lea(rax, g.ptr("victim"))
    a.or_(rax, P | RW | US)
    a.mov(qword[rip_(upd, 8)], rax)                    # val
    g.call("mmu_update", "mmu_update", upd, 1, 0, C.DOMID_SELF)
    g.report_word("entry_0", "tbl")
    # the kernel's own store into it faults (present, write) and changes nothing
    g.resume_at("store_done")
    a.mov(qword["tbl"], 0x1234)
    a.label("store_done")
    g.report_word("pf_count", "on_pf.count")
    g.report_word("pf_error", "on_pf.frame", 16)
    g.report_word("entry_0_after_store", "tbl")
    mmuext(g, "unpin", C.MMUEXT_UNPIN_TABLE)
    mmuext(g, "unpin_again", C.MMUEXT_UNPIN_TABLE)
    # plain RAM again: writable, and the guest's store lands
    remap(g, "remap_writable_after_unpin", "tbl", P | RW | A | D)
    a.mov(qword["tbl"], 0x5678)
    g.report_word("stored_after_unpin", "tbl")
    g.report_word("pf_count_at_end", "on_pf.count")
    g.handlers(lambda: g.recording_handler("on_pf", True))
    run = run_cases(g.finish())
    assert run["pin_while_writable"] == EINVAL
    assert run["remap_read_only"] == 0
    assert run["pin"] == 0
    assert run["pin_again"] == EINVAL
    assert run["pin_as_l2"] == EINVAL
    assert run["remap_writable_while_pinned"] == EINVAL
    assert run["mmu_update"] == 0
    tbl_victim = run["entry_0"] & ~0xFFF
    assert run["entry_0"] & 0xFFF == P | RW | US | A | D and tbl_victim != 0
    assert (run["pf_count"], run["pf_error"]) == (1, P | RW)
    assert run["entry_0_after_store"] == run["entry_0"]
    assert run["unpin"] == 0
    assert run["unpin_again"] == EINVAL
    assert run["remap_writable_after_unpin"] == 0
    assert run["stored_after_unpin"] == 0x5678
    assert run["pf_count_at_end"] == 1
