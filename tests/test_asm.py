"""Tests for guest_kernel.asm.

Most of the work is done by a generator that yields thousands of
instruction forms.  Each form is a DSL call plus the same instruction in
GNU intel syntax, written independently of the assembler's own operand
printing.  All forms go into one Assembler and one .s file; GNU as is run
once and the bytes are compared form by form.
"""

import random
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from guest_kernel import asm
from guest_kernel.asm import (
    AsmError, Assembler, Ref, byte, word, dword, qword, ptr,
    rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r12, r15,
    eax, ebx, ecx, ax, al, bl, cl, dl, dx, cr0, cr2, cr3, rip,
)

HAVE_BINUTILS = all(shutil.which(tool) for tool in ("as", "nm", "objcopy"))
needs_binutils = pytest.mark.skipif(not HAVE_BINUTILS,
                                    reason="GNU binutils not installed")

# ---------------------------------------------------------------------------
# Operand generators: (DSL operand, GNU intel text)
# ---------------------------------------------------------------------------

REG_NAMES = {
    64: "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15",
    32: "eax ecx edx ebx esp ebp esi edi r8d r9d r10d r11d r12d r13d r14d r15d",
    16: "ax cx dx bx sp bp si di r8w r9w r10w r11w r12w r13w r14w r15w",
    8: "al cl dl bl spl bpl sil dil r8b r9b r10b r11b r12b r13b r14b r15b",
}
REG_NAMES = {bits: names.split() for bits, names in REG_NAMES.items()}
SIZES = (8, 16, 32, 64)
SIZE_WORDS = {8: "byte", 16: "word", 32: "dword", 64: "qword"}
BUILDERS = {8: byte, 16: word, 32: dword, 64: qword, None: ptr}


def regs(bits):
    """All registers of one size as (Register, name)."""
    return [(getattr(asm, name), name) for name in REG_NAMES[bits]]


def reg_cycle(bits, i):
    """The i-th register of a size, cycling, so forms vary the register."""
    name = REG_NAMES[bits][i % 16]
    return getattr(asm, name), name


def gnu_hex(value):
    return f"-{-value:#x}" if value < 0 else f"{value:#x}"


def address(base=None, index=None, scale=1, disp=0):
    """Build (DSL address expression, GNU bracket text) from parts, each
    side on its own: the DSL side with Python operators, the GNU side as
    text."""
    expr = None
    parts = []
    if base is not None:
        expr = getattr(asm, base)
        parts.append(base)
    if index is not None:
        scaled = getattr(asm, index) * scale
        expr = scaled if expr is None else expr + scaled
        parts.append(f"{index}*{scale}")
    if expr is None:
        expr = disp
    elif disp < 0:
        expr = expr - (-disp)          # exercise __sub__ too
    elif disp > 0:
        expr = expr + disp
    text = "+".join(parts)
    if disp or not parts:
        text += ("+" if parts and disp >= 0 else "") + gnu_hex(disp)
    return expr, f"[{text}]"


BASE_DISPS = (0, 1, 0x7F, 0x80, -0x80, -0x81, 0x1234, 0x7FFFFFFF, -0x80000000)
SIB_DISPS = (0, 0x7F, -0x80, 0x80, -0x7FFFFFFF)
INDEXES = [n for n in REG_NAMES[64] if n != "rsp"]


def all_addresses():
    """Every base, every index with every scale, displacement widths."""
    for base in REG_NAMES[64]:
        for disp in BASE_DISPS:
            yield address(base, disp=disp)
    for base in REG_NAMES[64]:
        for index in INDEXES:
            for scale in (1, 2, 4, 8):
                for disp in SIB_DISPS:
                    yield address(base, index, scale, disp)
    for index in INDEXES:
        for scale in (1, 2, 4, 8):
            for disp in (0, 0x10, -0x10, 0x7FFFFFFF):
                yield address(None, index, scale, disp)
    for disp in (0, 0x1000, 0x7FFFFFFF, -0x80000000, -1):
        yield address(disp=disp)


def some_addresses():
    """A small set covering every special case, for the other instructions."""
    yield from (address(b) for b in ("rax", "rsp", "rbp", "r12", "r13", "r15"))
    yield address("rbx", disp=0x10)
    yield address("rsp", disp=-0x80)
    yield address("rbp", disp=-8)
    yield address("r13", disp=0x12345)
    yield address("r12", "rbp", 2)
    yield address("rax", "r15", 8, 0x80)
    yield address("r13", "r12", 4)
    yield address("rsp", "rsi", 1, 0x7F)
    yield address(None, "r9", 8, 0x100)
    yield address(None, "rcx", 1)
    yield address(disp=0x1000)
    yield rbx + rsp + 8, "[rbx+rsp+0x8]"         # both swap: rsp is the base
    yield "tgt", "[rip+tgt]"                     # bare label: RIP-relative
    yield rip + "tgt" + 8, "[rip+tgt+8]"
    yield Ref("tgt") - 4, "[rip+tgt-4]"
    yield rip + 0x40, "[rip+0x40]"


def mems(bits, addresses=some_addresses):
    """Memory operands of a size (None = ptr) as (Mem, GNU text)."""
    for expr, text in addresses():
        prefix = f"{SIZE_WORDS[bits]} ptr " if bits else ""
        yield BUILDERS[bits][expr], prefix + text


IMMEDIATES = {
    8: (0, 1, 0x7F, 0x80, 0xFF, -1, -0x80),
    16: (0, 0x7F, 0x80, -0x80, -0x81, 0x7FFF, 0x8000, 0xFF80, 0xFFFF, -0x8000),
    32: (0, 0x7F, 0x80, -0x80, -0x81, 0x7FFFFFFF, 0x80000000, 0xFFFFFF80,
         0xFFFFFFFF, -0x80000000),
    64: (0, 0x7F, 0x80, -0x80, -0x81, 0x7FFFFFFF, -0x80000000,
         2**64 - 1, 2**64 - 0x80, 2**64 - 0x81, 2**64 - 2**31),
}
MOV64_IMMEDIATES = IMMEDIATES[64] + (0x80000000, 0xFFFFFFFF, 2**32, 2**63,
                                     2**63 - 1, 2**64 - 2**31 - 1, -2**63,
                                     -0x80000001)

# ---------------------------------------------------------------------------
# The big form generator: yields (group, method, args, GNU text)
# ---------------------------------------------------------------------------


def form(method, *operands, gnu=None):
    """One form: operands are (DSL value, GNU text) pairs."""
    mnemonic = gnu or method.rstrip("_")
    args = [op for op, _ in operands]
    text = mnemonic + (" " + ", ".join(t for _, t in operands) if operands else "")
    return mnemonic, method, args, text


def imm(value):
    return value, gnu_hex(value)


def two_operand_forms(method, mem_imm=True):
    """reg,reg (all pairs), reg,imm (boundaries), reg,mem, mem,reg, mem,imm."""
    for bits in SIZES:
        for dst in regs(bits):
            for src in regs(bits):
                yield form(method, dst, src)
            for value in IMMEDIATES[bits]:
                yield form(method, dst, imm(value))
        for i, m in enumerate(mems(bits)):
            r = reg_cycle(bits, i * 5)
            yield form(method, r, m)
            yield form(method, m, r)
            if mem_imm:
                for value in (0x7F, -0x80, IMMEDIATES[bits][-1]):
                    yield form(method, m, imm(value))
        # accumulator with every immediate boundary (short forms)
        for value in IMMEDIATES[bits]:
            yield form(method, reg_cycle(bits, 0), imm(value))


def generate_forms():
    # mov: the full addressing matrix, then the usual forms
    for i, m in enumerate(mems(64, all_addresses)):
        yield form("mov", reg_cycle(64, i), m)
    for i, m in enumerate(mems(32, all_addresses)):
        if i % 3 == 0:
            yield form("mov", m, reg_cycle(32, i))
    yield from two_operand_forms("mov")
    for dst in regs(64):
        for value in MOV64_IMMEDIATES:
            yield form("mov", dst, imm(value))
    for cr in ("cr0", "cr2", "cr3", "cr4"):
        for r in regs(64):
            yield form("mov", (getattr(asm, cr), cr), r)
            yield form("mov", r, (getattr(asm, cr), cr))

    for method in ("add", "or_", "adc", "sbb", "and_", "sub", "xor", "cmp", "test"):
        yield from two_operand_forms(method)

    for method in ("inc", "dec", "not_", "neg", "mul", "div", "idiv", "imul"):
        for bits in SIZES:
            for r in regs(bits):
                yield form(method, r)
            for m in mems(bits):
                yield form(method, m)

    for method in ("shl", "shr", "sar", "sal", "rol", "ror"):
        for bits in SIZES:
            for r in regs(bits):
                for count in (1, 2, 0x1F, 0xFF, 0):
                    yield form(method, r, imm(count))
                yield form(method, r, (cl, "cl"))
            for m in mems(bits):
                yield form(method, m, imm(1))
                yield form(method, m, imm(7))
                yield form(method, m, (cl, "cl"))

    for bits in (16, 32, 64):
        for i, dst in enumerate(regs(bits)):
            for src in regs(bits):
                yield form("imul", dst, src)
            for value in IMMEDIATES[bits]:
                yield form("imul", dst, reg_cycle(bits, i + 3), imm(value))
                yield form("imul", dst, imm(value))
        for i, m in enumerate(mems(bits)):
            yield form("imul", reg_cycle(bits, i), m)
            yield form("imul", reg_cycle(bits, i + 7), m, imm(0x1000))

    for method in ("movzx", "movsx"):
        for dst_bits in (16, 32, 64):
            for src_bits in (8, 16):
                if src_bits >= dst_bits:
                    continue
                for dst in regs(dst_bits):
                    for src in regs(src_bits):
                        yield form(method, dst, src)
                for i, m in enumerate(mems(src_bits)):
                    yield form(method, reg_cycle(dst_bits, i), m)
    for dst in regs(64):
        for src in regs(32):
            yield form("movsxd", dst, src)
    for i, m in enumerate(mems(32)):
        yield form("movsxd", reg_cycle(64, i), m)

    for bits in (16, 32, 64):
        for i, m in enumerate(mems(None)):
            yield form("lea", reg_cycle(bits, i * 3), m)
    for i, m in enumerate(mems(None, all_addresses)):
        if i % 7 == 0:
            yield form("lea", reg_cycle(64, i), m)

    for r in regs(64):
        yield form("push", r)
        yield form("pop", r)
        yield form("call", r)
        yield form("jmp", r)
    for m in mems(64):
        yield form("push", m)
        yield form("pop", m)
        yield form("call", m)
        yield form("jmp", m)
    for value in IMMEDIATES[64]:
        yield form("push", imm(value))

    for data in (al, "al"), (ax, "ax"), (eax, "eax"):
        for port in (0, 0x60, 0x7F, 0x80, 0xCA, 0xFF):
            yield form("in_", data, imm(port))
            yield form("out", imm(port), data)
        yield form("in_", data, (dx, "dx"))
        yield form("out", (dx, "dx"), data)

    for method in ("lgdt", "lidt", "invlpg"):
        for m in mems(None):
            yield form(method, m)

    for vector in (0, 3, 0x80, 0xFF):
        yield form("int_", imm(vector))
    for name in asm._SIMPLE:
        yield form(name.replace(" ", "_"), gnu=name)

    for bits in SIZES:
        for dst in regs(bits):
            for src in regs(bits):
                yield form("xchg", dst, src)
        for i, m in enumerate(mems(bits)):
            yield form("xchg", m, reg_cycle(bits, i))
            yield form("xchg", reg_cycle(bits, i + 3), m)
    for bits in (16, 32, 64):
        for dst in regs(bits):
            for src in regs(bits):
                yield form("bsf", dst, src)
        for i, m in enumerate(mems(bits)):
            yield form("bsf", reg_cycle(bits, i), m)
    yield form("lock")


FORMS = list(generate_forms())
GROUPS = sorted({group for group, *_ in FORMS})


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def gnu_assemble(lines, workdir: Path, labels=True):
    """Assemble GNU intel syntax lines; return (.text bytes, {label: offset})."""
    src = workdir / "forms.s"
    src.write_text(".intel_syntax noprefix\n.text\n" + "\n".join(lines) + "\n")
    obj = workdir / "forms.o"
    run(["as", "--64", "-o", str(obj), str(src)])
    binary = workdir / "forms.bin"
    run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)])
    symbols = {}
    for line in run(["nm", str(obj)], text=True).stdout.splitlines():
        value, _, name = line.split()
        symbols[name] = int(value, 16)
    return binary.read_bytes(), symbols


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """Assemble every form with both assemblers; group the mismatches."""
    if not HAVE_BINUTILS:
        pytest.skip("GNU binutils not installed")
    a = Assembler(base=0)
    a.section(".text")
    for _, method, args, _ in FORMS:
        getattr(a, method)(*args)
    a.label("tgt")
    ours = a.assemble().listing
    assert len(ours) == len(FORMS)

    lines = [f"f{i}: {text}" for i, (*_, text) in enumerate(FORMS)] + ["tgt:"]
    gnu, offsets = gnu_assemble(lines, tmp_path_factory.mktemp("gnu"))
    ends = [offsets[f"f{i}"] for i in range(1, len(FORMS))] + [offsets["tgt"]]

    mismatches = defaultdict(list)
    start = 0
    for (group, _, _, text), line, end in zip(FORMS, ours, ends):
        expected = gnu[start:end]
        if line.data != expected:
            mismatches[group].append(
                f"{text:45} ours {line.data.hex(' '):32} as {expected.hex(' ')}")
        start = end
    return mismatches


@needs_binutils
@pytest.mark.parametrize("group", GROUPS)
def test_matches_gnu_as(comparison, group):
    problems = comparison.get(group, [])
    assert not problems, f"{len(problems)} mismatches:\n" + "\n".join(problems[:30])


def test_form_count():
    # Keep the coverage from silently shrinking.
    assert len(FORMS) > 20000
    assert len(GROUPS) >= 50


@needs_binutils
def test_listing_text_is_gnu_syntax(tmp_path):
    """The assembler's own listing text is accepted by GNU as and gives the
    same bytes (checks the operand __str__ methods)."""
    a = Assembler()
    sample = FORMS[::37]
    for _, method, args, _ in sample:
        getattr(a, method)(*args)
    a.label("tgt")
    listing = a.assemble().listing
    gnu, _ = gnu_assemble([line.text for line in listing] + ["tgt:"], tmp_path)
    assert gnu == b"".join(line.data for line in listing)


# ---------------------------------------------------------------------------
# Branches and relaxation
# ---------------------------------------------------------------------------

CONDS = ("e", "ne", "l", "ge", "b", "ae", "s", "ns", "a", "be", "o", "g")


def branch_program(seed, aligns):
    """A random program of labels, jumps and filler: (DSL steps, GNU lines)."""
    rnd = random.Random(seed)
    labels = [f"L{i}" for i in range(40)]
    steps, lines = [], []
    order = labels[:]
    rnd.shuffle(order)
    pending = list(order)
    while pending:
        choice = rnd.random()
        target = rnd.choice(labels)
        if choice < 0.15:
            name = pending.pop()
            steps.append(("label", name))
            lines.append(f"{name}:")
        elif choice < 0.40:
            steps.append(("jmp", target))
            lines.append(f"jmp {target}")
        elif choice < 0.65:
            cond = rnd.choice(CONDS)
            steps.append(("jcc", cond, target))
            lines.append(f"j{cond} {target}")
        elif choice < 0.72:
            steps.append(("call", target))
            lines.append(f"call {target}")
        elif choice < 0.78 and aligns:
            boundary = rnd.choice((4, 8, 16, 32))
            # (0xcc: with 0x90 GNU as would pad code with long NOPs)
            steps.append(("align", boundary, 0xCC))
            lines.append(f".balign {boundary}, 0xcc")
        else:
            size = rnd.choice((1, 3, 10, 40, 60, 100, 120, 126, 127, 128, 129, 200))
            steps.append(("db", bytes([0x90]) * size))
            lines.append(f".fill {size}, 1, 0x90")
    return steps, lines


def run_steps(a, steps):
    for step in steps:
        getattr(a, step[0])(*step[1:])


@needs_binutils
@pytest.mark.parametrize("seed", range(12))
def test_branch_relaxation_matches_gnu_as(tmp_path, seed):
    steps, lines = branch_program(seed, aligns=seed % 2 == 1)
    a = Assembler(base=0)
    run_steps(a, steps)
    ours = a.assemble().sections[0].data
    gnu, _ = gnu_assemble(lines, tmp_path)
    assert ours == gnu


@needs_binutils
def test_branch_boundaries_match_gnu_as(tmp_path):
    """Forward and backward jumps right at the rel8 limits."""
    steps, lines = [], []
    for n, size in enumerate((123, 124, 125, 126, 127, 128, 129, 130)):
        # forward: jmp/jne over `size` bytes
        for kind in ("jmp", "jne"):
            steps += [("jcc", "ne", f"f{kind}{n}") if kind == "jne"
                      else ("jmp", f"f{kind}{n}"),
                      ("db", bytes(size)), ("label", f"f{kind}{n}")]
            lines += [f"{kind} f{kind}{n}", f".fill {size}, 1, 0", f"f{kind}{n}:"]
        # backward
        for kind in ("jmp", "jne"):
            steps += [("label", f"b{kind}{n}"), ("db", bytes(size)),
                      ("jcc", "ne", f"b{kind}{n}") if kind == "jne"
                      else ("jmp", f"b{kind}{n}")]
            lines += [f"b{kind}{n}:", f".fill {size}, 1, 0", f"{kind} b{kind}{n}"]
    a = Assembler()
    run_steps(a, steps)
    ours = a.assemble().sections[0].data
    gnu, _ = gnu_assemble(lines, tmp_path)
    assert ours == gnu


def test_branch_sizes_and_cascade():
    a = Assembler(base=0x1000)
    a.label("top")
    a.jmp("end")          # pushed out of range only because the jne grows
    a.jne("far")
    a.db(bytes(124))
    a.label("end")
    a.db(bytes(200))
    a.label("far")
    a.jmp("top")
    img = a.assemble()
    kinds = [line.data[:2] for line in img.listing if not line.text.startswith("db")]
    assert kinds[0][:1] == b"\xe9"                   # jmp near
    assert kinds[1] == b"\x0f\x85"                   # jne near
    assert kinds[2][:1] == b"\xe9"                   # jmp back, near
    assert img.symbols["end"] == 0x1000 + 5 + 6 + 124


def test_named_conditions():
    a = Assembler()
    a.label("x")
    for cond, code in asm._CONDITIONS.items():
        getattr(a, f"j{cond}")("x")
    a.jcc("nz", "x")
    data = a.assemble().sections[0].data
    assert [data[i] for i in range(0, len(data), 2)] == \
        [0x70 + code for code in asm._CONDITIONS.values()] + [0x75]


# ---------------------------------------------------------------------------
# Labels, data, sections
# ---------------------------------------------------------------------------

def build_kernel(a):
    a.section(".text")
    a.label("entry")
    a.mov(rax, "table")
    a.mov(eax, "message")
    a.mov(qword[rbx], "entry")
    a.mov(eax, dword["counter"])
    a.mov(dword[rip + "counter" + 4], 7)
    a.lea(rsi, ptr["message"])
    a.mov(rdx, qword[rcx*8 + "table"])
    a.lea(rdi, ptr[rbx + a.ref("table") + 16])
    a.lgdt(ptr["gdt_ptr"])
    a.call("helper")
    a.jmp("entry")
    a.align(16, 0xCC)     # GNU as would pad with long NOPs for 0x90
    a.label("helper")
    a.inc(qword["scratch"])
    a.ret()
    a.section(".rodata")
    a.label("message")
    a.asciz("hello")
    a.align(8)
    a.label("table")
    a.dq("entry", "helper", a.ref("message") + 2, 0x1122334455667788)
    a.label("gdt_ptr")
    a.dw(a.ref("gdt_end") - "table" - 1)
    a.dq("table")
    a.label("gdt_end")
    a.section(".data")
    a.label("counter")
    a.dd(1, 2, "message")
    a.db(1, 255, -1, b"ab")
    a.section(".bss")
    a.align(64)
    a.label("scratch")
    a.reserve(100)
    a.label("bss_end")
    a.section(".text")        # appending to an earlier section
    a.label("late")
    a.hlt()


KERNEL_GNU = """
.intel_syntax noprefix
.text
entry:
movabs rax, offset table
mov eax, offset message
mov qword ptr [rbx], offset entry
mov eax, dword ptr [rip+counter]
mov dword ptr [rip+counter+4], 7
lea rsi, [rip+message]
mov rdx, qword ptr [rcx*8+table]
lea rdi, [rbx+table+16]
lgdt [rip+gdt_ptr]
call helper
jmp entry
.balign 16, 0xcc
helper:
inc qword ptr [rip+scratch]
ret
late:
hlt
.section .rodata
message:
.asciz "hello"
.balign 8, 0
table:
.quad entry, helper, message+2, 0x1122334455667788
gdt_ptr:
.short gdt_end - table - 1
.quad table
gdt_end:
.data
counter:
.long 1, 2, message
.byte 1, 255, -1, 'a', 'b'
.bss
.balign 64
scratch:
.skip 100
bss_end:
"""

LINKER_SCRIPT = """
SECTIONS {
  . = 0x200000;
  .text : { *(.text) }
  . = ALIGN(4096);
  .rodata : { *(.rodata) }
  . = ALIGN(4096);
  .data : { *(.data) }
  . = ALIGN(4096);
  .bss : { *(.bss) }
  /DISCARD/ : { *(.note*) *(.comment) }
}
"""


@pytest.mark.skipif(not (HAVE_BINUTILS and shutil.which("ld")),
                    reason="GNU binutils not installed")
def test_sections_and_labels_match_gnu_as_and_ld(tmp_path):
    a = Assembler(base=0x200000)
    build_kernel(a)
    img = a.assemble()

    (tmp_path / "k.s").write_text(KERNEL_GNU)
    (tmp_path / "k.ld").write_text(LINKER_SCRIPT)
    run(["as", "--64", "-o", str(tmp_path / "k.o"), str(tmp_path / "k.s")])
    run(["ld", "-T", str(tmp_path / "k.ld"), "-o", str(tmp_path / "k.elf"),
         str(tmp_path / "k.o")])
    elf = str(tmp_path / "k.elf")
    symbols = {}
    for line in run(["nm", elf], text=True).stdout.splitlines():
        value, _, name = line.split()
        symbols[name] = int(value, 16)
    for name, address in img.symbols.items():
        assert symbols[name] == address, name
    for sec in img.sections:
        if sec.name == ".bss":
            continue
        out = tmp_path / (sec.name[1:] + ".bin")
        run(["objcopy", "-O", "binary", "-j", sec.name, elf, str(out)])
        assert sec.data == out.read_bytes(), sec.name


def test_section_layout():
    a = Assembler(base=0x200000)
    build_kernel(a)
    img = a.assemble()
    names = [s.name for s in img.sections]
    assert names == [".text", ".rodata", ".data", ".bss"]
    flags = {s.name: s.flags for s in img.sections}
    assert flags == {".text": "rx", ".rodata": "r", ".data": "rw", ".bss": "rw"}
    text, rodata, data, bss = img.sections
    assert text.vaddr == 0x200000
    for sec in img.sections[1:]:
        assert sec.vaddr % 4096 == 0
    assert rodata.vaddr == 0x201000 and data.vaddr == 0x202000
    assert bss.vaddr == 0x203000 and bss.data == b"" and bss.memsz == 100
    assert all(s.memsz == len(s.data) for s in (text, rodata, data))
    # the hlt appended to .text later comes after the helper's ret
    assert text.data.endswith(b"\xc3\xf4")
    assert img.symbols["late"] == 0x200000 + len(text.data) - 1
    assert img.symbols["scratch"] == 0x203000
    assert img.symbols["bss_end"] == 0x203000 + 100
    assert a.symbol_address("table") == img.symbols["table"]
    assert img.symbols["table"] % 8 == 0


def test_data_values():
    a = Assembler(base=0x400000)
    a.section(".rodata")
    a.label("start")
    a.dq("start", a.ref("end") + 1)
    a.dd(a.ref("end") - "start")
    a.dw(0xFFFF, -1)
    a.db(b"\x01\x02", 3)
    a.ascii("ab")
    a.asciz(b"c")
    a.label("end")
    img = a.assemble()
    start, end = 0x400000, 0x400000 + 8 + 8 + 4 + 4 + 3 + 2 + 2
    assert img.symbols == {"start": start, "end": end}
    assert img.sections[0].data == (
        start.to_bytes(8, "little") + (end + 1).to_bytes(8, "little")
        + (end - start).to_bytes(4, "little") + b"\xff\xff\xff\xff"
        + b"\x01\x02\x03" + b"ab" + b"c\0")


def test_align_fill():
    a = Assembler(base=0x1000)
    a.section(".text")
    a.ret()
    a.align(8)
    a.label("aligned")
    a.section(".data")
    a.db(1)
    a.align(4)
    a.db(2)
    a.align(4)          # already aligned: no padding
    img = a.assemble()
    assert img.section(".text").data == b"\xc3" + b"\x90" * 7
    assert img.section(".data").data == b"\x01\0\0\0\x02\0\0\0"
    assert img.symbols["aligned"] == 0x1008


def test_rip_relative_across_sections():
    a = Assembler(base=0x10000)
    a.section(".text")
    a.mov(rax, qword["value"])           # 48 8b 05 disp32
    a.mov(qword[rip + "value" + 8], 1)   # imm after the disp: counted
    a.section(".data")
    a.label("value")
    a.dq(0, 0)
    img = a.assemble()
    code = img.section(".text").data
    value = img.symbols["value"]
    disp1 = int.from_bytes(code[3:7], "little", signed=True)
    assert 0x10000 + 7 + disp1 == value
    disp2 = int.from_bytes(code[10:14], "little", signed=True)
    assert 0x10000 + 7 + 11 + disp2 == value + 8


def test_here_and_default_section():
    a = Assembler(base=0x5000)
    a.nop()                 # no section() yet: goes to .text
    spin = a.here()
    a.pause()
    a.jmp(spin)
    img = a.assemble()
    assert img.sections[0].name == ".text"
    assert img.sections[0].data == b"\x90\xf3\x90\xeb\xfc"
    assert img.symbols == {}                 # anonymous labels are hidden


def test_label_immediate_is_movabs():
    a = Assembler(base=0x200000)
    a.label("x")
    a.mov(rax, "x")
    a.mov(r8, Ref("x") + 3)
    data = a.assemble().sections[0].data
    assert data == (b"\x48\xb8" + (0x200000).to_bytes(8, "little")
                    + b"\x49\xb8" + (0x200003).to_bytes(8, "little"))


def test_symbol_address_before_assemble():
    a = Assembler()
    a.label("x")
    with pytest.raises(AsmError, match="assemble"):
        a.symbol_address("x")
    a.assemble()
    assert a.symbol_address("x") == 0
    with pytest.raises(AsmError, match="unknown label"):
        a.symbol_address("y")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

ERROR_CASES = [
    (lambda a: a.mov(eax, rbx),
     "mov eax, rbx: operand sizes differ (32 vs 64 bits)"),
    (lambda a: a.mov(qword[rbx], eax), "mov qword ptr [rbx], eax: operand sizes differ"),
    (lambda a: a.mov(rax, qword[rbx + 0x100000000]),
     "mov rax, qword ptr [rbx+0x100000000]: displacement out of range"),
    (lambda a: a.mov(rax, qword[rbx - 0x80000001]), "displacement out of range"),
    (lambda a: a.mov(eax, 2**32),
     "mov eax, 0x100000000: immediate 0x100000000 does not fit in 32 bits"),
    (lambda a: a.mov(al, 256), "mov al, 0x100: immediate"),
    (lambda a: a.mov(al, -129), "mov al, -0x81: immediate"),
    (lambda a: a.mov(rax, 2**64), "mov rax, 0x10000000000000000: immediate"),
    (lambda a: a.mov(qword[rax], 2**31), "sign-extended 32-bit"),
    (lambda a: a.add(rax, 2**31),
     "add rax, 0x80000000: immediate 0x80000000 does not fit in a sign-extended"),
    (lambda a: a.add(ax, 0x10000), "add ax, 0x10000: immediate"),
    (lambda a: a.cmp(rax, -2**31 - 1), "cmp rax, -0x80000001: immediate"),
    (lambda a: a.push(2**31), "push 0x80000000: immediate"),
    (lambda a: a.imul(eax, ebx, 2**32), "imul eax, ebx, 0x100000000: immediate"),
    (lambda a: a.mov(dword[rbx], 1 << 32), "mov dword ptr [rbx], 0x100000000"),
    (lambda a: a.mov(rax, qword[rbx + rsp*2]), "rsp cannot be an index"),
    (lambda a: a.mov(rax, qword[rsp*1]), "mov rax, qword ptr [rsp*1]: rsp cannot be an index"),
    (lambda a: a.mov(rax, qword[rbx + rcx*3]), "scale must be 1, 2, 4 or 8"),
    (lambda a: a.mov(rax, qword[ebx]), "ebx cannot be used in an address"),
    (lambda a: a.mov(rax, qword[rbx + rcx + rdx]), "too many registers"),
    (lambda a: a.mov(rax, qword[rip + rcx*2]), "cannot have an index"),
    (lambda a: a.inc(ptr[rbx]), "inc [rbx]: operand size unknown"),
    (lambda a: a.mov(ptr[rbx], 1), "mov [rbx], 0x1: operand size unknown"),
    (lambda a: a.mov(qword[rbx], qword[rcx]), "both operands are memory"),
    (lambda a: a.add(qword[rbx], qword[rcx]), "both operands are memory"),
    (lambda a: a.movzx(eax, ebx), "movzx eax, ebx: source must be 8 or 16 bits"),
    (lambda a: a.movzx(eax, ptr[rbx]), "movzx eax, [rbx]: source must be 8 or 16 bits"),
    (lambda a: a.movzx(ax, ax), "source must be smaller"),
    (lambda a: a.movzx(al, bl), "movzx al, bl: destination must be"),
    (lambda a: a.lea(rax, rbx), "lea rax, rbx: source must be a memory operand"),
    (lambda a: a.lea(al, ptr[rbx]), "lea al, [rbx]: destination"),
    (lambda a: a.push(eax), "push eax: operand must be a 64-bit register"),
    (lambda a: a.pop(dword[rax]), "pop dword ptr [rax]: operand must be"),
    (lambda a: a.call(eax), "call eax: target must be"),
    (lambda a: a.jmp(dword[rax]), "jmp dword ptr [rax]: target must be"),
    (lambda a: a.jcc("xx", "l"), "jxx l: unknown condition"),
    (lambda a: a.jcc("ne", rax), "jne rax: target must be a label"),
    (lambda a: a.shl(rax, 256), "shl rax, 0x100: count"),
    (lambda a: a.shl(rax, dl), "shl rax, dl: count must be"),
    (lambda a: a.out(0x100, al), "out 0x100, al: port must be"),
    (lambda a: a.out(dx, bl), "out dx, bl: data register must be al, ax or eax"),
    (lambda a: a.in_(rax, dx), "in rax, dx: data register"),
    (lambda a: a.in_(al, ecx), "in al, ecx: port must be"),
    (lambda a: a.mov(cr3, eax), "mov cr3, eax: source must be a 64-bit register"),
    (lambda a: a.mov(ebx, cr0), "mov ebx, cr0: destination must be a 64-bit"),
    (lambda a: a.mov(cr3, 5), "mov cr3, 0x5: source must be"),
    (lambda a: a.lgdt(rax), "lgdt rax: operand must be memory"),
    (lambda a: a.mov(al, "x"), "mov al, offset x: a label needs a 32 or 64-bit"),
    (lambda a: a.add(rax, "x"), "add rax, x: source must be a register or memory"),
    (lambda a: a.mov(5, rax), "mov 0x5, rax: destination must be"),
    (lambda a: a.db(256), "db 0x100: value 0x100 does not fit in 8 bits"),
    (lambda a: a.db("text"), "db text: db cannot hold 'text'"),
    (lambda a: a.dw(0x10000), "dw 0x10000: value"),
    (lambda a: a.int_(256), "int 0x100: vector out of range"),
    (lambda a: a.imul(al, bl), "imul al, bl: destination must be"),
    (lambda a: a.movsxd(rax, rbx), "movsxd rax, rbx: source must be 32 bits"),
    (lambda a: a.test(qword[rax], qword[rbx]), "both operands are memory"),
    (lambda a: a.align(3), "align 3: not a power of two"),
    (lambda a: a.reserve(-1), "reserve -1: negative size"),
    (lambda a: a.section(".weird"), "section .weird: unknown section"),
    (lambda a: a.label("rax"), "label 'rax': is a register name"),
    (lambda a: a.label("1abc"), "label '1abc': not a valid label name"),
    (lambda a: (a.label("x"), a.label("x")), "label 'x': defined twice"),
    (lambda a: (a.section(".bss"), a.nop()), "nop: section .bss holds no bytes"),
    (lambda a: (a.section(".bss"), a.dq(1)), "dq 0x1: section .bss holds no bytes"),
    (lambda a: (a.section(".bss"), a.jmp("x")), "jmp x: section .bss holds no bytes"),
]


@pytest.mark.parametrize("action, message", ERROR_CASES,
                         ids=[m.split(":")[0] for _, m in ERROR_CASES])
def test_error_when_emitting(action, message):
    with pytest.raises(AsmError) as info:
        action(Assembler())
    assert message in str(info.value)
    assert "\n" not in str(info.value)


ASSEMBLE_ERROR_CASES = [
    (lambda a: a.jmp("nowhere"), "jmp nowhere: unknown label 'nowhere'"),
    (lambda a: a.jne("nowhere"), "jne nowhere: unknown label 'nowhere'"),
    (lambda a: a.call("nowhere"), "call nowhere: unknown label 'nowhere'"),
    (lambda a: a.mov(eax, dword["nowhere"]),
     "mov eax, dword ptr [rip+nowhere]: unknown label 'nowhere'"),
    (lambda a: a.mov(rax, "nowhere"), "mov rax, offset nowhere: unknown label"),
    (lambda a: a.dq(Ref("here") - "nowhere"), "dq here-nowhere: unknown label"),
    # values that only turn out too big once labels have addresses
    (lambda a: (a.label("far"), a.mov(eax, "far")),
     "mov eax, offset far: value 0x100000000 out of range for a 32-bit field"),
    (lambda a: (a.label("far"), a.mov(rax, qword[rbx + "far"])),
     "mov rax, qword ptr [rbx+far]: value 0x100000000 out of range"),
    (lambda a: (a.label("far"), a.dd("far")), "dd far: value 0x100000000 out of range"),
    (lambda a: a.call(0x10), "call 0x10: target out of range"),
    (lambda a: a.jmp(0x10), "jmp 0x10: target out of range"),
]


@pytest.mark.parametrize("action, message", ASSEMBLE_ERROR_CASES,
                         ids=[m.split(":")[0] for _, m in ASSEMBLE_ERROR_CASES])
def test_error_when_assembling(action, message):
    a = Assembler(base=0x100000000)
    a.label("here")
    action(a)                       # accepted while emitting ...
    with pytest.raises(AsmError) as info:
        a.assemble()                # ... reported once labels are known
    assert message in str(info.value)


# ---------------------------------------------------------------------------
# Round trip through capstone
# ---------------------------------------------------------------------------

def test_capstone_round_trip():
    capstone = pytest.importorskip("capstone")
    a = Assembler(base=0x200000)
    a.section(".text")
    a.label("entry")
    a.cli()
    a.mov(rax, 0x123456789)
    a.mov(qword[rbx + rcx*8 + 16], rax)
    a.lea(rdi, ptr["msg"])
    a.mov(cr3, rax)
    a.mov(rdx, cr2)
    a.xor(eax, eax)
    a.add(r12, 1)
    a.shl(rax, cl)
    a.imul(r8, qword[rsp + 8], 100)
    a.movzx(ecx, byte[rsi])
    a.out(dx, al)
    a.in_(eax, 0x60)
    a.push(r15)
    a.pop(rbp)
    a.call("entry")
    a.jne("entry")
    a.rep_stosb()
    a.invlpg(ptr[rax])
    a.lidt(ptr["msg"])
    a.iretq()
    a.section(".rodata")
    a.label("msg")
    a.asciz("hi")
    img = a.assemble()
    text = img.section(".text")
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    decoded = list(cs.disasm(text.data, text.vaddr))
    assert sum(i.size for i in decoded) == len(text.data)
    assert [i.mnemonic for i in decoded] == [
        "cli", "movabs", "mov", "lea", "mov", "mov", "xor", "add", "shl",
        "imul", "movzx", "out", "in", "push", "pop", "call", "jne",
        "rep stosb", "invlpg", "lidt", "iretq"]
    # the call and jne point back at entry, the lea at msg
    by_name = {i.mnemonic: i for i in decoded}
    assert by_name["call"].op_str == hex(img.symbols["entry"])
    assert by_name["jne"].op_str == hex(img.symbols["entry"])
    lea = by_name["lea"]
    disp = int.from_bytes(lea.bytes[3:7], "little", signed=True)
    assert lea.address + lea.size + disp == img.symbols["msg"]
