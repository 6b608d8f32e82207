"""Loading and validating a guest's ELF image: segments, Xen notes, entry and symbols.

A PV image is ELF64 for x86-64, laid out by its VIRT_BASE and PADDR_OFFSET notes. A
PVH image (an HVM container entered in 32-bit protected mode) is named by its
PHYS32_ENTRY note, may be ELF64 or ELF32 (EM_X86_64 or EM_386 containers, as XTF's
hvm64 images are) and is loaded at its segments' physical addresses. An image with
only a PHYS32_ENTRY note is PVH by default; one with an ENTRY note as well (Linux) is
PV unless asked otherwise."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from abi import C
from guest_kernel.elf import (
    EHDR_SIZE, ELF_MAGIC, ELFCLASS32, ELFCLASS64, ELFDATA2LSB, ELFDATA2MSB, EM_X86_64,
    ET_CORE, ET_DYN, ET_EXEC, ET_NONE, ET_REL, NHDR_SIZE, PAGE_SIZE, PHDR_SIZE, PT_LOAD, PT_NOTE,
    SHDR_SIZE, SHN_UNDEF, SHT_NOTE, SHT_SYMTAB, STT_FILE, STT_SECTION, SYM_SIZE,
    XEN_NOTE_OWNER, Elf64_Ehdr, Elf64_Phdr, Elf64_Shdr, Elf64_Sym, Elf_Ident, Elf_Nhdr, Layout,
    Record, align_up, pflags_to_flags,
)
from hypervisor.elf32 import EM_386, ELF32_LAYOUTS
from hypervisor.errors import ImageError
from hypervisor.files import RegularFile

ADDRESS_LIMIT = 1 << 64
# Canonical x86-64 addresses (48-bit): [0, 2^47) and [2^64 - 2^47, 2^64).
CANONICAL_LOW_END, CANONICAL_HIGH_START = 1 << 47, (1 << 64) - (1 << 47)
# Far above any real kernel (Debian's uncompressed vmlinux is 40-60 MB); a file bigger
# than this is a mistake and is refused before it is read.
MAX_IMAGE_BYTES = 256 << 20

E_TYPE_NAMES = {ET_NONE: "ET_NONE", ET_REL: "ET_REL", ET_EXEC: "ET_EXEC",
                ET_DYN: "ET_DYN", ET_CORE: "ET_CORE"}

# Notes whose descriptor is a number (4 or 8 bytes, little-endian).
NUMERIC_NOTES = {
    C.XEN_ELFNOTE_ENTRY: "ENTRY",
    C.XEN_ELFNOTE_HYPERCALL_PAGE: "HYPERCALL_PAGE",
    C.XEN_ELFNOTE_VIRT_BASE: "VIRT_BASE",
    C.XEN_ELFNOTE_PADDR_OFFSET: "PADDR_OFFSET",
    C.XEN_ELFNOTE_PHYS32_ENTRY: "PHYS32_ENTRY",
}
GUEST_TYPES = ("pv", "pvh")


@dataclass
class Segment:
    """One loaded PT_LOAD segment."""
    vaddr: int       # guest virtual address
    paddr: int       # pseudo-physical address: vaddr - virt_base
    data: bytes | memoryview  # file contents (p_filesz bytes); the rest up to memsz is zero
    memsz: int
    flags: str       # subset of "rwx", in that order

    @property
    def end(self) -> int:
        return self.vaddr + self.memsz


@dataclass
class PVImage:
    """A validated PV image, ready for the domain builder."""
    entry: int
    virt_base: int
    segments: list[Segment]
    hypercall_page: int | None
    guest_os: str | None
    notes: dict[int, bytes] = field(default_factory=dict)    # raw Xen note descriptors
    symbols: dict[str, int] = field(default_factory=dict)
    guest_type: str = "pv"          # "pv" or "pvh" (GUEST_TYPES)
    phys32_entry: int | None = None # the PHYS32_ENTRY note: a PVH guest's first instruction
    elf_class: int = ELFCLASS64

    @property
    def image_start(self) -> int:
        """Lowest virtual address of any loaded segment."""
        return min(seg.vaddr for seg in self.segments)

    @property
    def image_end(self) -> int:
        """Highest virtual address + 1 of any loaded segment (not page-rounded)."""
        return max(seg.end for seg in self.segments)


def _range(start: int, end: int) -> str:
    return f"[{start:#x}-{end:#x})"


def address_problem(start: int, end: int) -> str | None:
    """Why virtual [start, end) cannot be mapped on x86-64, or None."""
    if end > ADDRESS_LIMIT:
        return f"{_range(start, end)} wraps past 2^64"
    if start < CANONICAL_HIGH_START and end > CANONICAL_LOW_END:
        return (f"{_range(start, end)} is not canonical (x86-64 maps [0-{CANONICAL_LOW_END:#x}) "
                f"and [{CANONICAL_HIGH_START:#x}-2^64) only)")
    return None


class _Reader:
    """The file's bytes, with bounds-checked access that reports problems as ImageError."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data

    def fail(self, problem: str) -> ImageError:
        return ImageError(f"{self.name}: {problem}")

    def _within(self, offset: int, size: int, what: str) -> int:
        end = offset + size
        if end > len(self.data):
            raise self.fail(f"truncated: {what} {_range(offset, end)} runs past the end "
                            f"of the file ({len(self.data):#x} bytes)")
        return end

    def span(self, offset: int, size: int, what: str) -> bytes:
        return self.data[offset:self._within(offset, size, what)]

    def view(self, offset: int, size: int, what: str) -> memoryview:
        """As span, without a copy (a segment's contents: most of a kernel image)."""
        return memoryview(self.data)[offset:self._within(offset, size, what)]

    def parse(self, layout: Layout, offset: int, what: str) -> Record:
        return layout.parse(self.span(offset, layout.sizeof(), what))


def _read_source(source: str | Path | bytes, name: str | None) -> tuple[str, bytes | bytearray]:
    """The image's bytes. A file is read whole only once its ELF header has passed
    _check_header and its size is known to be sane."""
    if isinstance(source, (bytes, bytearray)):
        return name or "<image>", bytes(source)
    name = name or str(source)
    with RegularFile(source, name, ImageError) as f:
        head = f.read(EHDR_SIZE)
        _check_header(_Reader(name, head))
        if f.size > MAX_IMAGE_BYTES:
            raise ImageError(f"{name}: {f.size:,} bytes; kernel images above "
                             f"{MAX_IMAGE_BYTES >> 20} MiB are refused")
        return name, f.read_rest(head)


ELF64_LAYOUTS = dict(ehdr=Elf64_Ehdr, phdr=Elf64_Phdr, shdr=Elf64_Shdr, sym=Elf64_Sym,
                     phdr_size=PHDR_SIZE, shdr_size=SHDR_SIZE, sym_size=SYM_SIZE)


def _check_header(rd: _Reader):
    """The ELF header and the layouts of its class, once it is known to be ELF64 or
    ELF32, little-endian, an x86 machine (EM_X86_64; EM_386 for ELF32), ET_EXEC."""
    if not rd.data:
        raise rd.fail("empty file")
    if rd.data[:4] != ELF_MAGIC:
        raise rd.fail("not an ELF file (bad magic)")
    ident = rd.parse(Elf_Ident, 0, "ELF identification")
    if ident.ei_class not in (ELFCLASS32, ELFCLASS64):
        raise rd.fail(f"unknown ELF class {ident.ei_class}")
    if ident.ei_data == ELFDATA2MSB:
        raise rd.fail("big-endian ELF file (ELFDATA2MSB); x86-64 images are little-endian")
    if ident.ei_data != ELFDATA2LSB:
        raise rd.fail(f"unknown ELF data encoding {ident.ei_data}")
    layouts = ELF64_LAYOUTS if ident.ei_class == ELFCLASS64 else ELF32_LAYOUTS
    ehdr = rd.parse(layouts["ehdr"], 0, "ELF header")
    machines = (EM_X86_64,) if ident.ei_class == ELFCLASS64 else (EM_X86_64, EM_386)
    if ehdr.e_machine not in machines:
        expected = ("EM_X86_64 = 62" if ident.ei_class == ELFCLASS64
                    else "EM_386 = 3 or EM_X86_64 = 62")
        raise rd.fail(f"not an x86 ELF file (e_machine {ehdr.e_machine}, expected {expected})")
    if ehdr.e_type != ET_EXEC:
        kind = E_TYPE_NAMES.get(ehdr.e_type, str(ehdr.e_type))
        raise rd.fail(f"not an executable (e_type {kind}, expected ET_EXEC)")
    if ehdr.e_phnum and ehdr.e_phentsize != layouts["phdr_size"]:
        raise rd.fail(f"bad program header size {ehdr.e_phentsize} "
                      f"(expected {layouts['phdr_size']})")
    if ehdr.e_shnum and ehdr.e_shentsize != layouts["shdr_size"]:
        raise rd.fail(f"bad section header size {ehdr.e_shentsize} "
                      f"(expected {layouts['shdr_size']})")
    return ehdr, layouts, ident.ei_class


def _parse_notes(rd: _Reader, blob: bytes, where: str, notes: dict[int, bytes]) -> None:
    """Add the Xen notes found in a note area to notes (later duplicates win)."""
    pos = 0
    while pos + NHDR_SIZE <= len(blob):
        hdr = Elf_Nhdr.parse(blob[pos:pos + NHDR_SIZE])
        name_at = pos + NHDR_SIZE
        desc_at = name_at + align_up(hdr.n_namesz, 4)
        next_at = desc_at + align_up(hdr.n_descsz, 4)
        if desc_at + hdr.n_descsz > len(blob):
            raise rd.fail(f"malformed note at offset {pos:#x} of {where}: "
                          f"it runs past the end of the note area")
        owner = blob[name_at:name_at + hdr.n_namesz].rstrip(b"\0")
        if owner == XEN_NOTE_OWNER.encode():
            notes[hdr.n_type] = blob[desc_at:desc_at + hdr.n_descsz]
        pos = next_at


def _numeric_note(rd: _Reader, notes: dict[int, bytes], note_type: int) -> int | None:
    desc = notes.get(note_type)
    if desc is None:
        return None
    if len(desc) not in (4, 8):
        raise rd.fail(f"{NUMERIC_NOTES[note_type]} note has a {len(desc)}-byte value "
                      f"(expected 4 or 8 bytes)")
    return int.from_bytes(desc, "little")


def _read_symbols(rd: _Reader, shdrs: list, layouts: dict = ELF64_LAYOUTS) -> dict[str, int]:
    symbols: dict[str, int] = {}
    for index, sh in enumerate(shdrs):
        if sh.sh_type != SHT_SYMTAB:
            continue
        if sh.sh_link >= len(shdrs):
            raise rd.fail(f"section {index} (symbol table) links to missing string "
                          f"table {sh.sh_link}")
        strings = shdrs[sh.sh_link]
        table = rd.span(sh.sh_offset, sh.sh_size, f"section {index} (symbol table)")
        names = rd.span(strings.sh_offset, strings.sh_size, f"section {sh.sh_link} (string table)")
        size = layouts["sym_size"]
        for at in range(0, len(table) - size + 1, size):
            sym = layouts["sym"].parse(table[at:at + size])
            if sym.st_shndx == SHN_UNDEF or (sym.st_info & 0xF) in (STT_SECTION, STT_FILE):
                continue
            end = names.find(b"\0", sym.st_name)
            name = names[sym.st_name:end if end >= 0 else len(names)].decode(errors="replace")
            if name:
                symbols[name] = sym.st_value
    return symbols


def _guest_type(rd: _Reader, notes: dict[int, bytes], elf_class: int,
                requested: str | None) -> str:
    """pv or pvh: what was asked for, else what the notes say (XEN-ABI-FACTS 15, 26)."""
    phys32 = C.XEN_ELFNOTE_PHYS32_ENTRY in notes
    if requested is not None and requested not in GUEST_TYPES:
        raise rd.fail(f"unknown guest type {requested!r} (known: {', '.join(GUEST_TYPES)})")
    if requested == "pvh" and not phys32:
        raise rd.fail("cannot boot as PVH: the image has no PHYS32_ENTRY note")
    if elf_class == ELFCLASS32:
        if not phys32:
            raise rd.fail("a 32-bit ELF image (ELFCLASS32) boots only as PVH, and this one "
                          "has no PHYS32_ENTRY note")
        if requested == "pv":
            raise rd.fail("cannot boot as PV: a 32-bit ELF image (ELFCLASS32) boots only as PVH")
        return "pvh"
    if requested is not None:
        return requested
    return "pvh" if phys32 and C.XEN_ELFNOTE_ENTRY not in notes else "pv"


def load_image(source: str | Path | bytes, mem_bytes: int, name: str | None = None,
               guest_type: str | None = None) -> PVImage:
    """Read and check an ELF image for a domain of mem_bytes of pseudo-physical memory.

    name labels error messages (default: the path as given, or "<image>" for bytes).
    guest_type: "pv" or "pvh"; None lets the image's notes decide.
    """
    name, data = _read_source(source, name)
    rd = _Reader(name, data)
    ehdr, layouts, elf_class = _check_header(rd)

    phdrs = [rd.parse(layouts["phdr"], ehdr.e_phoff + i * layouts["phdr_size"], "program headers")
             for i in range(ehdr.e_phnum)]
    shdrs = []
    if ehdr.e_shoff and ehdr.e_shnum:
        shdrs = [rd.parse(layouts["shdr"], ehdr.e_shoff + i * layouts["shdr_size"],
                          "section headers")
                 for i in range(ehdr.e_shnum)]

    # Xen notes: from PT_NOTE segments, else from SHT_NOTE sections.
    notes: dict[int, bytes] = {}
    for i, ph in enumerate(phdrs):
        if ph.p_type == PT_NOTE:
            where = f"segment {i} (notes)"
            _parse_notes(rd, rd.span(ph.p_offset, ph.p_filesz, where), where, notes)
    if not any(ph.p_type == PT_NOTE for ph in phdrs):
        for i, sh in enumerate(shdrs):
            if sh.sh_type == SHT_NOTE:
                where = f"section {i} (notes)"
                _parse_notes(rd, rd.span(sh.sh_offset, sh.sh_size, where), where, notes)

    guest_type = _guest_type(rd, notes, elf_class, guest_type)
    virt_base = _numeric_note(rd, notes, C.XEN_ELFNOTE_VIRT_BASE)
    paddr_offset = _numeric_note(rd, notes, C.XEN_ELFNOTE_PADDR_OFFSET)
    if paddr_offset is not None and virt_base is None:
        raise rd.fail("PADDR_OFFSET note without a VIRT_BASE note")
    virt_base = virt_base or 0
    paddr_offset = paddr_offset or 0
    if guest_type == "pvh":
        virt_base = paddr_offset = 0    # PVH: loaded at the physical addresses, paging off

    # Loadable segments: virtual = p_paddr + VIRT_BASE - PADDR_OFFSET; pseudo-physical =
    # virtual - VIRT_BASE.  Segment numbers in messages are program header indexes.
    segments: list[Segment] = []
    numbers: list[int] = []
    for i, ph in enumerate(phdrs):
        if ph.p_type != PT_LOAD or ph.p_memsz == 0:
            continue
        if ph.p_filesz > ph.p_memsz:
            raise rd.fail(f"segment {i}: file size {ph.p_filesz:#x} exceeds memory size "
                          f"{ph.p_memsz:#x}")
        contents = rd.view(ph.p_offset, ph.p_filesz, f"segment {i} data")
        vaddr = ph.p_paddr + virt_base - paddr_offset
        if ph.p_paddr + ph.p_memsz > ADDRESS_LIMIT or not 0 <= vaddr <= ADDRESS_LIMIT - ph.p_memsz:
            raise rd.fail(f"segment {i}: address range wraps around (p_paddr {ph.p_paddr:#x}, "
                          f"size {ph.p_memsz:#x})")
        why = address_problem(vaddr, vaddr + ph.p_memsz)
        if why:
            raise rd.fail(f"segment {i} {why}")
        paddr = vaddr - virt_base
        if paddr < 0:
            raise rd.fail(f"segment {i} {_range(vaddr, vaddr + ph.p_memsz)} lies below VIRT_BASE "
                          f"{virt_base:#x} (p_paddr {ph.p_paddr:#x} is less than PADDR_OFFSET "
                          f"{paddr_offset:#x})")
        if paddr + ph.p_memsz > mem_bytes:
            raise rd.fail(f"segment {i} {_range(vaddr, vaddr + ph.p_memsz)} lies outside guest "
                          f"memory: pseudo-physical {_range(paddr, paddr + ph.p_memsz)} is not "
                          f"within {_range(0, mem_bytes)}")
        segment = Segment(vaddr=vaddr, paddr=paddr, data=contents, memsz=ph.p_memsz,
                          flags=pflags_to_flags(ph.p_flags))
        for other, number in zip(segments, numbers):
            if segment.vaddr < other.end and other.vaddr < segment.end:
                raise rd.fail(f"segment {i} {_range(segment.vaddr, segment.end)} overlaps "
                              f"segment {number} {_range(other.vaddr, other.end)}")
        segments.append(segment)
        numbers.append(i)
    if not segments:
        raise rd.fail("no loadable (PT_LOAD) segments")

    phys32_entry = _numeric_note(rd, notes, C.XEN_ELFNOTE_PHYS32_ENTRY)
    entry = _numeric_note(rd, notes, C.XEN_ELFNOTE_ENTRY)
    if entry is None:
        entry = ehdr.e_entry
    if guest_type == "pvh":
        entry = phys32_entry
        if entry >= 1 << 32:
            raise rd.fail(f"PHYS32_ENTRY {entry:#x} is above 4 GiB")
    if entry == 0:
        raise rd.fail("no entry point (e_entry is 0 and there is no ENTRY note)")
    if not any("x" in seg.flags and seg.vaddr <= entry < seg.end for seg in segments):
        raise rd.fail(f"entry point {entry:#x} is not inside an executable loaded segment")

    image = PVImage(entry=entry, virt_base=virt_base, segments=segments, hypercall_page=None,
                    guest_os=None, notes=notes, symbols=_read_symbols(rd, shdrs, layouts),
                    guest_type=guest_type, phys32_entry=phys32_entry, elf_class=elf_class)

    hypercall_page = _numeric_note(rd, notes, C.XEN_ELFNOTE_HYPERCALL_PAGE)
    if hypercall_page is not None and guest_type == "pv":
        if hypercall_page % PAGE_SIZE:
            raise rd.fail(f"HYPERCALL_PAGE {hypercall_page:#x} is not page-aligned")
        start, end = image.image_start, align_up(image.image_end, PAGE_SIZE)
        if not start <= hypercall_page <= end - PAGE_SIZE:
            raise rd.fail(f"HYPERCALL_PAGE {hypercall_page:#x} is outside the loaded image "
                          f"{_range(start, end)}")
        image.hypercall_page = hypercall_page

    guest_os = notes.get(C.XEN_ELFNOTE_GUEST_OS)
    if guest_os is not None:
        image.guest_os = guest_os.split(b"\0", 1)[0].decode(errors="replace")
    return image
