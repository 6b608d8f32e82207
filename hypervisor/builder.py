"""Domain builder: lays out a PV domain's memory and the state its vCPU starts in.

Follows Xen's x86-64 PV start-of-day layout (XEN-ABI-FACTS §17). After the kernel
image, each element 4 KiB-aligned: the initial ramdisk (start_info.mod_start/mod_len,
when there is one), the page-frame list (mfn_list), start_info, the
xenstore and console ring pages, the page tables (pt_base), the boot stack and the
boot GDT. The whole region is mapped 1:1 from VIRT_BASE, writable except the page
tables, and ends on a 4 MiB boundary with at least 512 KiB of padding.

trapless keeps page tables in a pool of guest-physical frames the guest cannot write
(a read-only memslot on kvm): the bootstrap tables come first, then zeroed spare frames
the guest may turn into new tables later. start_info.nr_pt_frames covers the pool
(and, under Xen's model, the shared_info frame between the two: see plan()).

The CPU model comes from the image (cpu_model): a PV kernel runs deprivileged, in ring
3 under Xen's PV CPU model, unless its FEATURES note requires supervisor_mode_kernel,
the feature Xen once offered kernels that run in ring 0. trapless's own kernels still
require it until they are converted; every other image gets Xen's model.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass


from abi import C, ffi
from guest_kernel.asm import Assembler, eax, r11, rax, rcx

from .errors import ImageError
from .image import PVImage, address_problem

PAGE = 4096
PTE_P, PTE_RW, PTE_A, PTE_D = 1 << 0, 1 << 1, 1 << 5, 1 << 6
# Accessed and dirty are set up front: the CPU must never need to write a page-table
# frame itself, since the guest's view of the pool is read-only.
TABLE_FLAGS = PTE_P | PTE_RW | PTE_A
SPARE_PT_FRAMES = 64
BOOT_STACK_PAGES = 4
CODE_SELECTOR, DATA_SELECTOR = 0x08, 0x10
GDT_ENTRIES = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)  # null, 64-bit code, data (accessed)
START_INFO_MAGIC = b"xen-3.0-x86_64"
REGION_ALIGN, REGION_PAD = 4 << 20, 512 << 10


def page_up(x: int) -> int:
    return (x + PAGE - 1) & ~(PAGE - 1)


RING0, XEN_PV = 0, 1           # enum hv_pv_model (cext/pv_cpu.h)
SUPERVISOR_MODE_KERNEL = "supervisor_mode_kernel"


def required_features(image: PVImage) -> set[str]:
    """Names the image's FEATURES note marks required ('!name'), as Xen's libelf reads it."""
    raw = image.notes.get(C.XEN_ELFNOTE_FEATURES, b"").split(b"\0")[0].decode("ascii", "replace")
    return {name[1:] for name in raw.split("|") if name.startswith("!")}


def cpu_model(image: PVImage) -> int:
    """RING0 for a kernel that requires supervisor_mode_kernel; XEN_PV for any other."""
    return RING0 if SUPERVISOR_MODE_KERNEL in required_features(image) else XEN_PV


def hypercall_page(model: int = RING0) -> bytes:
    """128 stubs of 32 bytes, stub N for hypercall N. Padding is int3.

    Ring 0: mov eax, N ; in eax, HYPERCALL_PORT ; cdqe ; ret: the exit hands the VMM rax
    and the argument registers, the result comes back as the data of the `in`.
    Xen's model: Xen's own PV stub, push rcx ; push r11 ; mov eax, N ; syscall ; pop r11 ;
    pop rcx ; ret; and at 23 (iret) push rcx ; push r11 ; push rax ; mov eax, 23 ;
    syscall, which does not return (XEN-ABI-FACTS §18, §20).
    """
    a = Assembler(base=0)
    a.section(".text")
    for n in range(C.TRAPLESS_HYPERCALL_PAGE_STUBS):
        a.align(C.TRAPLESS_HYPERCALL_STUB_SIZE, 0xCC)
        if model == RING0:
            a.mov(eax, n)
            a.in_(eax, C.TRAPLESS_HYPERCALL_PORT)
            a.cdqe()
            a.ret()
        elif n == C.__HYPERVISOR_iret:
            a.push(rcx)
            a.push(r11)
            a.push(rax)
            a.mov(eax, n)
            a.syscall()
        else:
            a.push(rcx)
            a.push(r11)
            a.mov(eax, n)
            a.syscall()
            a.pop(r11)
            a.pop(rcx)
            a.ret()
    a.align(PAGE, 0xCC)
    return a.assemble().section(".text").data


@dataclass
class Layout:
    """Where everything of one domain lives (pseudo-physical unless named virt)."""
    virt_base: int
    ram_bytes: int
    image_start: int
    image_end: int
    mfn_list: int
    start_info: int
    xenstore: int
    console: int
    pt_start: int
    pt_bootstrap_frames: int
    pt_end: int
    stack_bottom: int
    stack_top: int
    gdt: int
    region_end: int
    # Xen's model: the shared_info frame start_info names (plan() says where it goes)
    shared_info: int | None = None
    # where the start-of-day mapping begins (pseudo-physical; virtual = virt_base + it)
    map_start: int | None = None
    # the initial ramdisk (module 0), right after the image; size 0: none
    ramdisk: int = 0
    ramdisk_size: int = 0

    def virt(self, phys: int) -> int:
        return self.virt_base + phys

    @property
    def nr_pages(self) -> int:
        return self.ram_bytes // PAGE


def tables_needed(start: int, end: int) -> int:
    """Page-table frames (L4 + L3s + L2s + L1s) to map virtual [start, end) with 4 KiB pages."""
    def spans(shift: int) -> int:
        return ((end - 1) >> shift) - (start >> shift) + 1
    return 1 + spans(39) + spans(30) + spans(21)


def plan(image: PVImage, ram_bytes: int, model: int = RING0, ramdisk_size: int = 0) -> Layout:
    """Choose the layout; one-line ImageError if the domain's memory is too small.
    ramdisk_size: bytes of the initial ramdisk, which goes right after the image."""
    first = min(s.paddr for s in image.segments) & ~(PAGE - 1)
    # Xen's builder maps the whole start-of-day region from VIRT_BASE, pseudo-physical
    # frame 0, up: what lies below the kernel is the guest's too (XTF writes there and
    # unmaps its NULL page itself). trapless's ring-0 kernels keep the map starting at
    # their image, so their NULL page stays unmapped.
    map_start = 0 if model == XEN_PV else first
    img_end = page_up(max(s.paddr + s.memsz for s in image.segments))
    nr_pages = ram_bytes // PAGE
    ramdisk = img_end
    mfn_list = page_up(ramdisk + ramdisk_size)
    start_info = page_up(mfn_list + nr_pages * 8)
    xenstore = start_info + PAGE
    console = xenstore + PAGE
    pt_start = console + PAGE
    # Xen's model: the shared_info frame start_info names. Xen keeps it outside the
    # domain's memory, so a guest never takes it for free RAM; trapless gives it the
    # frame after the bootstrap tables, inside the area start_info.nr_pt_frames covers,
    # which a PV kernel keeps reserved as its bootstrap page tables (Linux reuses any
    # other frame of its start-of-day region it does not know, and did: module text
    # overwrote the event channels). The spare frames stay the last ones.
    extra = 1 if model == XEN_PV else 0
    # The number of bootstrap tables depends on the region's size, which depends on it:
    # grow until it stops changing.
    boot = 4
    while True:
        pt_end = pt_start + (boot + extra + SPARE_PT_FRAMES) * PAGE
        stack_bottom = pt_end
        stack_top = stack_bottom + BOOT_STACK_PAGES * PAGE
        gdt = stack_top
        last = gdt + PAGE
        region_end = (last + REGION_PAD + REGION_ALIGN - 1) & ~(REGION_ALIGN - 1)
        need = tables_needed(image.virt_base + map_start, image.virt_base + region_end)
        if need <= boot:
            break
        boot = need
    # The loader checked the segments; the region after them may still run off the top
    # of the address space or into the non-canonical hole.
    why = address_problem(image.virt_base + map_start, image.virt_base + region_end)
    if why:
        raise ImageError(f"the start-of-day region at VIRT_BASE {image.virt_base:#x} "
                         f"cannot be mapped: {why}")
    shared_info = pt_start + boot * PAGE if model == XEN_PV else None
    if region_end > ram_bytes:
        what = f" (with a {ramdisk_size:,}-byte ramdisk)" if ramdisk_size else ""
        raise ImageError(
            f"{ram_bytes >> 20} MiB of guest memory is too small: the start-of-day region"
            f"{what} needs {region_end >> 20} MiB")
    return Layout(image.virt_base, ram_bytes, first, img_end, mfn_list, start_info, xenstore,
                  console, pt_start, boot, pt_end, stack_bottom, stack_top, gdt, region_end,
                  shared_info, map_start, ramdisk, ramdisk_size)


class PageTableWriter:
    """Builds the bootstrap 4-level page tables in the pool, frame by frame."""

    def __init__(self, ram: memoryview, layout: Layout):
        self.ram, self.layout = ram, layout
        self.next_frame = layout.pt_start
        self.root = self._new_table()

    def _new_table(self) -> int:
        frame = self.next_frame
        self.next_frame += PAGE
        if self.next_frame > self.layout.pt_start + self.layout.pt_bootstrap_frames * PAGE:
            raise AssertionError("bootstrap page-table estimate too small")
        return frame

    def _entry(self, table: int, index: int) -> int:
        return struct.unpack_from("<Q", self.ram, table + index * 8)[0]

    def _set(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.ram, table + index * 8, value)

    def map_page(self, virt: int, phys: int, writable: bool) -> None:
        table = self.root
        for shift in (39, 30, 21):
            index = (virt >> shift) & 511
            entry = self._entry(table, index)
            if not entry & PTE_P:
                child = self._new_table()
                self._set(table, index, child | TABLE_FLAGS)
                table = child
            else:
                table = entry & 0x000FFFFFFFFFF000
        leaf = phys | PTE_P | PTE_A | PTE_D | (PTE_RW if writable else 0)
        self._set(table, (virt >> 12) & 511, leaf)


@dataclass
class BootState:
    rip: int
    rsp: int
    rsi: int
    cr3: int
    gdt_base: int
    gdt_limit: int
    code_selector: int = CODE_SELECTOR
    data_selector: int = DATA_SELECTOR


def cmdline_problem(cmdline: str) -> str | None:
    """Why a command line cannot go into start_info.cmd_line, or None. It is UTF-8 text:
    a byte that is not UTF-8 reaches us as a lone surrogate (Python decodes argv with
    surrogateescape) and cannot be encoded; a NUL would cut it short."""
    try:
        encoded = cmdline.encode()
    except UnicodeEncodeError as e:
        bad = ord(cmdline[e.start])
        what = f"byte {bad - 0xDC00:#04x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        return f"command line is not valid UTF-8 ({what} at offset {e.start})"
    if b"\0" in encoded:
        return f"command line contains a NUL byte (at offset {encoded.index(0)})"
    if len(encoded) >= C.XEN_MAX_GUEST_CMDLINE:
        return (f"command line is {len(encoded)} bytes; the limit is "
                f"{C.XEN_MAX_GUEST_CMDLINE - 1} (Xen's MAX_GUEST_CMDLINE with its NUL)")
    return None


def build(ram: memoryview, image: PVImage, layout: Layout, cmdline: str,
          model: int = RING0, console_evtchn: int = 0, store_evtchn: int = 0,
          ramdisk: bytes | None = None) -> BootState:
    """Write the image and the start-of-day region into zeroed guest RAM.

    model: the PV CPU model the domain runs (its hypercall page differs);
    console_evtchn: the guest's port of the console ring (0: the domain has no ring, and
    start_info names no console page, as for Xen's dom0); store_evtchn likewise for the
    xenstore ring; ramdisk: the initial ramdisk, layout.ramdisk_size bytes, whose
    virtual address start_info.mod_start names (flags without SIF_MOD_START_PFN)."""
    why = cmdline_problem(cmdline)
    if why:
        raise ImageError(why)
    encoded = cmdline.encode()
    for seg in image.segments:
        ram[seg.paddr:seg.paddr + len(seg.data)] = seg.data
    if image.hypercall_page is not None:
        hp = image.hypercall_page - layout.virt_base
        ram[hp:hp + PAGE] = hypercall_page(model)
    if len(ramdisk or b"") != layout.ramdisk_size:
        raise AssertionError("the layout was planned for another ramdisk")
    if ramdisk:
        ram[layout.ramdisk:layout.ramdisk + len(ramdisk)] = ramdisk

    # mfn_list: trapless domains are auto-translated, so pfn == mfn.
    struct.pack_into(f"<{layout.nr_pages}Q", ram, layout.mfn_list, *range(layout.nr_pages))

    pt = PageTableWriter(ram, layout)
    map_start = layout.image_start if layout.map_start is None else layout.map_start
    for phys in range(map_start, layout.region_end, PAGE):
        # tables read-only; shared_info, which sits among them, writable as before
        writable = not layout.pt_start <= phys < layout.pt_end or phys == layout.shared_info
        pt.map_page(layout.virt(phys), phys, writable)

    struct.pack_into(f"<{len(GDT_ENTRIES)}Q", ram, layout.gdt, *GDT_ENTRIES)

    si = ffi.new("struct start_info *")
    si.magic = START_INFO_MAGIC
    si.nr_pages = layout.nr_pages
    si.shared_info = layout.shared_info or 0      # a machine address, not mapped for it
    si.flags = 0
    si.store_mfn = layout.xenstore // PAGE
    si.store_evtchn = store_evtchn
    if console_evtchn:
        si.console_mfn = layout.console // PAGE
        si.console_evtchn = console_evtchn
    si.pt_base = layout.virt(layout.pt_start)
    si.nr_pt_frames = (layout.pt_end - layout.pt_start) // PAGE
    si.mfn_list = layout.virt(layout.mfn_list)
    if ramdisk:
        si.mod_start = layout.virt(layout.ramdisk)
        si.mod_len = len(ramdisk)
    si.cmd_line = encoded
    raw = bytes(ffi.buffer(si))
    ram[layout.start_info:layout.start_info + len(raw)] = raw

    return BootState(rip=image.entry, rsp=layout.virt(layout.stack_top),
                     rsi=layout.virt(layout.start_info), cr3=pt.root,
                     gdt_base=layout.virt(layout.gdt), gdt_limit=len(GDT_ENTRIES) * 8 - 1)



