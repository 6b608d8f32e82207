"""Tests for the ELF writer (guest_kernel/elf.py) and the PV image loader (hypervisor/image.py)."""
from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from abi import C, ffi
from guest_kernel.asm import Section   # the assembler's own section objects
from guest_kernel.elf import (
    EHDR_SIZE, ELFCLASS32, ELFDATA2MSB, ET_DYN, ET_REL, NHDR_SIZE, PHDR_SIZE, PT_LOAD, PT_NOTE,
    PT_NULL, Elf64_Ehdr, Elf64_Phdr, Elf_Nhdr, build_elf, write_elf,
)
from hypervisor.errors import ImageError
from hypervisor.image import PVImage, Segment, load_image

MEM = 16 << 20
TEXT = b"\x48\x31\xc0\xc3"          # xor %rax,%rax ; ret
DATA = b"\x01\x02\x03\x04"
LINUX_BASE = 0xffffffff80000000




def sections(base: int = 0x100000) -> list[Section]:
    return [
        Section(".text", base, TEXT, len(TEXT), "rx"),
        Section(".data", base + 0x1000, DATA, 8, "rw"),
        Section(".bss", base + 0x2000, b"", 0x2000, "rw"),
    ]


SYMBOLS = {"_start": 0x100000, "counter": 0x101000, "stack": 0x102000}


def notes(**override) -> list[tuple[int, object]]:
    """The good image's Xen notes; override=None drops one, a value replaces it."""
    values = dict(GUEST_OS="trapless-test", ENTRY=0x100000, VIRT_BASE=0,
                  HYPERCALL_PAGE=0x101000)
    values.update(override)
    return [(getattr(C, f"XEN_ELFNOTE_{k}"), v) for k, v in values.items() if v is not None]


def good_image(**note_override) -> bytes:
    return build_elf(sections(), SYMBOLS, 0x100000, notes(**note_override))


# --- patching a good image's fields through the ELF layouts ---

def patch_ehdr(data: bytes, **fields) -> bytes:
    ehdr = Elf64_Ehdr.parse(data)
    for key, value in fields.items():
        if key.startswith("ei_"):
            ehdr.e_ident[key] = value
        else:
            ehdr[key] = value
    return Elf64_Ehdr.build(ehdr) + data[EHDR_SIZE:]


def phdr_offset(data: bytes, index: int) -> int:
    return Elf64_Ehdr.parse(data).e_phoff + index * PHDR_SIZE


def read_phdr(data: bytes, index: int):
    at = phdr_offset(data, index)
    return Elf64_Phdr.parse(data[at:at + PHDR_SIZE])


def patch_phdr(data: bytes, index: int, **fields) -> bytes:
    phdr = read_phdr(data, index)
    phdr.update(fields)
    at = phdr_offset(data, index)
    return data[:at] + Elf64_Phdr.build(phdr) + data[at + PHDR_SIZE:]


def error_of(data: bytes, tmp_path: Path, monkeypatch, mem: int = MEM) -> str:
    """Write data to guest.elf, load it, and return the ImageError's message."""
    monkeypatch.chdir(tmp_path)
    Path("guest.elf").write_bytes(data)
    with pytest.raises(ImageError) as info:
        load_image("guest.elf", mem)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the writer, checked with binutils ---

needs_binutils = pytest.mark.skipif(not (shutil.which("readelf") and shutil.which("objdump")),
                                    reason="binutils (readelf, objdump) not installed")


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def squeezed_lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines()]


@pytest.fixture
def elf_file(tmp_path: Path) -> Path:
    return write_elf(tmp_path / "guest.elf", sections(), SYMBOLS, 0x100000, notes())


@needs_binutils
def test_readelf_lists_xen_notes(elf_file):
    # readelf 2.40 has no decoder for owner "Xen": it prints the type number (or the
    # name of the generic note with the same number) and, on the next line, the raw
    # descriptor bytes.
    lines = [line for line in squeezed_lines(run("readelf", "-n", str(elf_file))) if line]
    assert lines[:2] == ["Displaying notes found in: .note.Xen", "Owner Data size Description"]
    assert lines[2:] == [
        "Xen 0x0000000e Unknown note type: (0x00000006)",                   # GUEST_OS
        "description data: 74 72 61 70 6c 65 73 73 2d 74 65 73 74 00",     # "trapless-test"
        "Xen 0x00000008 NT_VERSION (version)",                              # ENTRY (1)
        "description data: 00 00 10 00 00 00 00 00",                        # 0x100000
        "Xen 0x00000008 Unknown note type: (0x00000003)",                   # VIRT_BASE
        "description data: 00 00 00 00 00 00 00 00",                        # 0
        "Xen 0x00000008 NT_ARCH (architecture)",                            # HYPERCALL_PAGE (2)
        "description data: 00 10 10 00 00 00 00 00",                        # 0x101000
    ]


@needs_binutils
def test_readelf_lists_symbols(elf_file):
    lines = squeezed_lines(run("readelf", "-s", "-W", str(elf_file)))
    assert "1: 0000000000100000 0 FUNC GLOBAL DEFAULT 1 _start" in lines
    assert "2: 0000000000101000 0 OBJECT GLOBAL DEFAULT 2 counter" in lines
    assert "3: 0000000000102000 0 OBJECT GLOBAL DEFAULT 3 stack" in lines


@needs_binutils
def test_readelf_shows_load_segments(elf_file):
    text = run("readelf", "-l", "-W", str(elf_file))
    lines = squeezed_lines(text)
    assert "Elf file type is EXEC (Executable file)" in lines
    assert "Entry point 0x100000" in lines
    loads = [line for line in lines if line.startswith("LOAD ")]
    assert loads == [
        "LOAD 0x001000 0x0000000000100000 0x0000000000100000 0x000004 0x000004 R E 0x1000",
        "LOAD 0x002000 0x0000000000101000 0x0000000000101000 0x000004 0x000008 RW 0x1000",
        "LOAD 0x002000 0x0000000000102000 0x0000000000102000 0x000000 0x002000 RW 0x1000",
    ]
    assert any(line.startswith("NOTE ") for line in lines)
    assert "warning" not in text.lower()


@needs_binutils
def test_readelf_shows_sections(elf_file):
    lines = squeezed_lines(run("readelf", "-S", "-W", str(elf_file)))
    found = {line.split()[2]: line.split()[3] for line in lines
             if line.startswith("[") and len(line.split()) > 3 and line.split()[2].startswith(".")}
    assert found == {".text": "PROGBITS", ".data": "PROGBITS", ".bss": "NOBITS",
                     ".note.Xen": "NOTE", ".symtab": "SYMTAB", ".strtab": "STRTAB",
                     ".shstrtab": "STRTAB"}


@needs_binutils
def test_objdump_disassembles_text(elf_file):
    out = run("objdump", "-d", str(elf_file))
    assert "file format elf64-x86-64" in out
    assert "0000000000100000 <_start>:" in out
    instructions = [line.split("\t")[-1].strip() for line in out.splitlines()
                    if line.startswith("  1000")]
    assert instructions == ["xor    %rax,%rax", "ret"]


@needs_binutils
def test_linux_style_physical_addresses(tmp_path):
    path = write_elf(tmp_path / "linux.elf", sections(LINUX_BASE + 0x1000000), {},
                     LINUX_BASE + 0x1000000,
                     [(C.XEN_ELFNOTE_VIRT_BASE, LINUX_BASE)], virt_base=LINUX_BASE)
    lines = squeezed_lines(run("readelf", "-l", "-W", str(path)))
    assert ("LOAD 0x001000 0xffffffff81000000 0x0000000001000000 0x000004 0x000004 R E 0x1000"
            in lines)


def test_write_elf_writes_build_elf_bytes(tmp_path):
    path = write_elf(tmp_path / "a.elf", sections(), SYMBOLS, 0x100000, notes())
    assert path.read_bytes() == good_image()


def test_note_values_are_encoded_as_xen_expects():
    data = build_elf(sections(), {}, 0x100000,
                     [(C.XEN_ELFNOTE_ENTRY, 0x100000), (C.XEN_ELFNOTE_GUEST_OS, "ab"),
                      (C.XEN_ELFNOTE_INFO, b"\x01\x02\x03\x04\x05")])
    image = load_image(data, MEM)
    assert image.notes == {C.XEN_ELFNOTE_ENTRY: (0x100000).to_bytes(8, "little"),
                           C.XEN_ELFNOTE_GUEST_OS: b"ab\0",
                           C.XEN_ELFNOTE_INFO: b"\x01\x02\x03\x04\x05"}
    note_phdr = read_phdr(data, 3)
    assert note_phdr.p_type == PT_NOTE
    # three notes, each 12-byte header + "Xen\0", descriptors padded to 4: 8, 4 (3), 8 (5)
    assert note_phdr.p_filesz == 3 * (NHDR_SIZE + 4) + 8 + 4 + 8
    assert note_phdr.p_offset % 4 == 0


def test_file_offsets_are_congruent_to_addresses():
    data = good_image()
    for index in range(3):
        phdr = read_phdr(data, index)
        assert phdr.p_type == PT_LOAD
        assert phdr.p_offset % 4096 == phdr.p_vaddr % 4096
        assert phdr.p_offset + phdr.p_filesz <= len(data)


# --- the loader: good images ---

def test_round_trip(tmp_path):
    path = write_elf(tmp_path / "guest.elf", sections(), SYMBOLS, 0x100000, notes())
    for source in (good_image(), path, str(path)):
        image = load_image(source, MEM)
        assert isinstance(image, PVImage)
        assert image.entry == 0x100000
        assert image.virt_base == 0
        assert image.segments == [
            Segment(vaddr=0x100000, paddr=0x100000, data=TEXT, memsz=4, flags="rx"),
            Segment(vaddr=0x101000, paddr=0x101000, data=DATA, memsz=8, flags="rw"),
            Segment(vaddr=0x102000, paddr=0x102000, data=b"", memsz=0x2000, flags="rw"),
        ]
        assert image.image_start == 0x100000
        assert image.image_end == 0x104000
        assert image.hypercall_page == 0x101000
        assert image.guest_os == "trapless-test"
        assert image.symbols == SYMBOLS
        assert image.notes[C.XEN_ELFNOTE_GUEST_OS] == b"trapless-test\0"
        assert image.notes[C.XEN_ELFNOTE_ENTRY] == (0x100000).to_bytes(8, "little")
        assert image.notes[C.XEN_ELFNOTE_VIRT_BASE] == bytes(8)


def test_linux_style_image():
    base = LINUX_BASE + 0x1000000
    symbols = {"startup_xen": base, "hypercall_page": base + 0x1000}
    data = build_elf(sections(base), symbols, 0,
                     [(C.XEN_ELFNOTE_GUEST_OS, "linux"), (C.XEN_ELFNOTE_ENTRY, base),
                      (C.XEN_ELFNOTE_VIRT_BASE, LINUX_BASE),
                      (C.XEN_ELFNOTE_HYPERCALL_PAGE, base + 0x1000)],
                     virt_base=LINUX_BASE)
    assert read_phdr(data, 0).p_paddr == 0x1000000
    image = load_image(data, 32 << 20)
    assert image.virt_base == LINUX_BASE
    assert image.entry == base
    assert [(s.vaddr, s.paddr) for s in image.segments] == [
        (base, 0x1000000), (base + 0x1000, 0x1001000), (base + 0x2000, 0x1002000)]
    assert image.hypercall_page == base + 0x1000
    assert image.symbols == symbols


def test_paddr_offset_is_applied():
    base = LINUX_BASE + 0x1000000
    data = build_elf(sections(base), {}, base,
                     [(C.XEN_ELFNOTE_VIRT_BASE, LINUX_BASE),
                      (C.XEN_ELFNOTE_PADDR_OFFSET, 0x400000)],
                     virt_base=LINUX_BASE, paddr_offset=0x400000)
    assert read_phdr(data, 0).p_paddr == 0x1400000
    image = load_image(data, 32 << 20)
    assert [(s.vaddr, s.paddr) for s in image.segments][0] == (base, 0x1000000)


def test_no_notes_uses_e_entry_and_zero_virt_base():
    data = build_elf(sections(), {}, 0x100002, [])
    image = load_image(data, MEM)
    assert (image.entry, image.virt_base, image.hypercall_page, image.guest_os) == \
        (0x100002, 0, None, None)
    assert image.notes == {} and image.symbols == {}


def test_four_byte_numeric_notes():
    image = load_image(good_image(ENTRY=(0x100003).to_bytes(4, "little")), MEM)
    assert image.entry == 0x100003


def test_entry_note_wins_over_e_entry():
    data = build_elf(sections(), {}, 0x100001, notes(ENTRY=0x100003))
    assert load_image(data, MEM).entry == 0x100003


# --- the loader: every malformed input, one line each ---

def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageError, match=r"^guest\.elf: no such file$"):
        load_image("guest.elf", MEM)


def test_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("guest.elf").mkdir()
    with pytest.raises(ImageError, match=r"^guest\.elf: is a directory$"):
        load_image("guest.elf", MEM)


def test_not_a_regular_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkfifo("guest.elf")
    with pytest.raises(ImageError, match=r"^guest\.elf: is not a regular file \(a FIFO\)$"):
        load_image("guest.elf", MEM)            # at once: no wait for a writer


def test_a_device_is_not_read():
    with pytest.raises(ImageError, match=r"^/dev/zero: is not a regular file "
                                         r"\(a character device\)$"):
        load_image("/dev/zero", MEM)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("guest.elf", "wb") as f:        # sparse: costs no disk
        f.write(good_image())
        f.truncate(3 << 30)
    with pytest.raises(ImageError, match=r"^guest\.elf: 3,221,225,472 bytes; kernel images "
                                         r"above 256 MiB are refused$"):
        load_image("guest.elf", MEM)
    with open("junk", "wb") as f:               # not ELF: the header says so first
        f.truncate(3 << 30)
    with pytest.raises(ImageError, match=r"^junk: not an ELF file \(bad magic\)$"):
        load_image("junk", MEM)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("guest.elf").write_bytes(good_image())
    os.chmod("guest.elf", 0)
    with pytest.raises(ImageError, match=r"^guest\.elf: cannot read \(Permission denied\)$"):
        load_image("guest.elf", MEM)


def test_read_error_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("guest.elf").write_bytes(good_image())

    def refuse(fd, size):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "read", refuse)
    with pytest.raises(ImageError, match=r"^guest\.elf: cannot read \(Input/output error\)$"):
        load_image("guest.elf", MEM)


def test_bytes_source_is_named_image():
    with pytest.raises(ImageError, match=r"^<image>: empty file$"):
        load_image(b"", MEM)
    with pytest.raises(ImageError, match=r"^kernel: empty file$"):
        load_image(b"", MEM, name="kernel")


BAD_IMAGES = {
    "empty": (lambda d: b"", "empty file"),
    "bad magic": (lambda d: b"MZ" + d[2:], "not an ELF file (bad magic)"),
    "tiny": (lambda d: b"\x7fE", "not an ELF file (bad magic)"),
    "elf32": (lambda d: patch_ehdr(d, ei_class=ELFCLASS32),     # read as ELF32 headers
              "a 32-bit ELF image (ELFCLASS32) boots only as PVH, and this one has no "
              "PHYS32_ENTRY note"),
    "bad class": (lambda d: patch_ehdr(d, ei_class=7), "unknown ELF class 7"),
    "big-endian": (lambda d: patch_ehdr(d, ei_data=ELFDATA2MSB),
                   "big-endian ELF file (ELFDATA2MSB); x86-64 images are little-endian"),
    "bad data": (lambda d: patch_ehdr(d, ei_data=0), "unknown ELF data encoding 0"),
    "i386": (lambda d: patch_ehdr(d, e_machine=3),
             "not an x86 ELF file (e_machine 3, expected EM_X86_64 = 62)"),
    "relocatable": (lambda d: patch_ehdr(d, e_type=ET_REL),
                    "not an executable (e_type ET_REL, expected ET_EXEC)"),
    "shared object": (lambda d: patch_ehdr(d, e_type=ET_DYN),
                      "not an executable (e_type ET_DYN, expected ET_EXEC)"),
    "odd e_type": (lambda d: patch_ehdr(d, e_type=0xfe00),
                   "not an executable (e_type 65024, expected ET_EXEC)"),
    "phentsize": (lambda d: patch_ehdr(d, e_phentsize=32),
                  "bad program header size 32 (expected 56)"),
    "shentsize": (lambda d: patch_ehdr(d, e_shentsize=40),
                  "bad section header size 40 (expected 64)"),
    "truncated ident": (lambda d: d[:10],
                        "truncated: ELF identification [0x0-0x10) runs past the end of the "
                        "file (0xa bytes)"),
    "truncated header": (lambda d: d[:40],
                         "truncated: ELF header [0x0-0x40) runs past the end of the file "
                         "(0x28 bytes)"),
    "truncated phdrs": (lambda d: d[:100],
                        "truncated: program headers [0x40-0x78) runs past the end of the "
                        "file (0x64 bytes)"),
    "phdrs past end": (lambda d: patch_ehdr(d, e_phoff=0x10000),
                       "truncated: program headers [0x10000-0x10038) runs past the end of "
                       "the file (0x22b8 bytes)"),
    "shdrs past end": (lambda d: patch_ehdr(d, e_shoff=0x2280),
                       "truncated: section headers [0x2280-0x22c0) runs past the end of "
                       "the file (0x22b8 bytes)"),
    "segment data past end": (lambda d: patch_phdr(d, 0, p_offset=0x22b6),
                              "truncated: segment 0 data [0x22b6-0x22ba) runs past the end "
                              "of the file (0x22b8 bytes)"),
    "notes past end": (lambda d: patch_phdr(d, 3, p_offset=0x2280),
                       "truncated: segment 3 (notes) [0x2280-0x22e8) runs past the end of "
                       "the file (0x22b8 bytes)"),
    "bad note size": (lambda d: d[:0x120] + Elf_Nhdr.build(dict(n_namesz=4, n_descsz=0x1000,
                                                                 n_type=6)) + d[0x12c:],
                      "malformed note at offset 0x0 of segment 3 (notes): it runs past the "
                      "end of the note area"),
    "no PT_LOAD": (lambda d: patch_phdr(patch_phdr(patch_phdr(d, 0, p_type=PT_NULL), 1,
                                                   p_type=PT_NULL), 2, p_type=PT_NULL),
                   "no loadable (PT_LOAD) segments"),
    "filesz > memsz": (lambda d: patch_phdr(d, 1, p_memsz=2),
                       "segment 1: file size 0x4 exceeds memory size 0x2"),
    "wraps": (lambda d: patch_phdr(d, 2, p_paddr=0xfffffffffffff000),
              "segment 2: address range wraps around (p_paddr 0xfffffffffffff000, "
              "size 0x2000)"),
    "above memory": (lambda d: patch_phdr(d, 1, p_paddr=0x2000000),
                     "segment 1 [0x2000000-0x2000008) lies outside guest memory: "
                     "pseudo-physical [0x2000000-0x2000008) is not within [0x0-0x1000000)"),
    "partly above memory": (lambda d: patch_phdr(d, 2, p_paddr=0xfff000),
                            "segment 2 [0xfff000-0x1001000) lies outside guest memory: "
                            "pseudo-physical [0xfff000-0x1001000) is not within "
                            "[0x0-0x1000000)"),
    "overlap": (lambda d: patch_phdr(d, 1, p_paddr=0x100000),
                "segment 1 [0x100000-0x100008) overlaps segment 0 [0x100000-0x100004)"),
    "overlap partly": (lambda d: patch_phdr(d, 2, p_paddr=0x101004),
                       "segment 2 [0x101004-0x103004) overlaps segment 1 [0x101000-0x101008)"),
    "no entry": (lambda d: patch_ehdr(good_image(ENTRY=None), e_entry=0),
                 "no entry point (e_entry is 0 and there is no ENTRY note)"),
    "entry outside": (lambda d: patch_ehdr(good_image(ENTRY=None), e_entry=0x400000),
                      "entry point 0x400000 is not inside an executable loaded segment"),
    "entry in data": (lambda d: good_image(ENTRY=0x101000),
                      "entry point 0x101000 is not inside an executable loaded segment"),
    "entry past text": (lambda d: good_image(ENTRY=0x100004),
                        "entry point 0x100004 is not inside an executable loaded segment"),
    "entry note size": (lambda d: good_image(ENTRY=b"\x00\x00\x10"),
                        "ENTRY note has a 3-byte value (expected 4 or 8 bytes)"),
    "paddr offset alone": (lambda d: good_image(VIRT_BASE=None, PADDR_OFFSET=0),
                           "PADDR_OFFSET note without a VIRT_BASE note"),
    "hypercall unaligned": (lambda d: good_image(HYPERCALL_PAGE=0x101008),
                            "HYPERCALL_PAGE 0x101008 is not page-aligned"),
    "hypercall outside": (lambda d: good_image(HYPERCALL_PAGE=0x104000),
                          "HYPERCALL_PAGE 0x104000 is outside the loaded image "
                          "[0x100000-0x104000)"),
    "hypercall below": (lambda d: good_image(HYPERCALL_PAGE=0xff000),
                        "HYPERCALL_PAGE 0xff000 is outside the loaded image "
                        "[0x100000-0x104000)"),
}


def test_good_image_layout_matches_the_offsets_used_below():
    data = good_image()
    assert len(data) == 0x22b8
    notes_phdr = read_phdr(data, 3)
    assert (notes_phdr.p_type, notes_phdr.p_offset, notes_phdr.p_filesz) == (PT_NOTE, 0x120, 0x68)


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image(case, tmp_path, monkeypatch):
    mutate, problem = BAD_IMAGES[case]
    assert error_of(mutate(good_image()), tmp_path, monkeypatch) == f"guest.elf: {problem}"


def test_segment_outside_small_memory(tmp_path, monkeypatch):
    assert error_of(good_image(), tmp_path, monkeypatch, mem=0x103000) == (
        "guest.elf: segment 2 [0x102000-0x104000) lies outside guest memory: "
        "pseudo-physical [0x102000-0x104000) is not within [0x0-0x103000)")


def test_segment_below_paddr_offset(tmp_path, monkeypatch):
    data = build_elf(sections(), {}, 0x100000,
                     [(C.XEN_ELFNOTE_VIRT_BASE, LINUX_BASE),
                      (C.XEN_ELFNOTE_PADDR_OFFSET, 0x200000)])
    # p_paddr == vaddr == 0x100000, so pseudo-physical = p_paddr - PADDR_OFFSET < 0
    assert error_of(data, tmp_path, monkeypatch) == (
        "guest.elf: segment 0 [0xffffffff7ff00000-0xffffffff7ff00004) lies below VIRT_BASE "
        "0xffffffff80000000 (p_paddr 0x100000 is less than PADDR_OFFSET 0x200000)")


def test_virtual_address_wraps_through_virt_base(tmp_path, monkeypatch):
    data = build_elf(sections(), {}, 0x100000, [(C.XEN_ELFNOTE_VIRT_BASE, LINUX_BASE)])
    data = patch_phdr(data, 0, p_paddr=0x7ffff000, p_memsz=0x2000)
    assert error_of(data, tmp_path, monkeypatch) == (
        "guest.elf: segment 0: address range wraps around (p_paddr 0x7ffff000, size 0x2000)")


def test_a_segment_in_the_non_canonical_hole(tmp_path, monkeypatch):
    virt_base, start = (1 << 47) - 0x100000, (1 << 47) - 0x1000    # .data lands at 2^47
    data = build_elf(sections(start), {}, start,
                     notes(VIRT_BASE=virt_base, ENTRY=start, HYPERCALL_PAGE=None),
                     virt_base=virt_base)
    assert error_of(data, tmp_path, monkeypatch) == (
        "guest.elf: segment 1 [0x800000000000-0x800000000008) is not canonical (x86-64 maps "
        "[0-0x800000000000) and [0xffff800000000000-2^64) only)")


@pytest.mark.parametrize("virt_base, problem", [
    ((1 << 64) - 0x200000, "[0xfffffffffff00000-0x10000000000200000) wraps past 2^64"),
    ((1 << 47) - 0x200000, "[0x7ffffff00000-0x800000200000) is not canonical (x86-64 maps "
                           "[0-0x800000000000) and [0xffff800000000000-2^64) only)"),
])
def test_a_start_of_day_region_that_cannot_be_mapped_is_refused(virt_base, problem):
    """The segments fit, but the region the builder puts after them would not."""
    from hypervisor import builder
    start = virt_base + 0x100000
    image = load_image(build_elf(sections(start), {}, start,
                                 notes(VIRT_BASE=virt_base, ENTRY=start,
                                       HYPERCALL_PAGE=start + 0x1000), virt_base=virt_base), MEM)
    with pytest.raises(ImageError) as e:
        builder.plan(image, MEM)
    assert str(e.value) == (f"the start-of-day region at VIRT_BASE {virt_base:#x} cannot be "
                            f"mapped: {problem}")


def test_a_pv_ramdisk_follows_the_image_and_start_info_names_it():
    """Xen's start-of-day order: image, ramdisk (mod_start is its virtual address,
    mod_len its size), then the page-frame list; all of it mapped by the bootstrap
    tables. A ramdisk the memory cannot hold is one ImageError."""
    from hypervisor import builder
    image = load_image(good_image(), MEM)
    ramdisk = bytes(range(256)) * 4097            # 1 MiB and 256 bytes: a partial page
    layout = builder.plan(image, MEM, builder.XEN_PV, len(ramdisk))
    assert layout.ramdisk == layout.image_end and layout.ramdisk_size == len(ramdisk)
    assert layout.mfn_list == builder.page_up(layout.ramdisk + len(ramdisk))
    ram = bytearray(MEM)
    boot = builder.build(memoryview(ram), image, layout, "x", builder.XEN_PV, ramdisk=ramdisk)
    si = ffi.from_buffer("struct start_info *", ram[layout.start_info:])
    assert (si.mod_start, si.mod_len, si.flags) == (layout.virt(layout.ramdisk), len(ramdisk), 0)
    assert ram[layout.ramdisk:layout.ramdisk + len(ramdisk)] == ramdisk

    def walk(va: int) -> int:
        table = boot.cr3
        for shift in (39, 30, 21, 12):
            entry = struct.unpack_from("<Q", ram, table + ((va >> shift) & 511) * 8)[0]
            assert entry & 1, f"{va:#x} is not mapped"
            table = entry & 0x000FFFFFFFFFF000
        return table
    for offset in (0, len(ramdisk) - 1):
        assert walk(si.mod_start + offset) == (layout.ramdisk + offset) & ~0xFFF
    # without a ramdisk: no module
    layout = builder.plan(image, MEM, builder.XEN_PV)
    ram = bytearray(MEM)
    builder.build(memoryview(ram), image, layout, "x", builder.XEN_PV)
    si = ffi.from_buffer("struct start_info *", ram[layout.start_info:])
    assert (si.mod_start, si.mod_len) == (0, 0)
    with pytest.raises(ImageError) as e:
        builder.plan(image, MEM, builder.XEN_PV, MEM)
    assert str(e.value) == (f"16 MiB of guest memory is too small: the start-of-day region "
                            f"(with a {MEM:,}-byte ramdisk) needs 20 MiB")


def test_corrupt_images_raise_only_image_error():
    """Truncations and random byte damage never leak anything but ImageError."""
    good = good_image()
    damaged = [good[:n] for n in range(0, len(good), 7)]
    rng = random.Random(1)
    for _ in range(1000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            # mostly the headers and notes, sometimes anywhere (symbols, section headers)
            where = rng.randrange(0, 0x188) if rng.random() < 0.7 else rng.randrange(len(good))
            data[where] = rng.randrange(256)
        damaged.append(bytes(data))
    for data in damaged:
        try:
            load_image(data, MEM)
        except ImageError as err:
            assert "\n" not in str(err)
