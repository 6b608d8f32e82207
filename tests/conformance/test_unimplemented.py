"""Every hypercall number trapless does not implement returns -ENOSYS, and the domain
goes on; the implemented ones are listed here so the suite names the rest."""
from abi import C, HYPERCALL_NAMES

from guest_kernel.conformance import ConformanceGuest

from hypervisor._hv import lib

IMPLEMENTED = {n for n in range(C.TRAPLESS_NR_HYPERCALLS) if lib.hv_hypercall_implemented(n)}


def test_the_implemented_set_is_what_trapless_documents():
    names = {HYPERCALL_NAMES[n] for n in IMPLEMENTED}
    assert names == {"console_io", "xen_version", "sched_op", "memory_op", "mmu_update",
                     "mmuext_op", "multicall", "set_timer_op", "vcpu_op", "event_channel_op",
                     "hvm_op", "set_trap_table", "stack_switch", "set_callbacks", "callback_op",
                     "update_va_mapping", "set_gdt", "update_descriptor", "iret",
                     "fpu_taskswitch", "set_debugreg", "get_debugreg", "vm_assist",
                     "physdev_op", "set_segment_base", "grant_table_op"}


def test_unimplemented_hypercalls_are_enosys(run_cases):
    g = ConformanceGuest("unimplemented")
    # 23 is Xen's iret for a kernel under Xen's PV model: it returns through the frame
    # on the stack, never to its caller (tests/test_pv_cpu.py)
    numbers = [n for n in range(C.TRAPLESS_HYPERCALL_PAGE_STUBS)
               if n not in IMPLEMENTED and n != C.__HYPERVISOR_iret]
    for n in numbers:
        g.call(f"nr{n}", n, 0, 0, 0, 0, 0)
    run = run_cases(g.finish())
    for n in numbers:
        assert run[f"nr{n}"] == -C.XEN_ENOSYS, HYPERCALL_NAMES.get(n, n)
    counters = run.domain.counters()
    assert counters.hypercall_errors["platform_op"] == 1
    assert counters.hypercalls["platform_op"] == 1
    assert counters.hypercall_errors["out_of_range"] == C.TRAPLESS_HYPERCALL_PAGE_STUBS - C.TRAPLESS_NR_HYPERCALLS
