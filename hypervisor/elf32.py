"""ELF32 layouts (System V gABI): the containers XTF's hvm64 images and other PVH guests
come in. Field names match guest_kernel/elf.py's ELF64 layouts, so the loader reads
either class the same way."""
from __future__ import annotations

from construct import Int16ul, Int32ul, Int8ul, Struct

from guest_kernel.elf import Elf_Ident

EM_386 = 3

Elf32_Ehdr = Struct(
    "e_ident" / Elf_Ident,
    "e_type" / Int16ul,
    "e_machine" / Int16ul,
    "e_version" / Int32ul,
    "e_entry" / Int32ul,
    "e_phoff" / Int32ul,
    "e_shoff" / Int32ul,
    "e_flags" / Int32ul,
    "e_ehsize" / Int16ul,
    "e_phentsize" / Int16ul,
    "e_phnum" / Int16ul,
    "e_shentsize" / Int16ul,
    "e_shnum" / Int16ul,
    "e_shstrndx" / Int16ul,
)

Elf32_Phdr = Struct(
    "p_type" / Int32ul,
    "p_offset" / Int32ul,
    "p_vaddr" / Int32ul,
    "p_paddr" / Int32ul,
    "p_filesz" / Int32ul,
    "p_memsz" / Int32ul,
    "p_flags" / Int32ul,
    "p_align" / Int32ul,
)

Elf32_Shdr = Struct(
    "sh_name" / Int32ul,
    "sh_type" / Int32ul,
    "sh_flags" / Int32ul,
    "sh_addr" / Int32ul,
    "sh_offset" / Int32ul,
    "sh_size" / Int32ul,
    "sh_link" / Int32ul,
    "sh_info" / Int32ul,
    "sh_addralign" / Int32ul,
    "sh_entsize" / Int32ul,
)

Elf32_Sym = Struct(
    "st_name" / Int32ul,
    "st_value" / Int32ul,
    "st_size" / Int32ul,
    "st_info" / Int8ul,
    "st_other" / Int8ul,
    "st_shndx" / Int16ul,
)

ELF32_LAYOUTS = dict(ehdr=Elf32_Ehdr, phdr=Elf32_Phdr, shdr=Elf32_Shdr, sym=Elf32_Sym,
                     phdr_size=Elf32_Phdr.sizeof(), shdr_size=Elf32_Shdr.sizeof(),
                     sym_size=Elf32_Sym.sizeof())
