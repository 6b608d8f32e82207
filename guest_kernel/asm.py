"""Python-emitted x86: a small x86-64 assembler for writing guest kernels.

Guest kernels are written as Python code that calls one method per machine
instruction.  The bytes produced are identical to what GNU ``as`` (binutils
2.40, ``.intel_syntax noprefix``, default options) emits for the same
instruction, which ``tests/test_asm.py`` checks form by form.

Quick tour
----------
::

    from guest_kernel.asm import *

    a = Assembler(base=0x200000)
    a.section(".text")
    a.label("entry")
    a.mov(rax, 5)                          # 48 c7 c0 05 00 00 00
    a.mov(qword[rbx + rcx*8 + 16], rax)    # memory operand with size
    a.mov(eax, dword["counter"])           # a bare label = RIP-relative
    a.lea(rdi, ptr["msg"])                 # ptr[...] = memory without size
    a.out(0xCA, eax)
    a.jne("entry")                         # short or near, chosen for you
    a.hlt()

    a.section(".data")
    a.label("counter")
    a.dd(0)
    a.section(".rodata")
    a.label("msg")
    a.asciz("hello")

    img = a.assemble()
    img.sections        # [Section(name, vaddr, data, memsz, flags), ...]
    img.symbols         # {"entry": 0x200000, ...}
    img.section(".text")  # one Section by name
    img.listing         # [Line(address, data, text), ...] one per instruction
                        # or data directive; instruction text is GNU syntax

Operands
--------
* Registers: ``rax`` .. ``r15`` (64 bit), ``eax`` .. ``r15d`` (32),
  ``ax`` .. ``r15w`` (16), ``al cl dl bl spl bpl sil dil r8b`` .. ``r15b``
  (8; ah/ch/dh/bh are not supported), ``cr0 cr2 cr3 cr4`` and ``rip``.
* Immediates: Python ints.  They are range checked against the operand size
  (an 8/16/32-bit operand takes signed or unsigned values of that width; a
  64-bit operand of anything but ``mov`` takes a sign-extended 32-bit value,
  where 0xffffffffffffffff counts as -1, as in GNU as).  ``mov`` to a 64-bit
  register uses ``movabs`` only when the value does not fit that way.
* Memory: ``byte[...]``, ``word[...]``, ``dword[...]``, ``qword[...]`` and
  ``ptr[...]`` (no size: for lea, lgdt/lidt, invlpg, or when a register
  operand gives the size).  Inside the brackets write an address expression:

  - ``rbx``, ``rbx + 16``, ``rbp - 8``
  - ``rbx + rcx*8 + 16`` (base + index*scale + displacement),
    ``rcx*8 + 16`` (no base), ``0x1000`` (absolute address)
  - ``"counter"`` or ``rip + "counter"``: RIP-relative to a label
  - ``rip + "table" + 8`` or ``a.ref("table") + 8``: label plus offset
    (Python cannot add an int to a str, so start from ``rip`` or a Ref)
  - ``rcx*8 + "table"``: the label's absolute address as a 32-bit
    displacement next to registers

  ``rbx + rsp`` is read as ``rsp + rbx`` (rsp can only be a base), as GNU as
  does.  Displacements must fit in a signed 32-bit field.
* Labels: a ``str`` naming a label, or a :class:`Ref`.  A Ref is a small
  expression over labels: ``a.ref("end") - a.ref("start") - 1`` is fine
  wherever a label is (useful for a GDT limit: ``a.dw(a.ref("gdt_end") -
  "gdt" - 1)``).  ``a.here()`` returns a Ref to the current position (an
  anonymous label).  Label values are only known after :meth:`assemble`.

Label immediates
----------------
``a.mov(rax, "label")`` loads the label's address.  For a 64-bit register it
is always encoded as ``movabs`` with a 64-bit immediate (10 bytes), even if
the address would fit in 32 bits, so code size never depends on where labels
land.  For a 32-bit register (or a dword memory operand) it is a 32-bit
immediate, for a qword memory operand a sign-extended 32-bit immediate; the
value is range checked at assemble time.  Only ``mov`` and the data
directives (``dw``/``dd``/``dq``) take label values.

Branches
--------
``jmp``/``jcc`` to a label start out short (rel8) and are widened to near
(rel32) only when the target is out of reach, exactly like GNU as.  ``call``
to a label is always rel32.  ``call``/``jmp`` also take a 64-bit register or a
memory operand.  Condition codes: ``a.jcc("ne", target)`` or the named
methods ``jo jno jb jc jnae jae jnb jnc je jz jne jnz jbe jna ja jnbe js jns
jp jpe jnp jpo jl jnge jge jnl jle jng jg jnle``.

Sections and layout
-------------------
Known sections are ``.text`` (rx), ``.rodata`` (r), ``.data`` (rw) and
``.bss`` (rw, holds no bytes: only labels, ``reserve()`` and ``align()``).
Other names need ``flags``.  Sections are placed in the order they were first
opened, the first at ``base`` and every later one at the next 4096-byte
boundary.  Opening a section again appends to it.  Emitting before any
``section()`` call opens ``.text``.  Labels are global across sections.
``align(n)`` pads ``.text`` with single-byte NOPs (0x90; GNU as would use
multi-byte NOPs there) and other sections with zeros; ``align(n, fill)``
picks the byte.  Sections that stay empty are still listed (memsz 0).

Instructions
------------
mov (incl. cr0/cr2/cr3/cr4), movzx, movsx, movsxd, lea, push, pop,
add or adc sbb and_ sub xor cmp test, inc dec not_ neg, mul imul div idiv,
shl sal shr sar rol ror, jmp jcc call ret, in_ out, int_, lgdt lidt invlpg,
and without operands: nop hlt cli sti cld std int3 pause iretq cdq cqo cdqe rdtsc
cpuid rdmsr wrmsr ud2 syscall sysretq swapgs vmcall vmmcall wbinvd lfence
mfence sfence rep_movsb rep_movsq rep_stosb rep_stosq.
Data: db dw dd dq ascii asciz align reserve.

Errors
------
Mistakes raise :class:`AsmError` with a one-line message that starts with
the offending instruction, e.g. ``mov eax, rbx: operand sizes differ (32 vs
64 bits)``.  Problems that need label values (unknown labels, values out of
range) are reported by :meth:`assemble`.

Python keywords get a trailing underscore: ``and_``, ``or_``, ``not_``,
``in_``, ``int_``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "AsmError", "Assembler", "Image", "Section", "Line", "Ref", "Register",
    "Mem", "byte", "word", "dword", "qword", "ptr",
    "cr0", "cr2", "cr3", "cr4", "rip",
]


class AsmError(Exception):
    """A mistake in the guest source (bad operand, unknown label, ...)."""


# ---------------------------------------------------------------------------
# Registers
# ---------------------------------------------------------------------------

class Register:
    """A machine register.

    ``num`` is the 4-bit register number used in ModRM/REX (rax=0 .. r15=15).
    ``kind`` is "gpr" for general purpose registers, "cr" for control
    registers and "rip" for the instruction pointer (only usable in memory
    operands).
    """

    def __init__(self, name: str, bits: int, num: int, kind: str = "gpr"):
        self.name = name
        self.bits = bits
        self.num = num
        self.kind = kind

    @property
    def needs_rex(self) -> bool:
        # spl/bpl/sil/dil exist only when a REX prefix is present (without
        # one the same numbers mean ah/ch/dh/bh).
        return self.kind == "gpr" and self.bits == 8 and 4 <= self.num <= 7

    def __str__(self):
        return self.name

    def __repr__(self):
        return self.name

    # Address arithmetic: rbx + rcx*8 + 16 builds an Address.
    def __mul__(self, scale):
        if isinstance(scale, int):
            return Scaled(self, scale)
        return NotImplemented

    __rmul__ = __mul__

    def __add__(self, other):
        return Address(base=self) + other

    def __radd__(self, other):
        return Address(base=self) + other

    def __sub__(self, other):
        return Address(base=self) - other


def _make_registers(bits, names):
    return [Register(name, bits, num) for num, name in enumerate(names.split())]


(rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi,
 r8, r9, r10, r11, r12, r13, r14, r15) = _make_registers(
    64, "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15")
(eax, ecx, edx, ebx, esp, ebp, esi, edi,
 r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d) = _make_registers(
    32, "eax ecx edx ebx esp ebp esi edi "
        "r8d r9d r10d r11d r12d r13d r14d r15d")
(ax, cx, dx, bx, sp, bp, si, di,
 r8w, r9w, r10w, r11w, r12w, r13w, r14w, r15w) = _make_registers(
    16, "ax cx dx bx sp bp si di r8w r9w r10w r11w r12w r13w r14w r15w")
(al, cl, dl, bl, spl, bpl, sil, dil,
 r8b, r9b, r10b, r11b, r12b, r13b, r14b, r15b) = _make_registers(
    8, "al cl dl bl spl bpl sil dil r8b r9b r10b r11b r12b r13b r14b r15b")

cr0 = Register("cr0", 64, 0, "cr")
cr2 = Register("cr2", 64, 2, "cr")
cr3 = Register("cr3", 64, 3, "cr")
cr4 = Register("cr4", 64, 4, "cr")
rip = Register("rip", 64, 0, "rip")

REGISTERS = {r.name: r for r in globals().values() if isinstance(r, Register)}
__all__ += [name for name in REGISTERS if name not in __all__]


# ---------------------------------------------------------------------------
# Label expressions
# ---------------------------------------------------------------------------

class Ref:
    """A value that depends on label addresses: sum(coef * label) + offset.

    ``Ref("table") + 8`` is the address 8 bytes past ``table``;
    ``Ref("end") - "start"`` is the distance between two labels.
    """

    def __init__(self, name: str | None = None, offset: int = 0):
        self.terms: dict[str, int] = {name: 1} if name is not None else {}
        self.offset = offset

    @staticmethod
    def of(value) -> "Ref":
        """Turn a label name, an int or a Ref into a Ref."""
        if isinstance(value, Ref):
            return value
        if isinstance(value, str):
            return Ref(value)
        if isinstance(value, int):
            return Ref(None, value)
        raise TypeError(f"not a label or address: {value!r}")

    def _combined(self, other, sign):
        other = Ref.of(other)
        result = Ref(None, self.offset + sign * other.offset)
        result.terms = dict(self.terms)
        for name, coef in other.terms.items():
            result.terms[name] = result.terms.get(name, 0) + sign * coef
        result.terms = {n: c for n, c in result.terms.items() if c != 0}
        return result

    def __add__(self, other):
        if not isinstance(other, (int, str, Ref)):
            return NotImplemented
        return self._combined(other, +1)

    __radd__ = __add__

    def __sub__(self, other):
        if not isinstance(other, (int, str, Ref)):
            return NotImplemented
        return self._combined(other, -1)

    def __rsub__(self, other):
        if not isinstance(other, (int, str)):
            return NotImplemented
        return Ref.of(other)._combined(self, -1)

    def __str__(self):
        parts = []
        for name, coef in self.terms.items():
            if coef == 1:
                parts.append(name)
            elif coef == -1:
                parts.append("-" + name)
            else:
                parts.append(f"{coef}*{name}")
        if self.offset or not parts:
            parts.append(_hex(self.offset))
        return "+".join(parts).replace("+-", "-")

    def __repr__(self):
        return f"Ref({str(self)!r})"


def _hex(value: int) -> str:
    return f"-{-value:#x}" if value < 0 else f"{value:#x}"


# ---------------------------------------------------------------------------
# Memory operands
# ---------------------------------------------------------------------------

class Scaled:
    """``index * scale`` inside an address (validated when encoding)."""

    def __init__(self, reg: Register, scale: int):
        self.reg = reg
        self.scale = scale

    def __add__(self, other):
        return Address(index=self.reg, scale=self.scale) + other

    __radd__ = __add__

    def __sub__(self, other):
        return Address(index=self.reg, scale=self.scale) - other


class Address:
    """base + index*scale + disp (+ label).  Checked only when encoded, so
    that errors can name the instruction."""

    def __init__(self, base=None, index=None, scale=1, disp=0, target=None,
                 extra=()):
        self.base = base            # Register (gpr or rip) or None
        self.index = index          # Register or None
        self.scale = scale
        self.disp = disp            # int
        self.target = target        # Ref or None
        self.extra = tuple(extra)   # registers that did not fit: an error

    def _copy(self, **changes):
        fields = dict(base=self.base, index=self.index, scale=self.scale,
                      disp=self.disp, target=self.target, extra=self.extra)
        fields.update(changes)
        return Address(**fields)

    def __add__(self, other):
        if isinstance(other, int):
            return self._copy(disp=self.disp + other)
        if isinstance(other, (str, Ref)):
            target = Ref.of(other) if self.target is None else self.target + other
            return self._copy(target=target)
        if isinstance(other, Register):
            if self.base is None:
                return self._copy(base=other)
            if self.index is None:
                if other is rsp:    # rsp cannot be an index: swap, as GNU as does
                    return self._copy(base=other, index=self.base)
                return self._copy(index=other, scale=1)
            return self._copy(extra=self.extra + (other,))
        if isinstance(other, Scaled):
            if self.index is None:
                return self._copy(index=other.reg, scale=other.scale)
            return self._copy(extra=self.extra + (other.reg,))
        if isinstance(other, Address):
            result = self
            for part in (other.base, other.index and Scaled(other.index, other.scale),
                         other.disp, other.target, *other.extra):
                if part is not None:
                    result = result + part
            return result
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other):
        if isinstance(other, int):
            return self._copy(disp=self.disp - other)
        return NotImplemented

    def __str__(self):
        parts = []
        if self.base is not None:
            parts.append(self.base.name)
        if self.index is not None:
            parts.append(f"{self.index.name}*{self.scale}")
        parts += [r.name for r in self.extra]
        if self.target is not None:
            parts.append(str(self.target))
        if self.disp or not parts:
            parts.append(_hex(self.disp))
        return "+".join(parts).replace("+-", "-")


def _to_address(expr) -> Address:
    if isinstance(expr, Address):
        return expr
    if isinstance(expr, Register):
        return Address(base=expr)
    if isinstance(expr, Scaled):
        return Address(index=expr.reg, scale=expr.scale)
    if isinstance(expr, int):
        return Address(disp=expr)
    if isinstance(expr, (str, Ref)):
        return Address(base=rip, target=Ref.of(expr))
    raise TypeError(f"not an address expression: {expr!r}")


_SIZE_NAMES = {8: "byte", 16: "word", 32: "dword", 64: "qword"}


class Mem:
    """A memory operand: an Address plus an access size in bits (None for
    ``ptr[...]``)."""

    def __init__(self, bits: int | None, addr: Address):
        self.bits = bits
        self.addr = addr

    def __str__(self):
        if self.bits is None:
            return f"[{self.addr}]"
        return f"{_SIZE_NAMES[self.bits]} ptr [{self.addr}]"

    __repr__ = __str__


class _MemBuilder:
    """``qword[...]`` etc.: indexing builds a Mem of this size."""

    def __init__(self, bits):
        self.bits = bits

    def __getitem__(self, expr) -> Mem:
        return Mem(self.bits, _to_address(expr))


byte = _MemBuilder(8)
word = _MemBuilder(16)
dword = _MemBuilder(32)
qword = _MemBuilder(64)
ptr = _MemBuilder(None)


# ---------------------------------------------------------------------------
# Output objects
# ---------------------------------------------------------------------------

@dataclass
class Section:
    name: str
    vaddr: int
    data: bytes
    memsz: int
    flags: str


class Line(NamedTuple):
    """One listing line: an instruction or data directive and its bytes."""
    address: int
    data: bytes
    text: str


@dataclass
class Image:
    sections: list[Section]
    symbols: dict[str, int]
    listing: list[Line]

    def section(self, name: str) -> Section:
        for sec in self.sections:
            if sec.name == name:
                return sec
        raise KeyError(name)


# ---------------------------------------------------------------------------
# Items that make up a section before layout
# ---------------------------------------------------------------------------

@dataclass
class _Fixup:
    """A field of `size` bytes at `offset` in an instruction whose value is
    the label expression `expr`, filled in once labels have addresses.

    kind: "rel"    value - (address of the next instruction), signed
          "signed" value must fit the field as a signed number
          "any"    signed or unsigned both accepted
    """
    offset: int
    size: int
    expr: Ref
    kind: str


@dataclass
class _Bytes:          # an instruction or data with a fixed size
    text: str
    code: bytes
    fixups: list
    address: int = 0

    def size(self):
        return len(self.code)


@dataclass
class _Branch:         # jmp/jcc to a label: 2 bytes, or 5/6 once widened
    text: str
    cond: int | None   # None for jmp, else the condition code (0..15)
    target: Ref
    long: bool = False
    address: int = 0

    def size(self):
        if not self.long:
            return 2
        return 5 if self.cond is None else 6


@dataclass
class _Label:
    name: str
    address: int = 0

    def size(self):
        return 0


@dataclass
class _Align:
    boundary: int
    fill: int
    address: int = 0

    def size(self):
        return -self.address % self.boundary


@dataclass
class _Reserve:
    count: int
    address: int = 0

    def size(self):
        return self.count


class _SectionBuilder:
    def __init__(self, name, flags, nobits):
        self.name = name
        self.flags = flags
        self.nobits = nobits
        self.items = []


# ---------------------------------------------------------------------------
# Encoding helpers
# ---------------------------------------------------------------------------

def _fits_signed(value, bits):
    return -(1 << (bits - 1)) <= value < (1 << (bits - 1))


def _fits_any(value, bits):
    """Fits as either a signed or an unsigned `bits`-bit number."""
    return -(1 << (bits - 1)) <= value < (1 << bits)


def _as_signed(value, bits):
    """Reinterpret the low `bits` bits of value as a signed number."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _pack(value, size):
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _modrm(mod, reg, rm):
    return bytes([mod << 6 | (reg & 7) << 3 | (rm & 7)])


def _is_gpr(x, *sizes):
    return (isinstance(x, Register) and x.kind == "gpr"
            and (not sizes or x.bits in sizes))


def _is_label(x):
    return isinstance(x, (str, Ref))


def _operand_text(op):
    if isinstance(op, int):
        return _hex(op)
    return str(op)


_CONDITIONS = {
    "o": 0, "no": 1, "b": 2, "c": 2, "nae": 2, "ae": 3, "nb": 3, "nc": 3,
    "e": 4, "z": 4, "ne": 5, "nz": 5, "be": 6, "na": 6, "a": 7, "nbe": 7,
    "s": 8, "ns": 9, "p": 10, "pe": 10, "np": 11, "po": 11,
    "l": 12, "nge": 12, "ge": 13, "nl": 13, "le": 14, "ng": 14,
    "g": 15, "nle": 15,
}

# Instructions without operands: name -> bytes.
_SIMPLE = {
    "nop": b"\x90", "ret": b"\xc3", "hlt": b"\xf4", "cli": b"\xfa",
    "sti": b"\xfb", "cld": b"\xfc", "std": b"\xfd", "int3": b"\xcc",
    "pause": b"\xf3\x90", "iretq": b"\x48\xcf", "cdq": b"\x99",
    "cqo": b"\x48\x99", "cdqe": b"\x48\x98", "rdtsc": b"\x0f\x31", "cpuid": b"\x0f\xa2",
    "rdmsr": b"\x0f\x32", "wrmsr": b"\x0f\x30", "ud2": b"\x0f\x0b",
    "syscall": b"\x0f\x05", "sysretq": b"\x48\x0f\x07",
    "swapgs": b"\x0f\x01\xf8", "vmcall": b"\x0f\x01\xc1",
    "vmmcall": b"\x0f\x01\xd9", "wbinvd": b"\x0f\x09",
    "lfence": b"\x0f\xae\xe8", "mfence": b"\x0f\xae\xf0",
    "sfence": b"\x0f\xae\xf8",
    "rep movsb": b"\xf3\xa4", "rep movsq": b"\xf3\x48\xa5",
    "rep stosb": b"\xf3\xaa", "rep stosq": b"\xf3\x48\xab",
}

# The eight classic ALU operations: the /digit in ModRM and the opcode row.
_ALU_OPS = {"add": 0, "or": 1, "adc": 2, "sbb": 3,
            "and": 4, "sub": 5, "xor": 6, "cmp": 7}

_SHIFT_OPS = {"rol": 0, "ror": 1, "shl": 4, "sal": 4, "shr": 5, "sar": 7}

# Single-operand group 3/4/5 operations: (/digit, opcode for 8 bit, others).
_UNARY_OPS = {"inc": (0, 0xFE, 0xFF), "dec": (1, 0xFE, 0xFF),
              "not": (2, 0xF6, 0xF7), "neg": (3, 0xF6, 0xF7),
              "mul": (4, 0xF6, 0xF7), "imul": (5, 0xF6, 0xF7),
              "div": (6, 0xF6, 0xF7), "idiv": (7, 0xF6, 0xF7)}

_LABEL_RE = re.compile(r"[A-Za-z_.$][A-Za-z0-9_.$]*\Z")

_DEFAULT_FLAGS = {".text": "rx", ".rodata": "r", ".data": "rw", ".bss": "rw"}

PAGE_SIZE = 4096


# ---------------------------------------------------------------------------
# The assembler
# ---------------------------------------------------------------------------

class Assembler:
    """Collects instructions and data, then lays them out with assemble()."""

    def __init__(self, base: int = 0):
        self.base = base
        self._sections: dict[str, _SectionBuilder] = {}
        self._current: _SectionBuilder | None = None
        self._labels: set[str] = set()
        self._anonymous = 0
        self._symbols: dict[str, int] | None = None

    # -- sections, labels -------------------------------------------------

    def section(self, name: str, flags: str | None = None):
        """Switch to section `name`, creating it on first use."""
        sec = self._sections.get(name)
        if sec is None:
            if flags is None:
                flags = _DEFAULT_FLAGS.get(name)
                if flags is None:
                    raise AsmError(f"section {name}: unknown section, give flags")
            sec = _SectionBuilder(name, flags, nobits=name.startswith(".bss"))
            self._sections[name] = sec
        elif flags is not None and flags != sec.flags:
            raise AsmError(f"section {name}: flags {flags!r} differ from "
                           f"earlier {sec.flags!r}")
        self._current = sec

    def _section(self) -> _SectionBuilder:
        if self._current is None:
            self.section(".text")
        return self._current

    def label(self, name: str):
        """Define `name` at the current position."""
        if not isinstance(name, str) or not _LABEL_RE.match(name):
            raise AsmError(f"label {name!r}: not a valid label name")
        if name in REGISTERS:
            raise AsmError(f"label {name!r}: is a register name")
        if name in self._labels:
            raise AsmError(f"label {name!r}: defined twice")
        self._labels.add(name)
        self._section().items.append(_Label(name))

    def ref(self, name: str) -> Ref:
        """A Ref to label `name` (supports + and - with ints and labels)."""
        return Ref(name)

    def here(self) -> Ref:
        """A Ref to the current position (defines an anonymous label)."""
        self._anonymous += 1
        name = f"@here{self._anonymous}"     # '@' cannot start a user label
        self._section().items.append(_Label(name))
        return Ref(name)

    def symbol_address(self, name: str) -> int:
        """Address of label `name` (after assemble())."""
        if self._symbols is None:
            raise AsmError(f"symbol_address {name!r}: call assemble() first")
        if name not in self._symbols:
            raise AsmError(f"symbol_address {name!r}: unknown label")
        return self._symbols[name]

    # -- layout -------------------------------------------------------------

    def assemble(self) -> Image:
        """Lay out all sections, choose branch sizes and fill in labels.

        Branches start short.  Each pass assigns addresses with the current
        sizes, then widens every short branch whose target is out of rel8
        reach.  Branches only ever grow, so this stops, and it gives the same
        choice as GNU as.
        """
        sections = list(self._sections.values())
        branches = [item for sec in sections for item in sec.items
                    if isinstance(item, _Branch)]
        for branch in branches:
            branch.long = False
        while True:
            symbols, extents = _place(self.base, sections)
            widened = False
            for branch in branches:
                if branch.long:
                    continue
                target = _resolve(branch.text, branch.target, symbols)
                if not _fits_signed(target - (branch.address + 2), 8):
                    branch.long = True
                    widened = True
            if not widened:
                break

        out_sections = []
        listing = []
        for sec, (start, end) in zip(sections, extents):
            data = bytearray()
            for item in sec.items:
                if isinstance(item, _Bytes):
                    code = _apply_fixups(item, symbols)
                elif isinstance(item, _Branch):
                    code = _encode_branch(item, symbols)
                elif isinstance(item, _Align):
                    code = bytes([item.fill]) * item.size()
                elif isinstance(item, _Reserve):
                    code = bytes(item.count)
                else:
                    continue
                if isinstance(item, (_Bytes, _Branch)):
                    listing.append(Line(item.address, code, item.text))
                if not sec.nobits:
                    data += code
            out_sections.append(Section(sec.name, start, bytes(data),
                                        end - start, sec.flags))
        self._symbols = {name: addr for name, addr in symbols.items()
                         if not name.startswith("@")}
        return Image(out_sections, dict(self._symbols), listing)

    # -- data ---------------------------------------------------------------

    def _emit(self, text, code, fixups=()):
        sec = self._section()
        if sec.nobits:
            raise AsmError(f"{text}: section {sec.name} holds no bytes "
                           f"(use reserve())")
        sec.items.append(_Bytes(text, bytes(code), list(fixups)))

    def _data(self, name, size, values):
        text = f"{name} " + ", ".join(
            repr(v) if isinstance(v, (bytes, bytearray)) else _operand_text(v)
            for v in values)
        code = bytearray()
        fixups = []
        for v in values:
            if isinstance(v, (bytes, bytearray)) and size == 1:
                code += v
            elif isinstance(v, int):
                if not _fits_any(v, 8 * size):
                    raise AsmError(f"{text}: value {_hex(v)} does not fit "
                                   f"in {8 * size} bits")
                code += _pack(v, size)
            elif _is_label(v) and size > 1:
                fixups.append(_Fixup(len(code), size, Ref.of(v), "any"))
                code += bytes(size)
            else:
                raise AsmError(f"{text}: {name} cannot hold {v!r}")
        self._emit(text, code, fixups)

    def db(self, *values):
        """Bytes: ints (-128..255) and bytes objects."""
        self._data("db", 1, values)

    def dw(self, *values):
        """16-bit words: ints or label expressions."""
        self._data("dw", 2, values)

    def dd(self, *values):
        """32-bit words: ints or label expressions."""
        self._data("dd", 4, values)

    def dq(self, *values):
        """64-bit words: ints or label names/expressions (absolute)."""
        self._data("dq", 8, values)

    def ascii(self, text):
        """The characters of `text` (str or bytes) without a terminator."""
        data = text if isinstance(text, bytes) else text.encode("ascii")
        self._emit(f"ascii {text!r}", data)

    def asciz(self, text):
        """The characters of `text` followed by a zero byte."""
        data = text if isinstance(text, bytes) else text.encode("ascii")
        self._emit(f"asciz {text!r}", data + b"\0")

    def align(self, boundary: int, fill: int | None = None):
        """Pad to a multiple of `boundary` (NOPs in .text, else zeros)."""
        if boundary <= 0 or boundary & (boundary - 1):
            raise AsmError(f"align {boundary}: not a power of two")
        sec = self._section()
        if fill is None:
            fill = 0x90 if sec.name == ".text" else 0
        sec.items.append(_Align(boundary, fill))

    def reserve(self, count: int):
        """`count` zero bytes (no file bytes in .bss)."""
        if count < 0:
            raise AsmError(f"reserve {count}: negative size")
        self._section().items.append(_Reserve(count))

    # -- core instruction encoder ----------------------------------------------

    def _address_bytes(self, text, reg, mem: Mem):
        """Encode the ModRM byte, SIB byte and displacement for `mem` with
        `reg` (0..15) in the ModRM reg field.

        Returns (rex_x, rex_b, body, fixup) where fixup is None or a _Fixup
        whose offset is relative to the start of body.
        """
        addr = mem.addr
        base, index, disp, target = addr.base, addr.index, addr.disp, addr.target
        if addr.extra:
            raise AsmError(f"{text}: too many registers in address")
        for r in (base, index):
            if r is not None and not (_is_gpr(r, 64) or r is rip):
                raise AsmError(f"{text}: {r} cannot be used in an address "
                               f"(use 64-bit registers)")
        if index is not None:
            if index is rip:
                raise AsmError(f"{text}: rip cannot be an index")
            if index is rsp:
                raise AsmError(f"{text}: rsp cannot be an index")
            if addr.scale not in (1, 2, 4, 8):
                raise AsmError(f"{text}: scale must be 1, 2, 4 or 8")
        if target is None and not _fits_signed(disp, 32):
            raise AsmError(f"{text}: displacement out of range")

        # RIP-relative: ModRM mod=00 rm=101, then disp32 from the next insn.
        if base is rip:
            if index is not None:
                raise AsmError(f"{text}: rip-relative address cannot have an index")
            body = _modrm(0, reg, 0b101) + _pack(disp, 4)
            fixup = None
            if target is not None:
                fixup = _Fixup(1, 4, target + disp, "rel")
            return 0, 0, body, fixup

        # How big is the displacement?  A label always takes 32 bits; with no
        # base the encoding requires disp32; rbp/r13 as base have no
        # "no displacement" encoding, so they get disp8 = 0.
        if target is not None or base is None:
            disp_size = 4
        elif disp == 0 and base.num & 7 != 0b101:
            disp_size = 0
        elif _fits_signed(disp, 8):
            disp_size = 1
        else:
            disp_size = 4
        if base is None:
            mod = 0b00                      # with SIB base=101: disp32 only
        else:
            mod = {0: 0b00, 1: 0b01, 4: 0b10}[disp_size]

        # A SIB byte is needed for an index, for no base, and for rsp/r12 as
        # base (rm=100 means "SIB follows").
        if index is not None or base is None or base.num & 7 == 0b100:
            scale_bits = {1: 0, 2: 1, 4: 2, 8: 3}[addr.scale]
            sib_index = index.num if index is not None else 0b100  # 100 = none
            sib_base = base.num if base is not None else 0b101     # 101 = none
            body = _modrm(mod, reg, 0b100) + bytes(
                [scale_bits << 6 | (sib_index & 7) << 3 | (sib_base & 7)])
        else:
            body = _modrm(mod, reg, base.num)

        fixup = None
        if target is not None:
            fixup = _Fixup(len(body), 4, target + disp, "signed")
            body += bytes(4)
        elif disp_size:
            body += _pack(disp, disp_size)
        rex_x = index.num >> 3 if index is not None else 0
        rex_b = base.num >> 3 if base is not None else 0
        return rex_x, rex_b, body, fixup

    def _modrm_insn(self, text, opcode, reg, rm, bits=None, imm=b"",
                    imm_fixup=None):
        """Emit [66] [REX] opcode ModRM [SIB] [disp] [imm].

        reg:  a Register, or an int for the /digit opcode extension
        rm:   a Register or a Mem
        bits: operand size; 16 adds the 0x66 prefix and 64 sets REX.W
              (None for instructions that have no operand size)
        imm_fixup: a _Fixup (offset relative to the immediate) for a label
              immediate.
        """
        need_rex = False
        if isinstance(reg, Register):
            need_rex |= reg.needs_rex
            reg = reg.num
        fixups = []
        if isinstance(rm, Register):
            need_rex |= rm.needs_rex
            rex_x, rex_b, body = 0, rm.num >> 3, _modrm(0b11, reg, rm.num)
        else:
            rex_x, rex_b, body, fixup = self._address_bytes(text, reg, rm)
            if fixup is not None:
                fixups.append(fixup)
        rex = (0x40 | (bits == 64) << 3 | (reg >> 3) << 2
               | rex_x << 1 | rex_b)
        head = b"\x66" if bits == 16 else b""
        if rex != 0x40 or need_rex:
            head += bytes([rex])
        head += opcode
        for f in fixups:
            f.offset += len(head)
        if imm_fixup is not None:
            imm_fixup.offset += len(head) + len(body)
            fixups.append(imm_fixup)
        self._emit(text, head + body + imm, fixups)

    def _opreg_insn(self, text, opcode, reg, bits, imm=b"", imm_fixup=None):
        """Emit [66] [REX] (opcode + reg) [imm]: the register is encoded in
        the low three bits of the opcode (push, pop, mov reg, imm)."""
        rex = 0x40 | (bits == 64) << 3 | reg.num >> 3
        head = b"\x66" if bits == 16 else b""
        if rex != 0x40 or reg.needs_rex:
            head += bytes([rex])
        head += bytes([opcode + (reg.num & 7)])
        fixups = []
        if imm_fixup is not None:
            imm_fixup.offset += len(head)
            fixups.append(imm_fixup)
        self._emit(text, head + imm, fixups)

    @staticmethod
    def _text(mnemonic, *operands):
        if not operands:
            return mnemonic
        return f"{mnemonic} " + ", ".join(_operand_text(op) for op in operands)

    def _operand_size(self, text, dst, src=None):
        """Size in bits shared by dst and src (registers or memory)."""
        sizes = [op.bits for op in (dst, src)
                 if isinstance(op, (Register, Mem)) and op.bits is not None]
        if not sizes:
            raise AsmError(f"{text}: operand size unknown "
                           f"(write byte/word/dword/qword[...])")
        if len(sizes) == 2 and sizes[0] != sizes[1]:
            raise AsmError(f"{text}: operand sizes differ "
                           f"({sizes[0]} vs {sizes[1]} bits)")
        return sizes[0]

    @staticmethod
    def _check_rm(text, op, what="operand"):
        if not (_is_gpr(op) or isinstance(op, Mem)):
            raise AsmError(f"{text}: {what} must be a register or memory")

    @staticmethod
    def _immediate(text, value, bits):
        """Check that `value` fits an immediate of an operation of size
        `bits`; return it as a signed `bits`-bit number.

        Values may be written signed or unsigned (0xff and -1 are the same
        byte).  64-bit operations take a sign-extended 32-bit immediate, so
        there the 64-bit value must be between -2**31 and 2**31-1 (or the
        same numbers written unsigned, like 0xffffffffffffffff), as in GNU as.
        """
        if not _fits_any(value, bits):
            raise AsmError(f"{text}: immediate {_hex(value)} does not fit "
                           f"in {bits} bits")
        signed = _as_signed(value, bits)
        if bits == 64 and not _fits_signed(signed, 32):
            raise AsmError(f"{text}: immediate {_hex(value)} does not fit "
                           f"in a sign-extended 32-bit field")
        return signed

    # -- data movement ----------------------------------------------------------

    def mov(self, dst, src):
        """mov between registers, memory, immediates, labels and cr0-cr4."""
        text = self._text("mov", dst, "offset " + str(src) if _is_label(src) else src)
        # Control registers: 0F 22 /r (to cr) and 0F 20 /r (from cr).
        if isinstance(dst, Register) and dst.kind == "cr":
            if not _is_gpr(src, 64):
                raise AsmError(f"{text}: source must be a 64-bit register")
            return self._modrm_insn(text, b"\x0f\x22", dst, src)
        if isinstance(src, Register) and src.kind == "cr":
            if not _is_gpr(dst, 64):
                raise AsmError(f"{text}: destination must be a 64-bit register")
            return self._modrm_insn(text, b"\x0f\x20", src, dst)

        self._check_rm(text, dst, "destination")
        if isinstance(src, int):
            bits = self._operand_size(text, dst)
            if _is_gpr(dst):
                if bits == 64 and not _fits_signed(_as_signed(src, 64), 32):
                    # movabs: REX.W B8+r imm64
                    if not _fits_any(src, 64):
                        raise AsmError(f"{text}: immediate {_hex(src)} does "
                                       f"not fit in 64 bits")
                    return self._opreg_insn(text, 0xB8, dst, 64, _pack(src, 8))
                if bits != 64:
                    # B0+r ib / B8+r iw / B8+r id
                    self._immediate(text, src, bits)
                    opcode = 0xB0 if bits == 8 else 0xB8
                    return self._opreg_insn(text, opcode, dst, bits,
                                            _pack(src, bits // 8))
            # C6 /0 ib, C7 /0 iw/id (sign-extended for 64 bits)
            self._immediate(text, src, bits)
            opcode = b"\xc6" if bits == 8 else b"\xc7"
            return self._modrm_insn(text, opcode, 0, dst, bits,
                                    _pack(src, min(bits, 32) // 8))
        if _is_label(src):
            bits = self._operand_size(text, dst)
            if bits not in (32, 64):
                raise AsmError(f"{text}: a label needs a 32 or 64-bit destination")
            if _is_gpr(dst) and bits == 64:
                fixup = _Fixup(0, 8, Ref.of(src), "any")
                return self._opreg_insn(text, 0xB8, dst, 64, bytes(8), fixup)
            if _is_gpr(dst):
                fixup = _Fixup(0, 4, Ref.of(src), "any")
                return self._opreg_insn(text, 0xB8, dst, 32, bytes(4), fixup)
            fixup = _Fixup(0, 4, Ref.of(src), "signed" if bits == 64 else "any")
            return self._modrm_insn(text, b"\xc7", 0, dst, bits, bytes(4), fixup)
        self._check_rm(text, src, "source")
        bits = self._operand_size(text, dst, src)
        if isinstance(src, Register):
            # 88 /r (8 bit), 89 /r: store form, also used for reg, reg
            return self._modrm_insn(text, b"\x88" if bits == 8 else b"\x89",
                                    src, dst, bits)
        if isinstance(dst, Mem):
            raise AsmError(f"{text}: both operands are memory")
        return self._modrm_insn(text, b"\x8a" if bits == 8 else b"\x8b",
                                dst, src, bits)

    def _extend(self, name, dst, src, opcode_byte, opcode_word):
        text = self._text(name, dst, src)
        if not _is_gpr(dst, 16, 32, 64):
            raise AsmError(f"{text}: destination must be a 16, 32 or 64-bit register")
        self._check_rm(text, src, "source")
        if src.bits not in (8, 16):
            raise AsmError(f"{text}: source must be 8 or 16 bits")
        if src.bits >= dst.bits:
            raise AsmError(f"{text}: source must be smaller than destination")
        opcode = opcode_byte if src.bits == 8 else opcode_word
        self._modrm_insn(text, opcode, dst, src, dst.bits)

    def movzx(self, dst, src):
        """Zero-extend an 8 or 16-bit register or memory into a register."""
        self._extend("movzx", dst, src, b"\x0f\xb6", b"\x0f\xb7")

    def movsx(self, dst, src):
        """Sign-extend an 8 or 16-bit register or memory into a register."""
        self._extend("movsx", dst, src, b"\x0f\xbe", b"\x0f\xbf")

    def movsxd(self, dst, src):
        """Sign-extend a 32-bit register or memory into a 64-bit register."""
        text = self._text("movsxd", dst, src)
        if not _is_gpr(dst, 64):
            raise AsmError(f"{text}: destination must be a 64-bit register")
        self._check_rm(text, src, "source")
        if src.bits != 32:
            raise AsmError(f"{text}: source must be 32 bits")
        self._modrm_insn(text, b"\x63", dst, src, 64)

    def lea(self, dst, src):
        """Load the address of a memory operand: lea(rdi, ptr["msg"])."""
        text = self._text("lea", dst, src)
        if not _is_gpr(dst, 16, 32, 64):
            raise AsmError(f"{text}: destination must be a 16, 32 or 64-bit register")
        if not isinstance(src, Mem):
            raise AsmError(f"{text}: source must be a memory operand")
        self._modrm_insn(text, b"\x8d", dst, src, dst.bits)

    def push(self, src):
        """push a 64-bit register, qword memory or sign-extended imm32."""
        text = self._text("push", src)
        if isinstance(src, int):
            if _fits_signed(self._immediate(text, src, 64), 8):
                return self._emit(text, b"\x6a" + _pack(src, 1))
            return self._emit(text, b"\x68" + _pack(src, 4))
        self._push_pop(text, src, 0x50, b"\xff", 6)

    def pop(self, dst):
        """pop into a 64-bit register or qword memory."""
        self._push_pop(self._text("pop", dst), dst, 0x58, b"\x8f", 0)

    def _push_pop(self, text, op, reg_opcode, mem_opcode, digit):
        if _is_gpr(op, 64):
            return self._opreg_insn(text, reg_opcode, op, None)
        if isinstance(op, Mem) and op.bits in (None, 64):
            return self._modrm_insn(text, mem_opcode, digit, op)
        raise AsmError(f"{text}: operand must be a 64-bit register or qword memory")

    # -- arithmetic and logic ---------------------------------------------------

    def _alu(self, name, dst, src):
        digit = _ALU_OPS[name]
        text = self._text(name, dst, src)
        self._check_rm(text, dst, "destination")
        if isinstance(src, int):
            bits = self._operand_size(text, dst)
            value = self._immediate(text, src, bits)
            accumulator = _is_gpr(dst) and dst.num == 0
            if bits == 8:
                if accumulator:                     # 04+8*digit ib (al)
                    return self._emit(text, bytes([digit * 8 + 4]) + _pack(src, 1))
                return self._modrm_insn(text, b"\x80", digit, dst, 8, _pack(src, 1))
            if _fits_signed(value, 8):
                # 83 /digit ib: sign-extended 8-bit immediate
                return self._modrm_insn(text, b"\x83", digit, dst, bits,
                                        _pack(src, 1))
            imm = _pack(src, 2 if bits == 16 else 4)
            if accumulator:                         # 05+8*digit iw/id (ax/eax/rax)
                prefix = {16: b"\x66", 32: b"", 64: b"\x48"}[bits]
                return self._emit(text, prefix + bytes([digit * 8 + 5]) + imm)
            return self._modrm_insn(text, b"\x81", digit, dst, bits, imm)
        self._check_rm(text, src, "source")
        bits = self._operand_size(text, dst, src)
        if isinstance(src, Register):
            # 00+8*digit (8 bit) / 01+8*digit: r/m op= reg
            opcode = bytes([digit * 8 + (0 if bits == 8 else 1)])
            return self._modrm_insn(text, opcode, src, dst, bits)
        if isinstance(dst, Mem):
            raise AsmError(f"{text}: both operands are memory")
        # 02+8*digit / 03+8*digit: reg op= r/m
        opcode = bytes([digit * 8 + (2 if bits == 8 else 3)])
        return self._modrm_insn(text, opcode, dst, src, bits)

    def add(self, dst, src): self._alu("add", dst, src)
    def or_(self, dst, src): self._alu("or", dst, src)
    def adc(self, dst, src): self._alu("adc", dst, src)
    def sbb(self, dst, src): self._alu("sbb", dst, src)
    def and_(self, dst, src): self._alu("and", dst, src)
    def sub(self, dst, src): self._alu("sub", dst, src)
    def xor(self, dst, src): self._alu("xor", dst, src)
    def cmp(self, dst, src): self._alu("cmp", dst, src)

    def test(self, dst, src):
        """test: AND without storing, only flags."""
        text = self._text("test", dst, src)
        self._check_rm(text, dst)
        if isinstance(src, int):
            bits = self._operand_size(text, dst)
            self._immediate(text, src, bits)
            imm = _pack(src, min(bits, 32) // 8)
            if _is_gpr(dst) and dst.num == 0:       # A8 ib / A9 iw/id
                prefix = {8: b"", 16: b"\x66", 32: b"", 64: b"\x48"}[bits]
                return self._emit(text, prefix + (b"\xa8" if bits == 8 else b"\xa9") + imm)
            return self._modrm_insn(text, b"\xf6" if bits == 8 else b"\xf7",
                                    0, dst, bits, imm)
        self._check_rm(text, src)
        bits = self._operand_size(text, dst, src)
        if isinstance(dst, Mem) and isinstance(src, Mem):
            raise AsmError(f"{text}: both operands are memory")
        reg, rm = (src, dst) if isinstance(src, Register) else (dst, src)
        self._modrm_insn(text, b"\x84" if bits == 8 else b"\x85", reg, rm, bits)

    def xchg(self, dst, src):
        """Exchange; with a memory operand the CPU locks the bus (an atomic swap)."""
        text = self._text("xchg", dst, src)
        self._check_rm(text, dst)
        self._check_rm(text, src)
        if isinstance(dst, Mem) and isinstance(src, Mem):
            raise AsmError(f"{text}: both operands are memory")
        bits = self._operand_size(text, dst, src)
        if bits == 64 and _is_gpr(dst) and _is_gpr(src) and dst.num == src.num == 0:
            return self._emit(text, b"\x90")            # as GNU as spells xchg rax, rax
        if (bits > 8 and _is_gpr(dst) and _is_gpr(src) and (dst.num == 0 or src.num == 0)
                and not (bits == 32 and dst.num == src.num)):  # 90 would not zero-extend
            other = src if dst.num == 0 else dst        # 90+r: xchg with the accumulator
            return self._opreg_insn(text, 0x90, other, bits)
        reg, rm = (src, dst) if isinstance(src, Register) else (dst, src)
        self._modrm_insn(text, b"\x86" if bits == 8 else b"\x87", reg, rm, bits)

    def bsf(self, dst, src):
        """Index of the lowest set bit of src (ZF set, dst undefined, if src is 0)."""
        text = self._text("bsf", dst, src)
        if not _is_gpr(dst, 16, 32, 64):
            raise AsmError(f"{text}: destination must be a 16, 32 or 64-bit register")
        self._check_rm(text, src, "source")
        bits = self._operand_size(text, dst, src)
        self._modrm_insn(text, b"\x0f\xbc", dst, src, bits)

    def lock(self):
        """The lock prefix, for the read-modify-write instruction that follows."""
        self._emit("lock", b"\xf0")

    def _unary(self, name, op):
        digit, opcode8, opcode = _UNARY_OPS[name]
        text = self._text(name, op)
        self._check_rm(text, op)
        bits = self._operand_size(text, op)
        self._modrm_insn(text, bytes([opcode8 if bits == 8 else opcode]),
                         digit, op, bits)

    def inc(self, op): self._unary("inc", op)
    def dec(self, op): self._unary("dec", op)
    def not_(self, op): self._unary("not", op)
    def neg(self, op): self._unary("neg", op)

    def mul(self, op):
        """Unsigned rdx:rax = rax * op (also 8/16/32-bit forms)."""
        self._unary("mul", op)

    def div(self, op):
        """Unsigned rax = rdx:rax / op, rdx = remainder."""
        self._unary("div", op)

    def idiv(self, op):
        """Signed division, like div."""
        self._unary("idiv", op)

    def imul(self, dst, src=None, imm=None):
        """imul(op): rdx:rax = rax*op;  imul(reg, r/m): reg *= r/m;
        imul(reg, r/m, imm): reg = r/m * imm;  imul(reg, imm): reg *= imm."""
        if src is None:
            return self._unary("imul", dst)
        if isinstance(src, int) and imm is None:
            text = self._text("imul", dst, src)
            src, imm = dst, src
        else:
            text = self._text("imul", *(op for op in (dst, src, imm) if op is not None))
        if not _is_gpr(dst, 16, 32, 64):
            raise AsmError(f"{text}: destination must be a 16, 32 or 64-bit register")
        self._check_rm(text, src, "source")
        bits = self._operand_size(text, dst, src)
        if imm is None:
            return self._modrm_insn(text, b"\x0f\xaf", dst, src, bits)
        if not isinstance(imm, int):
            raise AsmError(f"{text}: third operand must be an immediate")
        if _fits_signed(self._immediate(text, imm, bits), 8):
            return self._modrm_insn(text, b"\x6b", dst, src, bits, _pack(imm, 1))
        return self._modrm_insn(text, b"\x69", dst, src, bits,
                                _pack(imm, 2 if bits == 16 else 4))

    def _shift(self, name, dst, count):
        digit = _SHIFT_OPS[name]
        text = self._text(name, dst, count)
        self._check_rm(text, dst, "destination")
        bits = self._operand_size(text, dst)
        small = bits == 8
        if count is cl:                             # D2/D3 /digit
            return self._modrm_insn(text, b"\xd2" if small else b"\xd3",
                                    digit, dst, bits)
        if not isinstance(count, int):
            raise AsmError(f"{text}: count must be an immediate or cl")
        if not 0 <= count <= 255:
            raise AsmError(f"{text}: count {count} out of range 0..255")
        if count == 1:                              # D0/D1 /digit
            return self._modrm_insn(text, b"\xd0" if small else b"\xd1",
                                    digit, dst, bits)
        self._modrm_insn(text, b"\xc0" if small else b"\xc1", digit, dst,
                         bits, _pack(count, 1))

    def shl(self, dst, count): self._shift("shl", dst, count)
    def sal(self, dst, count): self._shift("sal", dst, count)
    def shr(self, dst, count): self._shift("shr", dst, count)
    def sar(self, dst, count): self._shift("sar", dst, count)
    def rol(self, dst, count): self._shift("rol", dst, count)
    def ror(self, dst, count): self._shift("ror", dst, count)

    # -- control flow -------------------------------------------------------

    def jmp(self, target):
        """jmp to a label/address (short or near), a register or memory."""
        if _is_label(target) or isinstance(target, int):
            text = self._text("jmp", target)
            self._section_for_code(text).items.append(
                _Branch(text, None, Ref.of(target)))
        else:
            self._indirect("jmp", 4, target)

    def jcc(self, cond: str, target):
        """Conditional jump: jcc("ne", "loop")."""
        text = self._text(f"j{cond}", target)
        if cond not in _CONDITIONS:
            raise AsmError(f"{text}: unknown condition {cond!r}")
        if not (_is_label(target) or isinstance(target, int)):
            raise AsmError(f"{text}: target must be a label or address")
        self._section_for_code(text).items.append(
            _Branch(text, _CONDITIONS[cond], Ref.of(target)))

    def call(self, target):
        """call a label/address (always rel32), a register or memory."""
        if _is_label(target) or isinstance(target, int):
            text = self._text("call", target)
            self._emit(text, b"\xe8" + bytes(4),
                       [_Fixup(1, 4, Ref.of(target), "rel")])
        else:
            self._indirect("call", 2, target)

    def _indirect(self, name, digit, target):
        text = self._text(name, target)
        if _is_gpr(target, 64) or (isinstance(target, Mem)
                                   and target.bits in (None, 64)):
            return self._modrm_insn(text, b"\xff", digit, target)
        raise AsmError(f"{text}: target must be a label, a 64-bit register "
                       f"or qword memory")

    def _section_for_code(self, text):
        sec = self._section()
        if sec.nobits:
            raise AsmError(f"{text}: section {sec.name} holds no bytes")
        return sec

    def int_(self, vector: int):
        """int n: CD ib, except int 3 which is the one-byte CC (as GNU as
        emits it)."""
        text = self._text("int", vector)
        if not 0 <= vector <= 255:
            raise AsmError(f"{text}: vector out of range 0..255")
        self._emit(text, b"\xcc" if vector == 3 else bytes([0xCD, vector]))

    # -- port I/O ---------------------------------------------------------------

    def out(self, port, src):
        """out imm8/dx, al/ax/eax."""
        self._port_io("out", port, src, 0xE6, (port, src))

    def in_(self, dst, port):
        """in al/ax/eax, imm8/dx."""
        self._port_io("in", port, dst, 0xE4, (dst, port))

    def _port_io(self, name, port, data, opcode, operands):
        # E4/E5 (in imm8), E6/E7 (out imm8), EC/ED (in dx), EE/EF (out dx);
        # the low bit selects 8 bit vs 16/32 bit.
        text = self._text(name, *operands)
        if not (_is_gpr(data) and data.num == 0 and data.bits != 64):
            raise AsmError(f"{text}: data register must be al, ax or eax")
        prefix = b"\x66" if data.bits == 16 else b""
        opcode |= data.bits != 8
        if port is dx:
            return self._emit(text, prefix + bytes([opcode | 0x08]))
        if not isinstance(port, int) or not 0 <= port <= 255:
            raise AsmError(f"{text}: port must be dx or an immediate 0..255")
        self._emit(text, prefix + bytes([opcode, port]))

    # -- system instructions --------------------------------------------------

    def _system_mem(self, name, digit, mem):
        text = self._text(name, mem)
        if not isinstance(mem, Mem):
            raise AsmError(f"{text}: operand must be memory (ptr[...])")
        self._modrm_insn(text, b"\x0f\x01", digit, mem)

    def lgdt(self, mem):
        """Load the GDT register from a 10-byte pseudo-descriptor."""
        self._system_mem("lgdt", 2, mem)

    def lidt(self, mem):
        """Load the IDT register from a 10-byte pseudo-descriptor."""
        self._system_mem("lidt", 3, mem)

    def invlpg(self, mem):
        """Invalidate the TLB entry for the page containing `mem`."""
        self._system_mem("invlpg", 7, mem)


def _make_simple(name, code):
    def emit(self):
        self._emit(name, code)
    emit.__name__ = name.replace(" ", "_")
    emit.__doc__ = f"{name} ({code.hex(' ')})"
    return emit


def _make_jcc(cond):
    def jump(self, target):
        self.jcc(cond, target)
    jump.__name__ = f"j{cond}"
    jump.__doc__ = f"j{cond} to a label (short or near)."
    return jump


for _name, _code in _SIMPLE.items():
    setattr(Assembler, _name.replace(" ", "_"), _make_simple(_name, _code))
for _cond in _CONDITIONS:
    setattr(Assembler, f"j{_cond}", _make_jcc(_cond))
del _name, _code, _cond


# ---------------------------------------------------------------------------
# Layout and output
# ---------------------------------------------------------------------------

def _resolve(text, expr: Ref, symbols) -> int:
    value = expr.offset
    for name, coef in expr.terms.items():
        if name not in symbols:
            raise AsmError(f"{text}: unknown label '{name}'")
        value += coef * symbols[name]
    return value


def _place(base, sections):
    """Assign an address to every item; return (symbols, [(start, end)])."""
    symbols = {}
    extents = []
    address = base
    for i, sec in enumerate(sections):
        if i > 0:
            address = -(-address // PAGE_SIZE) * PAGE_SIZE
        start = address
        for item in sec.items:
            item.address = address
            if isinstance(item, _Label):
                symbols[item.name] = address
            address += item.size()
        extents.append((start, address))
    return symbols, extents


def _apply_fixups(item: _Bytes, symbols) -> bytes:
    code = bytearray(item.code)
    for f in item.fixups:
        value = _resolve(item.text, f.expr, symbols)
        bits = 8 * f.size
        if f.kind == "rel":
            value -= item.address + len(code)
            ok = _fits_signed(value, bits)
        elif f.kind == "signed":
            ok = _fits_signed(value, bits)
        else:
            ok = _fits_any(value, bits)
        if not ok:
            what = "target" if f.kind == "rel" else f"value {_hex(value)}"
            raise AsmError(f"{item.text}: {what} out of range for a "
                           f"{bits}-bit field")
        code[f.offset:f.offset + f.size] = _pack(value, f.size)
    return bytes(code)


def _encode_branch(branch: _Branch, symbols) -> bytes:
    target = _resolve(branch.text, branch.target, symbols)
    disp = target - (branch.address + branch.size())
    if not branch.long:
        opcode = 0xEB if branch.cond is None else 0x70 + branch.cond
        return bytes([opcode]) + _pack(disp, 1)
    if not _fits_signed(disp, 32):
        raise AsmError(f"{branch.text}: target out of range")
    if branch.cond is None:
        return b"\xe9" + _pack(disp, 4)
    return bytes([0x0F, 0x80 + branch.cond]) + _pack(disp, 4)

