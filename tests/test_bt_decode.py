"""The bt engine's instruction decoder (cext/bt_decode.c) against GNU objdump.

The translator finds sensitive instructions by decoding each new block, so a wrong
length would make it lose the instruction boundaries and miss (or invent) a trap.
Every instruction of every guest trapless builds, and a list of awkward encodings,
must decode to the length objdump gives it; the sensitive ones, and only those, must
be classed as sensitive.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hypervisor._hv import ffi, lib

needs_binutils = pytest.mark.skipif(not (shutil.which("as") and shutil.which("objdump")),
                                    reason="GNU binutils not installed")

LINE = re.compile(r"^\s*([0-9a-f]+):\t((?:[0-9a-f]{2} )+)\s*\t?(.*)$")


def decode(code: bytes) -> tuple[int, int]:
    kind = ffi.new("int *")
    n = lib.hv_bt_insn_length(code, len(code), kind)
    return n, kind[0]


def objdump(path: Path) -> list[tuple[int, bytes, str]]:
    """(address, bytes, text) of every instruction in the file's code sections."""
    out = subprocess.run(["objdump", "-d", "-M", "intel", "--insn-width=16", str(path)],
                         check=True, capture_output=True, text=True).stdout
    insns = []
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            insns.append((int(m.group(1), 16), bytes.fromhex(m.group(2)), m.group(3).strip()))
    return insns


def check_image(path: Path) -> int:
    """Decode each instruction objdump finds, with the bytes after it still there."""
    insns = objdump(path)
    stream = b"".join(code for _, code, _ in insns)
    offset, checked = 0, 0
    for addr, code, text in insns:
        if "(bad)" not in text:
            n, _ = decode(stream[offset:offset + 15])
            assert n == len(code), f"{path.name} {addr:#x}: {code.hex(' ')} ({text}): decoded {n}"
            checked += 1
        offset += len(code)
    return checked


def guest_images():
    from guest_kernel import compare_workloads
    from guest_kernel.conformance import ConformanceGuest
    from guest_kernel.pv_kernel import build_pv_kernel
    from guest_kernel import workloads
    yield "pv-kernel", build_pv_kernel()
    yield "bench-timer", workloads.timer_lateness(10)
    yield "bench-upcall", workloads.upcall_latency(10)
    g = ConformanceGuest("conformance")
    g.a.ret()
    yield "conformance", g.elf()
    for name in compare_workloads.WORKLOADS:
        for guest in compare_workloads.GUESTS:
            yield f"{name}-{guest}", compare_workloads.build(name, guest, 64)


@needs_binutils
def test_every_instruction_of_every_guest_decodes_to_objdumps_length(tmp_path):
    total = 0
    for name, image in guest_images():
        path = tmp_path / f"{name}.elf"
        path.write_bytes(image)
        total += check_image(path)
    assert total > 5000


# (GNU intel syntax, sensitive?) -- prefixes, REX, immediates of every size, SIB and
# rip-relative addressing, the 0F38/0F3A maps, VEX, EVEX, x87, and the system instructions.
AWKWARD = [
    ("mov rax, 0x1122334455667788", False), ("mov eax, 0x11223344", False),
    ("mov ax, 0x1122", False), ("mov al, 0x11", False), ("movabs al, [0x1122334455667788]", False),
    ("movabs rax, [0x1122334455667788]", False), ("add qword ptr [rsp+rbx*8+0x12345678], 0x7f", False),
    ("add word ptr [rbp-8], 0x1234", False), ("imul r13, qword ptr [r12+0x10], 0x12345", False),
    ("test byte ptr [rip+0x100], 0x80", False), ("test dword ptr [rax], 0x80000000", False),
    ("test word ptr [rax], 0x8000", False), ("not qword ptr [r15]", False),
    ("lea rax, [rip+0x12345678]", False), ("lea rax, [rbx*4+0x10]", False),
    ("mov r8d, dword ptr [r9+r10*2]", False), ("enter 0x10, 2", False), ("ret 8", False),
    ("push 0x12345678", False), ("push 0x12", False), ("jmp qword ptr [rip+0x10]", False),
    ("lock cmpxchg qword ptr [rdi], rsi", False), ("rep movsb", False), ("xchg r8, rax", False),
    ("movzx eax, byte ptr [rsi]", False), ("movsxd rax, dword ptr [rdi+4]", False),
    ("bt rax, 63", False), ("shld rax, rbx, 7", False), ("cmovne rax, qword ptr [rbx]", False),
    ("sete al", False), ("bswap r12", False), ("popcnt rax, rbx", False), ("ud2", False),
    ("movaps xmm1, xmmword ptr [rsp+0x20]", False), ("pshufd xmm0, xmm1, 0x1b", False),
    ("pshufb xmm0, xmm1", False), ("palignr xmm0, xmm1, 4", False), ("pextrq rax, xmm2, 1", False),
    ("crc32 eax, byte ptr [rsi]", False), ("cvtsi2sd xmm0, rax", False),
    ("vaddps ymm0, ymm1, ymm2", False), ("vpshufd ymm0, ymmword ptr [rax+8], 0x4e", False),
    ("vzeroupper", False), ("vpermq ymm0, ymm1, 0xd8", False), ("vfmadd231ps xmm0, xmm1, xmm2", False),
    ("vpaddd zmm0, zmm1, zmmword ptr [rax+0x40]", False), ("vpternlogd zmm0, zmm1, zmm2, 0x96", False),
    ("fld qword ptr [rsp]", False), ("fstp st(1)", False), ("fnstcw word ptr [rsp]", False),
    ("rdtsc", False), ("rdtscp", False), ("cpuid", False), ("pause", False), ("lfence", False),
    ("sgdt [rsp]", False),
    # hooked: a software interrupt's vector (gate DPL, no error code, its length)
    ("int 0x80", True), ("int3", True), ("syscall", False), ("nop word ptr [rax+rax+0x0]", False),
    ("hlt", True), ("cli", True), ("sti", True), ("popfq", True), ("iretq", True), ("iretd", True),
    ("mov cr3, rax", True), ("mov cr0, rbx", True), ("mov cr8, rax", True), ("mov dr7, rax", True),
    ("mov rax, cr3", True), ("mov rbx, dr7", True),     # privileged in ring 3 (Xen's PV model)
    ("wrfsbase rax", True), ("wrgsbase r9", True), ("rdfsbase rax", False),
    ("swapgs", True), ("sysretq", True), ("rdpmc", True), ("xsetbv", True), ("xgetbv", False),
    ("wrmsr", True), ("rdmsr", True), ("lgdt [rax]", True), ("lidt [rip+0x40]", True),
    ("lldt ax", True), ("ltr word ptr [rsp]", True), ("invlpg [rdi+0x1000]", True),
    ("lmsw ax", True), ("clts", True), ("wbinvd", True), ("invd", True),
    ("in al, 0x60", True), ("in eax, dx", True), ("out 0x80, al", True), ("out dx, ax", True),
    ("rep insb", True), ("outsd", True),
    # far jmp and call through memory: TCG refuses a ring-3 CS at its ring 0 (PV model)
    ("jmp fword ptr [rax]", True), ("call fword ptr [rbx+8]", True),
]


@needs_binutils
def test_awkward_encodings_and_which_are_sensitive(tmp_path):
    src = tmp_path / "awkward.s"
    src.write_text(".intel_syntax noprefix\n.text\n" + "".join(f"{t}\n" for t, _ in AWKWARD))
    obj = tmp_path / "awkward.o"
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True, capture_output=True)
    insns = objdump(obj)
    assert len(insns) == len(AWKWARD)
    for (addr, code, text), (source, sensitive) in zip(insns, AWKWARD):
        n, kind = decode(code + b"\x90" * 15)
        assert n == len(code), f"{source}: {code.hex(' ')} decoded as {n} bytes"
        assert (kind != 0) == sensitive, f"{source}: kind {kind}"


@pytest.mark.parametrize("code", [
    b"\x06",                    # push es: gone in 64-bit mode
    b"\x0f\x0b"[:1],            # an escape byte and nothing after it
    b"\x48\x8b",                # ModRM missing
    b"\x48\xb8\x01\x02\x03",    # imm64 cut short
    b"\x66" * 15 + b"\x90",     # longer than 15 bytes
])
def test_invalid_or_truncated_instructions_are_refused(code):
    assert decode(code)[0] == -1
