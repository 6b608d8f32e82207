"""multicall (13): a list of hypercalls run in order, each result written into its entry."""
from abi import C, sizeof

from guest_kernel.asm import qword, rax
from guest_kernel.conformance import MAPPED_END, NON_CANONICAL, NULL, UNMAPPED

from mm_guest import FIRST_FREE_SLOT, PAGE, PTE_P, PTE_RW, MMGuest, audit, l2_slot_va, rip_plus

EFAULT, EINVAL, ENOSYS = -C.XEN_EFAULT, -C.XEN_EINVAL, -C.XEN_ENOSYS
ENTRY = sizeof("multicall_entry")
N = (64 << 20) // PAGE
FREE = 0x80_0000
UNSET = 0x5A5A5A5A5A5A5A5A          # an entry's result before the call


def entries(g: MMGuest, label: str, calls) -> str:
    """A multicall_entry[] at label; an argument may be a label name (its address)."""
    a = g.a
    a.section(".data")
    a.align(8)
    a.label(label)
    for op, *args in calls:
        args = list(args) + [0] * (6 - len(args))
        a.dq(op, UNSET, *args)
    a.section(".text")
    return label


def report_results(g: MMGuest, case: str, label: str, count: int) -> None:
    for i in range(count):
        g.a.mov(rax, qword[rip_plus(label, i * ENTRY + 8)])
        g.report(f"{case}.{i}")


def multicall_guest() -> bytes:
    g = MMGuest("multicall")
    a = g.a
    a.section(".data")
    a.label("dom_self")
    a.dw(C.DOMID_SELF)
    a.section(".rodata")
    a.label("hello")
    a.ascii("from a multicall\n")
    a.section(".text")

    calls = [
        (C.__HYPERVISOR_xen_version, C.XENVER_version),
        (C.__HYPERVISOR_memory_op, C.XENMEM_current_reservation, "dom_self"),
        (C.__HYPERVISOR_console_io, C.CONSOLEIO_write, 17, "hello"),
        (C.__HYPERVISOR_mmuext_op, "mc_flush", 1, 0, C.DOMID_SELF),
        (C.__HYPERVISOR_multicall, "mc_nested", 1),
        (99, 0),
        (C.__HYPERVISOR_memory_op, C.XENMEM_maximum_reservation, NULL),
        (C.__HYPERVISOR_sched_op, C.SCHEDOP_yield, 0),
    ]
    a.section(".data")
    a.align(8)
    a.label("mc_flush")                 # struct mmuext_op
    a.dd(C.MMUEXT_TLB_FLUSH_LOCAL, 0)
    a.dq(0, 0)
    a.section(".text")
    entries(g, "mc_nested", [(C.__HYPERVISOR_xen_version, C.XENVER_version)])
    entries(g, "mc_list", calls)
    g.call("mixed", "multicall", "mc_list", len(calls))
    report_results(g, "mixed", "mc_list", len(calls))
    a.mov(rax, qword[rip_plus("mc_nested", 8)])
    g.report("nested_entry_untouched")

    entries(g, "mc_one", [(C.__HYPERVISOR_xen_version, C.XENVER_pagesize)])
    g.call("zero_entries", "multicall", "mc_one", 0)
    a.mov(rax, qword[rip_plus("mc_one", 8)])
    g.report("zero_entries.untouched")
    for case, where in (("null", NULL), ("noncanonical", NON_CANONICAL), ("unmapped", UNMAPPED)):
        g.call(case, "multicall", where, 1)
    # A list running off the mapped region: the first entry runs, then -EFAULT.
    first = MAPPED_END - ENTRY - 8
    a.mov(rax, C.__HYPERVISOR_xen_version)
    a.mov(qword[first], rax)
    a.mov(rax, UNSET)
    a.mov(qword[first + 8], rax)
    for i in range(6):
        a.mov(qword[first + 16 + 8 * i], C.XENVER_pagesize if i == 0 else 0)
    g.call("straddles_end", "multicall", first, 2)
    a.mov(rax, qword[first + 8])
    g.report("straddles_end.0")
    # Page-table updates batched with their flush, as a PV kernel does (last:
    # the new mapping covers what lies past MAPPED_END).
    s = MMGuest.spare(0)
    g.load(rax, s)
    a.mov(qword["mm_reqs"], rax)
    a.mov(rax, FREE | PTE_P | PTE_RW)
    a.mov(qword[rip_plus("mm_reqs", 8)], rax)
    g.load(rax, MMGuest.var("mm_l2", FIRST_FREE_SLOT * 8))
    a.mov(qword[rip_plus("mm_reqs", 16)], rax)
    g.load(rax, MMGuest.spare(0, PTE_P | PTE_RW))
    a.mov(qword[rip_plus("mm_reqs", 24)], rax)
    entries(g, "mc_map", [(C.__HYPERVISOR_mmu_update, "mm_reqs", 2, 0, C.DOMID_SELF),
                          (C.__HYPERVISOR_mmuext_op, "mc_flush", 1, 0, C.DOMID_SELF)])
    g.call("map", "multicall", "mc_map", 2)
    report_results(g, "map", "mc_map", 2)
    g.touch_pages(l2_slot_va(FIRST_FREE_SLOT), 1, 0xABC)
    g.check_pages("map.through", l2_slot_va(FIRST_FREE_SLOT), 1, 0xABC)

    return g.finish()


def test_multicall(run_cases):
    run = run_cases(multicall_guest())
    assert run["mixed"] == 0
    results = [run[f"mixed.{i}"] for i in range(8)]
    assert results[0] > 0                   # major << 16 | minor
    assert results[1:] == [N, 0, 0, EINVAL, ENOSYS, EFAULT, 0]
    assert "from a multicall" in run.console
    assert run["nested_entry_untouched"] == UNSET
    assert run["map"] == 0 and (run["map.0"], run["map.1"]) == (0, 0)
    assert run["map.through"] == 0
    assert run["zero_entries"] == 0 and run["zero_entries.untouched"] == UNSET
    for case in ("null", "noncanonical", "unmapped", "straddles_end"):
        assert run[case] == EFAULT, case
    assert run["straddles_end.0"] == PAGE
    # Each inner call is counted under its own number, and the multicalls themselves.
    c = run.domain.counters()
    assert c.hypercalls["multicall"] == 1 + 1 + 1 + 1 + 3 + 1   # incl. the nested one
    assert c.hypercalls["mmu_update"] == 1 and c.hypercalls["mmuext_op"] == 2
    assert c.hypercalls["out_of_range"] == 1            # op 99
    assert audit(run.domain) == ""
