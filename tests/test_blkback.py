"""The PV block device: trapless's backend (cext/blkback.c) serving a raw image to a
frontend in trapless's own PV kernel (guest_kernel/blkfront.py) through the XenbusState
handshake, granted ring and data pages and an event channel, on every engine. The guest
prints a checksum of the whole disk; the host computes its own of the file, and looks
at the sector the guest wrote once the domain is gone."""
from __future__ import annotations

import os
import random

import pytest

from abi import C
from guest_kernel.blkfront import WRITER_STAMP, blkfront_guest, fnv1a64, sector_pattern
from hypervisor import xenstore
from hypervisor.config import parse_disk
from hypervisor.domain import Domain
from hypervisor._hv import ffi, lib

from helpers import wait_for

SECTORS = 2048                                   # a 1 MiB disk
# what the backend answers to requests it must refuse (the guest prints each status):
# blkback's BLKIF_RSP_ERROR, and EOPNOTSUPP for an operation it does not know
REFUSED = (f"blkfront: refused: beyond the disk {C.BLKIF_RSP_ERROR}, a page it did not grant "
           f"{C.BLKIF_RSP_ERROR}, 12 segments {C.BLKIF_RSP_ERROR}, last_sect 8 "
           f"{C.BLKIF_RSP_ERROR}, operation 4 {C.BLKIF_RSP_EOPNOTSUPP}\n"
           # and a producer index no frontend produces: the ring is no longer served
           f"blkfront: req_prod 1000 ahead: backend state {C.XenbusStateClosing}\n")


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    path = tmp_path_factory.mktemp("blk") / "blkfront.elf"
    path.write_bytes(blkfront_guest())
    return path


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(15).randbytes(SECTORS * 512))
    return path


def stats(domid: int, devid: int):
    s = ffi.new("struct hv_blkback_stats *")
    assert lib.hv_blkback_stats(domid, devid, s) == 0
    return s


def run(guest, image, engine, spec: str, domid: int = 7):
    disk = parse_disk(spec.format(image=image))
    with Domain(guest, memory_mib=32, engine=engine, domid=domid, disks=[disk]) as dom:
        stop = dom.run(timeout=120)
        out = dom.console_output.decode(errors="replace")
        # the frontend closed as it went: the backend's thread follows on its own time
        state = f"/local/domain/0/backend/vbd/{domid}/{disk.devid}/state"
        wait_for(lambda: xenstore.read(state) == str(C.XenbusStateClosed).encode())
        s = stats(domid, disk.devid)
        backend_state = xenstore.read(state)
    return stop, out, s, backend_state


def test_the_guest_reads_the_whole_disk_and_writes_a_sector(guest, image, engine):
    original = image.read_bytes()
    stop, out, s, state = run(guest, image, engine, "format=raw, vdev=xvda, access=rw, target={image}")
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "poweroff"), (stop, out)
    assert out == (
        "blkfront: device 51712, backend /local/domain/0/backend/vbd/7/51712\n"
        f"blkfront: connected, {SECTORS} sectors, mode w, ring of 16 pages\n"
        f"blkfront: read {SECTORS} sectors, fnv1a64 {fnv1a64(original):#x}\n"
        f"blkfront: indirect read of sectors 0-15: 0 (response operation {C.BLKIF_OP_READ}), "
        f"fnv1a64 {fnv1a64(original[:8192]):#x}\n"
        "blkfront: write sector 1: 0, flush: 0, read back: 0, what it wrote\n"
        "blkfront: barrier write sector 2: 0, discard sectors 16-23: 0, read back: 0, zeros\n"
        + REFUSED + "blkfront: closed\n")
    # the frontend closed: so did the backend
    assert state == str(C.XenbusStateClosed).encode()
    assert (s.sectors_read, s.sectors_written) == (SECTORS + 16 + 1 + 8, 2)
    assert (s.errors, s.bad_grants, s.ring_broken) == (5, 1, 1)
    assert s.flushes == 3               # the flush; the barrier's before and after its data
    # after the domain: sectors 1 and 2 are what the guest wrote, 16-23 a hole in the
    # file (a 4 KiB block punched out), the rest untouched
    after = image.read_bytes()
    assert after[512:1024] == after[1024:1536] == sector_pattern()
    assert after[8192:12288] == bytes(4096)
    with open(image, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 8192
        assert os.lseek(f.fileno(), 8192, os.SEEK_DATA) == 12288
    assert after[:512] + after[1536:8192] + after[12288:] == \
        original[:512] + original[1536:8192] + original[12288:]


def test_a_read_only_disk_refuses_the_write(guest, image, engine):
    original = image.read_bytes()
    stop, out, s, _ = run(guest, image, engine, "{image},raw,xvdb,ro", domid=8)
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "poweroff"), (stop, out)
    assert out == (
        "blkfront: device 51728, backend /local/domain/0/backend/vbd/8/51728\n"
        f"blkfront: connected, {SECTORS} sectors, mode r, ring of 16 pages\n"
        f"blkfront: read {SECTORS} sectors, fnv1a64 {fnv1a64(original):#x}\n"
        f"blkfront: indirect read of sectors 0-15: 0 (response operation {C.BLKIF_OP_READ}), "
        f"fnv1a64 {fnv1a64(original[:8192]):#x}\n"
        f"blkfront: write sector 1: {C.BLKIF_RSP_ERROR}, flush: 0, read back: 0, "
        "not what it wrote\n"
        f"blkfront: barrier write sector 2: {C.BLKIF_RSP_ERROR}, discard sectors 16-23: "
        f"{C.BLKIF_RSP_EOPNOTSUPP}, read back: 0, not zeros\n"
        + REFUSED + "blkfront: closed\n")
    assert (s.errors, s.bad_grants, s.sectors_written) == (8, 1, 0)
    assert image.read_bytes() == original


SMALL = 256                 # the PV kernel is a ring-0 kernel: slow to hash on KVM-PVM


@pytest.fixture(scope="module")
def pv_kernel(tmp_path_factory):
    from guest_kernel.pv_kernel import build_pv_kernel
    path = tmp_path_factory.mktemp("blk-pv") / "pv-kernel.elf"
    path.write_bytes(build_pv_kernel())
    return path


def test_xl_disk_configs_through_the_toolstack_two_domains_at_once(tmp_path, pv_kernel,
                                                                    engine):
    """`disk = [...]` in xl's syntax, the PV kernel with `blkfront`: two domains, each
    with its own disk, at the same time; one destroyed while it reads leaves the other
    working and its own image as it was."""
    from hypervisor import config
    from hypervisor.toolstack import Toolstack
    images = {}
    for name, size in (("a", SMALL * 512), ("big", 256 << 20)):
        images[name] = tmp_path / f"{name}.img"
        with open(images[name], "wb") as f:
            f.write(random.Random(name).randbytes(SMALL * 512))
            f.truncate(size)                  # the rest: a hole, read as zeros
        (tmp_path / f"{name}.cfg").write_text(
            f'name = "{name}"\nkernel = "{pv_kernel}"\nmemory = 32\ncmdline = "blkfront"\n'
            f'engine = "{engine}"\non_poweroff = "preserve"\n'
            f"disk = [ 'format=raw, vdev=xvda, access=rw, target={name}.img' ]\n")
    big_before = images["big"].read_bytes()[:SMALL * 512]
    ts = Toolstack()
    try:
        big = ts.create(config.load(tmp_path / "big.cfg"))
        a = ts.create(config.load(tmp_path / "a.cfg"))
        assert wait_for(lambda: "connected" in big.console_text, timeout=60)
        s = ffi.new("struct hv_blkback_stats *")
        assert lib.hv_blkback_stats(big.domid, 51712, s) == 0
        assert s.sectors_read < (256 << 20) // 512        # still reading ...
        ts.destroy(big)                       # ... when destroyed: its backend stops with it
        assert lib.hv_blkback_stats(big.domid, 51712, s) == -C.XEN_ENOENT
        assert wait_for(lambda: "blkfront: closed" in a.console_text, timeout=120), \
            a.console_text
        assert "blkfront: write sector 1: 0, flush: 0, read back: 0, what it wrote" \
            in a.console_text
    finally:
        ts.shutdown()
    expected = random.Random("a").randbytes(SMALL * 512)
    assert f"read {SMALL} sectors, fnv1a64 {fnv1a64(expected):#x}" in a.console_text
    after = images["a"].read_bytes()
    assert after[512:1024] == after[1024:1536] == sector_pattern()  # the write, the barrier
    assert after[8192:12288] == bytes(4096)                             # discarded
    assert after[1536:8192] + after[12288:] == expected[1536:8192] + expected[12288:]
    assert images["big"].read_bytes()[:SMALL * 512] == big_before


def test_a_domain_destroyed_mid_write_leaves_every_acknowledged_write(tmp_path, engine):
    """The guest writes its disk from the start, a 128 KiB request at a time, and says
    after each response how far it got; destroyed while it writes, every sector it was
    told is written holds what it wrote (the backend finishes, and syncs, before the
    domain's memory goes)."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)             # more than it can write before we destroy it
    disk = parse_disk(f"{image},raw,xvda")
    with Domain(blkfront_guest(writer=True), memory_mib=32, engine=engine, domid=9,
                disks=[disk]) as dom:
        dom.start()
        assert wait_for(lambda: dom.console_output.count(b"writer: acknowledged") >= 8,
                        timeout=60), dom.console_output
        dom.destroy()
        out = dom.console_output.decode()
    assert "writer: done" not in out, "the guest finished before it was destroyed"
    complete = out.split("\n")[:-1]        # the console may stop mid-line
    acked = [int(line.split()[-1]) for line in complete
             if line.startswith("writer: acknowledged ")]
    assert acked == list(range(256, acked[-1] + 1, 256))     # in order, none missing
    with open(image, "rb") as f:
        data = f.read(acked[-1] * 512)
    stamps = [int.from_bytes(data[s * 512:s * 512 + 8], "little") for s in range(acked[-1])]
    assert stamps == [WRITER_STAMP + s for s in range(acked[-1])]
