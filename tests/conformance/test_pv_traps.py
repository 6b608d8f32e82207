"""The PV CPU model's set-up hypercalls: set_trap_table (0), stack_switch (3),
set_callbacks (4), callback_op (30). Good and bad arguments with Xen's errno values,
and what a refused call leaves in place (pv_traps.c)."""
from abi import C

from guest_kernel.asm import byte, eax, ecx
from guest_kernel.conformance import NON_CANONICAL, NULL, UNMAPPED, ConformanceGuest
from guest_kernel.xen_pv import PV_AREA_VA, UPCALL_MASK, XenPVGuest, event_handler, rip_

EFAULT, EINVAL, ENOSYS = -C.XEN_EFAULT, -C.XEN_EINVAL, -C.XEN_ENOSYS


def test_set_trap_table(run_cases):
    g = XenPVGuest("set_trap_table")
    g.call("null_clears", "set_trap_table", NULL)
    g.call("unmapped", "set_trap_table", UNMAPPED)
    g.call("noncanonical_pointer", "set_trap_table", NON_CANONICAL)
    g.call("in_hypervisor_region", "set_trap_table", PV_AREA_VA)
    g.trap_table("empty_list", [])
    # a non-canonical handler after a good entry: -EINVAL, the good entry stays
    g.trap_table("bad_handler", [(0, 0, "on_de"), (13, 0, NON_CANONICAL)])
    g.resume_at("de_done")
    g.a.xor(ecx, ecx)
    g.a.mov(eax, 1)
    g.a.div(ecx)
    g.a.label("de_done")
    g.report_word("de_count", "on_de.count")
    g.trap_table("good", [(0, 0, "on_de"), (6, 0, "on_ud")])
    g.handlers(lambda: (g.recording_handler("on_de", False),
                        g.recording_handler("on_ud", False)))
    run = run_cases(g.finish())
    assert run["null_clears"] == 0
    for case in ("unmapped", "noncanonical_pointer", "in_hypervisor_region"):
        assert run[case] == EFAULT, case
    assert run["empty_list"] == 0
    assert run["bad_handler"] == EINVAL
    assert run["de_count"] == 1
    assert run["good"] == 0


def test_callback_op(run_cases):
    g = XenPVGuest("callback_op")
    g.map_shared_info()
    g.callback("register_event", C.CALLBACKTYPE_event, "on_event")
    for case, kind in (("register_failsafe", C.CALLBACKTYPE_failsafe),
                       ("register_syscall", C.CALLBACKTYPE_syscall),
                       ("register_syscall32", C.CALLBACKTYPE_syscall32),
                       ("register_sysenter", C.CALLBACKTYPE_sysenter),
                       ("register_nmi", C.CALLBACKTYPE_nmi),
                       ("register_sysenter_deprecated", C.CALLBACKTYPE_sysenter_deprecated),
                       ("register_unknown", 99)):
        g.callback(case, kind, "on_event")
    g.struct("noncanon_event", "callback_register", type=C.CALLBACKTYPE_event,
             address=NON_CANONICAL)
    g.call("register_noncanonical", "callback_op", C.CALLBACKOP_register, "noncanon_event")
    g.struct("noncanon_unknown", "callback_register", type=99, address=NON_CANONICAL)
    g.call("register_noncanonical_unknown", "callback_op", C.CALLBACKOP_register,
           "noncanon_unknown")
    g.call("register_unmapped", "callback_op", C.CALLBACKOP_register, UNMAPPED)
    for case, kind in (("unregister_event", C.CALLBACKTYPE_event),
                       ("unregister_syscall", C.CALLBACKTYPE_syscall),
                       ("unregister_nmi", C.CALLBACKTYPE_nmi),
                       ("unregister_sysenter_deprecated", C.CALLBACKTYPE_sysenter_deprecated),
                       ("unregister_unknown", 99)):
        g.struct(f"{case}.arg", "callback_unregister", type=kind)
        g.call(case, "callback_op", C.CALLBACKOP_unregister, f"{case}.arg")
    g.call("unregister_unmapped", "callback_op", C.CALLBACKOP_unregister, UNMAPPED)
    g.call("unknown_cmd", "callback_op", 7, 0)
    # after all of that the event callback is still the first one: an upcall reaches it
    g.struct("bind_ipi", "evtchn_bind_ipi", vcpu=0)
    g.call("bind_ipi", "event_channel_op", C.EVTCHNOP_bind_ipi, "bind_ipi")
    g.a.mov(byte[rip_("shared_info", UPCALL_MASK)], 0)
    g.call("send", "event_channel_op", C.EVTCHNOP_send,
           g.a.ref("bind_ipi") + 4)
    g.report_word("event_count", "on_event.count")
    g.handlers(lambda: event_handler(g))
    run = run_cases(g.finish())
    for case in ("register_event", "register_failsafe", "register_syscall",
                 "register_syscall32", "register_sysenter", "register_nmi", "unregister_nmi"):
        assert run[case] == 0, case
    for case in ("register_sysenter_deprecated", "register_unknown",
                 "unregister_sysenter_deprecated", "unregister_unknown", "unknown_cmd"):
        assert run[case] == ENOSYS, case
    for case in ("register_noncanonical", "register_noncanonical_unknown",
                 "unregister_event", "unregister_syscall"):
        assert run[case] == EINVAL, case
    for case in ("register_unmapped", "unregister_unmapped"):
        assert run[case] == EFAULT, case
    assert run["event_count"] == 1


def test_set_callbacks_and_stack_switch(run_cases):
    g = XenPVGuest("set_callbacks")
    # set_callbacks ignores what each registration returns (Xen)
    g.call("set_callbacks", "set_callbacks", 0x1000, NON_CANONICAL, 0x2000)
    g.call("stack_switch", "stack_switch", C.FLAT_KERNEL_SS, 0x3000)
    g.call("stack_switch_any", "stack_switch", 0, NON_CANONICAL)
    run = run_cases(g.finish())
    assert run["set_callbacks"] == 0
    assert run["stack_switch"] == 0
    assert run["stack_switch_any"] == 0


def test_ring0_kernels_do_not_have_them(run_cases):
    """A kernel that requires supervisor_mode_kernel owns its IDT: no trap table."""
    g = ConformanceGuest("pv_traps_ring0", xen_pv=False)
    g.call("set_trap_table", "set_trap_table", NULL)
    g.call("stack_switch", "stack_switch", C.FLAT_KERNEL_SS, 0x3000)
    g.call("set_callbacks", "set_callbacks", 0, 0, 0)
    g.call("callback_op", "callback_op", C.CALLBACKOP_register, UNMAPPED)
    run = run_cases(g.finish())
    for case in ("set_trap_table", "stack_switch", "set_callbacks", "callback_op"):
        assert run[case] == ENOSYS, case
