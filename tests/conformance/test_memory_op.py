"""memory_op (12): memory map, reservation sizes, the balloon (decrease/increase
reservation, populate_physmap) and placing shared_info; good and bad arguments."""
import struct

from abi import C, offsetof, sizeof

from guest_kernel.asm import dword, ptr, qword, r12, rax, word
from guest_kernel.conformance import MAPPED_END, NON_CANONICAL, NULL, UNMAPPED

from mm_guest import FIRST_FREE_SLOT, PAGE, PTE_P, PTE_RW, MMGuest, audit, l2_slot_va, rip_plus

EDOM, EFAULT, EINVAL, ENOSYS, ESRCH = (-C.XEN_EDOM, -C.XEN_EFAULT, -C.XEN_EINVAL,
                                       -C.XEN_ENOSYS, -C.XEN_ESRCH)
MEMORY_MIB = 64
N = (MEMORY_MIB << 20) // PAGE      # nr_pages: the maximum reservation
DOMID = 1                           # the domain's own number (run_guest's default)
F = 0x1000                          # a frame well above the start-of-day region
DECREASE, INCREASE, POPULATE = (C.XENMEM_decrease_reservation, C.XENMEM_increase_reservation,
                                C.XENMEM_populate_physmap)
MARK = 0xDEAD


def domid_args(g: MMGuest) -> None:
    g.a.section(".data")
    for label, value in (("dom_self", C.DOMID_SELF), ("dom_own", DOMID), ("dom_other", 2),
                         ("dom_io", C.DOMID_IO)):
        g.a.label(label)
        g.a.dw(value)
    g.a.section(".text")


def current(g: MMGuest, case: str) -> None:
    g.call(case, "memory_op", C.XENMEM_current_reservation, "dom_self")


def info_guest() -> bytes:
    g = MMGuest("memory_op_info")
    a = g.a
    domid_args(g)
    a.section(".data")
    a.align(8)
    a.label("map")                      # struct xen_memory_map
    a.dd(0, 0)
    a.dq(0)
    a.label("mapbuf")
    a.db(bytes(48))
    a.label("machphys")                 # struct xen_machphys_mapping
    a.dq(0, 0, 0)
    a.section(".text")

    def memory_map(case, capacity, buffer, arg="map"):
        a.mov(dword["map"], capacity)
        g.load(rax, buffer)
        a.mov(qword[rip_plus("map", 8)], rax)
        g.call(case, "memory_op", C.XENMEM_memory_map, arg)
        g.dump(f"{case}.nr", "map", 4)

    g.fill("mapbuf", 48, 0xAA)
    memory_map("map4", 4, "mapbuf")
    g.dump("map4.buf", "mapbuf", 24)
    g.fill("mapbuf", 48, 0xAA)
    memory_map("map1", 1, "mapbuf")
    g.dump("map1.buf", "mapbuf", 24)
    memory_map("map0", 0, NULL)
    memory_map("map_buffer_null", 1, NULL)
    g.fill(MAPPED_END - 8, 8, 0x5A)
    memory_map("map_buffer_straddles_end", 1, MAPPED_END - 8)
    g.dump("map_buffer_straddles_end.buf", MAPPED_END - 8, 8)
    for case, arg in (("map_arg_null", NULL), ("map_arg_noncanonical", NON_CANONICAL),
                      ("map_arg_unmapped", UNMAPPED)):
        g.call(case, "memory_op", C.XENMEM_memory_map, arg)
    g.start_info_field(r12, "pt_base")
    g.call("map_arg_page_table", "memory_op", C.XENMEM_memory_map, r12)
    g.call("map_with_start", "memory_op", C.XENMEM_memory_map | (1 << 6), "map")

    for op in ("current_reservation", "maximum_reservation", "maximum_gpfn"):
        cmd = getattr(C, f"XENMEM_{op}")
        for dom in ("self", "own", "other", "io"):
            g.call(f"{op}.{dom}", "memory_op", cmd, f"dom_{dom}")
        g.call(f"{op}.null", "memory_op", cmd, NULL)
        g.call(f"{op}.start", "memory_op", cmd | (1 << 6), "dom_self")
    g.call("maximum_ram_page", "memory_op", C.XENMEM_maximum_ram_page, 0)
    g.call("maximum_ram_page.start", "memory_op", C.XENMEM_maximum_ram_page | (1 << 6), 0)
    g.call("machphys_mapping", "memory_op", C.XENMEM_machphys_mapping, "machphys")
    g.dump("machphys_mapping.buf", "machphys", 24)
    g.call("machphys_mapping.null", "memory_op", C.XENMEM_machphys_mapping, NULL)
    g.call("machphys_mapping.start", "memory_op", C.XENMEM_machphys_mapping | (1 << 6),
           "machphys")
    for op in (5, 8, 10, 11, 13, 15, 16, 23, 24, 28, 63):
        g.call(f"subop{op}", "memory_op", op, "map")
    return g.finish()


def test_memory_map_and_reservation_sizes(run_cases):
    run = run_cases(info_guest(), memory_mib=MEMORY_MIB)
    entry = struct.pack("<QQI", 0, MEMORY_MIB << 20, C.E820_RAM)
    for case in ("map4", "map1"):
        assert run[case] == 0
        assert run.dumps[f"{case}.nr"] == struct.pack("<I", 1)
        assert run.dumps[f"{case}.buf"] == entry + b"\xaa" * 4
    assert run["map0"] == 0 and run.dumps["map0.nr"] == struct.pack("<I", 0)
    # Nothing written back when the buffer is bad, and nothing written into it.
    assert run["map_buffer_null"] == EFAULT and run.dumps["map_buffer_null.nr"] == struct.pack("<I", 1)
    assert run["map_buffer_straddles_end"] == EFAULT
    assert run.dumps["map_buffer_straddles_end.buf"] == b"\x5a" * 8
    for case in ("map_arg_null", "map_arg_noncanonical", "map_arg_unmapped", "map_arg_page_table"):
        assert run[case] == EFAULT, case
    assert run["map_with_start"] == ENOSYS

    for op, value in (("current_reservation", N), ("maximum_reservation", N),
                      ("maximum_gpfn", N - 1)):
        assert run[f"{op}.self"] == value and run[f"{op}.own"] == value
        assert run[f"{op}.other"] == ESRCH and run[f"{op}.io"] == ESRCH
        assert run[f"{op}.null"] == EFAULT
        assert run[f"{op}.start"] == EINVAL
    assert run["maximum_ram_page"] == N and run["maximum_ram_page.start"] == EINVAL
    # where the read-only M2P is: inside Xen's reserved range, one u64 for each of the
    # domain's frames (the identity: test_pv_cpu.py reads it through this window)
    assert run["machphys_mapping"] == 0
    v_start, v_end, max_mfn = struct.unpack("<QQQ", run.dumps["machphys_mapping.buf"])
    assert C.HYPERVISOR_VIRT_START <= v_start < v_end <= C.HYPERVISOR_VIRT_END
    assert (v_end - v_start, max_mfn) == (N * 8, N - 1)
    assert run["machphys_mapping.null"] == EFAULT
    assert run["machphys_mapping.start"] == ENOSYS     # Xen's arch_memory_op: the whole cmd
    for op in (5, 8, 10, 11, 13, 15, 16, 23, 24, 28, 63):
        assert run[f"subop{op}"] == ENOSYS, op


def balloon_guest() -> bytes:
    g = MMGuest("memory_op_balloon")
    a = g.a
    domid_args(g)
    a.section(".data")
    a.align(8)
    a.label("extents_at_end")           # where the straddling list is copied from
    a.dq(F + 20, F + 21)
    a.section(".text")
    current(g, "start")

    # Below what it has: the fourth extent names a frame given back by the second.
    g.set_extents([F, F + 1, F + 2, F + 1, F + 3])
    g.reservation("decrease_twice", DECREASE, 5)
    current(g, "after_decrease_twice")
    g.set_extents([F + 3, F + 4])
    g.reservation("decrease_2", DECREASE, 2)
    current(g, "after_decrease_2")
    # Above the maximum: five frames were given back, the sixth is still populated.
    g.set_extents([F, F + 1, F + 2, F + 3, F + 4, F + 5])
    g.reservation("populate_6", POPULATE, 6)
    current(g, "after_populate_6")
    g.set_extents([F + 6])
    g.reservation("populate_at_maximum", POPULATE, 1)
    g.reservation("increase_at_maximum", INCREASE, 1)

    # increase_reservation picks the free frames and says which.
    g.set_extents([F + 10, F + 11])
    g.reservation("make_room_2", DECREASE, 2)
    g.set_extents([MARK, MARK, MARK])
    g.reservation("increase_3", INCREASE, 3)
    g.dump("increase_3", "mm_extents", 24)
    current(g, "after_increase_3")
    g.set_extents([F + 12])
    g.reservation("make_room_1", DECREASE, 1)
    g.reservation("increase_null_list", INCREASE, 1, extents=NULL)
    current(g, "after_increase_null_list")
    g.set_extents([F + 13])
    g.reservation("make_room_again", DECREASE, 1)
    g.start_info_field(r12, "pt_base")      # a list the hypervisor cannot write back to
    g.reservation("increase_list_in_page_table", INCREASE, 1, extents=r12)
    current(g, "after_failed_increase")
    g.reservation("populate_13", POPULATE, 1)

    # Extents of 2^order frames, up to a domU's order 9 (2 MiB).
    g.set_extents([0x2000])
    g.reservation("decrease_order9", DECREASE, 1, order=9)
    current(g, "after_order9")
    g.reservation("populate_order9", POPULATE, 1, order=9)
    for op, name in ((DECREASE, "decrease"), (POPULATE, "populate"), (INCREASE, "increase")):
        g.reservation(f"{name}_order10", op, 1, order=10)

    # Frames outside the domain, and frames that must stay.
    g.set_extents([N])
    g.reservation("decrease_beyond_ram", DECREASE, 1)
    g.set_extents([N - 1])
    g.reservation("decrease_straddles_ram_end", DECREASE, 1, order=1)
    g.set_extents([F])
    g.reservation("room_for_beyond", DECREASE, 1)
    g.set_extents([N])
    g.reservation("populate_beyond_ram", POPULATE, 1)
    g.set_extents([N - 2])
    g.reservation("populate_straddles_ram_end", POPULATE, 1, order=2)
    g.set_extents([F])
    g.reservation("populate_back", POPULATE, 1)
    g.start_info_field(rax, "pt_base")
    a.shr(rax, 12)
    a.mov(qword["mm_extents"], rax)
    g.reservation("decrease_page_table", DECREASE, 1)
    g.set_extents([0x100])
    g.reservation("decrease_kernel_image", DECREASE, 1)
    g.set_extents([0])
    g.reservation("decrease_unmapped_low_frame", DECREASE, 1)
    g.reservation("populate_low_frame", POPULATE, 1)

    # The request itself.
    for case, arg in (("arg_null", NULL), ("arg_noncanonical", NON_CANONICAL),
                      ("arg_unmapped", UNMAPPED)):
        g.call(case, "memory_op", DECREASE, arg)
    g.set_extents([F])
    g.reservation("domid_other", DECREASE, 1, domid=2)
    g.reservation("domid_own_number", DECREASE, 1, domid=DOMID)
    g.reservation("populate_own_number", POPULATE, 1, domid=DOMID)
    g.reservation("list_null", DECREASE, 1, extents=NULL)
    g.reservation("list_noncanonical", DECREASE, 1, extents=NON_CANONICAL)
    g.reservation("nr_zero", DECREASE, 0)
    g.reservation("nr_too_big", DECREASE, 1 << 32)
    # A list running off the mapped region: the extents before the edge are done.
    for i in range(2):
        a.mov(rax, qword[rip_plus("extents_at_end", 8 * i)])
        a.mov(qword[MAPPED_END - 16 + 8 * i], rax)
    g.reservation("list_straddles_end", DECREASE, 3, extents=MAPPED_END - 16)
    g.reservation("populate_list_straddles_end", POPULATE, 3, extents=MAPPED_END - 16)
    # The extent to start from, in the bits of cmd above the sub-op.
    g.set_extents([F + 30, F + 31, F + 32, F + 33])
    g.reservation("decrease_from_2", DECREASE, 4, start=2)
    current(g, "after_decrease_from_2")
    g.reservation("populate_from_2", POPULATE, 4, start=2)
    g.reservation("start_past_end", DECREASE, 4, start=5)
    current(g, "end")

    # A frame given back and populated again reads as zero.
    s, slot = MMGuest.spare(0), FIRST_FREE_SLOT
    frame = (F + 40) * PAGE
    g.mmu("map", s, frame | PTE_P | PTE_RW)
    g.mmu("link", MMGuest.var("mm_l2", slot * 8), MMGuest.spare(0, PTE_P | PTE_RW))
    g.fill(l2_slot_va(slot), PAGE, 0x77)
    g.mmu("unmap", s, 0)
    g.mmuext("flush", C.MMUEXT_TLB_FLUSH_LOCAL)
    g.set_extents([F + 40])
    g.reservation("give_back", DECREASE, 1)
    g.mmu("map_given_back", s, frame | PTE_P | PTE_RW)
    g.reservation("take_again", POPULATE, 1)
    g.mmu("map_again", s, frame | PTE_P | PTE_RW)
    g.mmuext("flush_again", C.MMUEXT_TLB_FLUSH_LOCAL)
    g.check_pages("nonzero_pages", l2_slot_va(slot), 1, None)
    return g.finish()


def test_balloon(run_cases):
    run = run_cases(balloon_guest(), memory_mib=MEMORY_MIB)
    assert run["start"] == N
    assert (run["decrease_twice"], run["after_decrease_twice"]) == (3, N - 3)
    assert (run["decrease_2"], run["after_decrease_2"]) == (2, N - 5)
    assert (run["populate_6"], run["after_populate_6"]) == (5, N)
    assert run["populate_at_maximum"] == 0 and run["increase_at_maximum"] == 0

    assert run["make_room_2"] == 2 and run["increase_3"] == 2
    assert struct.unpack("<3Q", run.dumps["increase_3"]) == (F + 10, F + 11, MARK)
    assert run["after_increase_3"] == N
    assert run["make_room_1"] == 1 and run["increase_null_list"] == 1
    assert run["after_increase_null_list"] == N
    # The frame could not be reported, so it was not taken.
    assert run["make_room_again"] == 1 and run["increase_list_in_page_table"] == 0
    assert run["after_failed_increase"] == N - 1 and run["populate_13"] == 1

    assert (run["decrease_order9"], run["after_order9"]) == (1, N - 512)
    assert run["populate_order9"] == 1
    for name in ("decrease", "populate", "increase"):
        assert run[f"{name}_order10"] == 0, name

    for case in ("decrease_beyond_ram", "decrease_straddles_ram_end", "populate_beyond_ram",
                 "populate_straddles_ram_end", "decrease_page_table", "decrease_kernel_image"):
        assert run[case] == 0, case
    assert run["room_for_beyond"] == 1 and run["populate_back"] == 1
    assert run["decrease_unmapped_low_frame"] == 1 and run["populate_low_frame"] == 1

    # Xen: a request it cannot read or accept is "no extents done", not an errno.
    for case in ("arg_null", "arg_noncanonical", "arg_unmapped", "domid_other", "list_null",
                 "list_noncanonical", "nr_zero", "nr_too_big"):
        assert run[case] == 0, case
    assert run["domid_own_number"] == 1 and run["populate_own_number"] == 1
    assert run["list_straddles_end"] == 2 and run["populate_list_straddles_end"] == 2
    assert (run["decrease_from_2"], run["after_decrease_from_2"]) == (4, N - 2)
    assert run["populate_from_2"] == 4
    assert run["start_past_end"] == 5
    assert run["end"] == N

    assert [run[c] for c in ("map", "link", "unmap", "flush", "give_back")] == [0, 0, 0, 0, 1]
    assert run["map_given_back"] == -C.XEN_EBUSY
    assert run["take_again"] == 1 and run["map_again"] == 0
    assert run["nonzero_pages"] == 0
    assert audit(run.domain) == ""


def physmap_guest() -> bytes:
    g = MMGuest("memory_op_physmap")
    a = g.a
    a.section(".bss")
    a.align(4096)
    a.label("page_a")
    a.reserve(4096)
    a.label("page_b")
    a.reserve(4096)
    a.section(".data")
    a.align(8)
    a.label("xatp")
    a.dq(0, 0, 0)
    a.section(".text")
    p2m_generation = offsetof("shared_info", "arch") + offsetof("arch_shared_info", "p2m_generation")
    tail = sizeof("shared_info")

    def place(case, gpfn, space=C.XENMAPSPACE_shared_info, idx=0, domid=C.DOMID_SELF, start=0):
        a.mov(word["xatp"], domid)
        a.mov(dword[rip_plus("xatp", 4)], space)
        a.mov(rax, idx)
        a.mov(qword[rip_plus("xatp", 8)], rax)
        if isinstance(gpfn, str):           # a label: its frame
            a.lea(rax, ptr[gpfn])
            a.shr(rax, 12)
        else:
            g.load(rax, gpfn)
        a.mov(qword[rip_plus("xatp", 16)], rax)
        g.call(case, "memory_op", C.XENMEM_add_to_physmap | (start << 6), "xatp")

    g.fill("page_a", 4096, 0xAA)
    place("place_a", "page_a")
    a.mov(rax, qword[rip_plus("page_a", tail)])
    g.report("a.tail_after_place")             # was 0xAA..: the page is zeroed first
    # The guest's own field in shared_info, to see the page move with its contents.
    a.mov(rax, 0x1122334455667788)
    a.mov(qword[rip_plus("page_a", p2m_generation)], rax)
    place("place_b", "page_b")
    a.mov(rax, qword[rip_plus("page_b", p2m_generation)])
    g.report("b.p2m_generation")
    a.mov(rax, qword[rip_plus("page_a", p2m_generation)])
    g.report("a.p2m_generation")
    a.mov(rax, qword[rip_plus("page_a", tail)])
    g.report("a.after_struct")
    place("place_b_again", "page_b")
    place("start_in_range", "page_b", start=0xffff)

    g.start_info_field(r12, "pt_base")
    a.shr(r12, 12)
    place("idx_1", "page_a", idx=1)
    place("page_table_frame", r12)
    place("beyond_ram", N)
    g.set_extents([F + 50])
    g.reservation("release", DECREASE, 1)
    place("unpopulated", F + 50)
    g.reservation("repopulate", POPULATE, 1)
    place("domid_other", "page_a", domid=2)
    place("domid_own_number", "page_b", domid=DOMID)
    for space in ("gmfn_foreign", "gmfn", "gmfn_range", "grant_table", "dev_mmio"):
        place(f"space_{space}", "page_a", space=getattr(C, f"XENMAPSPACE_{space}"))
    place("space_99", "page_a", space=99)
    g.call("arg_null", "memory_op", C.XENMEM_add_to_physmap, NULL)
    place("start_too_big", "page_a", start=0x10000)
    a.mov(rax, qword[rip_plus("page_b", p2m_generation)])
    g.report("b.still_there")

    # shared_info in a frame nothing maps: it still cannot be ballooned out.
    place("place_unmapped", F + 60)
    g.set_extents([F + 60])
    g.reservation("decrease_shared_info", DECREASE, 1)
    place("place_back", "page_b")
    g.reservation("decrease_former_shared_info", DECREASE, 1)
    g.reservation("populate_former_shared_info", POPULATE, 1)
    return g.finish()


def test_add_to_physmap_places_shared_info(run_cases):
    run = run_cases(physmap_guest(), memory_mib=MEMORY_MIB)
    assert run["place_a"] == 0 and run["place_b"] == 0
    assert run["a.tail_after_place"] == 0
    assert run["b.p2m_generation"] == 0x1122334455667788   # moved with the page
    assert run["a.p2m_generation"] == 0                    # the old frame is plain zeroed RAM
    assert run["a.after_struct"] == 0
    assert run["place_b_again"] == 0 and run["start_in_range"] == 0
    for case in ("idx_1", "page_table_frame", "beyond_ram", "unpopulated", "space_grant_table",
                 "space_dev_mmio", "space_99"):
        assert run[case] == EINVAL, case
    assert run["release"] == 1 and run["repopulate"] == 1
    assert run["domid_other"] == ESRCH and run["domid_own_number"] == 0
    for case in ("space_gmfn_foreign", "space_gmfn", "space_gmfn_range"):
        assert run[case] == ENOSYS, case
    assert run["arg_null"] == EFAULT and run["start_too_big"] == EDOM
    assert run["b.still_there"] == 0x1122334455667788
    assert run["place_unmapped"] == 0 and run["decrease_shared_info"] == 0
    assert run["place_back"] == 0
    assert run["decrease_former_shared_info"] == 1 and run["populate_former_shared_info"] == 1
    assert audit(run.domain) == ""


def test_a_domain_below_its_maximum_balloons_up(run_cases):
    """memory = 16 MiB, maxmem = 32 MiB (xl's memory < maxmem): the frames above 16 MiB
    start unpopulated, and populate_physmap fills them up to the maximum, no further."""
    g = MMGuest("balloon_up")
    g.call("current", "memory_op", C.XENMEM_current_reservation, "mm_domid")
    g.call("maximum", "memory_op", C.XENMEM_maximum_reservation, "mm_domid")
    g.set_extents(range(4096, 4096 + 16))
    g.reservation("populate_above_memory", C.XENMEM_populate_physmap, 16)
    g.call("current_after", "memory_op", C.XENMEM_current_reservation, "mm_domid")
    g.set_extents([8192])
    g.reservation("populate_beyond_maxmem", C.XENMEM_populate_physmap, 1)
    g.set_extents([4096])
    g.reservation("populate_again", C.XENMEM_populate_physmap, 1)
    run = run_cases(g.finish(), memory_mib=16, maxmem_mib=32)
    assert run["current"] == 4096 and run["maximum"] == 8192
    assert run["populate_above_memory"] == 16
    assert run["current_after"] == 4096 + 16
    assert run["populate_beyond_maxmem"] == 0       # gpfn 8192 is outside the domain
    assert run["populate_again"] == 0               # already populated
    assert audit(run.domain) == ""
