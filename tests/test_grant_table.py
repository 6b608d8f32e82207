"""The grant API trapless's own backends use (cext/grant_table.h): a frontend domain
grants a page in its grant table; the backend acquires it (Xen's checks, GTF_reading /
GTF_writing set in the entry while in use), reads and writes it through a host pointer,
and releases it. The granted page outlives its domain while a backend holds it."""
import pytest

from abi import C, ffi
from guest_kernel.xen_pv import XenPVGuest
from hypervisor._hv import lib
from hypervisor.image import load_image

MEMORY_MIB = 16
FRONT = 4                           # the granting domain
BACKEND = 0                         # the backend's domid: trapless itself
PERMIT, READONLY, READING, WRITING = (C.GTF_permit_access, C.GTF_readonly, C.GTF_reading,
                                      C.GTF_writing)


@pytest.fixture
def frontend(engine):
    from hypervisor.domain import Domain
    dom = Domain(XenPVGuest("grant-frontend").finish(), memory_mib=MEMORY_MIB, engine=engine,
                 domid=FRONT, console_ring=False, xenstore=False)
    yield dom
    dom.destroy()


def table_and_page(dom):
    """The domain's grant table (frame 0, after its RAM) and a free RAM frame of it."""
    ram = lib.hv_domain_ram(dom._live())
    table = ffi.cast("struct grant_entry_v1 *", ram + (MEMORY_MIB << 20))
    frame = dom.layout.region_end // 4096 + 1       # plain RAM above the start-of-day region
    return table, frame, ram + frame * 4096


def grant(table, ref: int, frame: int, flags: int = PERMIT, domid: int = BACKEND) -> None:
    table[ref].domid = domid
    table[ref].frame = frame
    table[ref].flags = flags


def test_backend_reads_and_writes_a_granted_page(frontend):
    table, frame, page = table_and_page(frontend)
    ffi.memmove(page, b"request", 7)
    grant(table, 8, frame)
    use = ffi.new("struct hv_grant_use *")
    assert lib.hv_grant_acquire(FRONT, 8, BACKEND, lib.HV_GRANT_WRITE, use) == C.GNTST_okay
    assert table[8].flags == PERMIT | READING | WRITING
    assert ffi.buffer(use.page, 7)[:] == b"request"
    ffi.memmove(use.page, b"response", 8)
    assert ffi.buffer(page, 8)[:] == b"response"
    # a second use of the same entry by the same backend pins it twice
    again = ffi.new("struct hv_grant_use *")
    assert lib.hv_grant_acquire(FRONT, 8, BACKEND, lib.HV_GRANT_READ, again) == C.GNTST_okay
    lib.hv_grant_release(use)
    assert table[8].flags == PERMIT | READING           # the reader still holds it
    lib.hv_grant_release(again)
    assert table[8].flags == PERMIT
    assert use.page == ffi.NULL


def test_backend_copies_in_and_out_of_a_granted_page(frontend):
    table, frame, page = table_and_page(frontend)
    ffi.memmove(page + 100, b"from the guest", 14)
    grant(table, 8, frame)
    grant(table, 9, frame, PERMIT | READONLY)
    buf = ffi.new("uint8_t[]", 4096)
    assert lib.hv_grant_copy(FRONT, 8, BACKEND, lib.HV_GRANT_READ, 100, buf, 14) == C.GNTST_okay
    assert ffi.buffer(buf, 14)[:] == b"from the guest"
    ffi.memmove(buf, b"from the backend", 16)
    assert lib.hv_grant_copy(FRONT, 8, BACKEND, lib.HV_GRANT_WRITE, 4080, buf, 16) == C.GNTST_okay
    assert ffi.buffer(page + 4080, 16)[:] == b"from the backend"
    assert table[8].flags == PERMIT                     # pinned only for the copy
    # refused: past the page, a read-only grant written, another backend's, no domain
    for args, status in (((FRONT, 8, BACKEND, lib.HV_GRANT_WRITE, 4081, buf, 16),
                          C.GNTST_bad_copy_arg),
                         ((FRONT, 9, BACKEND, lib.HV_GRANT_WRITE, 0, buf, 16),
                          C.GNTST_general_error),
                         ((FRONT, 8, 5, lib.HV_GRANT_READ, 0, buf, 16), C.GNTST_general_error),
                         ((99, 8, BACKEND, lib.HV_GRANT_READ, 0, buf, 16), C.GNTST_bad_domain)):
        assert lib.hv_grant_copy(*args) == status, args
    assert ffi.buffer(page + 4080, 16)[:] == b"from the backend"
    assert (table[8].flags, table[9].flags) == (PERMIT, PERMIT | READONLY)


def test_refused_uses_change_nothing(frontend):
    table, frame, _ = table_and_page(frontend)
    use = ffi.new("struct hv_grant_use *")
    grant(table, 8, frame, PERMIT | READONLY)
    grant(table, 9, frame, PERMIT, domid=5)             # for another backend
    grant(table, 10, 0x7FFF_FFFF)                       # no such frame
    grant(table, 11, frame, 0)                          # not granted
    cases = [((FRONT, 8, BACKEND, lib.HV_GRANT_WRITE), C.GNTST_general_error),
             ((FRONT, 9, BACKEND, lib.HV_GRANT_READ), C.GNTST_general_error),
             ((FRONT, 10, BACKEND, lib.HV_GRANT_READ), C.GNTST_bad_page),
             ((FRONT, 11, BACKEND, lib.HV_GRANT_READ), C.GNTST_general_error),
             ((FRONT, 512, BACKEND, lib.HV_GRANT_READ), C.GNTST_bad_gntref),  # one frame
             ((99, 8, BACKEND, lib.HV_GRANT_READ), C.GNTST_bad_domain)]
    for args, status in cases:
        assert lib.hv_grant_acquire(*args, use) == status, args
        assert use.page == ffi.NULL
    assert [table[r].flags for r in (8, 9, 10, 11)] == [PERMIT | READONLY, PERMIT, PERMIT, 0]
    # read-only is fine for reading
    assert lib.hv_grant_acquire(FRONT, 8, BACKEND, lib.HV_GRANT_READ, use) == C.GNTST_okay
    assert table[8].flags == PERMIT | READONLY | READING
    # while the backend has it, another backend cannot
    other = ffi.new("struct hv_grant_use *")
    grant(table, 12, frame, PERMIT, domid=5)
    assert lib.hv_grant_acquire(FRONT, 8, 5, lib.HV_GRANT_READ, other) == C.GNTST_general_error
    lib.hv_grant_release(use)
    assert table[8].flags == PERMIT | READONLY


def test_a_granted_page_outlives_its_domain(engine):
    from hypervisor.domain import Domain
    dom = Domain(XenPVGuest("grant-frontend").finish(), memory_mib=MEMORY_MIB, engine=engine,
                 domid=FRONT, console_ring=False, xenstore=False)
    table, frame, page = table_and_page(dom)
    ffi.memmove(page, b"still here", 10)
    grant(table, 8, frame)
    use = ffi.new("struct hv_grant_use *")
    assert lib.hv_grant_acquire(FRONT, 8, BACKEND, lib.HV_GRANT_WRITE, use) == C.GNTST_okay
    dom.destroy()
    assert ffi.buffer(use.page, 10)[:] == b"still here"
    ffi.memmove(use.page, b"written", 7)                # no fault: the page is ours still
    lib.hv_grant_release(use)                           # the granter is gone: nothing to do
    assert use.page == ffi.NULL


# ---- a PVH guest: the table placed with add_to_physmap, a grant mapped at a guest frame ----

PVH_DOMID = 6


def pvh_grant_code(p) -> None:
    """64-bit code for build_pvh_guest(extra=...): identity-mapped, so VA = guest frame
    address. Prints `result <case> <value>` lines."""
    from abi import offsetof
    from guest_kernel.asm import dword, eax, ptr, qword, r12, rax, rdi, rip, word
    a = p.a

    def result(case: str) -> None:
        a.mov(r12, rax)
        p.print(f"result {case} ")
        a.mov(rdi, r12)
        a.call("print_sdec")
        p.print("\n")

    def struct(label: str, name: str, **fields) -> None:
        a.section(".data")
        a.align(8)
        a.label(label)
        a.db(bytes(ffi.buffer(ffi.new(f"struct {name} *", fields))))
        a.section(".text")

    def frame_of(label: str) -> None:
        a.lea(rax, ptr[label])
        a.shr(rax, 12)

    a.section(".bss")
    a.align(4096)
    for page in ("g_table", "g_victim", "g_target"):
        a.label(page)
        a.reserve(4096)
    a.label("g_frames")
    a.reserve(8)
    a.section(".text")
    struct("g_xatp", "xen_add_to_physmap", domid=C.DOMID_SELF, space=C.XENMAPSPACE_grant_table)
    struct("setup", "gnttab_setup_table", dom=C.DOMID_SELF, nr_frames=1)
    struct("gmap", "gnttab_map_grant_ref", flags=C.GNTMAP_host_map, ref=8, dom=PVH_DOMID)
    struct("gunmap", "gnttab_unmap_grant_ref")
    map_at = lambda field: rip + "gmap" + offsetof("gnttab_map_grant_ref", field)  # noqa: E731

    # the table goes in a frame given back first, as Linux places it
    frame_of("g_table")
    a.mov(qword["g_frames"], rax)
    struct("g_resv", "xen_memory_reservation", nr_extents=1, domid=C.DOMID_SELF)
    a.lea(rax, ptr["g_frames"])
    a.mov(qword[rip + "g_resv"], rax)
    p.hypercall("memory_op", C.XENMEM_decrease_reservation, "g_resv")
    result("give_back_table_frame")
    frame_of("g_table")
    a.mov(qword[rip + "g_xatp" + offsetof("xen_add_to_physmap", "gpfn")], rax)
    p.hypercall("memory_op", C.XENMEM_add_to_physmap, "g_xatp")
    result("add_to_physmap")
    a.mov(eax, C.XENMAPIDX_grant_table_status)
    a.mov(qword[rip + "g_xatp" + offsetof("xen_add_to_physmap", "idx")], rax)
    p.hypercall("memory_op", C.XENMEM_add_to_physmap, "g_xatp")
    result("status_frame_in_v1")
    a.mov(qword[rip + "g_xatp" + offsetof("xen_add_to_physmap", "idx")],
          lib.HV_GNT_MAX_FRAMES)
    p.hypercall("memory_op", C.XENMEM_add_to_physmap, "g_xatp")
    result("frame_beyond_the_limit")
    a.lea(rax, ptr["g_frames"])
    a.mov(qword[rip + "setup" + offsetof("gnttab_setup_table", "frame_list")], rax)
    p.hypercall("grant_table_op", C.GNTTABOP_setup_table, "setup", 1)
    frame_of("g_table")
    a.sub(rax, qword["g_frames"])
    result("setup_names_the_placed_frame")           # 0: where we put it

    a.mov(qword["g_victim"], 0x1111)
    a.mov(qword["g_target"], 0x2222)
    frame_of("g_victim")
    a.mov(dword[rip + "g_table" + 8 * 8 + 4], eax)
    a.mov(word[rip + "g_table" + 8 * 8 + 2], PVH_DOMID)
    a.mov(word[rip + "g_table" + 8 * 8], C.GTF_permit_access)

    a.lea(rax, ptr["g_target"])
    a.mov(qword[map_at("host_addr")], rax)
    p.hypercall("grant_table_op", C.GNTTABOP_map_grant_ref, "gmap", 1)
    a.movsx(rax, word[map_at("status")])
    result("map")
    a.mov(rax, qword["g_target"])
    result("target_reads_victim")
    a.mov(qword["g_target"], 0x3333)
    a.mov(rax, qword["g_victim"])
    result("victim_written_through_target")
    a.movzx(rax, word[rip + "g_table" + 8 * 8])
    result("flags_mapped")

    for case, flags in (("device_map", C.GNTMAP_device_map),
                        ("contains_pte", C.GNTMAP_host_map | C.GNTMAP_contains_pte)):
        a.mov(dword[map_at("flags")], flags)
        p.hypercall("grant_table_op", C.GNTTABOP_map_grant_ref, "gmap", 1)
        a.movsx(rax, word[map_at("status")])
        result(case)

    a.lea(rax, ptr["g_target"])
    a.mov(qword[rip + "gunmap"], rax)
    a.mov(eax, dword[map_at("handle")])
    a.mov(dword[rip + "gunmap" + offsetof("gnttab_unmap_grant_ref", "handle")], eax)
    p.hypercall("grant_table_op", C.GNTTABOP_unmap_grant_ref, "gunmap", 1)
    a.movsx(rax, word[rip + "gunmap" + offsetof("gnttab_unmap_grant_ref", "status")])
    result("unmap")
    a.mov(rax, qword["g_target"])
    result("target_restored")                       # our own page again
    a.mov(rax, qword["g_victim"])
    result("victim_after_unmap")
    a.movzx(rax, word[rip + "g_table" + 8 * 8])
    result("flags_unmapped")

    # read-only: the guest's own page tables let it store, but the store stays its own
    a.mov(dword[map_at("flags")], C.GNTMAP_host_map | C.GNTMAP_readonly)
    p.hypercall("grant_table_op", C.GNTTABOP_map_grant_ref, "gmap", 1)
    a.movsx(rax, word[map_at("status")])
    result("ro_map")
    a.mov(rax, qword["g_target"])
    result("ro_target_reads_victim")
    a.mov(qword["g_target"], 0x4444)
    a.mov(rax, qword["g_victim"])
    result("victim_after_store_to_ro_map")
    a.mov(eax, dword[map_at("handle")])
    a.mov(dword[rip + "gunmap" + offsetof("gnttab_unmap_grant_ref", "handle")], eax)
    p.hypercall("grant_table_op", C.GNTTABOP_unmap_grant_ref, "gunmap", 1)
    a.movsx(rax, word[rip + "gunmap" + offsetof("gnttab_unmap_grant_ref", "status")])
    result("ro_unmap")
    a.mov(rax, qword["g_target"])
    result("target_restored_again")

    # v2: placing a status frame grows the table to have it, and pins the version
    a.section(".bss")
    a.align(4096)
    a.label("g_status")
    a.reserve(4096)
    a.section(".text")
    struct("g_ver", "gnttab_set_version", version=2)
    struct("g_query", "gnttab_query_size", dom=C.DOMID_SELF)
    p.hypercall("grant_table_op", C.GNTTABOP_set_version, "g_ver", 1)
    result("set_version_2")
    a.mov(eax, C.XENMAPIDX_grant_table_status | 1)     # the second status frame
    a.mov(qword[rip + "g_xatp" + offsetof("xen_add_to_physmap", "idx")], rax)
    frame_of("g_status")
    a.mov(qword[rip + "g_xatp" + offsetof("xen_add_to_physmap", "gpfn")], rax)
    p.hypercall("memory_op", C.XENMEM_add_to_physmap, "g_xatp")
    result("place_status_frame")
    p.hypercall("grant_table_op", C.GNTTABOP_query_size, "g_query", 1)
    a.mov(eax, dword[rip + "g_query" + offsetof("gnttab_query_size", "nr_frames")])
    result("frames_for_status_frame")
    a.mov(dword[rip + "g_ver"], 1)
    p.hypercall("grant_table_op", C.GNTTABOP_set_version, "g_ver", 1)
    result("set_version_1_with_status_placed")


def test_pvh_places_its_table_and_maps_a_grant_at_a_guest_frame(engine, run_guest):
    from guest_kernel.conformance import parse
    from guest_kernel.pvh_guest import build_pvh_guest
    image = build_pvh_guest(vmcall=False, extra=pvh_grant_code)
    stop, out, dom = run_guest(image, domid=PVH_DOMID, timeout=120)
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "poweroff"), (stop, out)
    r, _ = parse(out)
    assert r["give_back_table_frame"] == 1
    assert r["add_to_physmap"] == 0
    assert r["status_frame_in_v1"] == -C.XEN_EINVAL
    assert r["frame_beyond_the_limit"] == -C.XEN_EINVAL
    assert r["setup_names_the_placed_frame"] == 0
    assert r["map"] == C.GNTST_okay
    assert r["target_reads_victim"] == 0x1111
    assert r["victim_written_through_target"] == 0x3333
    assert r["flags_mapped"] == PERMIT | READING | WRITING
    assert r["device_map"] == C.GNTST_general_error         # no device mappings in HVM
    assert r["contains_pte"] == C.GNTST_general_error
    assert r["unmap"] == C.GNTST_okay
    assert r["target_restored"] == 0x2222
    assert r["victim_after_unmap"] == 0x3333
    assert r["flags_unmapped"] == PERMIT
    assert (r["ro_map"], r["ro_target_reads_victim"]) == (C.GNTST_okay, 0x3333)
    assert r["victim_after_store_to_ro_map"] == 0x3333      # never reaches the granter
    assert (r["ro_unmap"], r["target_restored_again"]) == (C.GNTST_okay, 0x2222)
    assert (r["set_version_2"], r["place_status_frame"]) == (0, 0)
    # 2048 status words cover 8 v2 frames: status frame 1 needs 16 of them
    assert r["frames_for_status_frame"] == 16
    assert r["set_version_1_with_status_placed"] == -C.XEN_EBUSY


# ---- a PVH guest's table beyond its RAM, as Linux's unpopulated-alloc places it ----

HIGH_GPFN = (1 << 32 >> 12) + 0x1ff          # in the first 2 MiB above 4 GiB
LOW_GPFN = 0x80000                            # 2 GiB: the hole below 4 GiB


def pvh_beyond_ram_code(p) -> None:
    """Map 2 MiB at 2 GiB and at 4 GiB (identity), place table frames 0 and 1 in the
    frames there, grant a page through entries written at those addresses, map the
    grant, and read back what the hypervisor wrote in the entry's flags."""
    from abi import offsetof
    from guest_kernel.asm import cr3, dword, eax, ptr, qword, r12, rax, rdi, rip, word
    a = p.a

    def result(case: str) -> None:
        a.mov(r12, rax)
        p.print(f"result {case} ")
        a.mov(rdi, r12)
        a.call("print_sdec")
        p.print("\n")

    def struct(label: str, name: str, **fields) -> None:
        a.section(".data")
        a.align(8)
        a.label(label)
        a.db(bytes(ffi.buffer(ffi.new(f"struct {name} *", fields))))
        a.section(".text")

    xatp = lambda field: rip + "b_xatp" + offsetof("xen_add_to_physmap", field)  # noqa: E731
    gmap = lambda field: rip + "b_gmap" + offsetof("gnttab_map_grant_ref", field)  # noqa: E731

    def place(case: str, idx: int, gpfn: int) -> None:
        a.mov(qword[xatp("idx")], idx)
        a.mov(rax, gpfn)
        a.mov(qword[xatp("gpfn")], rax)
        p.hypercall("memory_op", C.XENMEM_add_to_physmap, "b_xatp")
        result(case)

    a.section(".bss")
    a.align(4096)
    for page in ("b_pd_low", "b_pd_high", "b_victim", "b_target"):
        a.label(page)
        a.reserve(4096)
    a.label("b_frames")
    a.reserve(16)
    a.section(".text")
    struct("b_xatp", "xen_add_to_physmap", domid=C.DOMID_SELF, space=C.XENMAPSPACE_grant_table)
    struct("b_setup", "gnttab_setup_table", dom=C.DOMID_SELF, nr_frames=2)
    struct("b_gmap", "gnttab_map_grant_ref", flags=C.GNTMAP_host_map, ref=8, dom=PVH_DOMID)
    struct("b_gunmap", "gnttab_unmap_grant_ref")

    # the guest's page tables: one 2 MiB page at 2 GiB and one at 4 GiB, identity
    for pd, gib in (("b_pd_low", 2), ("b_pd_high", 4)):
        a.mov(rax, (gib << 30) | 0x83)
        a.mov(qword[rip + pd], rax)
        a.lea(rax, ptr[pd])
        a.or_(rax, 0x3)
        a.mov(qword[rip + "pdpt" + 8 * gib], rax)
    a.mov(rax, cr3)
    a.mov(cr3, rax)

    place("place_high", 0, HIGH_GPFN)
    place("place_low", 1, LOW_GPFN)
    place("place_at_the_apic", 2, 0xFEE00)
    place("place_at_the_limit", 2, lib.HV_PVH_PLACE_LIMIT >> 12)
    a.lea(rax, ptr["b_frames"])
    a.mov(qword[rip + "b_setup" + offsetof("gnttab_setup_table", "frame_list")], rax)
    p.hypercall("grant_table_op", C.GNTTABOP_setup_table, "b_setup", 1)
    a.mov(rax, qword["b_frames"])
    result("setup_frame_0")
    a.mov(rax, qword[rip + "b_frames" + 8])
    result("setup_frame_1")

    # entry 8 of frame 0 (at 4 GiB) grants the victim page
    high = HIGH_GPFN << 12
    a.mov(qword["b_victim"], 0x5151)
    a.lea(rax, ptr["b_victim"])
    a.shr(rax, 12)
    a.mov(rdi, high)
    a.mov(dword[rdi + 8 * 8 + 4], eax)
    a.mov(word[rdi + 8 * 8 + 2], PVH_DOMID)
    a.mov(word[rdi + 8 * 8], C.GTF_permit_access)
    a.lea(rax, ptr["b_target"])
    a.mov(qword[gmap("host_addr")], rax)
    p.hypercall("grant_table_op", C.GNTTABOP_map_grant_ref, "b_gmap", 1)
    a.movsx(rax, word[gmap("status")])
    result("map")
    a.mov(rax, qword["b_target"])
    result("target_reads_victim")
    a.mov(rdi, high)
    a.movzx(rax, word[rdi + 8 * 8])
    result("flags_mapped")
    a.lea(rax, ptr["b_target"])
    a.mov(qword[rip + "b_gunmap"], rax)
    a.mov(eax, dword[gmap("handle")])
    a.mov(dword[rip + "b_gunmap" + offsetof("gnttab_unmap_grant_ref", "handle")], eax)
    p.hypercall("grant_table_op", C.GNTTABOP_unmap_grant_ref, "b_gunmap", 1)
    a.movsx(rax, word[rip + "b_gunmap" + offsetof("gnttab_unmap_grant_ref", "status")])
    result("unmap")
    a.mov(rdi, high)
    a.movzx(rax, word[rdi + 8 * 8])
    result("flags_unmapped")
    # frame 0 moves into the hole below 4 GiB: the same entries are there now
    place("move_frame_0_low", 0, LOW_GPFN + 1)
    a.mov(rdi, (LOW_GPFN + 1) << 12)
    a.mov(eax, dword[rdi + 8 * 8 + 4])
    a.lea(rdi, ptr["b_victim"])
    a.shr(rdi, 12)
    a.sub(rax, rdi)
    result("moved_entry_names_victim")          # 0


def test_pvh_places_its_table_beyond_its_ram(engine, run_guest):
    """Linux's CONFIG_XEN_UNPOPULATED_ALLOC places the table in frames above its RAM (at
    4 GiB for Debian's 6.1 in 256 MiB): entries written there are the table, the
    hypervisor's flag updates show there, and the APIC page or the limit are refused."""
    from guest_kernel.conformance import parse
    from guest_kernel.pvh_guest import build_pvh_guest
    image = build_pvh_guest(vmcall=False, extra=pvh_beyond_ram_code)
    stop, out, dom = run_guest(image, domid=PVH_DOMID, timeout=120)
    assert (stop.kind, stop.shutdown_name) == ("shutdown", "poweroff"), (stop, out)
    r, _ = parse(out)
    assert (r["place_high"], r["place_low"]) == (0, 0)
    assert r["place_at_the_apic"] == -C.XEN_EINVAL
    assert r["place_at_the_limit"] == -C.XEN_EINVAL
    assert (r["setup_frame_0"], r["setup_frame_1"]) == (HIGH_GPFN, LOW_GPFN)
    assert r["map"] == C.GNTST_okay
    assert r["target_reads_victim"] == 0x5151
    assert r["flags_mapped"] == PERMIT | READING | WRITING
    assert r["unmap"] == C.GNTST_okay
    assert r["flags_unmapped"] == PERMIT
    assert r["move_frame_0_low"] == 0
    assert r["moved_entry_names_victim"] == 0


def pvh_read_above_4g_code(p) -> None:
    """Map 2 MiB at 4 GiB and read a frame there that holds no table frame."""
    from guest_kernel.asm import cr3, ptr, qword, rax, rdi, rip
    a = p.a
    a.section(".bss")
    a.align(4096)
    a.label("u_pd_high")
    a.reserve(4096)
    a.section(".text")
    a.mov(rax, (4 << 30) | 0x83)
    a.mov(qword[rip + "u_pd_high"], rax)
    a.lea(rax, ptr["u_pd_high"])
    a.or_(rax, 0x3)
    a.mov(qword[rip + "pdpt" + 8 * 4], rax)
    a.mov(rax, cr3)
    a.mov(cr3, rax)
    p.print("reading above 4 GiB\n")
    a.mov(rdi, (1 << 32) + 0x3000)
    a.label("read_above_4g")
    a.mov(rax, qword[rdi])
    p.print("read it\n")


def test_pvh_read_above_4g_where_no_table_frame_is_stops_the_domain(engine, run_guest):
    """Above 4 GiB only a placed table frame answers; any other access stops the
    domain as an access outside its memory, on both engines alike."""
    from guest_kernel.pvh_guest import build_pvh_guest
    image = build_pvh_guest(vmcall=False, extra=pvh_read_above_4g_code)
    stop, out, dom = run_guest(image, domid=PVH_DOMID, timeout=60)
    assert "reading above 4 GiB" in out and "read it" not in out
    assert stop.kind == "fault", (stop, out)
    assert "read of guest-physical 0x100003000, outside guest memory" in stop.message, stop
    # the stop names the instruction that read, not one near it
    assert stop.rip == load_image(image, 64 << 20).symbols["read_above_4g"], stop
