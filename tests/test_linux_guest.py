"""Debian's Linux as a PVH guest (issue 13, part 5): taking vmlinux out of a bzImage,
the busybox initramfs, and the boot itself where `make linux-guest` has fetched them."""
from __future__ import annotations

import gzip
import lzma
import os
import struct
from pathlib import Path

import pytest

from hypervisor import engines
from hypervisor.linux_guest import (LinuxGuestError, build_initramfs, extract_vmlinux,
                                    unlz4_legacy)

LINUX = Path(os.environ.get("TRAPLESS_LINUX", Path(__file__).parent.parent / "build" / "linux"))
FAKE_ELF = b"\x7fELF" + bytes(range(256)) * 40


def bzimage(payload: bytes, setup_sects: int = 3, version: int = 0x20F) -> bytes:
    """A bzImage's skeleton: the setup header and the payload where it says."""
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<II", image, 0x248, 0x80, len(payload))
    return bytes(image) + bytes(0x80) + payload + b"tail"


def lz4_legacy(*blocks: bytes, size: int) -> bytes:
    out = struct.pack("<I", 0x184C2102)
    for block in blocks:
        out += struct.pack("<I", len(block)) + block
    return out + struct.pack("<I", size)        # the kernel's size trailer


def test_lz4_legacy_literals_matches_and_overlapping_repeats():
    # "ab", then a match 2 back of length 6 (it overlaps itself: abababab), then "xyz";
    # a second block: a run of 300 'z' from one literal and a long match.
    block1 = bytes([0x22]) + b"ab" + struct.pack("<H", 2) + bytes([0x30]) + b"xyz"
    block2 = bytes([0x1F]) + b"z" + struct.pack("<H", 1) + bytes([255, 26]) + bytes([0x10]) + b"!"
    assert unlz4_legacy(lz4_legacy(block1, block2, size=0)) == \
        b"abababab" + b"xyz" + b"z" * (1 + 4 + 15 + 255 + 26) + b"!"


@pytest.mark.parametrize("compress", [gzip.compress, lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
                                      lambda d: lz4_legacy(bytes([0xF0, len(d) - 15]) + d,
                                                           size=len(d))],
                         ids=["gzip", "xz", "lz4"])
def test_extract_vmlinux_finds_and_decompresses_the_payload(compress):
    assert extract_vmlinux(bzimage(compress(FAKE_ELF[:200]))) == FAKE_ELF[:200]


def test_extract_vmlinux_refuses_what_is_not_a_bzimage():
    with pytest.raises(LinuxGuestError, match="not a bzImage"):
        extract_vmlinux(b"\x7fELF" + bytes(1000))
    with pytest.raises(LinuxGuestError, match=r"boot protocol 2\.7 has no payload_offset"):
        extract_vmlinux(bzimage(gzip.compress(FAKE_ELF), version=0x207))
    with pytest.raises(LinuxGuestError, match="unknown compression"):
        extract_vmlinux(bzimage(b"\x00\x01\x02\x03\x04\x05"))
    with pytest.raises(LinuxGuestError, match="not an ELF image"):
        extract_vmlinux(bzimage(gzip.compress(b"MZ" + bytes(100))))


def test_initramfs_is_a_newc_archive_with_init_and_busybox():
    archive = build_initramfs(b"BUSYBOX", init="#!/bin/busybox sh\n")
    names, at = {}, 0
    while True:
        assert archive[at:at + 6] == b"070701"
        fields = [int(archive[at + 6 + 8 * i:at + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name = archive[at + 110:at + 110 + namesize - 1].decode()
        at += 110 + namesize
        at += -at % 4
        data = archive[at:at + filesize]
        at += filesize
        at += -at % 4
        if name == "TRAILER!!!":
            break
        names[name] = (oct(mode), data)
    assert names["init"] == ("0o100755", b"#!/bin/busybox sh\n")
    assert names["bin/busybox"] == ("0o100755", b"BUSYBOX")
    assert names["bin"][0] == "0o40755" and at == len(archive)


@pytest.mark.skipif(not (LINUX / "vmlinux").is_file(),
                    reason=f"no Debian kernel at {LINUX}: `make linux-guest` fetches it "
                           f"(apt-get download; needs Debian's archive)")
@pytest.mark.skipif(engines.why_unavailable("bt") is not None, reason="needs the bt engine")
def test_debian_linux_boots_as_pvh_on_bt():
    """Debian's cloud kernel, PVH, on bt, with console=hvc0 and nothing else: it finds
    Xen, takes its memory map, ACPI tables and initramfs, runs on Xen's timer through the
    per-vCPU upcall vector of its local APIC, starts /init, whose line comes back, and
    powers off through ACPI S5."""
    from hypervisor.domain import Domain
    ramdisk = (LINUX / "initramfs.cpio").read_bytes()
    with Domain(LINUX / "vmlinux", memory_mib=256, engine="bt", guest_type="pvh",
                ramdisk=ramdisk, cmdline="console=hvc0") as dom:
        stop = dom.run(timeout=300)
        out = dom.console_output.decode(errors="replace")
    assert "Hypervisor detected: Xen HVM" in out
    assert "Xen version 4.19." in out
    assert "ACPI: Using ACPI for processor (LAPIC) configuration information" in out
    assert "installing Xen timer for CPU 0" in out and "clocksource: Switched to clocksource xen" in out
    assert "Kernel/User page tables isolation" not in out     # IA32_ARCH_CAPABILITIES: RDCL_NO
    assert "Run /init as init process" in out
    assert "trapless: /init of a busybox initramfs" in out
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "poweroff"), stop


@pytest.mark.skipif(not (LINUX / "vmlinux").is_file(),
                    reason=f"no Debian kernel at {LINUX}: `make linux-guest` fetches it "
                           f"(apt-get download; needs Debian's archive)")
@pytest.mark.skipif(engines.why_unavailable("bt") is not None, reason="needs the bt engine")
def test_debian_linux_shell_through_the_console(tmp_path):
    """A linux.cfg (type = "pvh", the initramfs's `shell` word) created from the console
    shell; `console linux` reaches busybox's prompt over hvc0, a typed `uname -r` gets
    the kernel's release back, and `poweroff -f` ends the domain (ACPI S5)."""
    import sys

    import pexpect
    release = (LINUX / "kernel-version").read_text().strip()    # make linux-guest wrote it
    cfg = tmp_path / "linux.cfg"
    cfg.write_text(f'name = "linux"\nkernel = "{LINUX / "vmlinux"}"\n'
                   f'ramdisk = "{LINUX / "initramfs.cpio"}"\ntype = "pvh"\nmemory = 256\n'
                   f'cmdline = "console=hvc0 shell"\n')
    child = pexpect.spawn(sys.executable, ["-m", "hypervisor.console"], encoding="utf-8",
                          timeout=240, dimensions=(40, 200))
    try:
        child.expect("trapless> ")
        child.sendline(f"create {cfg}")
        child.expect("created domain 1 \\(linux\\)")
        child.expect("trapless> ")
        child.sendline("console linux")
        child.expect("trapless: /init of a busybox initramfs")
        child.expect("/ # ")
        child.send("uname -r\r")
        child.expect(r"uname -r\r+\n(\S+)\r+\n")
        assert child.match.group(1) == release
        child.expect("/ # ")
        child.send("poweroff -f\r")
        child.expect("reboot: Power down")
        child.expect(r"console of domain 1 \(linux\) closed\]")
        child.expect("trapless> ")
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
