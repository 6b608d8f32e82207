"""Guests for Xen's x86-64 PV CPU model: a kernel in ring 3 that reaches the hypervisor
only through `syscall` (the hypercall page's stubs are Xen's own) and receives
exceptions and events as Xen delivers them (XEN-ABI-FACTS §18-§21).

`XenPVGuest` is a conformance guest for that model, with the pieces such a kernel needs:
a trap table, callbacks, handlers that record the bounce frame they were given and
return through the iret hypercall, shared_info mapped for the upcall mask and cr2.
`cpu_model_guest()` is the guest tests/test_pv_cpu.py runs on every engine.
"""
from __future__ import annotations

from abi import C, offsetof

from .asm import (byte, dword, eax, ebx, ecx, edx, esi, ptr, qword, r11, r12, rax, rbx, rcx,
                  rbp, rdx, rip, rsp)
from .conformance import ConformanceGuest, GuestImage
from .pvlib import (emit_bounce_return, emit_enter_user_mode, emit_iret_to_user,
                    emit_mask_console_port, emit_syscall_callback, emit_trap_info)

# Offsets inside shared_info of vCPU 0's vcpu_info.
UPCALL_PENDING = offsetof("vcpu_info", "evtchn_upcall_pending")
UPCALL_MASK = offsetof("vcpu_info", "evtchn_upcall_mask")
PENDING_SEL = offsetof("vcpu_info", "evtchn_pending_sel")
CR2 = offsetof("vcpu_info", "arch") + offsetof("arch_vcpu_info", "cr2")
EVTCHN_PENDING = offsetof("shared_info", "evtchn_pending")

FRAME_WORDS = 8                 # rcx, r11, [error], rip, cs, rflags, rsp, ss
UNMAPPED = 0x4000_0000          # no mapping there in a small guest (conformance.UNMAPPED)


class XenPVGuest(ConformanceGuest):
    """A ConformanceGuest for Xen's PV CPU model."""

    def __init__(self, name: str):
        super().__init__(name, xen_pv=True)
        a = self.a
        a.section(".bss")
        a.align(4096)
        a.label("shared_info")
        a.reserve(4096)
        a.label("resume_at")                # where the next handler returns (0: as is)
        a.reserve(8)
        a.label("saved_rax")
        a.reserve(8)
        a.section(".text")

    # ---- set-up --------------------------------------------------------------
    def map_shared_info(self) -> None:
        """XENMEM_add_to_physmap of our shared_info page; reports `map_shared_info`."""
        a = self.a
        xatp = self.struct("xatp", "xen_add_to_physmap", domid=C.DOMID_SELF,
                           space=C.XENMAPSPACE_shared_info)
        a.lea(rax, ptr["shared_info"])
        a.shr(rax, 12)
        a.mov(qword[rip_("xatp", offsetof("xen_add_to_physmap", "gpfn"))], rax)
        self.call("map_shared_info", "memory_op", C.XENMEM_add_to_physmap, xatp)
        emit_mask_console_port(self)

    def trap_table(self, case: str, entries: list[tuple[int, int, str | int]]) -> None:
        """set_trap_table with (vector, flags, handler label or address) entries;
        reports `case`."""
        a = self.a
        a.section(".data")
        a.align(16)
        emit_trap_info(a, f"{case}.table", entries)
        a.section(".text")
        self.call(case, "set_trap_table", f"{case}.table")

    def callback(self, case: str, kind: int, handler: str, flags: int = 0) -> None:
        """CALLBACKOP_register; reports `case`."""
        a = self.a
        a.section(".data")
        a.align(8)
        a.label(f"{case}.cb")
        a.dw(kind, flags)
        a.dd(0)
        a.dq(handler)
        a.section(".text")
        self.call(case, "callback_op", C.CALLBACKOP_register, f"{case}.cb")

    def share_l4_with_user_mode(self, user_stacks: tuple[str, ...] = ("user_stack_top",),
                                words: tuple[str, ...] = ()) -> None:
        """Set up guest user mode: MMUEXT_NEW_USER_BASEPTR with the start-of-day L4 (one
        L4 serves both modes), a 4 KiB kernel stack for events from user mode
        (stack_switch; reports `new_user_baseptr` and `stack_switch`), a 4 KiB stack
        for each label of user_stacks (its top) and an 8-byte word for each of words."""
        a = self.a
        a.section(".data")
        a.align(8)
        a.label("user_base")                                   # struct mmuext_op
        a.dd(C.MMUEXT_NEW_USER_BASEPTR, 0)
        a.dq(0, 0)
        a.section(".bss")
        a.align(16)
        for top in ("kernel_stack_top",) + user_stacks:
            a.reserve(4096)
            a.label(top)
        for word in words:
            a.label(word)
            a.reserve(8)
        a.section(".text")
        self.start_info_field(rax, "pt_base")
        a.shr(rax, 12)                                          # VIRT_BASE 0: VA = PA
        a.mov(qword[rip_("user_base", 8)], rax)
        self.call("new_user_baseptr", "mmuext_op", "user_base", 1, 0, C.DOMID_SELF,
                  subop=C.MMUEXT_NEW_USER_BASEPTR)
        self.call("stack_switch", "stack_switch", C.FLAT_KERNEL_SS, "kernel_stack_top")

    # ---- handlers ------------------------------------------------------------
    def record_frame(self, label: str, error_code: bool) -> None:
        """Handler entry: save rax, copy the bounce frame at rsp to `<label>.frame`
        (8 words, rcx first; without an error code the last stays 0), count the entry
        in `<label>.count`."""
        a = self.a
        words = FRAME_WORDS if error_code else FRAME_WORDS - 1
        a.section(".bss")
        a.align(8)
        a.label(f"{label}.frame")
        a.reserve(FRAME_WORDS * 8)
        a.label(f"{label}.count")
        a.reserve(8)
        a.section(".text")
        a.label(label)
        a.mov(qword["saved_rax"], rax)
        for i in range(words):
            a.mov(rax, qword[rsp + 8 * i])
            a.mov(qword[rip_(f"{label}.frame", 8 * i)], rax)
        a.inc(qword[f"{label}.count"])

    def recording_handler(self, label: str, error_code: bool) -> None:
        """A trap-table handler: records its frame (record_frame), resumes at
        `resume_at` if set (clearing it), and returns through the iret hypercall."""
        a = self.a
        self.record_frame(label, error_code)
        rip_slot = 24 if error_code else 16
        a.mov(rax, qword["resume_at"])
        a.test(rax, rax)
        a.je(f"{label}.keep")
        a.mov(qword[rsp + rip_slot], rax)
        a.mov(qword["resume_at"], 0)
        a.label(f"{label}.keep")
        a.mov(rax, qword["saved_rax"])
        self.iret(error_code)

    def iret(self, error_code: bool = False) -> None:
        """Return from a bounce frame at rsp: pop rcx and r11 (and the error code),
        push flags 0 and jump to the iret stub, as Linux and XTF do."""
        a = self.a
        a.pop(rcx)
        a.pop(r11)
        if error_code:
            a.add(rsp, 8)
        a.push(0)
        a.jmp("hypercall_iret")

    def handlers(self, emit) -> None:
        """Emit handlers (emit()) after the cases, out of the straight-line code."""
        self._emit_later = (*self._emit_later, lambda _guest: emit())

    def ptr(self, label: str):
        """The address operand of label, for lea."""
        return ptr[label]

    def hypercall_regs(self, case: str, name: str, *args) -> None:
        """Hypercall `name` with arguments that may be registers (copied through the
        stack, so loading one never clobbers another) or ints; reports `case`."""
        from .runtime import ARG_REGS
        a = self.a
        regs = [(reg, value) for reg, value in zip(ARG_REGS, args) if not isinstance(value, int)]
        for _, value in reversed(regs):
            a.push(value)
        for reg, _ in regs:
            a.pop(reg)
        for reg, value in zip(ARG_REGS, args):
            if isinstance(value, int):
                self.load_arg(reg, value)
        a.call(f"hypercall_{name}")
        self.cases[case] = (name, "-")
        self.report(case)

    def resume_at(self, label: str) -> None:
        self.a.lea(rax, ptr[label])
        self.a.mov(qword["resume_at"], rax)

    def report_word(self, case: str, where: str, offset: int = 0) -> None:
        """Report the qword at label + offset."""
        self.a.mov(rax, qword[rip_(where, offset)])
        self.report(case)

    def report_address(self, case: str, where: str, offset: int, label: str) -> None:
        """Report (qword at where + offset) - address of label: 0 when they match."""
        a = self.a
        a.mov(rax, qword[rip_(where, offset)])
        a.lea(rcx, ptr[label])
        a.sub(rax, rcx)
        self.report(case)


def rip_(label: str, offset: int):
    """The address expression label + offset, RIP-relative."""
    return rip + label + offset


def cpu_model_guest() -> GuestImage:
    """Exercises the PV CPU model from guest kernel mode and guest user mode: forced
    cpuid, #DE, #PF with cr2, #GP from privileged instructions and port I/O, int $0x80
    through the trap table, an event upcall, and syscall from user mode."""
    g = XenPVGuest("pv-cpu")
    a = g.a
    # start_info names shared_info by machine address (VIRT_BASE 0: also its VA), with
    # events masked at boot; then the guest places its own copy
    g.start_info_field(rcx, "shared_info")
    a.mov(rax, rcx)
    g.report("start_info_shared_info")
    g.start_info_field(rcx, "shared_info")
    a.movzx(eax, byte[rcx + UPCALL_MASK])
    g.report("boot_upcall_mask")
    g.map_shared_info()
    g.struct("features", "xen_feature_info", submap_idx=0)
    g.call("get_features", "xen_version", C.XENVER_get_features, "features")
    a.mov(eax, dword[rip_("features", 4)])
    g.report("features_submap_0")

    # forced-emulation cpuid: Xen's leaves
    for leaf in (0, 1, 2):
        a.mov(eax, C.XEN_CPUID_BASE + leaf)
        a.xor(ecx, ecx)
        a.db(0x0F, 0x0B, 0x78, 0x65, 0x6E)      # ud2; .ascii "xen"
        a.cpuid()
        a.mov(qword["cpuid_out"], rax)
        a.mov(qword[rip_("cpuid_out", 8)], rbx)
        a.mov(qword[rip_("cpuid_out", 16)], rcx)
        a.mov(qword[rip_("cpuid_out", 24)], rdx)
        for i, reg in enumerate(("eax", "ebx", "ecx", "edx")):
            g.report_word(f"cpuid_{leaf}_{reg}", "cpuid_out", 8 * i)
    a.section(".bss")
    a.label("cpuid_out")
    a.reserve(32)
    a.section(".text")

    g.trap_table("set_trap_table", [
        (0, 0, "on_de"),
        (12, 0, "on_ss"),
        (13, 0, "on_gp"),
        (14, 0, "on_pf"),
        (0x80, 3, "on_int80"),
    ])

    # #DE: a fault, rip at the div; boot state: events masked (saved in the CS slot)
    g.resume_at("de_done")
    a.xor(ecx, ecx)
    a.mov(eax, 1)
    a.label("de_insn")
    a.div(ecx)
    a.label("de_done")
    g.report_word("de_count", "on_de.count")
    g.report_address("de_rip", "on_de.frame", 16, "de_insn")
    g.report_word("de_cs", "on_de.frame", 24)
    g.report_word("de_ss", "on_de.frame", 48)
    a.mov(rax, qword[rip_("on_de.frame", 32)])
    a.and_(rax, 0x200)
    g.report("de_rflags_if")

    # #PF: a read of an unmapped address; cr2 in vcpu_info
    g.resume_at("pf_done")
    a.mov(rcx, UNMAPPED + 0x123)
    a.label("pf_insn")
    a.mov(rax, qword[rcx])
    a.label("pf_done")
    g.report_word("pf_count", "on_pf.count")
    g.report_word("pf_error", "on_pf.frame", 16)
    g.report_address("pf_rip", "on_pf.frame", 24, "pf_insn")
    g.report_word("pf_cr2", "shared_info", CR2)

    # #GP: privileged instructions and port I/O from the ring-3 kernel
    for name, emit in (("cli", lambda: a.cli()), ("hlt", lambda: a.hlt()),
                       ("in", lambda: a.in_(eax, 0x80))):
        g.resume_at(f"{name}_done")
        a.label(f"{name}_insn")
        emit()
        a.label(f"{name}_done")
        g.report_word(f"gp_{name}_error", "on_gp.frame", 16)
        g.report_address(f"gp_{name}_rip", "on_gp.frame", 24, f"{name}_insn")
    g.report_word("gp_count", "on_gp.count")

    # Xen's PV CPUID policy for the host's leaves, and XCR0 through the emulated xsetbv
    def forced_cpuid(case: str, leaf: int, subleaf: int, regs: tuple[str, ...]) -> None:
        a.mov(eax, leaf)
        a.mov(ecx, subleaf)
        a.db(0x0F, 0x0B, 0x78, 0x65, 0x6E, 0x0F, 0xA2)     # ud2; "xen"; cpuid
        for i, reg in enumerate((rax, rbx, rcx, rdx)):     # reporting clobbers them
            a.mov(qword[rip_("cpuid_out", 8 * i)], reg)
        for name in regs:
            g.report_word(f"{case}_{name}", "cpuid_out", 8 * ("eax", "ebx", "ecx", "edx").index(name))
    forced_cpuid("leaf1", 1, 0, ("ecx", "edx"))
    forced_cpuid("ext1", 0x80000001, 0, ("edx",))
    forced_cpuid("xsave0", 0xD, 0, ("eax", "ebx"))
    forced_cpuid("xsave1", 0xD, 1, ("ebx", "ecx"))
    a.db(0x0F, 0x20, 0xE0)                  # mov rax, cr4
    a.or_(rax, 1 << 18)                     # OSXSAVE
    a.db(0x0F, 0x22, 0xE0)                  # mov cr4, rax
    forced_cpuid("xsave0", 0xD, 0, ("eax",))
    a.and_(eax, 7)                          # x87, SSE and AVX where the policy has them
    a.xor(edx, edx)
    a.xor(ecx, ecx)
    a.db(0x0F, 0x01, 0xD1)                  # xsetbv
    a.xor(ecx, ecx)
    a.db(0x0F, 0x01, 0xD0)                  # xgetbv runs natively: the engine's XCR0
    g.report("xgetbv")
    forced_cpuid("xsave0_after", 0xD, 0, ("ebx",))
    forced_cpuid("xsave1_after", 0xD, 1, ("ebx",))
    for name, value in (("xsetbv_no_x87", 2), ("xsetbv_avx_without_sse", 5)):
        g.resume_at(f"{name}_done")
        a.mov(eax, value)
        a.xor(edx, edx)
        a.xor(ecx, ecx)
        a.label(f"{name}_insn")
        a.db(0x0F, 0x01, 0xD1)
        a.label(f"{name}_done")
        g.report_address(f"gp_{name}_rip", "on_gp.frame", 24, f"{name}_insn")
    g.report_word("gp_count_after_xsetbv", "on_gp.count")

    # A non-canonical address: #SS(0) through the stack segment (a base of rsp or rbp),
    # #GP(0) through any other; in 64-bit mode an %ss: or %ds: override changes nothing
    for name, vector, code in (("ss_override", "gp", (0x36, 0x48, 0x8B, 0x03)),    # mov rax, ss:[rbx]
                               ("rbp_base", "ss", (0x48, 0x8B, 0x45, 0x00)),      # mov rax, [rbp]
                               ("ds_override_rbp", "ss", (0x3E, 0x48, 0x8B, 0x45, 0x00))):
        g.resume_at(f"{name}_done")
        a.mov(rbx, 0x8000_0000_4000_0000)
        a.mov(rbp, rbx)
        a.label(f"{name}_insn")
        a.db(*code)
        a.label(f"{name}_done")
        a.xor(rbp, rbp)
        g.report_word(f"{vector}_{name}_error", f"on_{vector}.frame", 16)
        g.report_address(f"{vector}_{name}_rip", f"on_{vector}.frame", 24, f"{name}_insn")
    g.report_word("ss_count", "on_ss.count")
    g.report_word("gp_count_after_noncanonical", "on_gp.count")

    # int $0x80 through trap_table[0x80] (DPL 3): rip after the instruction
    a.int_(0x80)
    a.label("int80_after")
    g.report_word("int80_count", "on_int80.count")
    g.report_address("int80_rip", "on_int80.frame", 16, "int80_after")

    # an event upcall: an IPI to ourselves, delivered on the way back from the send
    g.callback("register_event", C.CALLBACKTYPE_event, "on_event")
    a.section(".data")
    a.align(8)
    a.label("bind_ipi")                     # struct evtchn_bind_ipi: vcpu, port (out)
    a.dd(0)
    a.label("bind_ipi.port")                # ... which is struct evtchn_send's port
    a.dd(0)
    a.section(".text")
    g.call("bind_ipi", "event_channel_op", C.EVTCHNOP_bind_ipi, "bind_ipi")
    a.mov(byte[rip_("shared_info", UPCALL_MASK)], 0)        # unmask: events may come now
    g.report_word("event_count_before", "on_event.count")
    g.call("send", "event_channel_op", C.EVTCHNOP_send, "bind_ipi.port")
    g.report_word("event_count", "on_event.count")
    a.mov(rax, qword[rip_("on_event.frame", 24)])
    a.shr(rax, 32)
    g.report("event_saved_mask")
    a.movzx(eax, byte[rip_("shared_info", UPCALL_MASK)])
    g.report("event_mask_after")

    # guest user mode: one L4 for both, a kernel stack, the syscall callback, then
    # iret to ring 3 user code that makes a syscall
    g.share_l4_with_user_mode(words=("main_rsp",))
    g.callback("register_syscall", C.CALLBACKTYPE_syscall, "on_syscall",
               C.CALLBACKF_mask_events)
    a.mov(qword["main_rsp"], rsp)
    emit_iret_to_user(a, "user_stack_top", "user_code")

    a.label("user_code")                    # ring 3, guest user mode
    a.mov(eax, 0x1234)
    a.label("user_syscall")
    a.syscall()
    a.label("user_after_syscall")
    a.jmp("user_code")                      # not reached: the kernel does not go back

    a.label("on_syscall")                   # guest kernel mode again, on kernel_stack_top
    a.mov(qword["saved_rax"], rax)
    a.mov(qword["syscall_rsp"], rsp)
    for i in range(FRAME_WORDS - 1):
        a.mov(rax, qword[rsp + 8 * i])
        a.mov(qword[rip_("syscall_frame", 8 * i)], rax)
    a.mov(rsp, qword["main_rsp"])
    a.section(".bss")
    a.align(8)
    a.label("syscall_frame")
    a.reserve(FRAME_WORDS * 8)
    a.label("syscall_rsp")
    a.reserve(8)
    a.section(".text")
    g.report_word("syscall_rax", "saved_rax")
    g.report_address("syscall_rip", "syscall_frame", 16, "user_after_syscall")
    g.report_word("syscall_cs", "syscall_frame", 24)
    g.report_address("syscall_rcx", "syscall_frame", 0, "user_after_syscall")
    g.report_address("syscall_user_rsp", "syscall_frame", 40, "user_stack_top")
    g.report_address("syscall_kernel_rsp", "syscall_rsp", 0, "kernel_stack_top")
    a.movzx(eax, byte[rip_("shared_info", UPCALL_MASK)])
    g.report("syscall_mask")

    g.handlers(lambda: (
        g.recording_handler("on_de", False),
        g.recording_handler("on_ss", True),
        g.recording_handler("on_gp", True),
        g.recording_handler("on_pf", True),
        g.recording_handler("on_int80", False),
        event_handler(g),
    ))
    return g.finish()


def event_handler(g: XenPVGuest) -> None:
    """The event callback: records its frame, acknowledges everything pending (the
    2-level ABI's pending flag, selector and port bits), returns with iret."""
    a = g.a
    g.record_frame("on_event", False)
    a.mov(byte[rip_("shared_info", UPCALL_PENDING)], 0)
    a.mov(qword[rip_("shared_info", PENDING_SEL)], 0)
    for i in range(4):
        a.mov(qword[rip_("shared_info", EVTCHN_PENDING + 8 * i)], 0)
    a.mov(rax, qword["saved_rax"])
    g.iret(False)


def iret_then_event_guest() -> GuestImage:
    """Events masked and one pending, then int3: the #BP handler sets IF in its frame
    and returns with the iret hypercall, which unmasks, so the event is delivered on
    the way out, its bounce frame built from the state the iret restored. Reports the
    CS slot of both frames (Xen keeps the interrupted upcall mask above the selector
    there) and how many events came."""
    g = XenPVGuest("iret-then-event")
    a = g.a
    g.map_shared_info()
    g.trap_table("set_trap_table", [(3, 3, "on_bp")])
    g.callback("register_event", C.CALLBACKTYPE_event, "on_event")
    a.mov(byte[rip_("shared_info", UPCALL_MASK)], 1)
    a.mov(byte[rip_("shared_info", UPCALL_PENDING)], 1)
    a.int3()
    g.report_word("bp_count", "on_bp.count")
    g.report_word("bp_frame_cs", "on_bp.frame", 24)
    g.report_word("event_count", "on_event.count")
    g.report_word("event_frame_cs", "on_event.frame", 24)
    a.movzx(eax, byte[rip_("shared_info", UPCALL_MASK)])
    g.report("mask_after")

    def bp_handler() -> None:
        g.record_frame("on_bp", False)
        a.or_(qword[rsp + 32], 0x200)       # IF in the frame: the iret unmasks
        a.mov(rax, qword["saved_rax"])
        g.iret(False)

    g.handlers(lambda: (bp_handler(), event_handler(g)))
    return g.finish()


# The hypervisor's area (cext/pv_cpu.h PV_AREA_VA): the GDT's first page.
PV_AREA_VA = 0xffff878000000000


def region_guest() -> GuestImage:
    """Pokes at the hypervisor's reserved region from the guest kernel: a store into it
    (a #PF for the guest), a hypercall buffer inside it (-EFAULT), and an mmu_update
    of the L4 slot that maps it (-EINVAL)."""
    g = XenPVGuest("pv-region")
    a = g.a
    g.map_shared_info()
    g.trap_table("set_trap_table", [(14, 0, "on_pf")])
    g.resume_at("store_done")
    a.mov(rcx, PV_AREA_VA + 0xe030)
    a.label("store_insn")
    a.mov(qword[rcx], rax)
    a.label("store_done")
    g.report_word("store_count", "on_pf.count")
    g.report_word("store_error", "on_pf.frame", 16)
    g.report_address("store_rip", "on_pf.frame", 24, "store_insn")
    a.mov(rax, qword[rip_("shared_info", CR2)])
    a.mov(rcx, PV_AREA_VA)
    a.sub(rax, rcx)
    g.report("store_cr2")
    g.call("console_from_region", "console_io", C.CONSOLEIO_write, 8, PV_AREA_VA)
    # the M2P is readable: the identity, one u64 per frame
    a.mov(rcx, C.MACH2PHYS_VIRT_START)
    a.mov(rax, qword[rcx + 8 * 0x123])
    g.report("m2p_0x123")
    a.mov(rcx, C.MACH2PHYS_VIRT_START)      # report() keeps only rax
    a.mov(eax, dword[rcx + 8 * 0x7])
    g.report("m2p_0x7_low")
    # and where XENMEM_machphys_mapping says it is (slot 271 here: see pv_cpu.h)
    a.section(".data")
    a.align(8)
    a.label("machphys")                     # struct xen_machphys_mapping
    a.dq(0, 0, 0)
    a.section(".text")
    g.call("machphys_mapping", "memory_op", C.XENMEM_machphys_mapping, "machphys")
    a.mov(rcx, qword["machphys"])
    a.mov(rax, qword[rcx + 8 * 0x123])
    g.report("m2p_window_0x123")
    # mmu_update of L4 slot 256 of the running L4 (pt_base; VIRT_BASE 0: VA = PA)
    a.section(".data")
    a.align(8)
    a.label("slot256")                      # struct mmu_update
    a.dq(0, 0x1000 | 0x7)
    a.section(".text")
    g.start_info_field(rax, "pt_base")
    a.add(rax, 256 * 8)
    a.mov(qword["slot256"], rax)
    g.call("mmu_update_slot256", "mmu_update", "slot256", 1, 0, C.DOMID_SELF)
    g.handlers(lambda: g.recording_handler("on_pf", True))
    return g.finish()


def unhandled_guest() -> GuestImage:
    """An empty trap table, then ud2 at `ud2_insn`: Xen crashes the domain."""
    g = XenPVGuest("pv-unhandled")
    g.print("before\n")
    g.a.label("ud2_insn")
    g.a.ud2()
    g.print("after\n")
    return g.finish()


VGCF_IN_SYSCALL = 0x100


def _to_compat(a, label: str) -> None:
    """64-bit code: flat data segments in DS and ES (compat code, unlike 64-bit code,
    faults on a null one), then a far return to FLAT_RING3_CS32 at label (32-bit code
    follows)."""
    a.mov(eax, C.FLAT_RING3_DS32)
    a.db(0x8E, 0xD8)                                # mov ds, eax
    a.db(0x8E, 0xC0)                                # mov es, eax
    a.push(C.FLAT_RING3_CS32)
    a.lea(rax, ptr[label])
    a.push(rax)
    a.db(0x48, 0xCB)                                # lretq


def _to_user(g: XenPVGuest, user_label: str, resume_kernel: str, cs: int) -> None:
    """From the guest kernel: iret to user code at user_label on the user stack, with
    code selector cs; the 64-bit syscall that ends it resumes the kernel at
    resume_kernel."""
    a = g.a
    a.lea(rax, ptr[resume_kernel])
    a.mov(qword["kernel_next"], rax)
    a.mov(qword["main_rsp"], rsp)
    emit_iret_to_user(a, "user_stack_top", user_label, cs)


def compat_guest() -> GuestImage:
    """32-bit compat-mode user code inside a 64-bit PV guest, as Xen runs it: the kernel
    enters it with the iret hypercall to FLAT_RING3_CS32 (round 1), 64-bit user code
    with an lretq to it (round 2); it leaves with an ljmp to FLAT_RING3_CS64, and calls
    64-bit code with an lcall, which returns with a 32-bit lret (a far jump to a data
    segment is its #GP). In between its 32-bit code (written as bytes: the assembler
    speaks 64-bit code) stores to memory, makes a `syscall` (first with no syscall32
    callback: Xen's #UD at the instruction; then to the syscall32 callback, which returns
    into the compat code through the iret hypercall with VGCF_in_syscall) and an
    `int $0x80` (the trap table's entry). Every frame is recorded for the host side."""
    g = XenPVGuest("pv-compat")
    a = g.a
    g.map_shared_info()
    g.trap_table("set_trap_table", [(6, 0, "on_ud"), (13, 0, "on_gp"), (0x80, 3, "on_int80")])
    g.share_l4_with_user_mode(("user_stack_top", "user_stack2_top"),
                              ("main_rsp", "kernel_next", "compat_word1", "compat_word2",
                               "eax_after_iret", "syscall32_mask", "syscall32_rax",
                               "lcall_return", "esp_after_lret"))
    g.callback("register_syscall", C.CALLBACKTYPE_syscall, "on_syscall64",
               C.CALLBACKF_mask_events)

    # Round 1, no syscall32 callback: the compat syscall is a #UD at the instruction.
    # The kernel enters the compat code itself, flat data segments loaded first (compat
    # code, unlike 64-bit code, faults on a null DS)
    g.resume_at("c1_after_syscall")
    a.mov(eax, C.FLAT_RING3_DS32)
    a.db(0x8E, 0xD8)                                        # mov ds, eax
    a.db(0x8E, 0xC0)                                        # mov es, eax
    _to_user(g, "c1", "kernel1", C.FLAT_RING3_CS32)
    a.label("kernel1")
    g.report_word("compat_store1", "compat_word1")
    g.report_word("ud_count", "on_ud.count")
    g.report_address("ud_rip", "on_ud.frame", 16, "c1_syscall")
    g.report_word("ud_cs", "on_ud.frame", 24)
    g.report_address("ud_rsp", "on_ud.frame", 40, "user_stack_top")
    g.report_word("ud_ss", "on_ud.frame", 48)
    g.report_word("syscall64_1_rax", "saved_rax")
    g.report_address("syscall64_1_rip", "on_syscall64.frame", 16, "user1_after_syscall")
    g.report_word("syscall64_1_cs", "on_syscall64.frame", 24)

    # Round 2: the syscall32 callback (flags 0), int $0x80
    g.callback("register_syscall32", C.CALLBACKTYPE_syscall32, "on_syscall32")
    _to_user(g, "user2", "kernel2", C.FLAT_RING3_CS64)
    a.label("kernel2")
    g.report_word("compat_store2", "compat_word2")
    g.report_word("syscall32_count", "on_syscall32.count")
    g.report_word("syscall32_rax", "syscall32_rax")
    g.report_address("syscall32_rcx", "on_syscall32.frame", 0, "c2_after_syscall")
    g.report_word("syscall32_r11", "on_syscall32.frame", 8)
    g.report_address("syscall32_rip", "on_syscall32.frame", 16, "c2_after_syscall")
    g.report_word("syscall32_cs", "on_syscall32.frame", 24)
    g.report_word("syscall32_rflags", "on_syscall32.frame", 32)
    g.report_address("syscall32_rsp", "on_syscall32.frame", 40, "user_stack2_top")
    g.report_word("syscall32_ss", "on_syscall32.frame", 48)
    g.report_word("syscall32_mask", "syscall32_mask")
    g.report_word("eax_after_iret", "eax_after_iret")
    g.report_word("int80_count", "on_int80.count")
    g.report_address("int80_rip", "on_int80.frame", 16, "c2_after_int80")
    g.report_word("int80_cs", "on_int80.frame", 24)
    g.report_address("int80_rsp", "on_int80.frame", 40, "user_stack2_top")
    g.report_word("int80_ss", "on_int80.frame", 48)
    # lcall from compat code to 64-bit code pushed CS and eip as two dwords; the 64-bit
    # code's 32-bit lret popped them (back on the stack it started from)
    a.mov(rax, qword["lcall_return"])
    a.shr(rax, 32)
    g.report("lcall_cs")
    a.mov(eax, dword["lcall_return"])
    a.lea(rcx, ptr["c2_after_lcall"])
    a.sub(rax, rcx)
    g.report("lcall_eip")
    g.report_address("esp_after_lret", "esp_after_lret", 0, "user_stack2_top")
    # a far jump to a data segment: #GP(selector) at the jump, in compat mode
    g.report_word("gp_count", "on_gp.count")
    g.report_word("gp_error", "on_gp.frame", 16)
    g.report_address("gp_rip", "on_gp.frame", 24, "c2_bad_ljmp")
    g.report_word("gp_cs", "on_gp.frame", 32)
    g.report_word("syscall64_2_rax", "saved_rax")
    g.report_address("syscall64_2_rip", "on_syscall64.frame", 16, "user2_after_syscall")
    g.report_word("syscall64_count", "on_syscall64.count")

    def user_code():                                # guest user mode
        a.label("c1")                                   # 32-bit
        a.db(0xC7, 0x05); a.dd("compat_word1", 0x12345678)  # mov dword [compat_word1], imm32
        a.db(0xB8); a.dd(0xC0DE)                        # mov eax, 0xc0de
        a.label("c1_syscall")
        a.db(0x0F, 0x05)                                # syscall: #UD, resumed after it
        a.label("c1_after_syscall")
        a.db(0xEA); a.dd("user1_back"); a.dw(C.FLAT_RING3_CS64)    # jmp far 0xe033:user1_back
        a.label("user1_back")                           # 64-bit again
        a.mov(eax, 0x64)
        a.syscall()
        a.label("user1_after_syscall")
        a.ud2()                                         # not reached

        a.label("user2")                                # 64-bit
        _to_compat(a, "c2")
        a.label("c2")                                   # 32-bit
        a.db(0xC7, 0x05); a.dd("compat_word2", 0x9ABCDEF0)  # mov dword [compat_word2], imm32
        a.db(0xBC); a.dd("user_stack2_top")             # mov esp, user_stack2_top
        a.db(0xB8); a.dd(0x32)                          # mov eax, 0x32
        a.db(0x0F, 0x05)                                # syscall: the syscall32 callback
        a.label("c2_after_syscall")
        a.db(0xA3); a.dd("eax_after_iret")              # mov [eax_after_iret], eax
        a.db(0xCD, 0x80)                                # int $0x80
        a.label("c2_after_int80")
        a.db(0x9A); a.dd("far64"); a.dw(C.FLAT_RING3_CS64)     # call far 0xe033:far64
        a.label("c2_after_lcall")
        a.db(0x89, 0x25); a.dd("esp_after_lret")        # mov [esp_after_lret], esp
        a.label("c2_bad_ljmp")
        a.db(0xEA); a.dd("c2_after_lcall"); a.dw(C.FLAT_RING3_DS32)    # jmp far to a data segment
        a.label("c2_after_bad_ljmp")                    # (on_gp resumes here)
        a.db(0xEA); a.dd("user2_back"); a.dw(C.FLAT_RING3_CS64)    # jmp far 0xe033:user2_back
        a.label("user2_back")                           # 64-bit again
        a.mov(eax, 0x65)
        a.syscall()
        a.label("user2_after_syscall")
        a.ud2()                                         # not reached

        a.label("far64")                                # 64-bit, called from compat code
        a.mov(rax, qword[rsp])                          # the 32-bit return eip and CS
        a.mov(qword["lcall_return"], rax)
        a.db(0xCB)                                      # lret: a 32-bit far return

    def handlers():
        user_code()
        # #GP from the far jump to a data segment: record, resume after it (compat code)
        g.record_frame("on_gp", True)
        a.lea(rax, ptr["c2_after_bad_ljmp"])
        a.mov(qword[rsp + 24], rax)
        a.mov(rax, qword["saved_rax"])
        g.iret(True)
        g.recording_handler("on_ud", False)
        g.recording_handler("on_int80", False)
        # the 64-bit syscall callback: record, then on in the kernel on its own stack
        g.record_frame("on_syscall64", False)
        a.mov(rsp, qword["main_rsp"])
        a.jmp(qword["kernel_next"])
        # the syscall32 callback: record, then back to the compat code as Xen's sysret
        # would return (VGCF_in_syscall), with eax = 0x7777
        g.record_frame("on_syscall32", False)
        a.mov(rax, qword["saved_rax"])
        a.mov(qword["syscall32_rax"], rax)
        a.movzx(eax, byte[rip_("shared_info", UPCALL_MASK)])
        a.mov(qword["syscall32_mask"], rax)
        a.pop(rcx)
        a.pop(r11)
        a.push(VGCF_IN_SYSCALL)
        a.mov(eax, 0x7777)
        a.jmp("hypercall_iret")
    g.handlers(handlers)
    return g.finish()


COMPAT_XMM_IN = (1, 2, 3, 4)           # dwords of xmm0 before the compat code
COMPAT_XMM_ADD = (10, 20, 30, 40)      # ... of xmm1, which it adds
COMPAT_MXCSR = 0x3F80                  # round down, exceptions masked
COMPAT_R12 = 0x1122_3344_5566_7788     # a register compat code cannot reach


def _abs32(a, prefix: tuple[int, ...], modrm_reg: int, label: str) -> None:
    """prefix bytes, then a ModRM with reg modrm_reg and an absolute 32-bit address
    (64-bit code: mod 00, rm 100 and SIB 0x25, no base, no index)."""
    a.db(*prefix, modrm_reg << 3 | 4, 0x25)
    a.dd(label)


def _rdtsc_to(a, label: str) -> None:
    """64-bit code: the TSC into the qword at label (rax, rdx clobbered)."""
    a.db(0x0F, 0x31)                                # rdtsc
    a.shl(rdx, 32)
    a.or_(rax, rdx)
    a.mov(qword[label], rax)


def compat_roundtrip_guest(rounds: int) -> GuestImage:
    """A round trip into 32-bit compat code, `rounds` times, from a 64-bit PV kernel that
    keeps its state in registers across it. The kernel loads xmm0/xmm1, two values on the
    x87 stack, MXCSR and r12, then enters the compat code with the iret hypercall (ebx =
    rounds, esi = 0). Each round there makes a `syscall`, which the syscall32 callback
    (64-bit kernel code) answers with its call count in eax, returning through the iret
    hypercall; the compat code sums the answers in esi. Then it adds xmm1 to xmm0
    (paddd), adds the two x87 values (faddp), stores esi and MXCSR, and leaves for 64-bit
    user code with an ljmp, whose syscall brings the kernel back: it reports the sum, the
    callback count, xmm0, the x87 result (fstp, a double), MXCSR and r12, and how the TSC
    compat code read compares with the kernel's reads before and after it."""
    g = XenPVGuest("pv-compat-roundtrip")
    a = g.a
    g.share_l4_with_user_mode(("user_stack_top",),
                              ("main_rsp", "kernel_next", "sum_out", "mxcsr_out", "x87_out",
                               "xmm_out", "xmm_out_hi", "r12_out", "s32_count", "tsc_before",
                               "tsc_compat", "tsc_compat_hi", "tsc_after"))
    g.callback("register_syscall", C.CALLBACKTYPE_syscall, "on_syscall64",
               C.CALLBACKF_mask_events)
    g.callback("register_syscall32", C.CALLBACKTYPE_syscall32, "on_syscall32")
    a.section(".data")
    a.align(16)
    a.label("xmm_in")
    a.dd(*COMPAT_XMM_IN)
    a.label("xmm_add")
    a.dd(*COMPAT_XMM_ADD)
    a.label("two")
    a.dq(0x4000_0000_0000_0000)                     # 2.0
    a.label("three")
    a.dq(0x4008_0000_0000_0000)                     # 3.0
    a.label("mxcsr_in")
    a.dd(COMPAT_MXCSR)
    a.section(".text")
    # the state compat code finds, and what it cannot touch
    _abs32(a, (0xF3, 0x0F, 0x6F), 0, "xmm_in")      # movdqu xmm0, [xmm_in]
    _abs32(a, (0xF3, 0x0F, 0x6F), 1, "xmm_add")     # movdqu xmm1, [xmm_add]
    _abs32(a, (0xDD,), 0, "two")                    # fld qword [two]
    _abs32(a, (0xDD,), 0, "three")                  # fld qword [three]
    _abs32(a, (0x0F, 0xAE), 2, "mxcsr_in")          # ldmxcsr [mxcsr_in]
    a.mov(r12, COMPAT_R12)
    _rdtsc_to(a, "tsc_before")
    a.mov(ebx, rounds)
    a.xor(esi, esi)
    _to_user(g, "c_entry", "k_done", C.FLAT_RING3_CS32)
    a.label("k_done")
    _rdtsc_to(a, "tsc_after")
    _abs32(a, (0xF3, 0x0F, 0x7F), 0, "xmm_out")     # movdqu [xmm_out], xmm0
    _abs32(a, (0xDD,), 3, "x87_out")                # fstp qword [x87_out]
    a.mov(qword["r12_out"], r12)
    g.report_word("sum", "sum_out")
    g.report_word("syscall32_count", "s32_count")
    g.report_word("xmm0_low", "xmm_out")
    g.report_word("xmm0_high", "xmm_out_hi")
    g.report_word("x87_sum", "x87_out")
    g.report_word("mxcsr", "mxcsr_out")
    g.report_word("r12", "r12_out")
    # the TSC compat code read (edx:eax), against the kernel's reads before and after
    a.mov(rax, qword["tsc_compat_hi"])
    a.shl(rax, 32)
    a.or_(rax, qword["tsc_compat"])
    a.mov(qword["tsc_compat"], rax)
    a.sub(rax, qword["tsc_before"])
    g.report("tsc_compat_minus_before")
    a.mov(rax, qword["tsc_after"])
    a.sub(rax, qword["tsc_compat"])
    g.report("tsc_after_minus_compat")

    def handlers():
        a.label("c_entry")                              # 32-bit user code
        a.label("c_loop")
        a.db(0xB8); a.dd(0x32)                          # mov eax, 0x32
        a.db(0x0F, 0x05)                                # syscall: the syscall32 callback
        a.db(0x01, 0xC6)                                # add esi, eax
        a.db(0x4B)                                      # dec ebx
        a.db(0x75, 0xF4)                                # jnz c_loop (-12)
        a.db(0x66, 0x0F, 0xFE, 0xC1)                    # paddd xmm0, xmm1
        a.db(0xDE, 0xC1)                                # faddp st(1), st
        a.db(0x89, 0x35); a.dd("sum_out")               # mov [sum_out], esi
        a.db(0x0F, 0xAE, 0x1D); a.dd("mxcsr_out")       # stmxcsr [mxcsr_out]
        a.db(0x0F, 0x31)                                # rdtsc
        a.db(0xA3); a.dd("tsc_compat")                  # mov [tsc_compat], eax
        a.db(0x89, 0x15); a.dd("tsc_compat_hi")         # mov [tsc_compat + 4], edx
        a.db(0xEA); a.dd("c_back"); a.dw(C.FLAT_RING3_CS64)    # jmp far 0xe033:c_back
        a.label("c_back")                               # 64-bit user code
        a.mov(eax, 0x64)
        a.syscall()
        a.ud2()                                         # not reached
        # the 64-bit syscall callback: on in the kernel on its own stack
        a.label("on_syscall64")
        a.mov(rsp, qword["main_rsp"])
        a.jmp(qword["kernel_next"])
        # the syscall32 callback: eax = how many calls so far, back as Xen's sysret
        a.label("on_syscall32")
        a.inc(qword["s32_count"])
        a.mov(rax, qword["s32_count"])
        a.pop(rcx)
        a.pop(r11)
        a.push(VGCF_IN_SYSCALL)
        a.jmp("hypercall_iret")
    g.handlers(handlers)
    return g.finish()


def compat_spin_guest() -> GuestImage:
    """32-bit compat code that waits for an event: the kernel binds VIRQ_DEBUG (the host
    sends it), enters the compat code with the iret hypercall, events unmasked; the
    compat code sets `spinning` and spins until the event callback (64-bit kernel code)
    sets `woken`, then sets `spin_done` and leaves for 64-bit code by ljmp, whose
    syscall brings the kernel back to report the event's count and the CS its frame
    holds (the compat selector it interrupted)."""
    g = XenPVGuest("pv-compat-spin")
    a = g.a
    g.map_shared_info()
    g.share_l4_with_user_mode(("user_stack_top",),
                              ("main_rsp", "kernel_next", "spinning", "woken", "spin_done"))
    g.callback("register_syscall", C.CALLBACKTYPE_syscall, "on_syscall64",
               C.CALLBACKF_mask_events)
    g.callback("register_event", C.CALLBACKTYPE_event, "on_event")
    bind = g.struct("bind_virq", "evtchn_bind_virq", virq=C.VIRQ_DEBUG, vcpu=0)
    g.call("bind_virq", "event_channel_op", C.EVTCHNOP_bind_virq, bind)
    _to_user(g, "spin_entry", "k_done", C.FLAT_RING3_CS32)
    a.label("k_done")
    g.report_word("spin_done", "spin_done")
    g.report_word("event_count", "on_event.count")
    g.report_word("event_cs", "on_event.frame", 24)

    def handlers():
        a.label("spin_entry")                           # 32-bit user code
        a.db(0xC7, 0x05); a.dd("spinning", 1)           # mov dword [spinning], 1
        a.label("spin")
        a.db(0x83, 0x3D); a.dd("woken"); a.db(0)        # cmp dword [woken], 0
        a.db(0x74, 0xF7)                                # je spin
        a.db(0xC7, 0x05); a.dd("spin_done", 1)          # mov dword [spin_done], 1
        a.db(0xEA); a.dd("spin_back"); a.dw(C.FLAT_RING3_CS64)     # jmp far 0xe033:spin_back
        a.label("spin_back")                            # 64-bit user code
        a.mov(eax, 0x64)
        a.syscall()
        a.ud2()                                         # not reached
        a.label("on_syscall64")
        a.mov(rsp, qword["main_rsp"])
        a.jmp(qword["kernel_next"])
        # the event callback: wake the compat code, acknowledge, back into it
        g.record_frame("on_event", False)
        a.mov(qword["woken"], 1)
        a.mov(byte[rip_("shared_info", UPCALL_PENDING)], 0)
        a.mov(qword[rip_("shared_info", PENDING_SEL)], 0)
        for i in range(4):
            a.mov(qword[rip_("shared_info", EVTCHN_PENDING + 8 * i)], 0)
        a.mov(rax, qword["saved_rax"])
        g.iret(False)
    g.handlers(handlers)
    return g.finish()


def _user_fault_handler(g: XenPVGuest, label: str, error_code: bool) -> None:
    """A handler for a fault of user code whose frame may hold Xen's sysenter values
    (rip 0, CS 3, rsp 0): records it, then returns to 64-bit user code at `resume_at`
    on the user stack."""
    a = g.a
    g.record_frame(label, error_code)
    at = 24 if error_code else 16                   # the frame's rip
    a.mov(rax, qword["resume_at"])
    a.mov(qword[rsp + at], rax)
    a.mov(qword[rsp + at + 8], C.FLAT_RING3_CS64)
    a.lea(rax, ptr["user_stack_top"])
    a.mov(qword[rsp + at + 24], rax)
    a.mov(rax, qword["saved_rax"])
    g.iret(error_code)


def sysenter_guest() -> GuestImage:
    """`sysenter` from guest user mode, first with no sysenter callback, then with one.
    Where the CPU runs sysenter in long mode (Intel's) Xen's sysenter_entry bounces a
    frame of rip 0, CS 3, rsp 0, SS FLAT_USER_SS to the callback, or raises #GP(0)
    without one; AMD's CPUs raise #UD at the instruction. The guest reports its CPUID
    vendor and every frame."""
    g = XenPVGuest("pv-sysenter")
    a = g.a
    g.map_shared_info()
    a.xor(eax, eax)
    a.xor(ecx, ecx)
    a.cpuid()
    a.mov(eax, ebx)
    g.report("vendor_ebx")
    g.trap_table("set_trap_table", [(6, 0, "on_ud"), (13, 0, "on_gp")])
    g.share_l4_with_user_mode(words=("main_rsp", "kernel_next", "sysenter_mask"))
    g.callback("register_syscall", C.CALLBACKTYPE_syscall, "on_syscall64")

    # Round 1: no sysenter callback
    g.resume_at("s1_resume")
    _to_user(g, "s1", "kernel1", C.FLAT_RING3_CS64)
    a.label("kernel1")
    for name, frame, error in (("ud", "on_ud", False), ("gp", "on_gp", True)):
        at = 8 if error else 0
        g.report_word(f"{name}_count", f"{frame}.count")
        if error:
            g.report_word(f"{name}_error", f"{frame}.frame", 16)
        g.report_word(f"{name}_rip", f"{frame}.frame", 16 + at)
        g.report_address(f"{name}_rip_from_insn", f"{frame}.frame", 16 + at, "s1_insn")
        g.report_word(f"{name}_cs", f"{frame}.frame", 24 + at)
        g.report_word(f"{name}_rsp", f"{frame}.frame", 40 + at)
        g.report_word(f"{name}_ss", f"{frame}.frame", 48 + at)

    # Round 2: the sysenter callback, masking events
    g.callback("register_sysenter", C.CALLBACKTYPE_sysenter, "on_sysenter",
               C.CALLBACKF_mask_events)
    g.resume_at("s2_resume")
    _to_user(g, "s2", "kernel2", C.FLAT_RING3_CS64)
    a.label("kernel2")
    g.report_word("ud_count_2", "on_ud.count")
    g.report_word("sysenter_count", "on_sysenter.count")
    for i, word in enumerate(("rcx", "r11", "rip", "cs", "rflags", "rsp", "ss")):
        g.report_word(f"sysenter_{word}", "on_sysenter.frame", 8 * i)
    g.report_word("sysenter_mask", "sysenter_mask")

    def code():
        a.label("s1")                                       # guest user mode
        a.label("s1_insn")
        a.db(0x0F, 0x34)                                    # sysenter
        a.label("s1_resume")
        a.syscall()                                         # back to the kernel
        a.label("s2")
        a.mov(ecx, 0x1111)
        a.mov(r11, 0x2222)
        a.db(0x0F, 0x34)                                    # sysenter
        a.label("s2_resume")                                # (after a #UD)
        a.syscall()
        _user_fault_handler(g, "on_ud", False)
        _user_fault_handler(g, "on_gp", True)
        g.record_frame("on_syscall64", False)
        a.mov(rsp, qword["main_rsp"])
        a.jmp(qword["kernel_next"])
        g.record_frame("on_sysenter", False)
        a.movzx(eax, byte[rip_("shared_info", UPCALL_MASK)])
        a.mov(qword["sysenter_mask"], rax)
        a.mov(rsp, qword["main_rsp"])
        a.jmp(qword["kernel_next"])
    g.handlers(code)
    return g.finish()


def remap_then_read_guest() -> bytes:
    """One page of the guest's, `window`, written through its own mapping, then mapped
    over frame_a and frame_b in turn, twice (update_va_mapping with UVMF_INVLPG): after
    each, the guest reads a byte there and console_io writes 8 bytes from `window`,
    which the hypervisor reads through
    the guest's translation as it is now. The console shows "window!\n", then the two
    frames' own lines, twice."""
    from .asm import al, rdi, rsi
    from .runtime import PVProgram

    pte_flags = 0x1 | 0x2 | 0x4 | 0x20 | 0x40       # P RW U A D (U: the kernel is in ring 3)
    p = PVProgram(guest_os="trapless-remap-read")
    a = p.a
    for i, ch in enumerate(b"window!\n"):
        a.mov(byte[rip + "window" + i], ch)
    p.hypercall("console_io", C.CONSOLEIO_write, 8, "window")
    a.xor(ebx, ebx)                                 # the second time round, no
    a.label("remap.loop")                           # new code is translated between
    a.lea(rsi, ptr["frame_a"])                      # VIRT_BASE 0: its address is its frame's
    a.test(ebx, 1)
    a.je("remap.map")
    a.lea(rsi, ptr["frame_b"])
    a.label("remap.map")
    a.or_(rsi, pte_flags)
    a.lea(rdi, ptr["window"])
    p.hypercall("update_va_mapping", rdi, rsi, C.UVMF_INVLPG)
    a.test(rax, rax)
    a.jne("remap.failed")
    a.mov(al, byte[rip + "window"])                 # the guest reads it: in its TLB now
    p.hypercall("console_io", C.CONSOLEIO_write, 8, "window")
    a.inc(ebx)
    a.cmp(ebx, 4)
    a.jne("remap.loop")
    a.xor(eax, eax)
    a.ret()
    a.label("remap.failed")
    a.mov(eax, 1)
    a.ret()
    a.section(".data")
    a.align(4096)
    a.label("frame_a")
    a.db(*b"frame A\n")
    a.align(4096)
    a.label("frame_b")
    a.db(*b"frame B\n")
    a.section(".bss")
    a.align(4096)
    a.label("window")
    a.reserve(4096)
    a.section(".text")
    return p.elf()


def handler_hypercall_guest(rounds: int = 3) -> bytes:
    """`rounds` times: the carry set, then int3 and int $0x81 from guest kernel mode, whose trap
    table handlers each make a hypercall (xen_version) before they return with the iret
    hypercall; after each trap `adc` counts the carry the bounce and the iret kept.
    The handlers store what xen_version returned in `handler_results` (the #BP one at
    +0, int $0x81's at +8) and count themselves (+16, +24); main stores its carry count
    (+32) and a register no trap touches (+40). A hypercall right after a bounce is
    where a hypervisor that bounces without leaving its emulator could lose track of
    the instruction pointer."""
    from .asm import edi, esi, r12, r13
    from .runtime import PVProgram

    p = PVProgram(guest_os="trapless-handler-hypercall")
    a = p.a
    p.hypercall("set_trap_table", "handler_traps")
    a.xor(r12, r12)
    a.mov(rbx, 0x5A5A_1234_5678)
    a.mov(r13, rounds)
    a.label("round")
    a.xor(eax, eax)
    a.cmp(eax, 1)                                   # the carry set: 0 - 1 borrows
    a.int3()
    a.adc(r12, 0)
    a.xor(eax, eax)
    a.cmp(eax, 1)
    a.int_(0x81)
    a.adc(r12, 0)
    a.dec(r13)
    a.jne("round")
    a.mov(qword[rip + "handler_results" + 32], r12)
    a.mov(qword[rip + "handler_results" + 40], rbx)
    a.xor(eax, eax)
    a.ret()
    for name, slot in (("bp", 0), ("int81", 8)):
        a.label(f"on_{name}")
        a.mov(edi, C.XENVER_version)
        a.xor(esi, esi)
        p.a.call("hypercall_xen_version")
        a.mov(qword[rip + "handler_results" + slot], rax)
        a.add(qword[rip + "handler_results" + (16 + slot)], 1)
        emit_bounce_return(p)
    a.section(".data")
    a.align(16)
    a.label("handler_results")
    a.dq(0, 0, 0, 0, 0, 0)
    emit_trap_info(a, "handler_traps", [(3, 3, "on_bp"), (0x81, 3, "on_int81")])  # DPL 3
    a.section(".text")
    return p.elf()


def trap_flags_guest() -> bytes:
    """int3 and int $0x81 from guest kernel mode with the carry and the direction flag
    set, each handler returning with the iret hypercall (whose frame restores both):
    `flags_results` holds, per trap (int3 at +0 and +8, int $0x81 at +16 and +24), the
    flags pushfq sees right after the trap, then after `test` and `cld` have cleared
    the arithmetic flags and DF. An iret that leaves the restored flags anywhere but
    where the CPU's next flag changes reach shows them again in the second."""
    from .runtime import PVProgram

    p = PVProgram(guest_os="trapless-trap-flags")
    a = p.a
    p.hypercall("set_trap_table", "flags_traps")
    for trap, slot in (("int3", 0), ("int81", 16)):
        a.xor(eax, eax)
        a.cmp(eax, 1)                               # CF, SF, AF, PF set: 0 - 1
        a.db(0xFD)                                  # std
        if trap == "int3":
            a.int3()
        else:
            a.int_(0x81)
        a.db(0x9C)                                  # pushfq
        a.pop(qword[rip + "flags_results" + slot])
        a.mov(eax, 1)
        a.test(eax, eax)                            # all of them clear: 1 is positive, odd parity
        a.db(0xFC)                                  # cld
        a.db(0x9C)
        a.pop(qword[rip + "flags_results" + (slot + 8)])
    a.xor(eax, eax)
    a.ret()
    a.label("on_trap")
    a.db(0xFC)                                      # the handler's own string direction
    emit_bounce_return(p)
    a.section(".data")
    a.align(16)
    a.label("flags_results")
    a.dq(0, 0, 0, 0)
    emit_trap_info(a, "flags_traps", [(3, 3, "on_trap"), (0x81, 3, "on_trap")])  # DPL 3
    a.section(".text")
    return p.elf()


def user_mode_gs_guest() -> bytes:
    """Guest user mode reads %gs:0 (its own GS base, set with SEGBASE_GS_USER), then
    enters the kernel three ways: int3 (#BP), int $0x82 (both trap-table entries of DPL
    3) and `syscall` (the syscall callback); each kernel handler reads %gs:0 (the
    kernel's base, SEGBASE_GS_KERNEL) and goes back to user mode with the iret
    hypercall. Every mode switch swaps the GS bases, so the user's reads, after each
    return, and the kernel's see their own words: `gs_results` holds the user's four
    reads at +0..+24 and the kernel's three at +32..+48. A last `syscall` (rax 1)
    powers off. One L4 serves both modes (MMUEXT_NEW_USER_BASEPTR names pt_base)."""
    from .asm import r12
    from .runtime import PVProgram

    p = PVProgram(guest_os="trapless-user-mode-gs")
    a = p.a

    def read_gs0_into(slot: int) -> None:
        a.db(0x65, 0x48, 0x8B, 0x04, 0x25, 0, 0, 0, 0)     # mov rax, gs:[0]
        a.mov(qword[rip + "gs_results" + slot], rax)

    p.hypercall("set_trap_table", "gs_traps")
    p.hypercall("set_segment_base", C.SEGBASE_GS_KERNEL, "kernel_gs_word")
    p.hypercall("set_segment_base", C.SEGBASE_GS_USER, "user_gs_word")
    emit_enter_user_mode(p, "gs_user_code", prefix="gs_")

    a.label("gs_user_code")                         # guest user mode
    read_gs0_into(0)
    a.int3()
    read_gs0_into(8)
    a.int_(0x82)
    read_gs0_into(16)
    a.xor(eax, eax)
    a.syscall()
    read_gs0_into(24)
    a.mov(eax, 1)
    a.syscall()

    for name, slot in (("on_gs_bp", 32), ("on_gs_int82", 40)):
        a.label(name)                               # rcx, r11, then the iret frame
        a.mov(r12, rax)
        read_gs0_into(slot)
        a.mov(rax, r12)
        emit_bounce_return(p)
    emit_syscall_callback(p, "on_gs_syscall", "gs_main_rsp", lambda: read_gs0_into(48))

    a.section(".data")
    a.align(16)
    a.label("gs_results")
    a.dq(0, 0, 0, 0, 0, 0, 0)
    a.label("kernel_gs_word")
    a.dq(0x4B45_524E_454C_0001)
    a.label("user_gs_word")
    a.dq(0x5553_4552_0000_0002)
    # DPL 3: user mode may raise them
    emit_trap_info(a, "gs_traps", [(3, 3, "on_gs_bp"), (0x82, 3, "on_gs_int82")])
    a.label("gs_user_base")                         # struct mmuext_op
    a.dd(C.MMUEXT_NEW_USER_BASEPTR, 0)
    a.dq(0, 0)
    a.label("gs_syscall_callback")                  # struct callback_register
    a.dw(C.CALLBACKTYPE_syscall, 0)
    a.dd(0)
    a.dq("on_gs_syscall")
    a.label("gs_main_rsp")
    a.dq(0)
    a.section(".bss")
    a.align(16)
    a.reserve(4096)
    a.label("gs_kernel_stack_top")
    a.reserve(4096)
    a.label("gs_user_stack_top")
    a.section(".text")
    return p.elf()
