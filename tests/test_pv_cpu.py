"""Xen's x86-64 PV CPU model on every engine: a guest kernel in ring 3 that reaches
trapless by `syscall`, takes exceptions and events as bounce frames through its trap
table and callbacks, returns with the iret hypercall, and cannot touch the hypervisor's
region (cext/pv_*.c, guest_kernel/xen_pv.py)."""
import pytest

from abi import C

from guest_kernel.conformance import parse
from guest_kernel.pv_kernel import build_pv_kernel
from guest_kernel.xen_pv import (compat_guest, cpu_model_guest, region_guest, sysenter_guest,
                                 unhandled_guest)
from hypervisor import builder, engines
from hypervisor.image import load_image

EFAULT, EINVAL = -C.XEN_EFAULT, -C.XEN_EINVAL
KERNEL_CS_RPL0 = C.FLAT_KERNEL_CS & ~3      # a frame from guest kernel mode
XEN_SIGNATURE = (0x566E6558, 0x65584D4D, 0x4D4D566E)     # "XenVMMXenVMM"


def run_clean(run_guest, image):
    # No console ring, as for the conformance cases: the guest reports through
    # console_io, so the only events are the ones a case makes
    stop, console, dom = run_guest(image, console_ring=False)
    assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
    return parse(console)[0], dom


def needs_compat_mode(engine):
    """Skip, saying why, where the engine cannot run compat-mode code (kvm without Unicorn
    for its twin)."""
    why = engines.compat_mode_unavailable(engine)
    if why:
        pytest.skip(why)


def test_deprivileged_kernel_takes_traps_events_and_syscalls(run_guest):
    r, dom = run_clean(run_guest, cpu_model_guest())
    assert dom.pv_model == builder.XEN_PV
    assert r["start_info_shared_info"] == dom.layout.shared_info != 0
    assert r["boot_upcall_mask"] == 1
    # no supervisor_mode_kernel, no callback vector: Xen's PV bits
    assert (r["get_features"], r["features_submap_0"]) == (
        0, 1 << C.XENFEAT_mmu_pt_update_preserve_ad | 1 << C.XENFEAT_highmem_assist |
        1 << C.XENFEAT_gnttab_map_avail_bits)
    # forced-emulation cpuid answers with Xen's leaves
    assert (r["cpuid_0_eax"], r["cpuid_0_ebx"], r["cpuid_0_ecx"], r["cpuid_0_edx"]) == (
        C.XEN_CPUID_BASE + 5, *XEN_SIGNATURE)
    assert r["cpuid_1_eax"] == (4 << 16) | 19
    assert (r["cpuid_2_eax"], r["cpuid_2_ebx"], r["cpuid_2_ecx"]) == (1, C.XEN_CPUID_BASE, 1)
    assert r["set_trap_table"] == 0
    # #DE: a fault at the div, from kernel mode (CS RPL 0), events masked since boot
    # (mask 1 in CS bits 32-39, IF clear in the saved rflags)
    assert (r["de_count"], r["de_rip"]) == (1, 0)
    assert r["de_cs"] == (1 << 32) | KERNEL_CS_RPL0
    assert (r["de_ss"], r["de_rflags_if"]) == (C.FLAT_KERNEL_SS, 0)
    # #PF: error code without U (kernel mode), cr2 in vcpu_info
    assert (r["pf_count"], r["pf_error"], r["pf_rip"], r["pf_cr2"]) == (1, 0, 0, 0x4000_0123)
    # privileged instructions and port I/O: #GP(0) at the instruction
    for insn in ("cli", "hlt", "in"):
        assert (r[f"gp_{insn}_error"], r[f"gp_{insn}_rip"]) == (0, 0), insn
    assert r["gp_count"] == 3
    # Xen's PV CPUID policy: no VME, PSE, PGE, MTRR, PSE36 (HVM-only), no 1 GiB pages;
    # the hypervisor bit; no XSS components (no XSAVES for PV)
    hidden_1d = 1 << 1 | 1 << 3 | 1 << 12 | 1 << 13 | 1 << 17
    assert r["leaf1_edx"] & hidden_1d == 0 and r["leaf1_ecx"] & 1 << 31
    assert r["ext1_edx"] & (1 << 26 | hidden_1d) == 0
    assert r["xsave1_ecx"] == 0
    # XSAVE sizes follow the guest's own XCR0: x87 alone before xsetbv, then + AVX
    avx = 256 if r["xsave0_eax"] & 4 else 0
    assert (r["xsave0_ebx"], r["xsave1_ebx"]) == (576, 576)
    assert (r["xsave0_after_ebx"], r["xsave1_after_ebx"]) == (576 + avx, 576 + avx)
    assert r["xgetbv"] == r["xsave0_eax"] & 7       # loaded into the CPU (kvm) or TCG (bt)
    # xsetbv without x87, or AVX without SSE: #GP(0) at the instruction
    assert (r["gp_xsetbv_no_x87_rip"], r["gp_xsetbv_avx_without_sse_rip"]) == (0, 0)
    assert r["gp_count_after_xsetbv"] == 5
    # a non-canonical address: #SS(0) only through the stack segment, whatever the
    # override says (the engine's own choice is corrected: TCG raises #GP for all,
    # this KVM-PVM host #SS for an %ss: override)
    assert (r["gp_ss_override_error"], r["gp_ss_override_rip"]) == (0, 0)
    assert (r["ss_rbp_base_error"], r["ss_rbp_base_rip"]) == (0, 0)
    assert (r["ss_ds_override_rbp_error"], r["ss_ds_override_rbp_rip"]) == (0, 0)
    assert (r["ss_count"], r["gp_count_after_noncanonical"]) == (2, 6)
    # int $0x80 through the trap table: a trap, rip after the instruction
    assert (r["int80_count"], r["int80_rip"]) == (1, 0)
    # an event upcall on the way back from EVTCHNOP_send, once unmasked; the iret
    # hypercall unmasks again (the saved IF was set)
    assert (r["register_event"], r["bind_ipi"], r["send"]) == (0, 0, 0)
    assert (r["event_count_before"], r["event_count"]) == (0, 1)
    assert (r["event_saved_mask"], r["event_mask_after"]) == (0, 0)
    assert dom.counters().upcalls == 1
    # guest user mode: syscall goes to the syscall callback on stack_switch's stack,
    # with the user's rip/rsp in the frame and CS RPL 3; CALLBACKF_mask_events masks
    assert (r["new_user_baseptr"], r["stack_switch"], r["register_syscall"]) == (0, 0, 0)
    assert r["syscall_rax"] == 0x1234
    assert (r["syscall_rip"], r["syscall_rcx"], r["syscall_user_rsp"]) == (0, 0, 0)
    assert r["syscall_cs"] == C.FLAT_RING3_CS64
    assert r["syscall_kernel_rsp"] == -56          # a 7-word frame under kernel_sp
    assert r["syscall_mask"] == 1
    counters = dom.counters()
    assert counters.hypercalls["iret"] == 13       # 11 handlers, 1 upcall, 1 to user mode
    assert counters.exits["exception"] >= 6


def test_hypervisor_region_is_out_of_the_guests_reach(run_guest):
    r, _ = run_clean(run_guest, region_guest())
    # a store into the region is a #PF (present, write, kernel mode) at the store
    assert (r["store_count"], r["store_error"], r["store_rip"], r["store_cr2"]) == (1, 3, 0, 0xe030)
    assert r["console_from_region"] == EFAULT
    assert (r["m2p_0x123"], r["m2p_0x7_low"]) == (0x123, 0x7)   # the identity M2P
    assert (r["machphys_mapping"], r["m2p_window_0x123"]) == (0, 0x123)
    assert r["mmu_update_slot256"] == EINVAL        # Xen's "L4 update in Xen-private area"


def test_unhandled_exception_crashes_the_domain_in_one_line(run_guest):
    stop, console, dom = run_guest(unhandled_guest())
    rip = dom.image.symbols["ud2_insn"]
    assert (stop.kind, stop.reason) == ("shutdown", C.SHUTDOWN_crash)
    assert stop.message == (f"domain_crash: #UD (vector 6) at rip {rip:#x} "
                            f"with no handler in the trap table")
    assert console == "before\n"


def test_cpu_model_comes_from_the_images_features_note():
    assert builder.cpu_model(load_image(build_pv_kernel(), 64 << 20)) == builder.XEN_PV
    assert builder.cpu_model(load_image(build_pv_kernel(xen_pv=False), 64 << 20)) == builder.RING0
    assert builder.cpu_model(load_image(unhandled_guest(), 64 << 20)) == builder.XEN_PV


def test_xen_model_hypercall_page_holds_xens_stubs():
    page = builder.hypercall_page(builder.XEN_PV)
    # push rcx; push r11; mov eax, 18; syscall; pop r11; pop rcx; ret
    assert page[18 * 32:18 * 32 + 14] == bytes.fromhex("514153b8120000000f05415b59c3")
    # iret: push rcx; push r11; push rax; mov eax, 23; syscall
    assert page[23 * 32:23 * 32 + 11] == bytes.fromhex("51415350b8170000000f05")


def test_run_prints_the_crash_in_one_line(tmp_path, engine):
    from helpers import hv
    image = unhandled_guest()
    path = tmp_path / "unhandled.elf"
    path.write_bytes(image)
    rip = load_image(image, 64 << 20).symbols["ud2_insn"]
    r = hv("run", path, "--engine", engine, "--timeout", "20")
    assert r.returncode == 5                         # shut down: crash
    assert r.stdout == "before\n"
    assert r.stderr.strip().splitlines()[-1] == (
        f"trapless: d1 shut down: crash (domain_crash: #UD (vector 6) at rip {rip:#x} "
        f"with no handler in the trap table)")


def test_a_kernel_that_requires_ring_0_still_gets_it(run_guest):
    """The PV kernel built with supervisor_mode_kernel required keeps trapless's ring-0
    model: its own IDT, a callback vector, the `in` hypercall stubs."""
    stop, console, dom = run_guest(build_pv_kernel(xen_pv=False), cmdline="ticks=3")
    assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
    assert dom.pv_model == builder.RING0
    lines = console.splitlines()
    assert "events: shared_info mapped, upcalls on vector 0xf3" in lines
    assert any(line.startswith("3 ticks at 100 Hz in ") for line in lines)
    assert lines[-1] == "powering off"
    assert "set_trap_table" not in dom.counters().hypercalls and dom.counters().upcalls >= 3


def test_compat_mode_user_code(run_guest, engine):
    """32-bit user code in a 64-bit PV guest (on kvm, on the vCPU's Unicorn twin): entered
    by the iret hypercall and by an lretq to FLAT_RING3_CS32, left by an ljmp to FLAT_RING3_CS64, calling 64-bit code
    with an lcall that returns by a 32-bit lret (an ljmp to a data segment is a #GP);
    its syscall reaches the syscall32 callback (a #UD without one), int $0x80 the trap
    table; each frame holds the 32-bit selector and the 32-bit rip and rsp."""
    needs_compat_mode(engine)
    image = compat_guest()
    r, dom = run_clean(run_guest, image)
    for case in ("new_user_baseptr", "stack_switch", "register_syscall", "register_syscall32"):
        assert r[case] == 0, case
    # round 1 (entered by the iret hypercall): the store, then no syscall32 callback:
    # Xen's #UD at the syscall itself, bounced with the compat selectors
    assert r["compat_store1"] == 0x12345678
    assert (r["ud_count"], r["ud_rip"], r["ud_rsp"]) == (1, 0, 0)
    assert (r["ud_cs"], r["ud_ss"]) == (C.FLAT_RING3_CS32, C.FLAT_RING3_DS32)
    # ... back in 64-bit code by ljmp: its syscall is the 64-bit callback's
    assert (r["syscall64_1_rax"], r["syscall64_1_rip"]) == (0x64, 0)
    assert r["syscall64_1_cs"] == C.FLAT_RING3_CS64
    # round 2 (entered by lretq): the syscall32 callback's frame word by word, as Xen's
    # cstar_enter builds it: rcx = rip = the next instruction, r11 = rflags, CS
    # FLAT_USER_CS32, the 32-bit rsp, SS FLAT_USER_SS32; events masked by the syscall
    # callback's flag (Xen's switch_to_kernel), though syscall32 was registered without
    assert r["compat_store2"] == 0x9ABCDEF0
    assert (r["syscall32_count"], r["syscall32_rax"]) == (1, 0x32)
    assert (r["syscall32_rcx"], r["syscall32_rip"], r["syscall32_rsp"]) == (0, 0, 0)
    assert r["syscall32_r11"] == r["syscall32_rflags"] == 0x202
    assert (r["syscall32_cs"], r["syscall32_ss"]) == (C.FLAT_USER_CS32, C.FLAT_USER_SS32)
    assert r["syscall32_mask"] == 1
    # the iret hypercall (VGCF_in_syscall) returned into the compat code with its rax
    assert r["eax_after_iret"] == 0x7777
    # int $0x80 from compat code: trap_table[0x80], rip after it, the compat selectors
    assert (r["int80_count"], r["int80_rip"], r["int80_rsp"]) == (1, 0, 0)
    assert (r["int80_cs"], r["int80_ss"]) == (C.FLAT_RING3_CS32, C.FLAT_RING3_DS32)
    # lcall from compat to 64-bit code: CS and eip pushed as dwords, a 32-bit lret back
    assert (r["lcall_cs"], r["lcall_eip"], r["esp_after_lret"]) == (C.FLAT_RING3_CS32, 0, 0)
    # ljmp to a data segment: #GP(selector) at the jump, still in compat code
    assert (r["gp_count"], r["gp_error"], r["gp_rip"]) == (1, C.FLAT_RING3_DS32 & ~3, 0)
    assert r["gp_cs"] == C.FLAT_RING3_CS32
    assert (r["syscall64_2_rax"], r["syscall64_2_rip"], r["syscall64_count"]) == (0x65, 0, 2)
    # kvm: compat code the model enters runs on the vCPU's Unicorn twin (cext/bt_twin.c),
    # as does compat code the guest's own far transfer reached (which this host runs
    # until it faults or makes a syscall): round 1 from the iret hypercall and from the
    # #UD handler's iret; round 2 from the syscall32 callback's iret, the int $0x80
    # handler's, the #GP of the ljmp to a data segment (after the host ran the lcall's
    # 32-bit lret and the code after it) and that #GP handler's iret
    assert dom.counters().twin_entries == (6 if engine == "kvm" else 0)


VENDOR_INTEL_EBX, VENDOR_AMD_EBX = 0x756E6547, 0x68747541     # "Genu", "Auth"


def test_sysenter_from_user_mode(run_guest):
    """sysenter as Xen takes it on the guest's CPU: where it runs in long mode (Intel's:
    bt's CPUID) Xen's frame of rip 0, CS 3, rsp 0, SS FLAT_USER_SS goes to the sysenter
    callback, or #GP(0) without one; AMD's (this kvm host's) raise #UD at it."""
    image = sysenter_guest()
    r, dom = run_clean(run_guest, image)
    symbols = load_image(image, 64 << 20).symbols
    assert (r["new_user_baseptr"], r["stack_switch"], r["register_sysenter"]) == (0, 0, 0)
    if r["vendor_ebx"] == VENDOR_AMD_EBX:
        assert (r["ud_count"], r["ud_rip_from_insn"], r["gp_count"]) == (1, 0, 0)
        assert (r["ud_cs"], r["ud_ss"]) == (C.FLAT_RING3_CS64, C.FLAT_RING3_SS64)
        assert r["ud_rsp"] == symbols["user_stack_top"]
        assert (r["ud_count_2"], r["sysenter_count"]) == (2, 0)
        return
    assert r["vendor_ebx"] == VENDOR_INTEL_EBX
    assert (r["gp_count"], r["gp_error"], r["ud_count"]) == (1, 0, 0)
    assert (r["gp_rip"], r["gp_cs"], r["gp_rsp"], r["gp_ss"]) == (0, 3, 0, C.FLAT_RING3_SS64)
    # with the callback: the same frame, the user's rcx and r11 kept, events masked
    assert (r["ud_count_2"], r["sysenter_count"]) == (0, 1)
    assert (r["sysenter_rcx"], r["sysenter_r11"]) == (0x1111, 0x2222)
    assert (r["sysenter_rip"], r["sysenter_cs"], r["sysenter_rsp"], r["sysenter_ss"]) == (
        0, 3, 0, C.FLAT_RING3_SS64)
    assert r["sysenter_rflags"] == 0x202
    assert r["sysenter_mask"] == 1


def test_trap_handlers_that_make_hypercalls_return_exactly(run_guest):
    """int3 and int $0x81 from guest kernel mode, each handler calling xen_version
    before its iret: every call returns where it was made with Xen's answer, every
    trap comes back to the instruction after it with the carry it had."""
    import struct
    from guest_kernel.xen_pv import handler_hypercall_guest
    image = handler_hypercall_guest(rounds=3)
    stop, console, dom = run_guest(image, console_ring=False)
    assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
    at = load_image(image, 64 << 20).symbols["handler_results"]
    bp_version, int81_version, bp_count, int81_count, carries, rbx = struct.unpack(
        "<6q", dom.read_guest(at, 48))
    assert (bp_version, int81_version) == ((4 << 16) | 19, (4 << 16) | 19)
    assert (bp_count, int81_count, carries, rbx) == (3, 3, 6, 0x5A5A_1234_5678)
    c = dom.counters()
    assert c.hypercalls["iret"] == 6 and c.hypercalls["xen_version"] == 6


def test_flags_an_iret_restores_give_way_to_the_next_ones(run_guest):
    """int3 and int $0x81 from guest kernel mode with CF and DF set, back with the iret
    hypercall: pushfq right after each trap shows the arithmetic flags and DF the
    frame restored, and after `test` and `cld` none of them (on bt the iret is done
    inside Unicorn's syscall hook, which must leave the flags where TCG's next
    instructions change them)."""
    import struct
    from guest_kernel.xen_pv import trap_flags_guest
    image = trap_flags_guest()
    stop, console, dom = run_guest(image, console_ring=False)
    assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
    at = load_image(image, 64 << 20).symbols["flags_results"]
    seen = struct.unpack("<4Q", dom.read_guest(at, 32))
    arith_df = 0x8D5 | 0x400                # OF SF ZF AF PF CF, and DF
    cf, pf, af, sf, df = 0x1, 0x4, 0x10, 0x80, 0x400
    assert [f & arith_df for f in seen] == [cf | pf | af | sf | df, 0] * 2, [hex(f) for f in seen]
    assert dom.counters().hypercalls["iret"] == 2


def test_a_hypercall_reads_a_remapped_page_through_its_new_frame(run_guest):
    """A page the guest wrote, then mapped over two other frames in turn with UVMF_INVLPG:
    console_io reads its buffer there through the guest's translation as it is after
    each flush (on bt through TCG's TLB, which the guest's own read there just filled)."""
    from guest_kernel.xen_pv import remap_then_read_guest
    stop, console, dom = run_guest(remap_then_read_guest(), console_ring=False)
    assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
    assert console == "window!\n" + "frame A\nframe B\n" * 2


def test_an_event_the_iret_unmasks_is_bounced_with_the_cs_it_restored(run_guest):
    """An iret whose frame sets IF while an event is pending delivers it on the way out:
    the event's frame holds the kernel's CS with RPL 0 and the upcall mask it interrupted
    (0, as the iret just cleared it) above it, not the mask the iret's own frame carried
    in its CS slot (Xen keeps 16 bits of a frame's CS)."""
    from guest_kernel.xen_pv import iret_then_event_guest
    r, dom = run_clean(run_guest, iret_then_event_guest())
    kernel_cs_rpl0 = C.FLAT_KERNEL_CS & ~3
    assert (r["bp_count"], r["bp_frame_cs"]) == (1, kernel_cs_rpl0 | 1 << 32)
    assert (r["event_count"], r["event_frame_cs"]) == (1, kernel_cs_rpl0)
    assert r["mask_after"] == 0
    assert dom.counters().hypercalls["iret"] == 2


def test_user_mode_and_kernel_keep_their_gs_bases_across_bounces(run_guest):
    """int3, int $0x82 and syscall from guest user mode, each back with the iret
    hypercall: the kernel's handlers read %gs:0 through the kernel's GS base, the user
    through its own after every return (the mode switch swaps the two bases, on bt
    inside the hooks that bounce)."""
    import struct
    from guest_kernel.xen_pv import user_mode_gs_guest
    image = user_mode_gs_guest()
    stop, console, dom = run_guest(image, console_ring=False)
    assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
    at = load_image(image, 64 << 20).symbols["gs_results"]
    seen = struct.unpack("<7Q", dom.read_guest(at, 56))
    user_word, kernel_word = 0x5553_4552_0000_0002, 0x4B45_524E_454C_0001
    assert seen == (user_word,) * 4 + (kernel_word,) * 3
    c = dom.counters()
    assert c.hypercalls["iret"] == 4        # to user mode, then back from each entry


def test_compat_round_trips_keep_the_vcpus_state(run_guest, engine):
    """A 64-bit PV kernel enters 32-bit compat code with the iret hypercall; it makes a
    `syscall` to the syscall32 callback three times, summing the answers (1, 2, 3), adds
    xmm1 to xmm0 and the two x87 values the kernel loaded, stores MXCSR and goes back to
    64-bit code by ljmp. On kvm every stretch of compat code runs on the vCPU's Unicorn
    twin, so the registers, the x87 stack, the SSE registers and MXCSR go over and back
    each time; r12, which compat code cannot reach, comes back as it was."""
    from guest_kernel.xen_pv import (COMPAT_MXCSR, COMPAT_R12, COMPAT_XMM_ADD, COMPAT_XMM_IN,
                                     compat_roundtrip_guest)
    needs_compat_mode(engine)
    r, dom = run_clean(run_guest, compat_roundtrip_guest(rounds=3))
    xmm = [x + y for x, y in zip(COMPAT_XMM_IN, COMPAT_XMM_ADD)]
    assert (r["register_syscall"], r["register_syscall32"]) == (0, 0)
    assert (r["sum"], r["syscall32_count"]) == (1 + 2 + 3, 3)
    assert (r["xmm0_low"], r["xmm0_high"]) == (xmm[0] | xmm[1] << 32, xmm[2] | xmm[3] << 32)
    assert r["x87_sum"] == 0x4014_0000_0000_0000            # 2.0 + 3.0 = 5.0
    assert (r["mxcsr"], r["r12"]) == (COMPAT_MXCSR, COMPAT_R12)
    # one TSC for both: the twin's rdtsc reads the host's, and so does the guest's in
    # KVM (a Xen-model vCPU gets TSC offset 0; this host runs ring-3 rdtsc natively)
    assert r["tsc_compat_minus_before"] > 0 and r["tsc_after_minus_compat"] > 0
    # kvm: the twin ran the compat code from the first iret and from each callback's
    assert dom.counters().twin_entries == (4 if engine == "kvm" else 0)


def test_compat_code_can_be_paused_woken_by_an_event_and_destroyed(engine):
    """32-bit code spinning in user mode (on kvm, on the vCPU's Unicorn twin): a pause
    holds it (under 1% of the CPU time spinning takes passes), an unpause lets it go on, a VIRQ the host sends
    reaches it as an event upcall (its frame holds the compat selector) whose handler
    wakes it; a second domain spinning there is destroyed."""
    import time

    from guest_kernel.xen_pv import compat_spin_guest
    from hypervisor.domain import Domain
    from hypervisor.image import load_image
    from tests.helpers import wait_for
    needs_compat_mode(engine)
    image = compat_spin_guest()
    spinning = load_image(image, 64 << 20).symbols["spinning"]

    def started(dom):
        dom.start()
        assert wait_for(lambda: dom.read_guest(spinning, 4) == b"\x01\0\0\0")

    with Domain(image, engine=engine, console_ring=False) as dom:
        started(dom)
        dom.pause()
        assert wait_for(lambda: dom.vcpu_state == "paused")
        cpu = dom.cpu_ns
        time.sleep(0.2)                 # spinning, it would take all of that
        assert dom.vcpu_state == "paused" and dom.cpu_ns - cpu < 2_000_000
        dom.unpause()
        assert wait_for(lambda: dom.cpu_ns > cpu)
        assert dom.send_virq(C.VIRQ_DEBUG) == 0
        stop = dom.wait(20)
        assert (stop.kind, stop.reason) == ("shutdown", 0), stop
        r = parse(dom.console_output.decode())[0]
        assert r["bind_virq"] == 0
        assert (r["spin_done"], r["event_count"], r["event_cs"]) == (1, 1, C.FLAT_RING3_CS32)
        assert dom.counters().twin_entries == (2 if engine == "kvm" else 0)
    with Domain(image, engine=engine, console_ring=False) as dom:
        started(dom)
        dom.destroy()
        assert dom.stop_info.kind == "stopped"
