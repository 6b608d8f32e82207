"""ELF32 layouts (System V gABI): the containers XTF's hvm64 images and other PVH guests
come in. Field names match guest_kernel/elf.py's ELF64 layouts, so the loader reads
either class the same way."""
from __future__ import annotations

from guest_kernel.elf import Elf_Ident, Layout

EM_386 = 3

Elf32_Ehdr = Layout(
    ("e_ident", Elf_Ident),
    ("e_type", "H"),
    ("e_machine", "H"),
    ("e_version", "I"),
    ("e_entry", "I"),
    ("e_phoff", "I"),
    ("e_shoff", "I"),
    ("e_flags", "I"),
    ("e_ehsize", "H"),
    ("e_phentsize", "H"),
    ("e_phnum", "H"),
    ("e_shentsize", "H"),
    ("e_shnum", "H"),
    ("e_shstrndx", "H"),
)

Elf32_Phdr = Layout(
    ("p_type", "I"),
    ("p_offset", "I"),
    ("p_vaddr", "I"),
    ("p_paddr", "I"),
    ("p_filesz", "I"),
    ("p_memsz", "I"),
    ("p_flags", "I"),
    ("p_align", "I"),
)

Elf32_Shdr = Layout(
    ("sh_name", "I"),
    ("sh_type", "I"),
    ("sh_flags", "I"),
    ("sh_addr", "I"),
    ("sh_offset", "I"),
    ("sh_size", "I"),
    ("sh_link", "I"),
    ("sh_info", "I"),
    ("sh_addralign", "I"),
    ("sh_entsize", "I"),
)

Elf32_Sym = Layout(
    ("st_name", "I"),
    ("st_value", "I"),
    ("st_size", "I"),
    ("st_info", "B"),
    ("st_other", "B"),
    ("st_shndx", "H"),
)

ELF32_LAYOUTS = dict(ehdr=Elf32_Ehdr, phdr=Elf32_Phdr, shdr=Elf32_Shdr, sym=Elf32_Sym,
                     phdr_size=Elf32_Phdr.sizeof(), shdr_size=Elf32_Shdr.sizeof(),
                     sym_size=Elf32_Sym.sizeof())
