"""vcpu_op (24): a domain's other vCPUs: VCPUOP_initialise, up, down, is_up (vcpu_op.c).

A domain with vcpus=2 has vCPU 0 (the builder's, up) and vCPU 1, down and uninitialised.
Every bad argument gets Xen's errno and changes nothing: a later good call still works.
The timer sub-ops are in test_timers.py."""
import struct

from abi import C, offsetof

from guest_kernel.asm import dword, eax, qword, rax, rdi, rdx, rip, rsi
from guest_kernel.conformance import NON_CANONICAL, NULL, UNMAPPED, ConformanceGuest
from mm_guest import audit

EFAULT, EINVAL, ENOENT, EEXIST = -C.XEN_EFAULT, -C.XEN_EINVAL, -C.XEN_ENOENT, -C.XEN_EEXIST
CTX = "vcpu_guest_context"
CR3 = offsetof(CTX, "ctrlreg") + 3 * 8
BEYOND_RAM = 0x4000_0000                # a frame a 64 MiB domain does not have


def context(g: ConformanceGuest, label: str, cr3: str | int = "pt_base", **fields) -> None:
    """A vcpu_guest_context at label; cr3 "pt_base": the L4 the guest runs on (a valid
    one), "self": the context's own frame (mapped writable, so never a page table)."""
    fields.setdefault("flags", C.VGCF_in_kernel)
    g.struct(label, CTX, **fields)
    if cr3 == "pt_base":
        g.start_info_field(rax, "pt_base")      # virtual = physical in these guests
    elif cr3 == "self":
        g.a.lea(rax, qword[rip + label])
        g.a.and_(rax, ~0xFFF)
    else:
        g.a.mov(rax, cr3)
    g.a.mov(qword[rip + label + CR3], rax)


def test_initialise_up_down_is_up(run_cases, request):
    g = ConformanceGuest("vcpu_op life")
    context(g, "good")
    context(g, "cr3_beyond_ram", cr3=BEYOND_RAM)
    context(g, "cr3_writable", cr3="self")
    context(g, "rip_noncanonical", user_regs={"rip": NON_CANONICAL})
    context(g, "user_mode_without_user_l4", flags=0)
    context(g, "gdt_too_big", gdt_ents=16 * 512 + 1)
    context(g, "ldt_misaligned", ldt_base=0x1001, ldt_ents=1)
    context(g, "dr7_high", debugreg=[0, 0, 0, 0, 0, 0, 0, 1 << 32])
    g.call("is_up_0", "vcpu_op", C.VCPUOP_is_up, 0, 0)
    g.call("is_up_1", "vcpu_op", C.VCPUOP_is_up, 1, 0)
    g.call("is_up_2", "vcpu_op", C.VCPUOP_is_up, 2, 0)
    g.call("is_up_32", "vcpu_op", C.VCPUOP_is_up, 32, 0)
    g.call("up_uninitialised", "vcpu_op", C.VCPUOP_up, 1, 0)
    g.call("initialise_null", "vcpu_op", C.VCPUOP_initialise, 1, NULL)
    g.call("initialise_unmapped", "vcpu_op", C.VCPUOP_initialise, 1, UNMAPPED)
    g.call("initialise_vcpu_2", "vcpu_op", C.VCPUOP_initialise, 2, "good")
    g.call("initialise_vcpu_0", "vcpu_op", C.VCPUOP_initialise, 0, "good")
    for bad in ("cr3_beyond_ram", "cr3_writable", "rip_noncanonical",
                "user_mode_without_user_l4", "gdt_too_big", "ldt_misaligned", "dr7_high"):
        g.call(bad, "vcpu_op", C.VCPUOP_initialise, 1, bad)
    g.call("is_up_1_after_bad", "vcpu_op", C.VCPUOP_is_up, 1, 0)
    g.call("runstate_1", "vcpu_op", C.VCPUOP_get_runstate_info, 1, "scratch")
    g.dump("runstate_1", "scratch", 4)
    g.call("initialise", "vcpu_op", C.VCPUOP_initialise, 1, "good")
    g.call("initialise_twice", "vcpu_op", C.VCPUOP_initialise, 1, "good")
    g.call("is_up_1_initialised", "vcpu_op", C.VCPUOP_is_up, 1, 0)
    g.call("down_1", "vcpu_op", C.VCPUOP_down, 1, 0)
    g.call("up_0", "vcpu_op", C.VCPUOP_up, 0, 0)
    run = run_cases(g.finish(), vcpus=2)
    assert run["is_up_0"] == 1 and run["is_up_1"] == 0
    assert run["is_up_2"] == ENOENT and run["is_up_32"] == ENOENT
    assert run["up_uninitialised"] == EINVAL
    assert run["initialise_null"] == EFAULT and run["initialise_unmapped"] == EFAULT
    assert run["initialise_vcpu_2"] == ENOENT
    assert run["initialise_vcpu_0"] == EEXIST        # the builder initialised it
    for bad in ("cr3_beyond_ram", "cr3_writable", "rip_noncanonical",
                "user_mode_without_user_l4", "gdt_too_big", "ldt_misaligned", "dr7_high"):
        assert run[bad] == EINVAL, bad
    assert run["is_up_1_after_bad"] == 0
    assert run["runstate_1"] == 0
    assert struct.unpack("<i", run.dumps["runstate_1"])[0] == C.RUNSTATE_offline
    assert run["initialise"] == 0 and run["initialise_twice"] == EEXIST
    assert run["is_up_1_initialised"] == 0            # without VGCF_online it stays down
    assert run["down_1"] == 0 and run["up_0"] == 0
    # vCPU 1's L4 holds a type reference, as Xen's guest_table does: the books balance
    assert audit(run.domain) == ""


def test_a_vcpu_not_up_yet_takes_its_vcpu_info_and_runstate_area(run_cases):
    """Linux registers every possible vCPU's vcpu_info and runstate area from vCPU 0
    before it brings the others up: the arguments are vCPU 0's to read (the target has
    no page tables yet), and Xen takes both."""
    g = ConformanceGuest("vcpu_op areas of a vCPU not up")
    g.struct("info", "vcpu_register_vcpu_info")
    g.struct("area", "vcpu_register_runstate_memory_area")
    g.a.lea(rax, qword[rip + "scratch"])
    g.a.shr(rax, 12)                                # virtual = physical: its frame
    g.a.mov(qword[rip + "info"], rax)
    g.a.lea(rax, qword[rip + "scratch"])
    g.a.add(rax, 2048)                              # the runstate area, apart from it
    g.a.mov(qword[rip + "area"], rax)
    g.call("vcpu_info_1", "vcpu_op", C.VCPUOP_register_vcpu_info, 1, "info")
    g.call("runstate_area_1", "vcpu_op", C.VCPUOP_register_runstate_memory_area, 1, "area")
    g.call("is_up_1", "vcpu_op", C.VCPUOP_is_up, 1, 0)
    run = run_cases(g.finish(), vcpus=2)
    assert (run["vcpu_info_1"], run["runstate_area_1"], run["is_up_1"]) == (0, 0, 0)


def test_taking_down_the_last_vcpu_up_powers_the_domain_off(run_cases):
    g = ConformanceGuest("vcpu_op last down")
    g.call("down_0", "vcpu_op", C.VCPUOP_down, 0, 0)
    g.report("after_down")                          # never printed
    run = run_cases(g.finish(), vcpus=2)
    assert (run.stop.kind, run.stop.reason) == ("shutdown", C.SHUTDOWN_poweroff)
    assert "after_down" not in run.results and "down_0" not in run.results


PTE_P, PTE_RW, PTE_A, PTE_D = 0x1, 0x2, 0x20, 0x40


def remap(g: ConformanceGuest, case: str, label: str, writable: bool) -> None:
    """update_va_mapping of the page at label onto itself, read-only or writable."""
    a = g.a
    a.lea(rdi, qword[rip + label])
    a.mov(rsi, rdi)
    a.or_(rsi, PTE_P | PTE_A | PTE_D | (PTE_RW if writable else 0))
    a.mov(rdx, C.UVMF_INVLPG)
    g.call(case, "update_va_mapping", rdi, rsi, rdx)


def test_a_refused_initialise_leaves_its_gdt_frames_alone(run_cases):
    """A context whose GDT frame checks out but whose cr3 does not: EINVAL, and the frame
    is no descriptor page afterwards (it can be mapped writable again, which a GDT frame
    cannot); with a good cr3 the same frame becomes vCPU 1's GDT and stays so."""
    g = ConformanceGuest("vcpu_op gdt undo")
    a = g.a
    a.section(".data")
    a.align(4096)
    a.label("gdt_page")
    a.db(bytes(4096))                   # one null descriptor, and more zeros
    a.section(".text")
    for label, cr3 in (("bad_cr3", BEYOND_RAM), ("good_cr3", "pt_base")):
        context(g, label, cr3=cr3, gdt_ents=1)
        a.lea(rax, qword[rip + "gdt_page"])
        a.shr(rax, 12)
        a.mov(qword[rip + label + offsetof(CTX, "gdt_frames")], rax)
    remap(g, "gdt_page_read_only", "gdt_page", writable=False)
    g.call("initialise_bad_cr3", "vcpu_op", C.VCPUOP_initialise, 1, "bad_cr3")
    remap(g, "writable_after_refusal", "gdt_page", writable=True)
    remap(g, "read_only_again", "gdt_page", writable=False)
    g.call("initialise_good_cr3", "vcpu_op", C.VCPUOP_initialise, 1, "good_cr3")
    remap(g, "writable_while_a_gdt", "gdt_page", writable=True)
    run = run_cases(g.finish(), vcpus=2)
    assert run["gdt_page_read_only"] == 0
    assert run["initialise_bad_cr3"] == EINVAL
    assert run["writable_after_refusal"] == 0 and run["read_only_again"] == 0
    assert run["initialise_good_cr3"] == 0
    assert run["writable_while_a_gdt"] == EINVAL
    assert audit(run.domain) == ""


def test_two_vcpus_exchange_ipis_and_vcpu_1_takes_itself_down(run_cases, engine):
    """vCPU 0 initialises vCPU 1 (its own entry and stack) and brings it up. Each binds an
    IPI port for itself and waits in SCHEDOP_poll until the other's IPI arrives; each
    reports through the console only after the other's IPI, so the lines come in one
    order. vCPU 1 then takes itself down, and vCPU 0 waits until is_up says 0."""
    g = ConformanceGuest("vcpu_op two vcpus")
    a = g.a
    regs = offsetof(CTX, "user_regs")
    rip_at = regs + offsetof("xen_user_regs", "rip")
    rsp_at = regs + offsetof("xen_user_regs", "rsp")
    port_at = offsetof("evtchn_bind_ipi", "port")
    poll_ports_at = offsetof("sched_poll", "ports")
    context(g, "ap_context", kernel_ss=C.FLAT_KERNEL_SS)
    for n in (0, 1):
        g.struct(f"bind{n}", "evtchn_bind_ipi", vcpu=n)
        g.struct(f"poll{n}", "sched_poll", nr_ports=1)    # ports: bind<n>.port, below
        g.struct(f"send_to{n}", "evtchn_send")
    a.section(".bss")
    a.align(16)
    a.label("ap_stack")
    a.reserve(8192)
    a.label("ap_stack_top")
    a.section(".text")
    for n in (0, 1):
        a.lea(rax, qword[rip + f"bind{n}" + port_at])
        a.mov(qword[rip + f"poll{n}" + poll_ports_at], rax)
    a.lea(rax, qword[rip + "ap_entry"])
    a.mov(qword[rip + "ap_context" + rip_at], rax)
    a.lea(rax, qword[rip + "ap_stack_top"])
    a.mov(qword[rip + "ap_context" + rsp_at], rax)
    a.mov(qword[rip + "ap_context" + offsetof(CTX, "kernel_sp")], rax)

    g.call("v0_bind_ipi", "event_channel_op", C.EVTCHNOP_bind_ipi, "bind0")
    g.call("v0_initialise_1", "vcpu_op", C.VCPUOP_initialise, 1, "ap_context")
    g.call("v0_is_up_1_before", "vcpu_op", C.VCPUOP_is_up, 1, 0)
    # from here vCPU 0 prints only while vCPU 1 waits for it or is down
    g.hypercall("vcpu_op", C.VCPUOP_up, 1, 0)
    a.mov(qword[rip + "v0_up_result"], rax)
    g.hypercall("sched_op", C.SCHEDOP_poll, "poll0")
    g.report("v0_poll")
    a.mov(rax, qword[rip + "v0_up_result"])
    g.report("v0_up_1")
    g.call("v0_is_up_1_running", "vcpu_op", C.VCPUOP_is_up, 1, 0)
    a.mov(eax, dword[rip + "bind1" + port_at])          # vCPU 1 bound it before its IPI
    a.mov(dword[rip + "send_to1"], eax)
    g.hypercall("event_channel_op", C.EVTCHNOP_send, "send_to1")
    a.mov(qword[rip + "v0_send_result"], rax)       # reported once vCPU 1 is quiet
    a.section(".bss")
    a.label("v0_send_result")
    a.reserve(8)
    a.label("v0_up_result")
    a.reserve(8)
    a.section(".text")
    a.label("v0_wait_down")
    g.hypercall("vcpu_op", C.VCPUOP_is_up, 1, 0)
    a.test(rax, rax)
    a.je("v0_saw_down")
    g.hypercall("sched_op", C.SCHEDOP_yield, 0)
    a.jmp("v0_wait_down")
    a.label("v0_saw_down")
    g.report("v0_is_up_1_after_down")
    a.mov(rax, qword[rip + "v0_send_result"])
    g.report("v0_send_to_1")
    g.call("v0_is_up_0", "vcpu_op", C.VCPUOP_is_up, 0, 0)

    def ap(g):
        a.label("ap_entry")
        g.call("v1_is_up_1", "vcpu_op", C.VCPUOP_is_up, 1, 0)
        g.call("v1_bind_ipi", "event_channel_op", C.EVTCHNOP_bind_ipi, "bind1")
        a.mov(eax, dword[rip + "bind0" + port_at])
        a.mov(dword[rip + "send_to0"], eax)
        g.hypercall("event_channel_op", C.EVTCHNOP_send, "send_to0")
        g.hypercall("sched_op", C.SCHEDOP_poll, "poll1")
        g.report("v1_poll")
        g.call("v1_is_up_0", "vcpu_op", C.VCPUOP_is_up, 0, 0)
        g.hypercall("vcpu_op", C.VCPUOP_down, 1, 0)
        a.ud2()                                          # never runs: it stays down
    g._emit_later = (*g._emit_later, ap)
    run = run_cases(g.finish(), vcpus=2)
    lines = [line for line in run.console.splitlines() if line.startswith("result ")]
    assert lines == [
        "result v0_bind_ipi 0", "result v0_initialise_1 0", "result v0_is_up_1_before 0",
        "result v1_is_up_1 1", "result v1_bind_ipi 0",
        "result v0_poll 0", "result v0_up_1 0", "result v0_is_up_1_running 1",
        "result v1_poll 0", "result v1_is_up_0 1",
        "result v0_is_up_1_after_down 0", "result v0_send_to_1 0", "result v0_is_up_0 1",
    ], run.console
    assert (run.stop.kind, run.stop.reason) == ("shutdown", C.SHUTDOWN_poweroff)


def test_code_one_vcpu_patches_runs_patched_on_the_other(run_cases):
    """vCPU 1 runs a function (mov eax, 1; ret); vCPU 0 then stores 2 into its
    immediate, and vCPU 1's next call returns 2: a store by one vCPU reaches the code
    the other runs (on bt each vCPU has its own translated code). Both wait by spinning
    on memory, so on bt each must hand the CPU to the other in turn."""
    g = ConformanceGuest("vcpu_op smc")
    a = g.a
    regs = offsetof(CTX, "user_regs")
    context(g, "ap_context", kernel_ss=C.FLAT_KERNEL_SS)
    a.section(".bss")
    for name in ("stage", "ap_first", "ap_second"):
        a.label(name)
        a.reserve(8)
    a.align(16)
    a.reserve(4096)
    a.label("ap_stack_top")
    a.section(".text")
    a.lea(rax, qword[rip + "ap_entry"])
    a.mov(qword[rip + "ap_context" + regs + offsetof("xen_user_regs", "rip")], rax)
    a.lea(rax, qword[rip + "ap_stack_top"])
    a.mov(qword[rip + "ap_context" + regs + offsetof("xen_user_regs", "rsp")], rax)
    a.mov(qword[rip + "ap_context" + offsetof(CTX, "kernel_sp")], rax)
    g.hypercall("vcpu_op", C.VCPUOP_initialise, 1, "ap_context")
    g.hypercall("vcpu_op", C.VCPUOP_up, 1, 0)
    a.label("v0_wait_first")
    a.cmp(qword[rip + "stage"], 1)
    a.jne("v0_wait_first")
    a.mov(dword[rip + "patchme" + 1], 2)                # mov eax, imm32: the immediate
    a.mov(qword[rip + "stage"], 2)
    a.label("v0_wait_down")
    g.hypercall("vcpu_op", C.VCPUOP_is_up, 1, 0)
    a.test(rax, rax)
    a.jne("v0_wait_down")
    a.mov(rax, qword[rip + "ap_first"])
    g.report("ap_first")
    a.mov(rax, qword[rip + "ap_second"])
    g.report("ap_second")

    def ap(g):
        a.label("patchme")
        a.mov(eax, 1)
        a.ret()
        a.label("ap_entry")
        a.call("patchme")
        a.mov(qword[rip + "ap_first"], rax)
        a.mov(qword[rip + "stage"], 1)
        a.label("ap_wait_patch")
        a.cmp(qword[rip + "stage"], 2)
        a.jne("ap_wait_patch")
        a.call("patchme")
        a.mov(qword[rip + "ap_second"], rax)
        g.hypercall("vcpu_op", C.VCPUOP_down, 1, 0)
        a.ud2()
    g._emit_later = (*g._emit_later, ap)
    run = run_cases(g.finish(), vcpus=2)
    assert (run["ap_first"], run["ap_second"]) == (1, 2), run.console
