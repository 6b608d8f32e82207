"""Page tables in any frame of a Xen-model PV domain (mm.c): a frame of the guest's own
.bss becomes an L1 table when it is pinned, as Linux and XTF pin tables in their
.data. What protects it is its type, as in Xen: it cannot take the type while it is
mapped writable, it cannot be mapped writable while it has it, the guest kernel's own
store to it faults, and it changes only through mmu_update; unpinned, it is plain RAM
again. (trapless's ring-0 kernels keep their tables in the read-only pool.)"""
from abi import C

from guest_kernel.asm import byte, qword, rax, rcx
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


def test_writable_pagetables_assist_applies_the_kernels_own_stores(run_cases):
    """With VMASST_TYPE_writable_pagetables a kernel store into an L1 table it maps
    read-only is applied as that entry's mmu_update (Xen's ptwr): validated like one,
    and the #PF stands when it is refused or the assist is off."""
    g = XenPVGuest("ptwr")
    a = g.a
    a.section(".bss")
    a.align(4096)
    a.label("tbl")
    a.reserve(4096)
    a.label("victim")
    a.reserve(4096)
    a.section(".text")
    g.trap_table("trap_table", [(14, 0, "on_pf")])
    remap(g, "remap_read_only", "tbl", P | A | D)
    mmuext(g, "pin", C.MMUEXT_PIN_L1_TABLE)

    def store(case, offset, label, flags, insn="mov"):
        """Store label's frame | flags into entry offset/8 of tbl; report the #PF count."""
        g.resume_at(f"{case}.after")
        a.lea(rcx, g.ptr(label))
        a.or_(rcx, flags)
        if insn == "mov":
            a.mov(qword[rip_("tbl", offset)], rcx)
        elif insn == "xchg":
            a.xchg(qword[rip_("tbl", offset)], rcx)
        elif insn == "or":                  # or qword [entry], imm8: sets RW
            a.or_(qword[rip_("tbl", offset)], RW)
        else:                               # ds; and byte [entry], ~RW: Linux's
            a.db(0x3e)                      # clear_bit with `lock` patched to `ds`
            a.and_(byte[rip_("tbl", offset)], 0xFF & ~RW)
        a.label(f"{case}.after")
        a.mov(qword["resume_at"], 0)
        if insn == "xchg":
            a.mov(qword["xchg_old"], rcx)
        g.report_word(case, "on_pf.count")

    a.section(".bss")
    a.label("xchg_old")
    a.reserve(8)
    a.section(".text")
    store("without_assist", 8, "victim", P | RW | US)
    g.call("enable", "vm_assist", C.VMASST_CMD_enable, C.VMASST_TYPE_writable_pagetables)
    store("with_assist", 8, "victim", P | RW | US)
    g.report_word("entry_1", "tbl", 8)
    store("table_writable_refused", 16, "tbl", P | RW | US)
    g.report_word("entry_2", "tbl", 16)
    store("xchg", 8, "victim", P | US, insn="xchg")
    g.report_word("entry_1_after_xchg", "tbl", 8)
    g.report_word("xchg_old_value", "xchg_old")
    store("or_imm", 8, "victim", 0, insn="or")
    g.report_word("entry_1_after_or", "tbl", 8)
    store("and_byte", 8, "victim", 0, insn="and")
    g.report_word("entry_1_after_and", "tbl", 8)
    g.handlers(lambda: g.recording_handler("on_pf", True))
    run = run_cases(g.finish())
    assert (run["remap_read_only"], run["pin"], run["enable"]) == (0, 0, 0)
    assert run["without_assist"] == 1
    assert run["with_assist"] == 1                      # no new #PF
    assert run["entry_1"] & 0xFFF == P | RW | US | A | D
    assert run["table_writable_refused"] == 2
    assert run["entry_2"] == 0
    assert run["xchg"] == 2
    assert run["entry_1_after_xchg"] & 0xFFF == P | US | A | D
    assert run["xchg_old_value"] == run["entry_1"]
    # read-modify-write logic ops on an entry, as Linux's set_bit/clear_bit are
    assert run["or_imm"] == 2 and run["entry_1_after_or"] == run["entry_1_after_xchg"] | RW
    assert run["and_byte"] == 2 and run["entry_1_after_and"] == run["entry_1_after_xchg"]
