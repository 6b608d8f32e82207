"""The hypercall fuzzer: a guest that makes N hypercalls with random numbers, sub-ops
and arguments from a seeded PRNG (xorshift64), and checks what came back.

Arguments aim at the interesting places: null, a scratch buffer, the end of the
mapped region (a straddling buffer), the page-table pool, non-canonical and unmapped
addresses, random 64-bit values and small integers. A few calls would end or wedge a
well-behaved guest by design (shutdown or taking its only vCPU down, block/poll
forever, moving shared_info over its own code, changing its upcall vector, under Xen's
PV model an iret through a random frame); those are steered to harmless calls, and the page-table, trap-table,
callback and grant-table hypercalls only get pointers that cannot name valid requests.

At the end the guest reports, one `result` line each: calls made, results that are
neither a success nor a Xen errno, whether its own code, read-only data and a canary
block changed, and a digest of every result (same seed, same digest: a failure
replays exactly).
"""
from __future__ import annotations

from abi import C, ERRNO_NAMES

from .asm import (byte, eax, ebx, ecx, edx, ptr, qword, r8, r9, r10, r12, r13, r14, r15, rax,
                  rbx, rcx, rdi, rdx, rsi)
from .conformance import MAPPED_END, NON_CANONICAL, UNMAPPED, ConformanceGuest

NUMBERS = 48                    # 0..47: every Xen number and a few beyond the table
CANARY = 4096
SCRATCH = 512
# Hypercalls that get only pointers which cannot be valid requests (for the trap table
# and callbacks: no random handler is installed for the events and faults to come).
# grant_table_op is one: like Xen it writes each op of the array back, so a random
# pointer and count would overwrite the guest's own memory op by op.
POINTER_SAFE_ONLY = {C.__HYPERVISOR_mmu_update, C.__HYPERVISOR_mmuext_op, C.__HYPERVISOR_multicall,
                     C.__HYPERVISOR_set_trap_table, C.__HYPERVISOR_callback_op,
                     C.__HYPERVISOR_grant_table_op}
# Under Xen's PV CPU model these would wreck the guest by design, and become xen_version:
# iret returns through a random frame; set_callbacks takes handler addresses, not
# pointers; a debug register or CR0.TS set at random traps the guest's next instruction.
XEN_MODEL_STEERED = {C.__HYPERVISOR_iret, C.__HYPERVISOR_set_callbacks,
                     C.__HYPERVISOR_set_debugreg, C.__HYPERVISOR_fpu_taskswitch}
# sched_op sub-ops a live guest must not be handed at random; they become yield.
SCHED_STEERED = {C.SCHEDOP_block, C.SCHEDOP_shutdown, C.SCHEDOP_poll, C.SCHEDOP_shutdown_code}


def fuzz_guest(seed: int, calls: int) -> bytes:
    g = ConformanceGuest("fuzz")
    a = g.a
    a.section(".data")
    a.align(8)
    a.label("rng")
    a.dq(seed or 1)
    a.label("errno_ok")             # byte per errno 0..127: 1 if Xen defines it
    a.db(bytes(1 if n in ERRNO_NAMES else 0 for n in range(128)))
    a.label("canary")
    a.db(bytes((i * 37 + 11) & 0xFF for i in range(CANARY)))
    a.label("canary_end")
    a.section(".bss")
    a.align(4096)
    a.label("fuzz_scratch")
    a.reserve(SCRATCH)
    a.section(".text")

    # rand -> rax (xorshift64); clobbers rcx
    a.jmp("fuzz.start")
    a.label("rand")
    a.mov(rax, qword["rng"])
    a.mov(rcx, rax)
    a.shl(rcx, 13)
    a.xor(rax, rcx)
    a.mov(rcx, rax)
    a.shr(rcx, 7)
    a.xor(rax, rcx)
    a.mov(rcx, rax)
    a.shl(rcx, 17)
    a.xor(rax, rcx)
    a.mov(qword["rng"], rax)
    a.ret()

    # checksum -> rax: a rotate-xor over .text, .rodata and the canary (clobbers rcx, rdx, rsi)
    a.label("checksum")
    a.xor(eax, eax)
    for start, end in (("_start", "fuzz_text_end"), ("canary", "canary_end")):
        a.lea(rsi, ptr[start])
        a.lea(rdx, ptr[end])
        loop = f"checksum.{start}"
        a.label(loop)
        a.movzx(ecx, byte[rsi])
        a.rol(rax, 5)
        a.xor(rax, rcx)
        a.inc(rsi)
        a.cmp(rsi, rdx)
        a.jb(loop)
    a.ret()

    # pointer -> rax: one of the interesting places, chosen at random
    a.label("pointer")
    a.call("rand")
    a.mov(r8, rax)
    a.shr(r8, 40)
    a.and_(r8, 7)
    targets = ["null", "scratch", "straddle", "pool", "noncanonical", "unmapped", "random", "small"]
    for i, name in enumerate(targets):
        a.cmp(r8, i)
        a.je(f"pointer.{name}")
    a.label("pointer.null")
    a.xor(eax, eax)
    a.ret()
    a.label("pointer.scratch")
    a.lea(rax, ptr["fuzz_scratch"])
    a.ret()
    a.label("pointer.straddle")
    a.mov(eax, MAPPED_END - 8)
    a.ret()
    a.label("pointer.pool")
    g.start_info_field(rax, "pt_base")
    a.ret()
    a.label("pointer.noncanonical")
    a.mov(rax, NON_CANONICAL)
    a.ret()
    a.label("pointer.unmapped")
    a.mov(eax, UNMAPPED)
    a.ret()
    a.label("pointer.random")
    a.call("rand")
    a.ret()
    a.label("pointer.small")
    a.call("rand")
    a.and_(eax, 63)
    a.ret()

    # bad_pointer -> rax: null, straddling, non-canonical or unmapped only
    a.label("bad_pointer")
    a.call("rand")
    a.mov(r8, rax)
    a.shr(r8, 40)
    a.and_(r8, 3)
    a.cmp(r8, 1)
    a.je("pointer.straddle")
    a.cmp(r8, 2)
    a.je("pointer.noncanonical")
    a.cmp(r8, 3)
    a.je("pointer.unmapped")
    a.jmp("pointer.null")

    a.label("fuzz.start")
    a.call("checksum")
    a.mov(qword["sum_before"], rax)
    a.mov(r12, calls)                       # calls left
    a.xor(r13, r13)                         # results that are not success or a Xen errno
    a.xor(r14, r14)                         # digest of every result
    a.label("fuzz.loop")
    # fresh random bytes in the scratch buffer
    a.lea(rbx, ptr["fuzz_scratch"])
    a.mov(r15, SCRATCH // 8)
    a.label("fuzz.fill")
    a.call("rand")
    a.mov(qword[rbx], rax)
    a.add(rbx, 8)
    a.dec(r15)
    a.jne("fuzz.fill")
    # the hypercall number
    a.call("rand")
    a.xor(edx, edx)
    a.mov(ecx, NUMBERS)
    a.div(rcx)
    a.mov(r15, rdx)
    # the arguments: a1 = a small sub-op (sometimes any value), a2..a5 = pointers
    a.call("rand")
    a.mov(rbx, rax)
    a.test(eax, 0xF0000)
    a.je("fuzz.wide_subop")
    a.and_(ebx, 15)
    a.label("fuzz.wide_subop")
    for n in POINTER_SAFE_ONLY:
        a.cmp(r15, n)
        a.je("fuzz.safe_args")
    for reg in ("arg2", "arg3", "arg4", "arg5"):
        a.call("pointer")
        a.mov(qword[reg], rax)
    a.jmp("fuzz.steer")
    a.label("fuzz.safe_args")
    for reg in ("arg2", "arg3", "arg4", "arg5"):
        a.call("bad_pointer")
        a.mov(qword[reg], rax)
    # set_trap_table takes its list in the first argument, and a null list is a valid
    # request (it clears every entry, as Xen's does): give it a bad non-null pointer
    a.cmp(r15, C.__HYPERVISOR_set_trap_table)
    a.jne("fuzz.steer")
    a.call("bad_pointer")
    a.test(rax, rax)
    a.jne("fuzz.trap_list")
    a.mov(eax, UNMAPPED)
    a.label("fuzz.trap_list")
    a.mov(rbx, rax)
    a.label("fuzz.steer")
    # update_va_mapping at a small first argument would map the NULL page the guest
    # unmapped, after which every null pointer the fuzzer passes would be a valid one
    for n in (C.__HYPERVISOR_update_va_mapping, C.__HYPERVISOR_update_va_mapping_otherdomain):
        a.cmp(r15, n)
        a.je("fuzz.va")
    a.jmp("fuzz.steer_more")
    a.label("fuzz.va")
    a.cmp(rbx, 4096)
    a.jae("fuzz.steer_more")
    a.add(rbx, UNMAPPED)
    a.label("fuzz.steer_more")
    # steer the few calls a live guest must not get at random
    for n in sorted(XEN_MODEL_STEERED):
        a.cmp(r15, n)
        a.je("fuzz.to_version")
    a.cmp(r15, C.__HYPERVISOR_sched_op)
    a.jne("fuzz.not_sched")
    for sub in sorted(SCHED_STEERED):
        a.cmp(rbx, sub)
        a.je("fuzz.to_yield")
    a.jmp("fuzz.call")
    a.label("fuzz.to_yield")
    a.mov(ebx, C.SCHEDOP_yield)
    a.jmp("fuzz.call")
    a.label("fuzz.to_version")
    a.mov(r15, C.__HYPERVISOR_xen_version)
    a.jmp("fuzz.call")
    a.label("fuzz.not_sched")
    # VCPUOP_down of the only vCPU up powers the domain off, as SCHEDOP_shutdown does
    # (the sub-op is the low 32 bits)
    a.cmp(r15, C.__HYPERVISOR_vcpu_op)
    a.jne("fuzz.not_vcpu")
    a.cmp(ebx, C.VCPUOP_down)
    a.jne("fuzz.call")
    a.mov(ebx, C.VCPUOP_is_up)
    a.jmp("fuzz.call")
    a.label("fuzz.not_vcpu")
    a.cmp(r15, C.__HYPERVISOR_hvm_op)
    a.jne("fuzz.not_hvm")
    a.mov(ebx, C.HVMOP_get_param)           # set_param could move the upcall vector
    a.jmp("fuzz.call")
    a.label("fuzz.not_hvm")
    a.cmp(r15, C.__HYPERVISOR_memory_op)
    a.jne("fuzz.not_memory")
    a.mov(rax, rbx)
    a.and_(eax, C.XENMEMOP_CMD_MASK)
    a.cmp(eax, C.XENMEM_add_to_physmap)     # shared_info over our own code: not a test of anything
    a.jne("fuzz.call")
    a.mov(ebx, C.XENMEM_current_reservation)
    a.jmp("fuzz.call")
    a.label("fuzz.not_memory")
    a.cmp(r15, C.__HYPERVISOR_console_io)
    a.jne("fuzz.call")
    a.mov(rax, qword["arg2"])               # keep console writes short
    a.and_(eax, 31)
    a.mov(qword["arg2"], rax)

    # the call: number in r15, through the page (stub N at N*32)
    a.label("fuzz.call")
    a.mov(rdi, rbx)
    a.mov(rsi, qword["arg2"])
    a.mov(rdx, qword["arg3"])
    a.mov(r10, qword["arg4"])
    a.mov(r8, qword["arg5"])
    a.mov(r9, r15)
    a.shl(r9, 5)
    a.lea(rax, ptr["hypercall_page"])
    a.add(r9, rax)
    a.call(r9)
    # digest and check the result
    a.rol(r14, 7)
    a.xor(r14, rax)
    a.test(rax, rax)
    a.jns("fuzz.next")
    a.cmp(rax, -127)
    a.jl("fuzz.bad")
    a.neg(rax)
    a.lea(rcx, ptr["errno_ok"])
    a.cmp(byte[rcx + rax], 1)
    a.je("fuzz.next")
    a.label("fuzz.bad")
    a.inc(r13)
    a.label("fuzz.next")
    a.dec(r12)
    a.jne("fuzz.loop")

    a.label("fuzz_text_end")            # the checksum covers _start up to here
    g.print("\n")
    a.mov(rax, calls)
    g.report("fuzz_calls")
    a.mov(rax, r13)
    g.report("fuzz_bad_results")
    a.call("checksum")
    a.sub(rax, qword["sum_before"])
    g.report("fuzz_state_changed")
    a.mov(rax, r14)
    a.shr(rax, 1)                           # keep the digest positive for the report line
    g.report("fuzz_digest")

    a.section(".data")
    a.align(8)
    for name in ("sum_before", "arg2", "arg3", "arg4", "arg5"):
        a.label(name)
        a.dq(0)
    a.section(".text")
    for case in ("fuzz_calls", "fuzz_bad_results", "fuzz_state_changed", "fuzz_digest"):
        g.cases[case] = ("(any)", f"fuzz, {calls:,} random calls")
    return g.finish()
