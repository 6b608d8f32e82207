r"""The ACPI tables of a PVH domain, as Xen's toolstack builds them (tools/libacpi for a
PVH domU): an RSDP that hvm_start_info's rsdp_paddr names, an XSDT, a hardware-reduced
FADT, a DSDT with only \_S5 and a MADT with one local APIC per vCPU and no IO-APIC.

The MADT is how a kernel learns that the local APIC exists and the machine has no
IO-APIC and no 8259 pair: Linux without one falls back to "virtual wire, no
configuration", runs uniprocessor without setting up its per-CPU timer, and never
starts Xen's clock events. The hardware-reduced FADT says there is no PM timer, SCI or
fixed hardware; its boot flags say there is no 8042, VGA or CMOS RTC, so nothing probes
for them (ACPI 6.x, sections 5.2.5, 5.2.8, 5.2.9, 5.2.12). Its sleep control and status
registers, with the DSDT's \_S5, are how the guest powers itself off (cext/pvh.c, ACPI
4.8.3.7): Linux's PVH poweroff goes through ACPI, as on Xen.

All tables fit in one page; layout within it: RSDP, XSDT, FADT, MADT, DSDT.
"""
from __future__ import annotations

import struct

from abi import C

PAGE = 4096
OEM_ID = b"Xen\0\0\0"               # what Xen's tables carry; 6 bytes
OEM_TABLE_ID = b"trapless"
CREATOR_ID = b"TRPL"
LAPIC_ADDRESS = 0xFEE00000
HEADER = struct.Struct("<4sIBB6s8sI4sI")    # the common table header (36 bytes)

FADT_REVISION, FADT_MINOR = 6, 0
FADT_LENGTH = 276                   # ACPI 6.0's FADT, hypervisor vendor id included
FADT_HW_REDUCED_ACPI = 1 << 20
IAPC_NO_VGA, IAPC_NO_CMOS_RTC = 1 << 2, 1 << 5
MADT_LOCAL_APIC, MADT_ENABLED = 0, 1
GAS_SYSTEM_IO, GAS_BYTE_ACCESS = 1, 1
# the DSDT's one object: Name (\_S5, Package (4) { S5, S5, 0, 0 }) in AML
# (NameOp, \_S5_, PackageOp, PkgLength 8, 4 elements, BytePrefix S5 twice, Zero twice)
S5_AML = bytes([0x08, 0x5C]) + b"_S5_" + bytes([0x12, 0x08, 0x04, 0x0A, C.TRAPLESS_ACPI_S5_SLP_TYP,
                                                0x0A, C.TRAPLESS_ACPI_S5_SLP_TYP, 0x00, 0x00])


def _checksum(data: bytes | bytearray) -> int:
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A table: the header with its length and checksum, then body."""
    length = HEADER.size + len(body)
    head = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    table = bytearray(head + body)
    table[9] = _checksum(table)
    return bytes(table)


def _gas_io_byte(port: int) -> bytes:
    """A Generic Address Structure naming one byte-wide I/O port."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, 8, 0, GAS_BYTE_ACCESS, port)


def _fadt(dsdt: int) -> bytes:
    body = bytearray(FADT_LENGTH - HEADER.size)
    struct.pack_into("<I", body, 40 - 36, dsdt)               # DSDT (32-bit)
    struct.pack_into("<H", body, 109 - 36, IAPC_NO_VGA | IAPC_NO_CMOS_RTC)
    struct.pack_into("<I", body, 112 - 36, FADT_HW_REDUCED_ACPI)
    body[131 - 36] = FADT_MINOR
    struct.pack_into("<Q", body, 140 - 36, dsdt)              # X_DSDT
    body[244 - 36:256 - 36] = _gas_io_byte(C.TRAPLESS_ACPI_SLEEP_CONTROL_PORT)
    body[256 - 36:268 - 36] = _gas_io_byte(C.TRAPLESS_ACPI_SLEEP_STATUS_PORT)
    body[268 - 36:276 - 36] = b"XenVMM\0\0"                   # hypervisor vendor identity
    return _table(b"FACP", FADT_REVISION, bytes(body))


def _madt(vcpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_ADDRESS, 0)               # no PCAT_COMPAT: no 8259s
    for cpu in range(vcpus):
        # processor UID, APIC id (Xen: 2 * vCPU id; here the vCPU id, as our LAPIC says)
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, MADT_ENABLED)
    return _table(b"APIC", 4, body)


def build(base: int, vcpus: int = 1) -> bytes:
    """The tables, to be placed at guest-physical base (page aligned); the RSDP is at
    base itself. At most one page."""
    rsdp_size, xsdt_size = 36, HEADER.size + 2 * 8
    xsdt_at = base + rsdp_size
    fadt_at = xsdt_at + xsdt_size
    madt = _madt(vcpus)
    madt_at = fadt_at + FADT_LENGTH
    dsdt_at = madt_at + len(madt)
    dsdt = _table(b"DSDT", 2, S5_AML)   # no devices to describe; the one sleep state
    xsdt = _table(b"XSDT", 1, struct.pack("<QQ", fadt_at, madt_at))

    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, rsdp_size,
                                 xsdt_at, 0))
    rsdp[8] = _checksum(rsdp[:20])
    rsdp[32] = _checksum(rsdp)
    blob = bytes(rsdp) + xsdt + _fadt(dsdt_at) + madt + dsdt
    assert len(blob) <= PAGE
    return blob
