"""Debian's own Linux kernel as a PVH guest: fetch it, take vmlinux out of the bzImage,
and build a busybox initramfs whose /init loads Xen's split-driver frontends, says
hello and powers off (or, by words on the kernel command line, runs a shell or the
disk test below).

    python -m hypervisor.linux_guest [--out build/linux]     (make linux-guest)

Fetching uses `apt-get download` (no install): linux-image-cloud-amd64, the kernel
package it depends on, and busybox-static. The bzImage's setup header says where its
compressed payload is (payload_offset, payload_length at 0x248, boot protocol 2.08+);
the payload is decompressed here, as the kernel's own scripts/extract-vmlinux does
(gzip, xz, bzip2 and lzma with Python's modules; LZ4's legacy frames, which Debian's
cloud kernel uses, with a decoder of our own). The initramfs is a newc cpio archive.

Debian's cloud kernel builds xen-blkfront and xen-netfront as modules (its
/boot/config: CONFIG_XEN_BLKDEV_FRONTEND=m, CONFIG_XEN_NETDEV_FRONTEND=m), so the
initramfs carries them, with whatever their .modinfo `depends=` names, from the same
kernel package, and /init insmods them in dependency order.

`disktest` on the command line: /init waits for /dev/xvda, mounts it (ext4), prints
the file hello.txt of its root as `disktest: read: ...`, writes guest.txt (the kernel
release and what it read), and, if the host put random.bin there, prints its MD5 and
copies it to copy.bin (a file of a few hundred KiB goes to and from the disk in
requests larger than a ring slot holds: blkfront's indirect requests); then it unmounts,
syncs and powers off; the host reads guest.txt and copy.bin back out of the image.

`nettest=LOCAL,PEER`: /init waits for eth0, gives it LOCAL/24, waits (up to a minute)
until PEER answers, pings it three times, prints ping's exit status and stays on the
network 5 s more, so that a peer doing the same (two Linux domains booting side by
side) still gets its answers.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
LZ4_LEGACY_MAGIC = 0x184C2102
FRONTENDS = ("xen-blkfront", "xen-netfront")
MODULE_ORDER = "lib/modules/order"          # the initramfs's list of modules to load
DISKTEST_READ = "hello.txt"                 # what `disktest` prints from xvda's root
DISKTEST_WRITTEN = "guest.txt"              # and what it writes there
DISKTEST_BIG = "random.bin"                 # what it takes the MD5 of, if it is there
DISKTEST_COPY = "copy.bin"                  # and copies it to
INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null
/bin/busybox echo "trapless: /init of a busybox initramfs, $(/bin/busybox uname -sr)"
if [ -f /""" + MODULE_ORDER + """ ]; then
    for m in $(/bin/busybox cat /""" + MODULE_ORDER + """); do
        /bin/busybox insmod /lib/modules/$m.ko || /bin/busybox echo "trapless: insmod $m failed"
    done
fi
if /bin/busybox grep -qw disktest /proc/cmdline; then
    /bin/busybox --install -s /bin
    i=0
    while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    mkdir -p /mnt
    if mount -t ext4 /dev/xvda /mnt; then
        read=$(cat /mnt/""" + DISKTEST_READ + """)
        echo "disktest: read: $read"
        echo "$(uname -r) read: $read" > /mnt/""" + DISKTEST_WRITTEN + """
        if [ -f /mnt/""" + DISKTEST_BIG + """ ]; then
            set -- $(md5sum /mnt/""" + DISKTEST_BIG + """)
            cp /mnt/""" + DISKTEST_BIG + """ /mnt/""" + DISKTEST_COPY + """ &&
                echo "disktest: """ + DISKTEST_BIG + """ md5 $1, copied to """ + DISKTEST_COPY + """"
        fi
        umount /mnt && echo "disktest: wrote """ + DISKTEST_WRITTEN + """, unmounted"
    else
        echo "disktest: cannot mount /dev/xvda"
    fi
    sync
fi
for word in $(/bin/busybox cat /proc/cmdline); do
    case $word in nettest=*,*)
        /bin/busybox --install -s /bin
        set -- $(echo "${word#nettest=}" | tr , ' ')
        i=0
        while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
        ip addr add "$1/24" dev eth0 && ip link set eth0 up
        echo "nettest: eth0 $1, pinging $2"
        i=0
        while ! ping -c 1 -W 1 "$2" >/dev/null 2>&1 && [ $i -lt 60 ]; do i=$((i + 1)); done
        ping -c 3 -W 10 "$2"
        echo "nettest: ping exit status $?"
        sleep 5
    esac
done
if /bin/busybox grep -qw shell /proc/cmdline; then
    /bin/busybox --install -s /bin
    exec /bin/busybox setsid /bin/busybox cttyhack /bin/busybox sh
fi
/bin/busybox poweroff -f
"""


class LinuxGuestError(Exception):
    """Something a user can fix: one line."""


# ---- vmlinux out of a bzImage ----

def _lz4_block(src: bytes, out: bytearray) -> None:
    """Decode one LZ4 block (the raw block format) and append it to out."""
    i, n = 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        length = token >> 4
        if length == 15:
            while True:
                b = src[i]
                i += 1
                length += b
                if b != 255:
                    break
        out += src[i:i + length]
        i += length
        if i >= n:
            break                       # the last sequence has literals only
        offset = src[i] | src[i + 1] << 8
        i += 2
        if offset == 0 or offset > len(out):
            raise LinuxGuestError(f"corrupt LZ4 block: match offset {offset}")
        length = token & 15
        if length == 15:
            while True:
                b = src[i]
                i += 1
                length += b
                if b != 255:
                    break
        length += 4
        start = len(out) - offset
        if offset >= length:
            out += out[start:start + length]
        else:                           # the match overlaps what it produces: a repeat
            pattern = bytes(out[start:])
            reps, rest = divmod(length, offset)
            out += pattern * reps + pattern[:rest]


def unlz4_legacy(data: bytes) -> bytes:
    """LZ4's legacy frame format: the magic, then (u32 size, block) pairs; the kernel
    appends the uncompressed size after the last block."""
    if struct.unpack_from("<I", data)[0] != LZ4_LEGACY_MAGIC:
        raise LinuxGuestError("not an LZ4 legacy stream")
    out, pos = bytearray(), 4
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        if size == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if pos + 4 + size > len(data):
            break                       # the trailer
        _lz4_block(data[pos + 4:pos + 4 + size], out)
        pos += 4 + size
    return bytes(out)


def _decompress(payload: bytes) -> bytes:
    head = payload[:6]
    if head[:3] == b"\x1f\x8b\x08":
        return gzip.decompress(payload)
    if head == b"\xfd7zXZ\x00":
        return lzma.decompress(payload, format=lzma.FORMAT_XZ)
    if head[:3] == b"BZh":
        return bz2.decompress(payload)
    if head[:3] == b"\x5d\x00\x00":
        return lzma.decompress(payload, format=lzma.FORMAT_ALONE)
    if struct.unpack_from("<I", head)[0] == LZ4_LEGACY_MAGIC:
        return unlz4_legacy(payload)
    raise LinuxGuestError(f"unknown compression of the kernel payload (starts {head.hex()})")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise LinuxGuestError("not a bzImage (no HdrS setup header)")
    version = struct.unpack_from("<H", bzimage, 0x206)[0]
    if version < 0x208:
        raise LinuxGuestError(f"boot protocol {version >> 8}.{version & 0xff} has no "
                              f"payload_offset (2.08 or later needed)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    vmlinux = _decompress(bzimage[start:start + length])
    if vmlinux[:4] != b"\x7fELF":
        raise LinuxGuestError("the decompressed payload is not an ELF image")
    return vmlinux


# ---- the initramfs ----

def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
    header = b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
    entry = header + name.encode() + b"\0"
    entry += b"\0" * (-len(entry) % 4) + data
    return entry + b"\0" * (-len(entry) % 4)


def build_initramfs(busybox: bytes, init: str = INIT_SCRIPT,
                    modules: list[tuple[str, bytes]] = (),
                    programs: dict[str, bytes] | None = None) -> bytes:
    """A newc cpio archive: /bin/busybox, /init, the directories they need, the kernel
    modules (name, .ko) under /lib/modules with their load order, and `programs`
    ({name: executable}) in /bin."""
    entries = [("bin", stat.S_IFDIR | 0o755, b""), ("dev", stat.S_IFDIR | 0o755, b""),
               ("proc", stat.S_IFDIR | 0o755, b""), ("sys", stat.S_IFDIR | 0o755, b""),
               ("bin/busybox", stat.S_IFREG | 0o755, busybox),
               ("init", stat.S_IFREG | 0o755, init.encode())]
    entries += [(f"bin/{name}", stat.S_IFREG | 0o755, data)
                for name, data in (programs or {}).items()]
    if modules:
        entries += [("lib", stat.S_IFDIR | 0o755, b""),
                    ("lib/modules", stat.S_IFDIR | 0o755, b"")]
        entries += [(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, ko)
                    for name, ko in modules]
        order = "".join(f"{name}\n" for name, _ in modules).encode()
        entries.append((MODULE_ORDER, stat.S_IFREG | 0o644, order))
    out = b"".join(_cpio_entry(name, mode, data, ino) for ino, (name, mode, data)
                   in enumerate(entries, 1))
    return out + _cpio_entry("TRAILER!!!", 0, b"", 0)


def newc_files(archive: bytes) -> dict[str, bytes]:
    """name -> data of the regular files in a newc archive."""
    files, at = {}, 0
    while archive[at:at + 6] == b"070701" and at + 110 <= len(archive):
        try:
            fields = [int(archive[at + 6 + 8 * i:at + 14 + 8 * i], 16) for i in range(13)]
            mode, filesize, namesize = fields[1], fields[6], fields[11]
            name = archive[at + 110:at + 110 + namesize - 1].decode()
        except ValueError:
            break
        at += 110 + namesize
        at += -at % 4
        if name == "TRAILER!!!":
            return files
        if at + filesize > len(archive):
            break
        if stat.S_ISREG(mode):
            files[name] = archive[at:at + filesize]
        at += filesize
        at += -at % 4
    raise LinuxGuestError("the initramfs is not a complete newc archive")


def with_current_init(archive: bytes) -> bytes:
    """An initramfs this module built, with INIT_SCRIPT as its /init: the same busybox
    and modules (an archive made before /init last changed needs no fetching again)."""
    files = newc_files(archive)
    if files.get("init") == INIT_SCRIPT.encode():
        return archive
    if "bin/busybox" not in files:
        raise LinuxGuestError("the initramfs has no bin/busybox")
    order = files.get(MODULE_ORDER, b"").decode().split()
    modules = []
    for name in order:
        if f"lib/modules/{name}.ko" not in files:
            raise LinuxGuestError(f"the initramfs lists module {name} but does not hold it")
        modules.append((name, files[f"lib/modules/{name}.ko"]))
    return build_initramfs(files["bin/busybox"], modules=modules)


# ---- kernel modules ----

def module_depends(ko: bytes) -> list[str]:
    """The modules a .ko needs first: the `depends=` string of its ELF .modinfo section
    (NUL-separated key=value strings)."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise LinuxGuestError("a kernel module that is not an ELF64 object")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:        # name offset, file offset, size
        at = shoff + i * shentsize
        name, = struct.unpack_from("<I", ko, at)
        offset, size = struct.unpack_from("<QQ", ko, at + 0x18)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if ko[names_at + name:ko.index(b"\0", names_at + name)] == b".modinfo":
            for item in ko[offset:offset + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
            return []
    raise LinuxGuestError("a kernel module without a .modinfo section")


def collect_modules(tree: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """The wanted modules of a /lib/modules/<release> tree and what they depend on, each
    once, every module after its dependencies (the order insmod needs)."""
    # module names use '_' where file names may have '-' (kbuild's KBUILD_MODNAME)
    files = {ko.name[:-3].replace("-", "_"): ko for ko in tree.rglob("*.ko")}
    out: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def add(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        if key in chain:
            raise LinuxGuestError(f"kernel modules depend on each other in a cycle: {key}")
        if key not in files:
            raise LinuxGuestError(f"kernel module {name} is not in {tree}")
        ko = files[key].read_bytes()
        for dep in module_depends(ko):
            add(dep, chain + (key,))
        seen.add(key)
        out.append((files[key].name[:-3], ko))

    for name in wanted:
        add(name, ())
    return out


# ---- fetching ----

def _apt_download(packages: list[str], where: Path) -> list[Path]:
    if shutil.which("apt-get") is None:
        raise LinuxGuestError("apt-get is not available here: cannot fetch Debian's packages")
    r = subprocess.run(["apt-get", "download", *packages], cwd=where, capture_output=True,
                       text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise LinuxGuestError(f"apt-get download {' '.join(packages)} failed: {last}")
    return sorted(where.glob("*.deb"))


def _deb_extract(deb: Path, into: Path) -> None:
    r = subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], capture_output=True, text=True)
    if r.returncode != 0:
        raise LinuxGuestError(f"dpkg-deb -x {deb.name} failed: {r.stderr.strip()}")


def fetch(out: Path) -> tuple[Path, Path]:
    """vmlinux and initramfs.cpio in out, from Debian's packages (kept once made). An
    initramfs made before it carried the frontends (no initramfs.modules beside it) is
    made again, with the modules of the kernel package kernel-version names; one with an
    older /init gets the current one."""
    vmlinux, initramfs = out / "vmlinux", out / "initramfs.cpio"
    version_file, stamp = out / "kernel-version", out / "initramfs.modules"
    if vmlinux.is_file() and initramfs.is_file() and stamp.is_file():
        archive = initramfs.read_bytes()
        current = with_current_init(archive)
        if current != archive:
            initramfs.write_bytes(current)
        return vmlinux, initramfs
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        if vmlinux.is_file() and version_file.is_file():
            kernel_pkg = "linux-image-" + version_file.read_text().strip()
        else:
            meta = _apt_download([KERNEL_META], tmp)[0]
            depends = subprocess.run(["dpkg-deb", "-f", str(meta), "Depends"],
                                     capture_output=True, text=True).stdout.strip()
            kernel_pkg = depends.split(",")[0].split()[0]
            meta.unlink()
        for deb in _apt_download([kernel_pkg, BUSYBOX], tmp):
            _deb_extract(deb, tmp / "root")
        bzimages = sorted((tmp / "root" / "boot").glob("vmlinuz-*"))
        if not bzimages:
            raise LinuxGuestError(f"{kernel_pkg} holds no /boot/vmlinuz-*")
        release = bzimages[0].name[len("vmlinuz-"):]
        if not vmlinux.is_file():
            vmlinux.write_bytes(extract_vmlinux(bzimages[0].read_bytes()))
            version_file.write_text(release + "\n")
        modules = collect_modules(tmp / "root" / "lib" / "modules" / release, FRONTENDS)
        busybox = tmp / "root" / "bin" / "busybox"
        initramfs.write_bytes(build_initramfs(busybox.read_bytes(), modules=modules))
        stamp.write_text("".join(f"{name}\n" for name, _ in modules))
    return vmlinux, initramfs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hypervisor.linux_guest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("build/linux"),
                   help="where vmlinux and initramfs.cpio go (default build/linux)")
    args = p.parse_args(argv)
    try:
        vmlinux, initramfs = fetch(args.out)
    except (LinuxGuestError, OSError) as e:
        print(f"linux-guest: {e}", file=sys.stderr)
        return 2
    modules = (args.out / "initramfs.modules").read_text().split()
    print(f"linux-guest: {vmlinux} ({os.path.getsize(vmlinux):,} bytes), "
          f"{initramfs} ({os.path.getsize(initramfs):,} bytes, modules: {' '.join(modules)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
