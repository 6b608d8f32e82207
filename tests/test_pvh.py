"""PVH guests (issue 13, parts 1-3): images with a PHYS32_ENTRY note, ELF64 or ELF32,
entered in 32-bit protected mode with hvm_start_info in ebx; the Xen CPUID leaves, the
hypercall-page MSR, hypercalls from 32-bit and 64-bit code, vmcall and vmmcall."""
from __future__ import annotations

import struct
import subprocess

import pytest

from abi import C, ffi
from guest_kernel.elf import build_elf
from guest_kernel.pvh_guest import build_pvh_guest
from hypervisor import pvh
from hypervisor.errors import ConfigError, ImageError
from hypervisor.image import load_image
from hypervisor._hv import ffi as hv_ffi, lib

from helpers import hv

MEM = 64 << 20


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    """The guest as ELF64 with and without vmcall, and as ELF32 (objcopy, as XTF does)."""
    d = tmp_path_factory.mktemp("pvh")
    out = {"vmcall": d / "pvh.elf", "page": d / "pvh-page.elf", "elf32": d / "pvh32.elf"}
    out["vmcall"].write_bytes(build_pvh_guest(vmcall=True))
    out["page"].write_bytes(build_pvh_guest(vmcall=False))
    subprocess.run(["objcopy", "-O", "elf32-i386", out["page"], out["elf32"]], check=True)
    return out


def expected(image_path, cmdline: str, vmcall: bool, module: tuple[int, int, int] | None = None,
             memory_mib: int = 64) -> str:
    image = load_image(image_path, memory_mib << 20)
    layout = pvh.plan(image, memory_mib << 20, module[1] if module else 0)
    top, reserved = memory_mib << 20, layout.reserved
    text = ("hello from 32-bit protected mode, through the hypercall page\n"
            "trapless PVH guest: entered in 32-bit protected mode, now in long mode\n"
            "console_io from 32-bit code returned 0\n"
            f"hvm_start_info at {layout.start_info:#x}: magic 0x336ec578, version 1, "
            f"modules {1 if module else 0}\n")
    if module:
        text += (f"module 0: {module[0]:#x}, {module[1]} bytes, first byte {module[2]:#x}\n")
    text += (f"command line: {cmdline}\n"
             "memory map: 4 entries\n"     # the ACPI tables' page (type 3) splits RAM
             f"  0x0-{layout.acpi:#x} type 1\n"
             f"  {layout.acpi:#x}-{layout.acpi + 4096:#x} type 3\n"
             f"  {layout.acpi + 4096:#x}-{reserved:#x} type 1\n"
             f"  {reserved:#x}-{top:#x} type 2\n"
             "cpuid 0x40000000: XenVMMXenVMM, last leaf 0x40000005\n"
             "cpuid 0x40000004: vcpu id 0, domid 1\n"
             "xen_version through the hypercall page: 4.19\n"
             # writable_page_tables, auto_translated_physmap, hvm_callback_vector,
             # hvm_safe_pvclock: what Xen reports to a PVH guest (common/kernel.c)
             "xen_version(get_features): 0, submap 0 0x305\n"
             # the console and xenstore rings (trapless's reserved pages, out of the
             # guest's RAM) and their ports, the store's first as libxl allocates them
             f"hvm_op get_param console_pfn: 0, value {layout.console >> 12:#x}\n"
             "hvm_op get_param console_evtchn: 0, value 0x2\n"
             f"hvm_op get_param store_pfn: 0, value {layout.xenstore >> 12:#x}\n"
             "hvm_op get_param store_evtchn: 0, value 0x1\n"
             # (a failed get leaves the value as it was: the store's port)
             "hvm_op get_param out_of_range: -22, value 0x1\n"
             # a read of its own domid (relative to its home) on the ring those name
             f"xenstore through its ring: read domid -> type {C.XS_READ}, req_id 7, \"1\"\n"
             "hvm_op set_param console_pfn: -1\n")
    if vmcall:
        text += ("xen_version(extraversion) through vmcall: 0 .0-trapless\n"
                 "hello through vmcall\n"
                 "xen_version through vmmcall: 0x40013\n"
                 "hypercall 99 through vmcall: -38\n")
    # shared_info placed, the callback vector, VIRQ_TIMER (port 3: xenstore has 1, the
    # console ring 2)
    # from a one-shot timer, taken through the guest's own IDT, never early
    text += ("events_init: 0, upcalls on vector 0xf3, VIRQ_TIMER on port 3\n"
             "set_singleshot_timer: 0, VIRQ_TIMER upcalls: 1, not early: yes\n")
    return text + "powering off\n"


# ---- loading ----

def test_an_image_with_only_phys32_entry_is_pvh_and_loads_at_its_physical_addresses(guests):
    image = load_image(guests["page"], MEM)
    assert image.guest_type == "pvh"
    assert image.entry == image.phys32_entry == image.symbols["_start32"]
    assert image.virt_base == 0
    assert all(seg.paddr == seg.vaddr for seg in image.segments)
    assert image.hypercall_page is None


def test_elf32_containers_load_as_pvh(guests):
    raw = guests["elf32"].read_bytes()
    assert raw[4] == 1 and struct.unpack_from("<H", raw, 18)[0] == 3    # ELFCLASS32, EM_386
    image32, image64 = load_image(guests["elf32"], MEM), load_image(guests["page"], MEM)
    assert image32.guest_type == "pvh" and image32.elf_class == 1
    assert image32.entry == image64.entry
    assert [(s.paddr, s.memsz, s.data) for s in image32.segments] == \
           [(s.paddr, s.memsz, s.data) for s in image64.segments]


def _two_entry_image() -> bytes:
    """An ELF64 image with an ENTRY and a PHYS32_ENTRY note, as Linux's vmlinux has."""
    from guest_kernel.asm import eax
    from guest_kernel.runtime import PVProgram
    p = PVProgram()
    p.a.xor(eax, eax)
    p.a.ret()
    img = p.image()
    notes = [(C.XEN_ELFNOTE_ENTRY, img.symbols["_start"]), (C.XEN_ELFNOTE_VIRT_BASE, 0),
             (C.XEN_ELFNOTE_PADDR_OFFSET, 0),
             (C.XEN_ELFNOTE_HYPERCALL_PAGE, img.symbols["hypercall_page"]),
             (C.XEN_ELFNOTE_PHYS32_ENTRY, img.symbols["main"])]
    return build_elf(img.sections, img.symbols, img.symbols["_start"], notes)


def test_an_image_with_both_entries_is_pv_unless_told():
    raw = _two_entry_image()
    assert load_image(raw, MEM).guest_type == "pv"
    image = load_image(raw, MEM, guest_type="pvh")
    assert image.guest_type == "pvh" and image.entry == image.phys32_entry
    assert image.hypercall_page is None         # PVH: no page up front


@pytest.mark.parametrize("which,guest_type,message", [
    ("pv-kernel", "pvh", "cannot boot as PVH: the image has no PHYS32_ENTRY note"),
    ("elf32", "pv", "cannot boot as PV: a 32-bit ELF image (ELFCLASS32) boots only as PVH"),
    ("elf32-no-note", None, "a 32-bit ELF image (ELFCLASS32) boots only as PVH, and this one "
                            "has no PHYS32_ENTRY note"),
])
def test_bad_type_choices_are_one_line_errors(guests, tmp_path, which, guest_type, message):
    if which == "pv-kernel":
        from guest_kernel.pv_kernel import build_pv_kernel
        path = tmp_path / "pv.elf"
        path.write_bytes(build_pv_kernel())
    elif which == "elf32":
        path = guests["elf32"]
    else:
        path = tmp_path / "nonote32.elf"
        subprocess.run(["objcopy", "-O", "elf32-i386", "--remove-section=.note.Xen",
                        guests["page"], path], check=True)
    with pytest.raises(ImageError) as err:
        load_image(path, MEM, guest_type=guest_type)
    assert str(err.value) == f"{path}: {message}"
    args = ["run", path] + (["--type", guest_type] if guest_type else [])
    r = hv(*args, env={"TRAPLESS_NO_KVM": "1"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"trapless: {path}: {message}\n"


def test_hvm_start_info_and_the_memory_map(guests):
    image = load_image(guests["page"], MEM)
    ramdisk = bytes(range(256)) * 20
    layout = pvh.plan(image, MEM, len(ramdisk))
    ram = bytearray(MEM)
    boot = pvh.build(memoryview(ram), image, layout, "console=hvc0", ramdisk)
    assert boot.rip == image.phys32_entry and boot.rbx == layout.start_info
    assert boot.mode == lib.HV_BOOT_PVH32 and boot.cr3 == 0
    si = ffi.new("struct hvm_start_info *")
    ffi.buffer(si)[:] = ram[layout.start_info:layout.start_info + ffi.sizeof(si[0])]
    assert (si.magic, si.version, si.nr_modules, si.rsdp_paddr) == (0x336EC578, 1, 1, layout.acpi)
    assert ram[si.cmdline_paddr:si.cmdline_paddr + 13] == b"console=hvc0\0"
    paddr, size = struct.unpack_from("<QQ", ram, si.modlist_paddr)
    assert (paddr, size) == (layout.ramdisk, len(ramdisk)) and paddr % 4096 == 0
    assert ram[paddr:paddr + size] == ramdisk
    assert paddr >= layout.image_end
    entries = [struct.unpack_from("<QQI", ram, si.memmap_paddr + 24 * i)
               for i in range(si.memmap_entries)]
    acpi = layout.acpi
    assert acpi == layout.start_info + 4096 and layout.ramdisk == acpi + 4096
    assert entries == [(0, acpi, 1), (acpi, 4096, 3), (acpi + 4096, MEM - 4 * 4096 - acpi - 4096, 1),
                       (MEM - 4 * 4096, 4 * 4096, 2)]


def _acpi_table(ram, at):
    """(signature, body) of the ACPI table at at, its length and checksum checked."""
    signature, length = struct.unpack_from("<4sI", ram, at)
    assert sum(ram[at:at + length]) % 256 == 0, signature
    return signature, bytes(ram[at + 36:at + length])


def test_acpi_tables_say_one_local_apic_no_ioapic_and_no_legacy_devices(guests):
    """What Xen's toolstack gives a PVH domU: RSDP -> XSDT -> a hardware-reduced FADT
    (no 8042, VGA or CMOS RTC; sleep registers) whose DSDT names \\_S5, and a MADT with
    the local APIC at 0xfee00000, one enabled processor and no IO-APIC or 8259."""
    image = load_image(guests["page"], MEM)
    layout = pvh.plan(image, MEM)
    ram = bytearray(MEM)
    pvh.build(memoryview(ram), image, layout, "")
    rsdp = layout.acpi
    assert ram[rsdp:rsdp + 8] == b"RSD PTR " and ram[rsdp + 15] == 2
    assert sum(ram[rsdp:rsdp + 20]) % 256 == 0 and sum(ram[rsdp:rsdp + 36]) % 256 == 0
    signature, body = _acpi_table(ram, struct.unpack_from("<Q", ram, rsdp + 24)[0])
    assert signature == b"XSDT"
    tables = dict(_acpi_table(ram, at) for at in struct.unpack(f"<{len(body) // 8}Q", body))
    assert sorted(tables) == [b"APIC", b"FACP"]
    fadt = tables[b"FACP"]
    iapc_boot_arch, = struct.unpack_from("<H", fadt, 109 - 36)
    flags, = struct.unpack_from("<I", fadt, 112 - 36)
    assert iapc_boot_arch == (1 << 2) | (1 << 5) and flags == 1 << 20
    dsdt, = struct.unpack_from("<Q", fadt, 140 - 36)
    # the sleep registers, byte-wide I/O ports, and \_S5 = Package { 5, 5, 0, 0 }
    assert fadt[244 - 36:268 - 36] == struct.pack("<BBBBQBBBBQ", 1, 8, 0, 1, 0xB004, 1, 8, 0, 1, 0xB000)
    assert _acpi_table(ram, dsdt) == (b"DSDT", bytes.fromhex("085c5f53355f1208040a050a050000"))
    madt = tables[b"APIC"]
    assert struct.unpack_from("<II", madt) == (0xFEE00000, 0)
    assert madt[8:] == bytes([0, 8, 0, 0, 1, 0, 0, 0])     # one LAPIC entry: id 0, enabled


def test_a_ramdisk_too_big_for_memory_is_one_line(guests):
    image = load_image(guests["page"], 4 << 20)
    with pytest.raises(ImageError, match=r"^4 MiB of guest memory is too small: the image, "
                                         r"hvm_start_info, ACPI tables and a 5,000,000-byte "
                                         r"ramdisk end at"):
        pvh.plan(image, 4 << 20, 5_000_000)


# ---- the 32-bit decoder (bt) ----

def test_the_32bit_entry_decodes_to_objdumps_lengths(guests):
    """Every instruction of the guest's 32-bit entry, as objdump -m i386 splits them."""
    image = load_image(guests["page"], MEM)
    out = subprocess.run(["objdump", "-d", "-m", "i386", "-j", ".text32", guests["page"]],
                         capture_output=True, text=True, check=True).stdout
    lengths = [len(line.split("\t")[1].split()) for line in out.splitlines()
               if line.startswith("  ") and line.count("\t") >= 2]
    code = next(bytes(s.data) for s in image.segments if s.paddr <= image.entry < s.paddr + s.memsz)
    at, kind = 0, hv_ffi.new("int *")
    for n in lengths:
        assert lib.hv_bt_insn_length32(code[at:at + 15] + b"\x90" * 15, 30, kind) == n, hex(at)
        at += n


@pytest.mark.parametrize("code,length", [
    (b"\x40", 1), (b"\x4f", 1),                     # inc eax, dec edi (REX in 64-bit code)
    (b"\x06", 1), (b"\x1f", 1), (b"\x60", 1), (b"\x61", 1),     # push es, pop ds, pusha, popa
    (b"\xea\x00\x00\x10\x00\x08\x00", 7),           # jmp far ptr16:32
    (b"\x66\xea\x00\x10\x08\x00", 6),               # jmp far ptr16:16
    (b"\xa1\x00\x10\x00\x00", 5),                   # mov eax, [moffs32]
    (b"\x67\x8b\x46\x02", 4),                       # mov eax, [bp+2] (16-bit addressing)
    (b"\x67\x8b\x06\x34\x12", 5),                   # mov eax, [0x1234] (16-bit addressing)
    (b"\xc5\x06", 2),                               # lds eax, [esi]
    (b"\xc5\xf8\x77", 3),                           # vzeroupper (VEX)
    (b"\xd4\x0a", 2),                               # aam
    (b"\x82\xc0\x01", 3),                           # add al, 1 (82 alias)
])
def test_32bit_only_encodings(code, length):
    assert lib.hv_bt_insn_length32(code + b"\x90" * 15, len(code) + 15, hv_ffi.NULL) == length


def test_vmcall_and_vmmcall_are_sensitive():
    kind = hv_ffi.new("int *")
    for code in (b"\x0f\x01\xc1", b"\x0f\x01\xd9"):
        assert lib.hv_bt_insn_length(code + b"\x90" * 12, 15, kind) == 3 and kind[0] != 0
        assert lib.hv_bt_insn_length32(code + b"\x90" * 12, 15, kind) == 3 and kind[0] != 0


# ---- booting, on each engine ----

def test_pvh_guest_boots_on_each_engine(guests, run_guest, engine):
    """32-bit entry, hvm_start_info, CPUID, the hypercall-page MSR, a 32-bit hypercall,
    long mode on its own tables, hypercalls through the page (and vmcall/vmmcall where
    the engine can take them), poweroff."""
    vmcall = engine == "bt" or bool(lib.hv_kvm_has_xen_hvm())
    path = guests["vmcall" if vmcall else "page"]
    stop, out, dom = run_guest(path, cmdline="console=hvc0 hello pvh", timeout=120)
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "poweroff"), stop
    assert out == expected(path, "console=hvc0 hello pvh", vmcall)
    c = dom.counters()
    assert c.hypercalls["xen_version"] == (4 if vmcall else 2)
    assert c.hypercall_errors.get("out_of_range", 0) == (1 if vmcall else 0)


def emit_timer_inside_the_wait(p) -> None:
    """A one-shot timer due at once, and 20 ms of PV-clock time spent between the wait's
    check and its sleep: the timer's event lands there every time, not once in a few
    hundred runs as with the 1 ms timer before."""
    from guest_kernel.asm import qword, r14, rax, rdi
    from guest_kernel.pvlib import emit_block_until, emit_events_on
    a = p.a
    a.call("pvclock_read")
    p.hypercall("set_timer_op", rax)

    def second_upcall():
        a.cmp(qword["timer_fired"], 2)
        a.jae("inside.done")

    def spin():
        a.call("pvclock_read")
        a.mov(r14, rax)
        a.add(r14, 20_000_000)
        a.label("inside.spin")
        a.call("pvclock_read")
        a.cmp(rax, r14)
        a.jb("inside.spin")

    emit_block_until(p, second_upcall, "inside.done", window=spin)
    a.label("inside.done")
    emit_events_on(p)
    p.print("a timer inside the wait's window: VIRQ_TIMER upcalls ")
    a.mov(rdi, qword["timer_fired"])
    a.call("print_dec")
    p.print("\n")


def run_to_poweroff(run_guest, extra, timeout: float) -> str:
    """Our PVH guest (hypercall page, no vmcall) with extra() in its body, run until it
    powers off: its console output."""
    stop, out, _ = run_guest(build_pvh_guest(vmcall=False, extra=extra), timeout=timeout)
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "poweroff"), (stop, out[-200:])
    return out


def test_an_event_between_the_wait_check_and_the_sleep_wakes_the_sleep(run_guest, engine):
    """The callback vector of a PVH guest ignores evtchn_upcall_mask (RFLAGS.IF alone
    gates it, as Xen's hvm_vcpu_has_pending_irq), so the guest waits as a ring-0 kernel
    does: check with interrupts off, then sti; hlt. An upcall taken between the check
    and a SCHEDOP_block would leave the block sleeping for an event that already came."""
    out = run_to_poweroff(run_guest, emit_timer_inside_the_wait, timeout=10)
    assert out.endswith("set_singleshot_timer: 0, VIRQ_TIMER upcalls: 1, not early: yes\n"
                        "a timer inside the wait's window: VIRQ_TIMER upcalls 2\n"
                        "powering off\n")


LAPIC_TIMER_VECTOR = 0x40


def emit_block_for_the_lapic_timer(p) -> None:
    """With interrupts off and no event channel pending, arm the local APIC's one-shot
    timer (5 ms) and SCHEDOP_block: the block must end when the timer raises its vector,
    as Xen's does for an HVM vCPU; the interrupt itself is taken at the sti after."""
    from guest_kernel.asm import cr3, dword, edi, ptr, qword, rax, rcx, rdi, rsi
    a = p.a
    a.cli()
    a.lea(rax, ptr["lapic_pd"])                     # pdpt[3]: the 4th GiB, for 0xfee00000
    a.or_(rax, 0x3)
    a.lea(rcx, ptr["pdpt"])
    a.mov(qword[rcx + 24], rax)
    a.mov(rax, cr3)
    a.mov(cr3, rax)
    a.mov(edi, LAPIC_TIMER_VECTOR)
    a.lea(rsi, ptr["lapic_timer_isr"])
    a.call("idt_set_gate")
    a.mov(rcx, 0xfee00000)
    a.mov(dword[rcx + 0xf0], 0x1ff)                 # spurious vector register: enabled
    a.mov(dword[rcx + 0x3e0], 0xb)                  # divide by 1: one tick a ns
    a.mov(dword[rcx + 0x320], LAPIC_TIMER_VECTOR)   # LVT timer: one-shot, unmasked
    a.mov(dword[rcx + 0x380], 5_000_000)            # initial count: 5 ms
    p.hypercall("sched_op", C.SCHEDOP_block, 0)
    a.mov(rdi, rax)
    a.push(rdi)
    p.print("SCHEDOP_block with interrupts off returned ")
    a.pop(rdi)
    a.call("print_sdec")
    p.print(", LAPIC timer interrupts taken: ")
    a.mov(rdi, qword["lapic_ticks"])
    a.call("print_dec")
    a.sti()
    a.hlt()                                         # ended at once by the pending vector
    a.cli()
    p.print(", after sti; hlt: ")
    a.mov(rdi, qword["lapic_ticks"])
    a.call("print_dec")
    p.print("\n")
    a.jmp("lapic.done")

    a.label("lapic_timer_isr")
    a.push(rcx)
    a.inc(qword["lapic_ticks"])
    a.mov(rcx, 0xfee00000)
    a.mov(dword[rcx + 0xb0], 0)                     # EOI
    a.pop(rcx)
    a.iretq()

    a.section(".data")
    a.align(8)
    a.label("lapic_ticks")
    a.dq(0)
    a.align(4096)
    a.label("lapic_pd")                             # 0xfee00000 as a 2 MiB uncached page
    a.dq(*[(0xfee00000 >> 21 << 21) | 0x9b if i == (0xfee00000 >> 21) & 511 else 0
           for i in range(512)])
    a.section(".text")
    a.label("lapic.done")


def test_schedop_block_wakes_for_a_local_apic_interrupt(run_guest, engine):
    """Xen's SCHEDOP_block on an HVM/PVH vCPU ends for any interrupt its local APIC
    raises (vlapic_set_irq kicks the vCPU), not only for an event channel upcall."""
    out = run_to_poweroff(run_guest, emit_block_for_the_lapic_timer, timeout=20)
    assert out.endswith("SCHEDOP_block with interrupts off returned 0, LAPIC timer "
                        "interrupts taken: 0, after sti; hlt: 1\n"
                        "powering off\n")


def test_elf32_pvh_guest_with_a_ramdisk(guests, run_guest, engine):
    ramdisk = b"\x5a" + bytes(9999)
    image = load_image(guests["elf32"], MEM)
    at = pvh.plan(image, MEM, len(ramdisk)).ramdisk
    stop, out, _ = run_guest(guests["elf32"], cmdline="elf32", timeout=120, ramdisk=ramdisk)
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "poweroff"), stop
    assert out == expected(guests["elf32"], "elf32", False, module=(at, len(ramdisk), 0x5a))


def test_a_bad_hypercall_page_msr_write_is_a_gp_fault(tmp_path, run_guest, engine):
    """Index 1 of a one-page set (low bits of the MSR value) is #GP(0), as in Xen: with
    no IDT yet the guest triple-faults."""
    raw = bytearray(build_pvh_guest(vmcall=False))
    image = load_image(bytes(raw), MEM)
    # mov eax, hypercall_page -> mov eax, hypercall_page + 1
    needle = b"\xb8" + struct.pack("<I", image.symbols["hypercall_page"]) + b"\x31\xd2\x0f\x30"
    at = raw.index(needle)
    raw[at + 1:at + 5] = struct.pack("<I", image.symbols["hypercall_page"] + 1)
    stop, out, _ = run_guest(bytes(raw), timeout=120)
    assert stop.kind == "fault" and stop.message == "triple fault", stop
    assert out == ""


def test_run_picks_bt_for_a_vmcall_guest_where_kvm_cannot_take_vmcall(guests):
    if lib.hv_kvm_has_xen_hvm():
        pytest.skip("this host's KVM hands vmcall to the VMM (KVM_CAP_XEN_HVM)")
    from hypervisor import engines
    if engines.why_unavailable("kvm") or engines.why_unavailable("bt"):
        pytest.skip("needs both engines")
    r = hv("run", guests["vmcall"], "--cmdline", "auto", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ("trapless: kvm unavailable (the guest calls Xen with vmcall/vmmcall, "
                        "which this host's KVM cannot hand to trapless (no KVM_CAP_XEN_HVM)); "
                        "using bt\n")
    assert r.stdout == expected(guests["vmcall"], "auto", True)
    r = hv("run", guests["vmcall"], "--engine", "kvm")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("trapless: engine kvm: the guest calls Xen with vmcall/vmmcall, which "
                        "this host's KVM cannot hand to trapless (no KVM_CAP_XEN_HVM)\n")


def test_a_config_file_names_a_pvh_guest_and_its_ramdisk(guests, tmp_path, engine):
    """type = "pvh" and ramdisk = (relative to the file, as kernel is), through the
    toolstack as `create` uses them."""
    from hypervisor import config
    from hypervisor.toolstack import Toolstack
    from helpers import wait_for

    (tmp_path / "initrd").write_bytes(b"\x7f" + bytes(4095))
    (tmp_path / "guest.elf").write_bytes(guests["elf32"].read_bytes())
    (tmp_path / "p.cfg").write_text(f'name = "p"\nkernel = "guest.elf"\ntype = "pvh"\n'
                                    f'ramdisk = "initrd"\ncmdline = "from a config"\n'
                                    f'engine = "{engine}"\non_poweroff = "preserve"\n')
    cfg = config.load(tmp_path / "p.cfg")
    assert (cfg.type, cfg.ramdisk) == ("pvh", tmp_path / "initrd")
    ts = Toolstack()
    try:
        rec = ts.create(cfg)
        assert wait_for(lambda: [row.state for row in ts.list()] == ["shutdown"], timeout=120)
        at = pvh.plan(load_image(guests["elf32"], MEM), MEM, 4096).ramdisk
        assert rec.engine == engine
        assert rec.console_text == expected(guests["elf32"], "from a config", False,
                                            module=(at, 4096, 0x7f))
    finally:
        ts.shutdown()


def test_a_config_ramdisk_that_is_missing_is_one_line(tmp_path):
    from hypervisor import config
    (tmp_path / "k.elf").write_bytes(build_pvh_guest(vmcall=False))
    (tmp_path / "p.cfg").write_text('kernel = "k.elf"\ntype = "pvh"\nramdisk = "nope"\n')
    with pytest.raises(ConfigError) as err:
        config.load(tmp_path / "p.cfg")
    assert str(err.value) == f"{tmp_path / 'p.cfg'}: ramdisk = '{tmp_path / 'nope'}': no such file"
