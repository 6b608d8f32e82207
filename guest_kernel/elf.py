"""ELF64 (x86-64, little-endian) layouts and a writer for PV guest images with Xen notes."""
from __future__ import annotations

import struct
from pathlib import Path

# --- Numbers from the ELF specification (System V gABI and the x86-64 psABI) ---

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ELFDATA2MSB = 2
EV_CURRENT = 1

ET_NONE, ET_REL, ET_EXEC, ET_DYN, ET_CORE = 0, 1, 2, 3, 4
EM_X86_64 = 62

PT_NULL, PT_LOAD, PT_NOTE = 0, 1, 4
PF_X, PF_W, PF_R = 1, 2, 4

SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOTE, SHT_NOBITS = 0, 1, 2, 3, 7, 8
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
SHN_UNDEF, SHN_ABS = 0, 0xFFF1

STB_LOCAL, STB_GLOBAL = 0, 1
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE = 0, 1, 2, 3, 4

PAGE_SIZE = 4096
XEN_NOTE_OWNER = "Xen"

# --- Binary layouts: the one definition, shared by the writer and hypervisor/image.py ---

class Record(dict):
    """A parsed layout: its fields by key and as attributes (ehdr.e_phoff)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Layout:
    """A fixed little-endian record: (name, field) pairs, a field being a struct-module
    code ("B", "H", "I", "Q", "4s") or a nested Layout; name None is padding ("7x").
    parse(data) reads one from the start of data, build(mapping) writes one.

    The struct module rather than construct: importing construct was a quarter of
    `python -m hypervisor run`'s cold start, and parsing a Linux-sized symbol table
    one construct call per symbol took seconds.
    """

    def __init__(self, *fields: tuple[str | None, "str | Layout"]):
        self.fields = [(name, f) for name, f in fields if name is not None]
        codes = [f"{f.sizeof()}s" if isinstance(f, Layout) else f for _, f in fields]
        self._struct = struct.Struct("<" + "".join(codes))

    def sizeof(self) -> int:
        return self._struct.size

    def parse(self, data: bytes) -> Record:
        values = self._struct.unpack_from(data)
        return Record((name, f.parse(v) if isinstance(f, Layout) else v)
                      for (name, f), v in zip(self.fields, values))

    def build(self, values) -> bytes:
        return self._struct.pack(*(f.build(values[name]) if isinstance(f, Layout) else values[name]
                                   for name, f in self.fields))


Elf_Ident = Layout(
    ("magic", "4s"),
    ("ei_class", "B"),
    ("ei_data", "B"),
    ("ei_version", "B"),
    ("ei_osabi", "B"),
    ("ei_abiversion", "B"),
    (None, "7x"),
)

Elf64_Ehdr = Layout(
    ("e_ident", Elf_Ident),
    ("e_type", "H"),
    ("e_machine", "H"),
    ("e_version", "I"),
    ("e_entry", "Q"),
    ("e_phoff", "Q"),
    ("e_shoff", "Q"),
    ("e_flags", "I"),
    ("e_ehsize", "H"),
    ("e_phentsize", "H"),
    ("e_phnum", "H"),
    ("e_shentsize", "H"),
    ("e_shnum", "H"),
    ("e_shstrndx", "H"),
)

Elf64_Phdr = Layout(
    ("p_type", "I"),
    ("p_flags", "I"),
    ("p_offset", "Q"),
    ("p_vaddr", "Q"),
    ("p_paddr", "Q"),
    ("p_filesz", "Q"),
    ("p_memsz", "Q"),
    ("p_align", "Q"),
)

Elf64_Shdr = Layout(
    ("sh_name", "I"),
    ("sh_type", "I"),
    ("sh_flags", "Q"),
    ("sh_addr", "Q"),
    ("sh_offset", "Q"),
    ("sh_size", "Q"),
    ("sh_link", "I"),
    ("sh_info", "I"),
    ("sh_addralign", "Q"),
    ("sh_entsize", "Q"),
)

Elf64_Sym = Layout(
    ("st_name", "I"),
    ("st_info", "B"),
    ("st_other", "B"),
    ("st_shndx", "H"),
    ("st_value", "Q"),
    ("st_size", "Q"),
)

# A note is this header, then the owner name and the descriptor, each padded to 4 bytes.
Elf_Nhdr = Layout(
    ("n_namesz", "I"),
    ("n_descsz", "I"),
    ("n_type", "I"),
)

EHDR_SIZE = Elf64_Ehdr.sizeof()
PHDR_SIZE = Elf64_Phdr.sizeof()
SHDR_SIZE = Elf64_Shdr.sizeof()
SYM_SIZE = Elf64_Sym.sizeof()
NHDR_SIZE = Elf_Nhdr.sizeof()


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def flags_to_pflags(flags: str) -> int:
    """"rwx"-style string -> PF_R | PF_W | PF_X."""
    bits = {"r": PF_R, "w": PF_W, "x": PF_X}
    result = 0
    for ch in flags:
        if ch not in bits:
            raise ValueError(f"bad section flag {ch!r} in {flags!r} (use r, w, x)")
        result |= bits[ch]
    return result


def pflags_to_flags(p_flags: int) -> str:
    """PF_R | PF_W | PF_X -> "rwx"-style string (letters in that order)."""
    return "".join(ch for ch, bit in (("r", PF_R), ("w", PF_W), ("x", PF_X)) if p_flags & bit)


def encode_note(owner: str, note_type: int, desc: bytes) -> bytes:
    """One ELF note: header, NUL-terminated owner name and descriptor, each 4-byte padded."""
    name = owner.encode() + b"\0"
    header = Elf_Nhdr.build(dict(n_namesz=len(name), n_descsz=len(desc), n_type=note_type))
    return (header + name.ljust(align_up(len(name), 4), b"\0")
            + desc.ljust(align_up(len(desc), 4), b"\0"))


def note_descriptor(value: int | str | bytes) -> bytes:
    """A Xen note value as its descriptor: int -> 8 bytes LE, str -> NUL-terminated."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode() + b"\0"
    if isinstance(value, int):
        return value.to_bytes(8, "little")
    raise TypeError(f"note value must be int, str or bytes, not {type(value).__name__}")


class _StringTable:
    """An ELF string table under construction: offset 0 is the empty string."""

    def __init__(self) -> None:
        self.data = bytearray(b"\0")
        self.offsets: dict[str, int] = {"": 0}

    def add(self, text: str) -> int:
        if text not in self.offsets:
            self.offsets[text] = len(self.data)
            self.data += text.encode() + b"\0"
        return self.offsets[text]


def _section_index_for(address: int, sections: list) -> int:
    """1-based index of the section holding address (its end counts if nothing else does)."""
    for i, sec in enumerate(sections):
        if sec.vaddr <= address < sec.vaddr + sec.memsz:
            return i + 1
    for i, sec in enumerate(sections):
        if sec.vaddr <= address <= sec.vaddr + sec.memsz:
            return i + 1
    return SHN_ABS


def _check_sections(sections: list) -> None:
    for sec in sections:
        if sec.memsz < len(sec.data):
            raise ValueError(f"section {sec.name}: memsz {sec.memsz:#x} is less than its "
                             f"data size {len(sec.data):#x}")
        flags_to_pflags(sec.flags)
    ordered = sorted(sections, key=lambda s: s.vaddr)
    for prev, cur in zip(ordered, ordered[1:]):
        if prev.memsz and cur.memsz and cur.vaddr < prev.vaddr + prev.memsz:
            raise ValueError(f"sections {prev.name} and {cur.name} overlap")


def build_elf(sections, symbols: dict[str, int], entry: int,
              notes: list[tuple[int, int | str | bytes]],
              virt_base: int = 0, paddr_offset: int = 0) -> bytes:
    """An ET_EXEC x86-64 image: one PT_LOAD per section, a PT_NOTE over .note.Xen,
    and section headers with .symtab/.strtab/.shstrtab for readelf and objdump."""
    _check_sections(sections)
    sections = sorted(sections, key=lambda s: s.vaddr)
    loaded = [s for s in sections if s.memsz > 0]
    note_blob = b"".join(encode_note(XEN_NOTE_OWNER, t, note_descriptor(v)) for t, v in notes)

    # File layout: ELF header, program headers, notes, section contents (each at a file
    # offset congruent to its address modulo the page size), symbols, strings, section headers.
    phnum = len(loaded) + 1
    image = bytearray(EHDR_SIZE + phnum * PHDR_SIZE)

    def place(blob: bytes, offset: int) -> int:
        if len(image) < offset:
            image.extend(bytes(offset - len(image)))
        image[offset:offset + len(blob)] = blob
        return offset

    note_offset = place(note_blob, align_up(len(image), 4))

    section_offsets = []
    for sec in sections:
        offset = len(image) + (sec.vaddr - len(image)) % PAGE_SIZE
        if sec.data:
            place(sec.data, offset)
        elif offset - PAGE_SIZE >= 0:
            offset -= PAGE_SIZE  # no file bytes: point inside the file, still congruent
        section_offsets.append(offset)

    # Symbol table: the null symbol, then every symbol as a global, ordered by address.
    strtab = _StringTable()
    symtab = bytearray(bytes(SYM_SIZE))
    for name, value in sorted(symbols.items(), key=lambda item: (item[1], item[0])):
        shndx = _section_index_for(value, sections)
        if shndx == SHN_ABS:
            kind = STT_NOTYPE
        else:
            kind = STT_FUNC if "x" in sections[shndx - 1].flags else STT_OBJECT
        symtab += Elf64_Sym.build(dict(st_name=strtab.add(name), st_info=(STB_GLOBAL << 4) | kind,
                                       st_other=0, st_shndx=shndx, st_value=value, st_size=0))
    symtab_offset = place(bytes(symtab), align_up(len(image), 8))
    strtab_offset = place(bytes(strtab.data), len(image))

    # Section headers: null, the program sections, .note.Xen, .symtab, .strtab, .shstrtab.
    shstrtab = _StringTable()
    shdrs = [dict(sh_name=0, sh_type=SHT_NULL, sh_flags=0, sh_addr=0, sh_offset=0, sh_size=0,
                  sh_link=0, sh_info=0, sh_addralign=0, sh_entsize=0)]
    for sec, offset in zip(sections, section_offsets):
        sh_flags = SHF_ALLOC
        if "w" in sec.flags:
            sh_flags |= SHF_WRITE
        if "x" in sec.flags:
            sh_flags |= SHF_EXECINSTR
        nobits = not sec.data
        shdrs.append(dict(sh_name=shstrtab.add(sec.name),
                          sh_type=SHT_NOBITS if nobits else SHT_PROGBITS,
                          sh_flags=sh_flags, sh_addr=sec.vaddr, sh_offset=offset,
                          sh_size=sec.memsz if nobits else len(sec.data),
                          sh_link=0, sh_info=0, sh_addralign=PAGE_SIZE, sh_entsize=0))
    strtab_index = len(shdrs) + 2
    shdrs.append(dict(sh_name=shstrtab.add(".note.Xen"), sh_type=SHT_NOTE, sh_flags=0,
                      sh_addr=0, sh_offset=note_offset, sh_size=len(note_blob),
                      sh_link=0, sh_info=0, sh_addralign=4, sh_entsize=0))
    shdrs.append(dict(sh_name=shstrtab.add(".symtab"), sh_type=SHT_SYMTAB, sh_flags=0,
                      sh_addr=0, sh_offset=symtab_offset, sh_size=len(symtab),
                      sh_link=strtab_index, sh_info=1, sh_addralign=8, sh_entsize=SYM_SIZE))
    shdrs.append(dict(sh_name=shstrtab.add(".strtab"), sh_type=SHT_STRTAB, sh_flags=0,
                      sh_addr=0, sh_offset=strtab_offset, sh_size=len(strtab.data),
                      sh_link=0, sh_info=0, sh_addralign=1, sh_entsize=0))
    shstrtab_name = shstrtab.add(".shstrtab")
    shstrtab_offset = place(bytes(shstrtab.data), len(image))
    shdrs.append(dict(sh_name=shstrtab_name, sh_type=SHT_STRTAB, sh_flags=0,
                      sh_addr=0, sh_offset=shstrtab_offset, sh_size=len(shstrtab.data),
                      sh_link=0, sh_info=0, sh_addralign=1, sh_entsize=0))
    shoff = place(b"".join(Elf64_Shdr.build(h) for h in shdrs), align_up(len(image), 8))

    # Program headers: a PT_LOAD per non-empty section, then the PT_NOTE.
    phdrs = []
    for sec, offset in zip(sections, section_offsets):
        if sec.memsz == 0:
            continue
        phdrs.append(dict(p_type=PT_LOAD, p_flags=flags_to_pflags(sec.flags), p_offset=offset,
                          p_vaddr=sec.vaddr, p_paddr=sec.vaddr - virt_base + paddr_offset,
                          p_filesz=len(sec.data), p_memsz=sec.memsz, p_align=PAGE_SIZE))
    phdrs.append(dict(p_type=PT_NOTE, p_flags=PF_R, p_offset=note_offset, p_vaddr=0, p_paddr=0,
                      p_filesz=len(note_blob), p_memsz=len(note_blob), p_align=4))
    place(b"".join(Elf64_Phdr.build(h) for h in phdrs), EHDR_SIZE)

    header = Elf64_Ehdr.build(dict(
        e_ident=dict(magic=ELF_MAGIC, ei_class=ELFCLASS64, ei_data=ELFDATA2LSB,
                     ei_version=EV_CURRENT, ei_osabi=0, ei_abiversion=0),
        e_type=ET_EXEC, e_machine=EM_X86_64, e_version=EV_CURRENT, e_entry=entry,
        e_phoff=EHDR_SIZE, e_shoff=shoff, e_flags=0, e_ehsize=EHDR_SIZE,
        e_phentsize=PHDR_SIZE, e_phnum=len(phdrs), e_shentsize=SHDR_SIZE,
        e_shnum=len(shdrs), e_shstrndx=len(shdrs) - 1))
    place(header, 0)
    return bytes(image)


def write_elf(path: str | Path, sections, symbols: dict[str, int], entry: int,
              notes: list[tuple[int, int | str | bytes]],
              virt_base: int = 0, paddr_offset: int = 0) -> Path:
    """build_elf, written to path; returns the path."""
    path = Path(path)
    path.write_bytes(build_elf(sections, symbols, entry, notes, virt_base, paddr_offset))
    return path
