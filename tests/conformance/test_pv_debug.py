"""Debug exceptions of Xen's PV model: data, instruction and I/O breakpoints and
single-step, each a #DB through the guest's trap table with the bits the CPU sets in
the guest's DR6 (get_debugreg 6). A data breakpoint and single-step are traps (the
frame's rip is past the instruction), an instruction breakpoint a fault (at it, until
the handler sets RF). bt plays the CPU's part (bt_debug.c); I/O breakpoints are the
PV model's own on both engines, as the guest's port I/O is always emulated (pv_emul.c).
kvm steps the guest with the CPU's TF while a breakpoint is armed (pv_debug.c): this
KVM-PVM host takes neither KVM_SET_DEBUGREGS nor KVM_SET_GUEST_DEBUG, so trapless
decodes each instruction and works out what it hits; that TF must never show in what
the guest sees of its rflags."""
import pytest

from abi import C

from guest_kernel.asm import byte, dword, ecx, qword, rax, rbx, rcx, rdi, rdx, rsi, rsp
from guest_kernel.xen_pv import XenPVGuest, rip_

RW_EXEC, RW_WRITE, RW_IO, RW_READ_WRITE = 0, 1, 2, 3
LEN1, LEN2, LEN8, LEN4 = 0, 1, 2, 3
DR6_DEFAULT = 0xFFFF0FF0
DR6_BS = 1 << 14
CR4_DE = 1 << 3
RFLAGS_TF, RFLAGS_RF = 1 << 8, 1 << 16
FRAME_RFLAGS = 32                           # rcx, r11, rip, cs, rflags: its offset


def dr7(i: int, rw: int, length: int) -> int:
    """G<i> with its R/W and LEN fields."""
    return (2 << (2 * i)) | (rw << (16 + 4 * i)) | (length << (18 + 4 * i))


def set_dr_to(g: XenPVGuest, case: str, reg: int, label: str, offset: int = 0) -> None:
    g.a.lea(rax, g.ptr(label))
    if offset:
        g.a.add(rax, offset)
    g.hypercall_regs(case, "set_debugreg", reg, rax)


def handler_changing_rflags(g: XenPVGuest, label: str, op: str, bits: int) -> None:
    """A #DB handler that records its frame, then ORs in (or ANDs out) bits of the
    frame's rflags before returning: RF to get past an instruction breakpoint, TF off
    to end a single-step."""
    a = g.a
    g.record_frame(label, False)
    if op == "or":
        a.or_(qword[rsp + FRAME_RFLAGS], bits)
    else:
        a.and_(qword[rsp + FRAME_RFLAGS], ~bits)
    a.mov(rax, qword["saved_rax"])
    g.iret(False)


def test_data_breakpoints(run_cases):
    g = XenPVGuest("data_breakpoints")
    g.trap_table("traps", [(1, 0, "on_db")])
    # write-only, 4 bytes: a read passes, a write traps after the store
    set_dr_to(g, "set_dr0", 0, "watch")
    g.call("set_dr7_w4", "set_debugreg", 7, dr7(0, RW_WRITE, LEN4))
    g.a.mov(ecx, dword["watch"])
    g.report_word("count_after_read", "on_db.count")
    g.a.mov(dword["watch"], ecx)
    g.a.label("after_write")
    g.report_word("count_after_write", "on_db.count")
    g.report_address("write_trap_rip", "on_db.frame", 16, "after_write")
    g.call("dr6_after_write", "get_debugreg", 6)
    # read/write, 8 bytes at watch+8: a read of its last 4 bytes
    set_dr_to(g, "set_dr1", 1, "watch", 8)
    g.call("set_dr7_rw8", "set_debugreg", 7, dr7(1, RW_READ_WRITE, LEN8))
    g.a.mov(ecx, dword[rip_("watch", 12)])
    g.report_word("count_after_rw8_read", "on_db.count")
    g.call("dr6_after_rw8", "get_debugreg", 6)
    # 2 bytes named by an odd address: aligned down to watch+0x10; a store of
    # 0x0e..0x11 overlaps it, one of 0x12..0x15 does not
    set_dr_to(g, "set_dr2", 2, "watch", 0x11)
    g.call("set_dr7_w2", "set_debugreg", 7, dr7(2, RW_WRITE, LEN2))
    g.a.mov(dword[rip_("watch", 0x12)], ecx)
    g.report_word("count_after_miss", "on_db.count")
    g.a.mov(dword[rip_("watch", 0x0e)], ecx)
    g.report_word("count_after_overlap", "on_db.count")
    g.call("dr6_after_w2", "get_debugreg", 6)
    # 1 byte: the byte after it is not it
    set_dr_to(g, "set_dr3", 3, "watch", 0x20)
    g.call("set_dr7_w1", "set_debugreg", 7, dr7(3, RW_WRITE, LEN1))
    g.a.mov(dword[rip_("watch", 0x21)], ecx)
    g.report_word("count_after_next_byte", "on_db.count")
    # a store the model emulates: mov %ss, 0x30(%rax) into a 2-byte write breakpoint
    set_dr_to(g, "set_dr0_ss", 0, "watch", 0x30)
    g.call("set_dr7_w2_ss", "set_debugreg", 7, dr7(0, RW_WRITE, LEN2))
    g.a.db(0x8C, 0xD0)                         # mov %ss, %eax: what the store should store
    g.a.mov(qword["ss_now"], rax)
    g.a.lea(rax, g.ptr("watch"))
    g.a.db(0x8C, 0x50, 0x30)
    g.a.label("after_ss_store")
    g.report_word("count_after_ss_store", "on_db.count")
    g.report_address("ss_store_trap_rip", "on_db.frame", 16, "after_ss_store")
    g.report_word("ss_stored", "watch", 0x30)
    g.report_word("ss_now", "ss_now")
    g.call("dr7_off", "set_debugreg", 7, 0)
    g.a.mov(dword["watch"], ecx)
    g.report_word("count_disabled", "on_db.count")
    g.a.section(".data")
    g.a.align(64)
    g.a.label("watch")
    g.a.db(*([0] * 64))
    g.a.label("ss_now")
    g.a.dq(0)
    g.a.section(".text")
    g.handlers(lambda: g.recording_handler("on_db", False))
    run = run_cases(g.finish())
    assert run["set_dr7_w4"] == 0
    assert run["count_after_read"] == 0
    assert run["count_after_write"] == 1
    assert run["write_trap_rip"] == 0
    assert run["dr6_after_write"] == DR6_DEFAULT | 0x1
    assert run["count_after_rw8_read"] == 2
    assert run["dr6_after_rw8"] == DR6_DEFAULT | 0x2
    assert run["count_after_miss"] == 2
    assert run["count_after_overlap"] == 3
    assert run["dr6_after_w2"] == DR6_DEFAULT | 0x4
    assert run["count_after_next_byte"] == 3
    assert run["count_after_ss_store"] == 4
    assert run["ss_store_trap_rip"] == 0
    # the selector `mov %ss, %eax` reads: Xen's FLAT_KERNEL_SS on bt; on kvm ring 3 runs
    # on this KVM-PVM host's own selectors, and a native `mov` from %ss reads those
    assert run["ss_stored"] & 0xFFFF == run["ss_now"] & 0xFFFF
    if run.engine == "bt":
        assert run["ss_now"] & 0xFFFF == C.FLAT_KERNEL_SS
    assert run["count_disabled"] == 4


def test_instruction_breakpoint_and_single_step(run_cases):
    g = XenPVGuest("instruction_breakpoint")
    g.trap_table("traps", [(1, 0, "on_bp")])
    set_dr_to(g, "set_dr3", 3, "bp_here")
    g.call("set_dr7_x", "set_debugreg", 7, dr7(3, RW_EXEC, LEN1))
    g.a.label("bp_here")
    g.a.nop()
    g.report_word("bp_count", "on_bp.count")
    g.report_address("bp_fault_rip", "on_bp.frame", 16, "bp_here")
    g.call("dr6_after_bp", "get_debugreg", 6)
    g.call("dr7_off", "set_debugreg", 7, 0)
    # TF by popf: the instruction after it runs, then a #DB trap with BS
    g.trap_table("traps_tf", [(1, 0, "on_step")])
    g.a.db(0x9C)                               # pushfq
    g.a.or_(qword[rsp], RFLAGS_TF)
    g.a.db(0x9D)                               # popfq
    g.a.nop()
    g.a.label("after_first")
    g.a.nop()
    g.report_word("step_count", "on_step.count")
    g.report_address("step_trap_rip", "on_step.frame", 16, "after_first")
    g.call("dr6_after_step", "get_debugreg", 6)
    # an instruction the model emulates under TF: a popf that clears it still traps
    g.a.db(0x9C)                               # flags without TF, for the second popfq
    g.a.db(0x9C)
    g.a.or_(qword[rsp], RFLAGS_TF)
    g.a.db(0x9D)                               # TF on
    g.a.db(0x9D)                               # TF off: a trap after it
    g.a.label("after_popf")
    g.report_word("popf_step_count", "on_step.count")
    g.report_address("popf_trap_rip", "on_step.frame", 16, "after_popf")
    g.handlers(lambda: (handler_changing_rflags(g, "on_bp", "or", RFLAGS_RF),
                        handler_changing_rflags(g, "on_step", "and", RFLAGS_TF)))
    run = run_cases(g.finish())
    assert run["set_dr7_x"] == 0
    assert run["bp_count"] == 1
    assert run["bp_fault_rip"] == 0
    assert run["dr6_after_bp"] == DR6_DEFAULT | 0x8
    assert run["step_count"] == 1
    assert run["step_trap_rip"] == 0
    assert run["dr6_after_step"] == DR6_DEFAULT | DR6_BS
    assert run["popf_step_count"] == 2
    assert run["popf_trap_rip"] == 0


def test_io_breakpoint(run_cases):
    """CR4.DE and an I/O breakpoint on ports 0x80-0x83: an `in` from 0x82 traps after
    it with B1, one from 0x84 does not (both engines: the model emulates port I/O)."""
    g = XenPVGuest("io_breakpoint")
    g.trap_table("traps", [(1, 0, "on_db")])
    g.struct("iopl1", "physdev_set_iopl", iopl=1)
    g.call("set_iopl_1", "physdev_op", C.PHYSDEVOP_set_iopl, "iopl1")
    g.a.db(0x0F, 0x20, 0xE0)                   # mov %cr4, %rax
    g.a.or_(rax, CR4_DE)
    g.a.db(0x0F, 0x22, 0xE0)                   # mov %rax, %cr4
    g.call("set_dr1", "set_debugreg", 1, 0x80)
    g.call("set_dr7_io4", "set_debugreg", 7, dr7(1, RW_IO, LEN4))
    g.a.mov(rdx, 0x84)
    g.a.db(0xEC)                               # in (%dx), %al
    g.report_word("count_after_0x84", "on_db.count")
    g.a.mov(rdx, 0x82)
    g.a.db(0xEC)
    g.a.label("after_in")
    g.report_word("count_after_0x82", "on_db.count")
    g.report_address("io_trap_rip", "on_db.frame", 16, "after_in")
    g.call("dr6_after_io", "get_debugreg", 6)
    g.handlers(lambda: g.recording_handler("on_db", False))
    run = run_cases(g.finish())
    assert run["set_iopl_1"] == 0
    assert run["set_dr7_io4"] == 0
    assert run["count_after_0x84"] == 0
    assert run["count_after_0x82"] == 1
    assert run["io_trap_rip"] == 0
    assert run["dr6_after_io"] == DR6_DEFAULT | 0x2


RFLAGS_IF = 1 << 9


def test_breakpoint_stepping_is_invisible(run_cases):
    """With a data breakpoint armed (kvm steps the guest with the CPU's TF): pushf, a
    hypercall's return and the #DB and #UD bounce frames show the guest's own rflags,
    TF clear; the #DB frame holds exactly the flags of the instruction it trapped after.
    With the guest's own TF set as well, one #DB carries both B0 and BS."""
    g = XenPVGuest("stepping_invisible")
    a = g.a
    g.trap_table("traps", [(1, 0, "on_db"), (6, 0, "on_ud")])
    set_dr_to(g, "set_dr0", 0, "watch")
    g.call("set_dr7_w8", "set_debugreg", 7, dr7(0, RW_WRITE, LEN8))
    a.db(0x9C)                                 # pushfq
    a.db(0x5A)                                 # pop %rdx
    a.mov(qword["flags_pushed"], rdx)
    a.mov(qword["watch"], rdx)                 # the write breakpoint: a #DB after it
    a.label("after_write")
    g.report_word("flags_pushed", "flags_pushed")
    g.report_word("db_count", "on_db.count")
    g.report_address("db_rip", "on_db.frame", 16, "after_write")
    g.report_word("db_flags", "on_db.frame", 32)
    g.call("dr6_after_write", "get_debugreg", 6)
    g.call("version", "xen_version", 0)        # a hypercall while stepping
    a.db(0x9C)
    a.db(0x5A)
    a.mov(rax, rdx)
    g.report("flags_after_hypercall")
    g.resume_at("after_ud")
    a.ud2()
    a.label("after_ud")
    g.report_word("ud_count", "on_ud.count")
    g.report_word("ud_flags", "on_ud.frame", 32)
    # the guest's own TF on top: the store's #DB has B0 and BS; the popf clearing TF
    # traps once more (BS only)
    g.call("dr6_clear", "set_debugreg", 6, 0)
    a.db(0x9C)
    a.db(0x9C)
    a.or_(qword[rsp], RFLAGS_TF)
    a.db(0x9D)                                 # TF on
    a.mov(qword["watch"], rdx)
    a.label("after_tf_write")
    a.db(0x9D)                                 # TF off: a trap after it
    g.report_word("tf_db_count", "on_db.count")
    g.call("dr6_after_tf_write", "get_debugreg", 6)
    g.call("dr7_off", "set_debugreg", 7, 0)
    a.section(".data")
    a.align(8)
    a.label("watch")
    a.dq(0)
    a.label("flags_pushed")
    a.dq(0)
    a.section(".text")
    g.handlers(lambda: (g.recording_handler("on_db", False),
                        g.recording_handler("on_ud", False)))
    run = run_cases(g.finish())
    assert run["set_dr7_w8"] == 0
    assert run["flags_pushed"] & RFLAGS_TF == 0
    assert run["db_count"] == 1
    assert run["db_rip"] == 0
    assert run["db_flags"] & ~RFLAGS_IF == run["flags_pushed"] & ~RFLAGS_IF
    assert run["dr6_after_write"] == DR6_DEFAULT | 0x1
    assert run["version"] == (4 << 16) | 19
    assert run["flags_after_hypercall"] & RFLAGS_TF == 0
    assert run["ud_count"] == 1
    assert run["ud_flags"] & RFLAGS_TF == 0
    assert run["tf_db_count"] == 3
    assert run["dr6_after_tf_write"] == DR6_DEFAULT | DR6_BS
    assert run["dr7_off"] == 0


def step_logging_handler(g: XenPVGuest, label: str) -> None:
    """A #DB handler that records each trap's rip by its count (1, 2, ...) into
    rips[count - 1] (8 slots), leaving TF as the frame has it."""
    a = g.a
    a.section(".bss")
    a.align(8)
    a.label("rips")
    a.reserve(64)
    a.section(".text")
    g.record_frame(label, False)
    a.mov(rax, qword[f"{label}.count"])
    a.and_(rax, 7)
    a.lea(rdx, g.ptr("rips"))
    a.db(0x48, 0x8B, 0x4C, 0x24, 0x10)         # mov 0x10(%rsp), %rcx: the frame's rip
    a.db(0x48, 0x89, 0x4C, 0xC2, 0xF8)         # mov %rcx, -8(%rdx,%rax,8)
    a.mov(rax, qword["saved_rax"])
    g.iret(False)


def test_emulated_instruction_under_tf_traps_after_it(run_cases):
    """An instruction the PV model emulates after a #GP (`mov %cr0, %rax`) or a #UD
    (the forced-emulation `cpuid`) ends as the CPU would end it under the guest's TF:
    a #DB trap after it with BS, as Xen's emulator injects one."""
    g = XenPVGuest("emulated_under_tf")
    a = g.a
    g.trap_table("traps", [(1, 0, "on_step")])
    a.db(0x9C)                                 # flags without TF, for the last popfq
    a.db(0x9C)
    a.or_(qword[rsp], RFLAGS_TF)
    a.db(0x9D)                                 # TF on: a trap after the next one
    a.label("mov_cr0")
    a.db(0x0F, 0x20, 0xC0)                     # mov %cr0, %rax: #GP, emulated
    a.label("after_mov_cr0")
    a.db(0x0F, 0x0B, 0x78, 0x65, 0x6E)         # ud2; .ascii "xen"
    a.cpuid()
    a.label("after_cpuid")
    a.db(0x9D)                                 # TF off: a trap after it
    a.label("after_popf")
    g.report_word("step_count", "on_step.count")
    g.report_address("last_trap_rip", "on_step.frame", 16, "after_popf")
    g.report_address("cpuid_trap_rip", "rips", 8, "after_cpuid")
    g.report_address("mov_cr0_trap_rip", "rips", 0, "after_mov_cr0")
    g.call("dr6", "get_debugreg", 6)
    g.handlers(lambda: step_logging_handler(g, "on_step"))
    run = run_cases(g.finish())
    assert run["step_count"] == 3
    assert run["mov_cr0_trap_rip"] == 0
    assert run["cpuid_trap_rip"] == 0
    assert run["last_trap_rip"] == 0
    assert run["dr6"] == DR6_DEFAULT | DR6_BS


def test_mov_ss_shadow_holds_the_db(run_cases):
    """A `mov` to %ss from a watched word holds its #DB until the next instruction is
    done (the CPU's shadow): one trap after that one, with B0. When the next one is a
    hypercall (`syscall`), the #DB would come in the hypervisor, and is dropped, as
    Xen's do_debug drops it since XSA-260."""
    g = XenPVGuest("mov_ss_shadow")
    a = g.a
    g.trap_table("traps", [(1, 0, "on_db")])
    a.lea(rbx, g.ptr("ss_word"))
    a.db(0x8C, 0x13)                           # mov %ss, (%rbx)
    set_dr_to(g, "set_dr0", 0, "ss_word")
    g.call("set_dr7_rw2", "set_debugreg", 7, dr7(0, RW_READ_WRITE, LEN2))
    a.lea(rbx, g.ptr("ss_word"))
    a.db(0x8E, 0x13)                           # mov (%rbx), %ss
    a.label("in_shadow")
    a.nop()
    a.label("after_shadow")
    g.report_word("count_after_nop", "on_db.count")
    g.report_address("trap_rip", "on_db.frame", 16, "after_shadow")
    g.call("dr6_after_nop", "get_debugreg", 6)
    g.call("dr6_clear", "set_debugreg", 6, 0)
    a.mov(rax, C.__HYPERVISOR_xen_version)
    a.mov(rdi, C.XENVER_version)
    a.lea(rbx, g.ptr("ss_word"))
    a.db(0x8E, 0x13)                           # mov (%rbx), %ss
    a.db(0x0F, 0x05)                           # syscall: xen_version in the shadow
    g.report("version_in_shadow")
    g.report_word("count_after_syscall", "on_db.count")
    g.call("dr6_after_syscall", "get_debugreg", 6)
    g.call("dr7_off", "set_debugreg", 7, 0)
    a.section(".data")
    a.align(8)
    a.label("ss_word")
    a.dq(0)
    a.section(".text")
    g.handlers(lambda: g.recording_handler("on_db", False))
    run = run_cases(g.finish())
    assert run["set_dr7_rw2"] == 0
    assert run["count_after_nop"] == 1
    assert run["trap_rip"] == 0
    assert run["dr6_after_nop"] == DR6_DEFAULT | 0x1
    assert run["version_in_shadow"] == (4 << 16) | 19
    assert run["count_after_syscall"] == 1
    assert run["dr6_after_syscall"] == DR6_DEFAULT
    assert run["dr7_off"] == 0


def test_data_breakpoints_see_each_kind_of_access(run_cases):
    """One #DB per instruction whose accesses overlap a watched range, none for the
    others: reads and writes through a ModRM operand (mov, add, xchg, movzx, lea that
    touches nothing), the stack (push, call, pushf write; pop, ret read) and a string
    instruction, one element a step (rep movsb). bt sees the accesses TCG makes; kvm
    works them out from the decoded instruction: both must count the same."""
    g = XenPVGuest("access_kinds")
    a = g.a
    g.trap_table("traps", [(1, 0, "on_db")])
    set_dr_to(g, "set_dr0", 0, "w")                    # w: read/write, 8 bytes
    set_dr_to(g, "set_dr1", 1, "x")                    # x: write, 8 bytes
    a.lea(rax, qword[rsp - 8])                         # the next stack slot: write
    g.hypercall_regs("set_dr2", "set_debugreg", 2, rax)
    set_dr_to(g, "set_dr3", 3, "dst", 5)               # dst+5: write, 1 byte
    g.call("set_dr7", "set_debugreg", 7,
           dr7(0, RW_READ_WRITE, LEN8) | dr7(1, RW_WRITE, LEN8) | dr7(2, RW_WRITE, LEN8) |
           dr7(3, RW_WRITE, LEN1))
    steps = []

    def count(name):
        """the #DB count after the instruction before: a result of its own"""
        a.mov(rax, qword["on_db.count"])
        a.mov(qword[rip_("counts", 8 * len(steps))], rax)
        steps.append(name)

    count("base")                              # set_dr7's report made calls: hits
    a.mov(rcx, qword["w"]); count("read_w")
    a.mov(qword["x"], rcx); count("write_x")
    a.mov(rcx, qword["x"]); count("read_x")
    a.add(qword["w"], rcx); count("add_w")
    a.lea(rcx, qword["w"]); count("lea_w")
    a.xchg(qword["x"], rcx); count("xchg_x")
    a.movzx(ecx, byte[rip_("w", 3)]); count("movzx_w3")
    a.push(rax); count("push")
    a.pop(rax); count("pop")
    a.call("callee"); count("call_ret")
    a.db(0x9C); count("pushf")
    a.db(0x9D); count("popf")
    a.lea(rsi, g.ptr("src"))
    a.lea(rdi, g.ptr("dst"))
    a.mov(rcx, 16)
    a.db(0xF3, 0xA4); count("rep_movsb")
    g.call("dr7_off", "set_debugreg", 7, 0)
    for i, name in enumerate(steps):
        g.report_word(name, "counts", 8 * i)
    a.section(".data")
    a.align(8)
    for label in ("w", "x"):
        a.label(label)
        a.dq(0)
    a.label("src")
    a.db(*range(16))
    a.label("dst")
    a.db(*([0] * 16))
    a.label("counts")
    a.db(*([0] * 8 * 16))
    a.section(".text")

    def out_of_line():
        g.recording_handler("on_db", False)
        a.label("callee")
        a.ret()
    g.handlers(out_of_line)
    run = run_cases(g.finish())
    assert run["set_dr7"] == 0
    expected = {"read_w": 1, "write_x": 2, "read_x": 2, "add_w": 3, "lea_w": 3,
                "xchg_x": 4, "movzx_w3": 5, "push": 6, "pop": 6, "call_ret": 7,
                "pushf": 8, "popf": 8, "rep_movsb": 9}
    assert {name: run[name] - run["base"] for name in expected} == expected


def test_tf_over_a_hypercall(run_cases):
    """The guest's TF across a hypercall (`syscall` in guest kernel mode): no #DB for
    the syscall itself (in Xen it comes at the hypervisor's entry point, and do_debug
    drops it); the guest returns with TF and traps after its next instruction."""
    g = XenPVGuest("tf_over_hypercall")
    a = g.a
    g.trap_table("traps", [(1, 0, "on_step")])
    a.db(0x9C)                                 # flags without TF, for the last popfq
    a.db(0x9C)
    a.or_(qword[rsp], RFLAGS_TF)
    a.db(0x9D)                                 # TF on
    a.mov(rax, C.__HYPERVISOR_xen_version)
    a.label("at_mov_rdi")
    a.mov(rdi, C.XENVER_version)
    a.label("at_syscall")
    a.db(0x0F, 0x05)
    a.label("after_syscall")
    a.mov(rbx, rax)
    a.label("after_mov")
    a.db(0x9D)                                 # TF off: a trap after it
    a.label("after_popf")
    a.mov(rax, rbx)
    g.report("version")
    g.report_word("step_count", "on_step.count")
    for i, label in enumerate(("at_mov_rdi", "at_syscall", "after_mov", "after_popf")):
        g.report_address(f"trap_{i + 1}_at_{label}", "rips", 8 * i, label)
    g.handlers(lambda: step_logging_handler(g, "on_step"))
    run = run_cases(g.finish())
    assert run["version"] == (4 << 16) | 19
    assert run["step_count"] == 4
    for i, label in enumerate(("at_mov_rdi", "at_syscall", "after_mov", "after_popf")):
        assert run[f"trap_{i + 1}_at_{label}"] == 0
