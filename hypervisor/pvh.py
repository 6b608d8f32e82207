"""PVH start of day: where the image, hvm_start_info and the ramdisk go, the memory map
the guest is given, the 32-bit entry state, and which engine can run the guest.

A PVH guest is an HVM container (XEN-ABI-FACTS 15, 26): its kernel runs in ring 0 on
page tables of its own in ordinary RAM, so there is no page-table pool, no start_info
and no hypercall page written up front. The layout, all physical:

    [image]                     the PT_LOAD segments at their physical addresses
    [hvm_start_info page]       hvm_start_info (version 1), the module list, the memory
                                map and the command line, right after the image
    [ACPI page]                 the ACPI tables (acpi.py), rsdp_paddr names their RSDP;
                                the memory map marks the page ACPI
    [ramdisk]                   module 0, page-aligned, when there is one
    ...                         free RAM
    [reserved pages]            the last RESERVED_PAGES of the memory the domain starts
                                with: trapless's own (the boot GDT, the console and
                                xenstore ring pages); the memory map marks them reserved

The vCPU starts in 32-bit flat protected mode with paging off at the PHYS32_ENTRY
note, ebx = the hvm_start_info's address, interrupts off.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from abi import C, ffi

from . import acpi, engines
from ._hv import ffi as hv_ffi, lib
from .errors import EngineError, ImageError
from .image import PVImage

PAGE = 4096
RESERVED_PAGES = 4
START_INFO_VERSION = 1
MODLIST_AT, MEMMAP_AT, CMDLINE_AT = 0x40, 0x80, 0x200      # offsets in the start-info page
CODE32_SELECTOR, DATA_SELECTOR, CODE64_SELECTOR = 0x08, 0x10, 0x18
# null; flat 32-bit code (0xc9b); flat data (0xc93); 64-bit code, for a guest that wants it
BOOT_GDT = (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00AF9B000000FFFF)
VMCALL, VMMCALL = b"\x0f\x01\xc1", b"\x0f\x01\xd9"


def page_up(x: int) -> int:
    return (x + PAGE - 1) & ~(PAGE - 1)


@dataclass
class PVHLayout:
    """Where everything of one PVH domain lives (physical addresses)."""
    ram_bytes: int              # the memory the domain starts with
    image_start: int
    image_end: int
    start_info: int
    acpi: int
    ramdisk: int
    ramdisk_size: int
    reserved: int               # first of the RESERVED_PAGES
    gdt: int
    console: int
    xenstore: int
    virt_base: int = 0          # paging is off at entry: virtual = physical
    pt_start: int = 0           # no page-table pool: the guest's tables are its own
    pt_end: int = 0

    @property
    def region_end(self) -> int:
        return self.ram_bytes

    @property
    def nr_pages(self) -> int:
        return self.ram_bytes // PAGE

    def virt(self, phys: int) -> int:
        return phys

    def memory_map(self) -> list[tuple[int, int, int]]:
        """(addr, size, type) entries, as the guest's hvm_start_info gives them."""
        return [(0, self.acpi, C.XEN_HVM_MEMMAP_TYPE_RAM),
                (self.acpi, PAGE, C.XEN_HVM_MEMMAP_TYPE_ACPI),
                (self.acpi + PAGE, self.reserved - self.acpi - PAGE, C.XEN_HVM_MEMMAP_TYPE_RAM),
                (self.reserved, self.ram_bytes - self.reserved, C.XEN_HVM_MEMMAP_TYPE_RESERVED)]


@dataclass
class PVHBootState:
    """struct hv_boot_state for the 32-bit entry."""
    rip: int
    rbx: int
    gdt_base: int
    gdt_limit: int
    rsp: int = 0
    rsi: int = 0
    cr3: int = 0
    code_selector: int = CODE32_SELECTOR
    data_selector: int = DATA_SELECTOR
    mode: int = lib.HV_BOOT_PVH32


def plan(image: PVImage, ram_bytes: int, ramdisk_size: int = 0) -> PVHLayout:
    """Choose the layout; one-line ImageError if it does not fit below 4 GiB in RAM."""
    first = min(s.paddr for s in image.segments) & ~(PAGE - 1)
    end = page_up(max(s.paddr + s.memsz for s in image.segments))
    reserved = ram_bytes - RESERVED_PAGES * PAGE
    start_info = end
    acpi_tables = start_info + PAGE
    ramdisk = acpi_tables + PAGE
    top = ramdisk + page_up(ramdisk_size)
    if top > reserved:
        what = f"the image, hvm_start_info, ACPI tables and a {ramdisk_size:,}-byte ramdisk" \
            if ramdisk_size else "the image, hvm_start_info and ACPI tables"
        raise ImageError(f"{ram_bytes >> 20} MiB of guest memory is too small: {what} end at "
                         f"{top:#x}, and trapless keeps [{reserved:#x}-{ram_bytes:#x})")
    if end > reserved:
        raise ImageError(f"the image ends at {end:#x}, inside trapless's reserved pages "
                         f"[{reserved:#x}-{ram_bytes:#x})")
    return PVHLayout(ram_bytes=ram_bytes, image_start=first, image_end=end,
                     start_info=start_info, acpi=acpi_tables, ramdisk=ramdisk,
                     ramdisk_size=ramdisk_size, reserved=reserved, gdt=reserved, console=reserved + PAGE,
                     xenstore=reserved + 2 * PAGE)


def build(ram: memoryview, image: PVImage, layout: PVHLayout, cmdline: str,
          ramdisk: bytes | None = None) -> PVHBootState:
    """Write the image, hvm_start_info and the ramdisk into zeroed guest RAM."""
    encoded = cmdline.encode()
    if len(encoded) >= C.XEN_MAX_GUEST_CMDLINE:
        raise ImageError(f"command line is {len(encoded)} bytes; the limit is "
                         f"{C.XEN_MAX_GUEST_CMDLINE - 1}")
    for seg in image.segments:
        ram[seg.paddr:seg.paddr + len(seg.data)] = seg.data
    struct.pack_into(f"<{len(BOOT_GDT)}Q", ram, layout.gdt, *BOOT_GDT)
    tables = acpi.build(layout.acpi)
    ram[layout.acpi:layout.acpi + len(tables)] = tables

    si_at = layout.start_info
    memmap = layout.memory_map()
    for i, (addr, size, kind) in enumerate(memmap):
        entry = ffi.new("struct hvm_memmap_table_entry *", dict(addr=addr, size=size, type=kind))
        raw = bytes(ffi.buffer(entry))
        at = si_at + MEMMAP_AT + i * len(raw)
        ram[at:at + len(raw)] = raw
    ram[si_at + CMDLINE_AT:si_at + CMDLINE_AT + len(encoded) + 1] = encoded + b"\0"
    nr_modules = 0
    if ramdisk:
        ram[layout.ramdisk:layout.ramdisk + len(ramdisk)] = ramdisk
        module = ffi.new("struct hvm_modlist_entry *",
                         dict(paddr=layout.ramdisk, size=len(ramdisk)))
        raw = bytes(ffi.buffer(module))
        ram[si_at + MODLIST_AT:si_at + MODLIST_AT + len(raw)] = raw
        nr_modules = 1
    si = ffi.new("struct hvm_start_info *", dict(
        magic=C.XEN_HVM_START_MAGIC_VALUE, version=START_INFO_VERSION, flags=0,
        nr_modules=nr_modules, modlist_paddr=si_at + MODLIST_AT if nr_modules else 0,
        cmdline_paddr=si_at + CMDLINE_AT, rsdp_paddr=layout.acpi, memmap_paddr=si_at + MEMMAP_AT,
        memmap_entries=len(memmap)))
    raw = bytes(ffi.buffer(si))
    ram[si_at:si_at + len(raw)] = raw
    return PVHBootState(rip=image.entry, rbx=si_at, gdt_base=layout.gdt,
                        gdt_limit=len(BOOT_GDT) * 8 - 1)


def set_console_params(dom, console_gpa: int, port: int) -> None:
    """Name the console ring to the guest, as Xen's builder does for a PVH domU:
    HVM_PARAM_CONSOLE_PFN and HVM_PARAM_CONSOLE_EVTCHN."""
    _set_params(dom, ((C.HVM_PARAM_CONSOLE_PFN, console_gpa // PAGE),
                      (C.HVM_PARAM_CONSOLE_EVTCHN, port)))


def set_store_params(dom, store_gpa: int, port: int) -> None:
    """Name the xenstore ring to the guest, as libxl does for a PVH domU (the page is one
    of trapless's reserved pages, so the guest's memory map keeps it out of its RAM)."""
    _set_params(dom, ((C.HVM_PARAM_STORE_PFN, store_gpa // PAGE),
                      (C.HVM_PARAM_STORE_EVTCHN, port)))


def _set_params(dom, params) -> None:
    for index, value in params:
        if lib.hv_domain_set_hvm_param(dom, index, value) < 0:
            raise EngineError(f"cannot set HVM parameter {index}")


def uses_vmcall(image: PVImage) -> bool:
    """Does the image's code hold vmcall or vmmcall (byte patterns in its executable
    segments)? Such a guest calls Xen directly, without the hypercall page."""
    code = [bytes(seg.data) for seg in image.segments if "x" in seg.flags]
    return any(VMCALL in c or VMMCALL in c for c in code)


def _kvm_problem(image: PVImage) -> str | None:
    """Why kvm cannot run this PVH guest here, or None."""
    why = engines.why_unavailable("kvm")
    if why:
        return why
    buf = hv_ffi.new("char[256]")
    if not lib.hv_kvm_pvh_available(buf, len(buf)):
        return hv_ffi.string(buf).decode()
    if uses_vmcall(image) and not lib.hv_kvm_has_xen_hvm():
        return ("the guest calls Xen with vmcall/vmmcall, which this host's KVM cannot hand "
                "to trapless (no KVM_CAP_XEN_HVM)")
    return None


def choose_engine(requested: str | None, image: PVImage) -> tuple[str, str | None]:
    """The engine for a PVH guest, and a one-line note when kvm was passed over."""
    if requested == "kvm":
        why = _kvm_problem(image)
        if why:
            raise EngineError(f"engine kvm: {why}")
        return "kvm", None
    if requested:
        return engines.choose(requested), None
    why = _kvm_problem(image)
    if why is None:
        return "kvm", None
    return engines.choose("bt"), f"kvm unavailable ({why}); using bt"
