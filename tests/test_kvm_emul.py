"""Ring-0 instructions this host's KVM cannot emulate (KVM_EXIT_INTERNAL_ERROR, suberror 1),
done by trapless instead (cext/kvm_emul.c): a PVH guest runs int3 and cmpxchg16b at CPL 0
and checks what the CPU would have done, exactly. bt runs them itself: the same answers."""
from __future__ import annotations

from guest_kernel.asm import ptr, qword, rax, rbx, rcx, rdi, rdx, r12, rip, rsi, rsp
from guest_kernel.conformance import parse
from guest_kernel.pvh_guest import build_pvh_guest

IRETQ = (0x48, 0xCF)
PUSHFQ_POP_RAX = (0x9C, 0x58)
CMPXCHG16B_RDI = (0x48, 0x0F, 0xC7, 0x0F)          # cmpxchg16b (%rdi)


def emul_code(p) -> None:
    a = p.a

    def result(case: str) -> None:
        a.mov(r12, rax)
        p.print(f"result {case} ")
        a.mov(rdi, r12)
        a.call("print_sdec")
        p.print("\n")

    a.section(".data")
    a.align(16)
    a.label("e_mem")
    a.dq(0, 0, 0, 0)
    for name in ("e_rip", "e_cs", "e_rflags", "e_rsp", "e_err", "e_pre_rsp", "e_flags",
                 "e_rax", "e_rdx"):
        a.label(name)
        a.dq(0)
    a.section(".text")
    a.jmp("e.start")

    # #BP: keep the frame (rip, cs, rflags, rsp) and return to it
    a.label("e_bp")
    for k, name in enumerate(("e_rip", "e_cs", "e_rflags", "e_rsp")):
        a.mov(rax, qword[rsp + 8 * k])
        a.mov(qword[name], rax)
    a.db(*IRETQ)
    # #GP: keep the error code and rip, resume after the 4-byte cmpxchg16b
    a.label("e_gp")
    a.mov(rax, qword[rsp])
    a.mov(qword["e_err"], rax)
    a.mov(rax, qword[rsp + 8])
    a.mov(qword["e_rip"], rax)
    a.add(rsp, 8)
    a.add(qword[rsp], len(CMPXCHG16B_RDI))
    a.db(*IRETQ)

    a.label("e.start")
    a.push(rbx)
    a.push(r12)
    a.mov(rdi, 3)
    a.lea(rsi, ptr["e_bp"])
    a.call("idt_set_gate")
    a.mov(rdi, 13)
    a.lea(rsi, ptr["e_gp"])
    a.call("idt_set_gate")

    # int3 at CPL 0: a trap, the frame's rip is the next instruction
    a.mov(qword["e_pre_rsp"], rsp)
    a.db(0xCC)
    a.label("e.after_int3")
    a.mov(rax, qword["e_rip"])
    a.lea(rcx, ptr["e.after_int3"])
    a.sub(rax, rcx)
    result("int3_rip_minus_next")
    a.mov(rax, qword["e_cs"])
    result("int3_cs")
    a.mov(rax, qword["e_rsp"])
    a.sub(rax, qword["e_pre_rsp"])
    result("int3_rsp_minus_rsp_before")
    a.mov(rax, qword["e_rflags"])
    a.shr(rax, 9)
    a.and_(rax, 1)
    result("int3_if_in_frame")

    # cmpxchg16b, equal: RCX:RBX stored, ZF set
    a.mov(qword[rip + "e_mem" + 0], 0x1111)
    a.mov(qword[rip + "e_mem" + 8], 0x2222)
    a.lea(rdi, ptr["e_mem"])
    a.mov(rax, 0x1111)
    a.mov(rdx, 0x2222)
    a.mov(rbx, 0x3333)
    a.mov(rcx, 0x4444)
    a.db(*CMPXCHG16B_RDI)
    a.db(*PUSHFQ_POP_RAX)
    a.shr(rax, 6)
    a.and_(rax, 1)
    result("equal_zf")
    a.mov(rax, qword["e_mem"])
    result("equal_mem_lo")
    a.mov(rax, qword[rip + "e_mem" + 8])
    result("equal_mem_hi")

    # different: memory loaded into RDX:RAX, ZF clear, memory kept
    a.lea(rdi, ptr["e_mem"])
    a.mov(rax, 0x5555)
    a.mov(rdx, 0x6666)
    a.mov(rbx, 0x7777)
    a.mov(rcx, 0x8888)
    a.db(*CMPXCHG16B_RDI)
    a.mov(qword["e_rax"], rax)
    a.mov(qword["e_rdx"], rdx)
    a.db(*PUSHFQ_POP_RAX)
    a.shr(rax, 6)
    a.and_(rax, 1)
    result("different_zf")
    a.mov(rax, qword["e_rax"])
    result("different_rax")
    a.mov(rax, qword["e_rdx"])
    result("different_rdx")
    a.mov(rax, qword["e_mem"])
    result("different_mem_lo")

    # not 16-byte aligned: #GP(0) at the instruction, memory untouched
    a.lea(rdi, ptr[rip + "e_mem" + 8])
    a.mov(qword["e_err"], -1)
    a.db(0x90)
    a.label("e.misaligned")
    a.db(*CMPXCHG16B_RDI)
    a.mov(rax, qword["e_err"])
    result("misaligned_gp_error")
    a.mov(rax, qword["e_rip"])
    a.lea(rcx, ptr["e.misaligned"])
    a.sub(rax, rcx)
    result("misaligned_rip_minus_insn")
    a.mov(rax, qword[rip + "e_mem" + 8])
    result("misaligned_mem")
    a.pop(r12)
    a.pop(rbx)


def test_int3_and_cmpxchg16b_at_cpl0(engine, run_guest):
    image = build_pvh_guest(vmcall=False, extra=emul_code)
    stop, out, _ = run_guest(image, timeout=120)
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "poweroff"), (stop, out)
    r, _ = parse(out)
    assert r == {
        "int3_rip_minus_next": 0, "int3_cs": 0x08, "int3_rsp_minus_rsp_before": 0,
        "int3_if_in_frame": 1,
        "equal_zf": 1, "equal_mem_lo": 0x3333, "equal_mem_hi": 0x4444,
        "different_zf": 0, "different_rax": 0x3333, "different_rdx": 0x4444,
        "different_mem_lo": 0x3333,
        "misaligned_gp_error": 0, "misaligned_rip_minus_insn": 0, "misaligned_mem": 0x4444,
    }, out
