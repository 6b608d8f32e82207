"""update_va_mapping (14): the L1 entry mapping a virtual address, validated like
MMU_NORMAL_PT_UPDATE, then flushed as asked; refused updates change nothing."""
from abi import C

from guest_kernel.asm import qword, rax, rcx
from guest_kernel.conformance import NON_CANONICAL, UNMAPPED
from guest_kernel.xen_pv import PV_AREA_VA, XenPVGuest

EFAULT, EINVAL, EPERM = -C.XEN_EFAULT, -C.XEN_EINVAL, -C.XEN_EPERM
P, RW, PWT, A, D = 1, 2, 8, 0x20, 0x40


def update(g: XenPVGuest, case: str, va, pte_flags: int | None, flags: int,
           frame_of: str = "victim", raw_val: int | None = None) -> None:
    """update_va_mapping(va, frame_of's frame | pte_flags, flags); VIRT_BASE 0: VA = PA."""
    a = g.a
    if raw_val is None:
        a.lea(rax, g.ptr(frame_of))
        a.or_(rax, pte_flags)
    else:
        a.mov(rax, raw_val)
    a.mov(rcx, rax)
    g.load_arg(rax, va)
    g.hypercall_regs(case, "update_va_mapping", rax, rcx, flags)


def test_update_va_mapping(run_cases):
    g = XenPVGuest("update_va_mapping")
    a = g.a
    a.section(".bss")
    a.align(4096)
    a.label("victim")
    a.reserve(4096)
    a.section(".text")
    g.map_shared_info()
    g.trap_table("set_trap_table", [(14, 0, "on_pf")])
    # read-only: a store faults (present, write)
    update(g, "read_only", "victim", P | A | D, C.UVMF_INVLPG)
    g.resume_at("ro_done")
    a.mov(qword["victim"], 1)
    a.label("ro_done")
    g.report_word("ro_faults", "on_pf.count")
    g.report_word("ro_error", "on_pf.frame", 16)
    # writable again, with a full flush this time
    update(g, "writable", "victim", P | RW | A | D, C.UVMF_TLB_FLUSH)
    # refused: nothing changes, the page stays writable
    update(g, "noncanonical", NON_CANONICAL, P | RW, C.UVMF_INVLPG)
    update(g, "no_l1", UNMAPPED, P | RW, C.UVMF_INVLPG)
    update(g, "hypervisor_area", PV_AREA_VA, P | RW, C.UVMF_INVLPG)
    update(g, "outside_ram", "victim", 0, C.UVMF_INVLPG, raw_val=(1 << 40) | P | RW)
    update(g, "bad_flag", "victim", P | RW | PWT, C.UVMF_INVLPG)
    g.start_info_field(rax, "pt_base")
    a.mov(qword["pt_base_va"], rax)
    a.section(".bss")
    a.label("pt_base_va")
    a.reserve(8)
    a.section(".text")
    a.mov(rax, qword["pt_base_va"])
    a.or_(rax, P | RW)
    a.mov(rcx, rax)
    g.load_arg(rax, "victim")
    g.hypercall_regs("page_table_writable", "update_va_mapping", rax, rcx, C.UVMF_INVLPG)
    # a vCPU bitmap pointer that does not map: the update is made, the flush -EFAULT
    update(g, "bad_vcpumask", "victim", P | RW | A | D, C.UVMF_INVLPG | UNMAPPED)
    g.resume_at("rw_done")
    a.mov(qword["victim"], 2)
    a.label("rw_done")
    g.report_word("faults_after", "on_pf.count")
    g.report_word("victim_value", "victim")
    g.handlers(lambda: g.recording_handler("on_pf", True))
    run = run_cases(g.finish())
    assert run["read_only"] == 0
    assert (run["ro_faults"], run["ro_error"]) == (1, 3)
    assert run["writable"] == 0
    for case in ("noncanonical", "no_l1", "hypervisor_area", "bad_flag", "page_table_writable"):
        assert run[case] == EINVAL, case
    assert run["outside_ram"] == EPERM
    assert run["bad_vcpumask"] == EFAULT
    assert (run["faults_after"], run["victim_value"]) == (1, 2)
