"""grant_table_op (20): a PV guest sets up and maps its grant table, grants its own pages
and maps, copies and unmaps them, switches table versions; every refused request gets
Xen's errno or GNTST_* status and changes nothing (XEN-ABI-FACTS §12, §29; Xen's
common/grant_table.c).

The guest grants to itself (trapless PV frame numbers are per domain): a grant names the
domain's own domid, which the test gives the domain."""
from abi import C, ffi, offsetof

from guest_kernel.asm import ax, dword, eax, qword, rax, rcx, word
from guest_kernel.conformance import NON_CANONICAL, UNMAPPED
from guest_kernel.xen_pv import XenPVGuest, rip_
from hypervisor._hv import lib

DOMID = 3
OTHER = 7                           # a domain id nobody has
MEMORY_MIB = 64
RAM_FRAMES = (MEMORY_MIB << 20) >> 12
P, RW, A, D = 1, 2, 0x20, 0x40
EINVAL, EBUSY, ENOSYS, EFAULT, EPERM = (
    -C.XEN_EINVAL, -C.XEN_EBUSY, -C.XEN_ENOSYS, -C.XEN_EFAULT, -C.XEN_EPERM)
PERMIT, READONLY, READING, WRITING = (C.GTF_permit_access, C.GTF_readonly, C.GTF_reading,
                                      C.GTF_writing)
GNTTABOP = "grant_table_op"
PAGES = ("gt", "gt2", "victim", "rovictim", "target", "rotarget", "copydst")
OPS = {"map": "gnttab_map_grant_ref", "unmap": "gnttab_unmap_grant_ref",
       "setup": "gnttab_setup_table", "query": "gnttab_query_size", "copy": "gnttab_copy",
       "ver": "gnttab_set_version", "getver": "gnttab_get_version",
       "status_frames": "gnttab_get_status_frames", "swap": "gnttab_swap_grant_ref",
       "flush": "gnttab_cache_flush"}


class GrantGuest(XenPVGuest):
    """A XenPVGuest with one struct of each grant op and the pages it grants."""

    def __init__(self):
        super().__init__("grant_table_op")
        a = self.a
        a.section(".bss")
        a.align(4096)
        for page in PAGES:
            a.label(page)
            a.reserve(4096)
        a.label("frames")
        a.reserve(8 * 8)
        a.section(".text")
        for label, struct in OPS.items():
            self.struct(label, struct)
        self.map_shared_info()

    def set(self, label: str, **fields) -> None:
        """Fields of the op struct at label := ints, or label names (their address)."""
        a = self.a
        struct = OPS[label]
        for name, value in fields.items():
            size = ffi.sizeof(dict(ffi.typeof(f"struct {struct}").fields)[name].type)
            self.load_arg(rax, value)
            at = rip_(label, offsetof(struct, name))
            if size == 8:
                a.mov(qword[at], rax)
            elif size == 4:
                a.mov(dword[at], eax)
            else:
                a.mov(word[at], ax)

    def gnttab(self, case: str, cmd: int, label: str, count: int = 1) -> None:
        self.call(case, GNTTABOP, cmd, label, count)

    def status(self, case: str, label: str, field: str = "status") -> None:
        """Report a signed 16-bit field of the op struct (a GNTST_* status)."""
        self.a.movsx(rax, word[rip_(label, offsetof(OPS[label], field))])
        self.report(case)

    def report_field(self, case: str, label: str, field: str) -> None:
        """Report an unsigned 32- or 64-bit field of the op struct."""
        struct = OPS[label]
        at = rip_(label, offsetof(struct, field))
        if ffi.sizeof(dict(ffi.typeof(f"struct {struct}").fields)[field].type) == 8:
            self.a.mov(rax, qword[at])
        else:
            self.a.mov(eax, dword[at])
        self.report(case)

    def grant(self, ref: int, flags: int, domid: int, page: str | int) -> None:
        """Entry ref of the table (mapped at gt): domid and frame first, then flags."""
        a = self.a
        if isinstance(page, str):
            a.lea(rax, self.ptr(page))
            a.shr(rax, 12)
        else:
            a.mov(rax, page)
        a.mov(dword[rip_("gt", ref * 8 + 4)], eax)
        a.mov(word[rip_("gt", ref * 8 + 2)], domid)
        a.mov(word[rip_("gt", ref * 8)], flags)

    def entry_flags(self, case: str, ref: int) -> None:
        self.a.movzx(rax, word[rip_("gt", ref * 8)])
        self.report(case)

    def map(self, case: str, ref: int, flags: int, host_addr, dom: int = DOMID) -> None:
        """map_grant_ref; reports `case` (the call) and `case.status`, `case.handle`."""
        self.set("map", host_addr=host_addr, flags=flags, ref=ref, dom=dom, handle=0xdead,
                 status=0x7777)
        self.gnttab(case, C.GNTTABOP_map_grant_ref, "map")
        self.status(f"{case}.status", "map")
        self.report_field(f"{case}.handle", "map", "handle")

    def unmap(self, case: str, handle: int, host_addr, dev_bus_addr=0) -> None:
        self.set("unmap", host_addr=host_addr, dev_bus_addr=dev_bus_addr, handle=handle,
                 status=0x7777)
        self.gnttab(case, C.GNTTABOP_unmap_grant_ref, "unmap")
        self.status(f"{case}.status", "unmap")


def grant_guest():
    g = GrantGuest()
    a = g.a
    # ---- the table's size, and handing out its frames ----
    g.set("query", dom=C.DOMID_SELF)
    g.gnttab("query", C.GNTTABOP_query_size, "query")
    g.status("query.status", "query")
    g.report_field("query.nr_frames", "query", "nr_frames")
    g.report_field("query.max", "query", "max_nr_frames")
    g.gnttab("query_count_2", C.GNTTABOP_query_size, "query", 2)
    g.set("query", dom=OTHER)
    g.gnttab("query_other", C.GNTTABOP_query_size, "query")
    g.status("query_other.status", "query")
    # a table frame nobody has named yet is outside the domain's memory
    a.mov(rax, (RAM_FRAMES << 12) | P | RW | A | D)
    a.mov(rcx, rax)
    g.load_arg(rax, "gt")
    g.hypercall_regs("map_unnamed_frame", "update_va_mapping", rax, rcx, C.UVMF_INVLPG)
    g.set("setup", dom=C.DOMID_SELF, nr_frames=65, frame_list="frames", status=0x7777)
    g.gnttab("setup_too_many", C.GNTTABOP_setup_table, "setup")
    g.status("setup_too_many.status", "setup")
    g.set("setup", nr_frames=1, frame_list=UNMAPPED)
    g.gnttab("setup_bad_list", C.GNTTABOP_setup_table, "setup")
    g.status("setup_bad_list.status", "setup")
    g.set("setup", frame_list=NON_CANONICAL)
    g.gnttab("setup_noncanonical_list", C.GNTTABOP_setup_table, "setup")
    g.set("setup", dom=OTHER, frame_list="frames")
    g.gnttab("setup_other", C.GNTTABOP_setup_table, "setup")
    g.status("setup_other.status", "setup")
    g.gnttab("setup_count_0", C.GNTTABOP_setup_table, "setup", 0)
    g.set("setup", dom=C.DOMID_SELF, nr_frames=2)
    g.gnttab("setup", C.GNTTABOP_setup_table, "setup")
    g.status("setup.status", "setup")
    g.report_word("frame0", "frames")
    g.report_word("frame1", "frames", 8)
    g.set("query", dom=C.DOMID_SELF)
    g.gnttab("query_after", C.GNTTABOP_query_size, "query")
    g.report_field("query_after.nr_frames", "query", "nr_frames")
    for page, slot in (("gt", 0), ("gt2", 8)):
        a.mov(rax, qword[rip_("frames", slot)])
        a.shl(rax, 12)
        a.or_(rax, P | RW | A | D)
        a.mov(rcx, rax)
        g.load_arg(rax, page)
        g.hypercall_regs(f"map_table_{page}", "update_va_mapping", rax, rcx, C.UVMF_INVLPG)

    # ---- entries: good, read-only, for another domain, a bad frame, invalid ----
    g.grant(8, PERMIT, DOMID, "victim")
    g.grant(9, PERMIT | READONLY, DOMID, "rovictim")
    g.grant(10, PERMIT, OTHER, "victim")
    g.grant(11, PERMIT, DOMID, 0x7FFF_FFFF)
    g.grant(12, 0, DOMID, "victim")
    g.grant(13, PERMIT | C.GTF_sub_page, DOMID, "victim")
    a.mov(qword["victim"], 0x1234)

    # ---- map ----
    g.map("map", 8, C.GNTMAP_host_map, "target")
    g.entry_flags("map.flags", 8)
    a.mov(rax, qword["target"])             # the victim's page, through the mapping
    g.report("target_reads_victim")
    a.mov(qword["target"], 0x5678)
    g.report_word("victim_written_through", "victim")
    g.map("ro_grant_writable", 9, C.GNTMAP_host_map, "rotarget")
    g.entry_flags("ro_grant_writable.flags", 9)
    g.map("ro_map", 9, C.GNTMAP_host_map | C.GNTMAP_readonly, "rotarget")
    g.entry_flags("ro_map.flags", 9)
    g.map("other_domains_grant", 10, C.GNTMAP_host_map, "copydst")
    g.map("bad_frame", 11, C.GNTMAP_host_map, "copydst")
    g.entry_flags("bad_frame.flags", 11)
    g.map("invalid_entry", 12, C.GNTMAP_host_map, "copydst")
    g.map("sub_page_entry", 13, C.GNTMAP_host_map, "copydst")
    g.map("ref_out_of_range", 2 * 512, C.GNTMAP_host_map, "copydst")
    g.map("no_map_flags", 8, 0, "copydst")
    g.map("unknown_domain", 8, C.GNTMAP_host_map, "copydst", dom=OTHER)
    g.map("domid_self", 8, C.GNTMAP_host_map, "copydst", dom=C.DOMID_SELF)
    g.map("no_l1", 8, C.GNTMAP_host_map, UNMAPPED)
    g.map("pte_misaligned", 8, C.GNTMAP_host_map | C.GNTMAP_contains_pte, 0x1002)
    g.report_word("copydst_untouched", "copydst")

    # ---- copy ----
    a.lea(rax, g.ptr("copydst"))
    a.shr(rax, 12)
    a.mov(qword[rip_("copy", offsetof("gnttab_copy", "dest"))], rax)
    a.mov(word[rip_("copy", offsetof("gnttab_copy", "dest") + 8)], C.DOMID_SELF)
    a.mov(qword[rip_("copy", 0)], 8)                    # source: ref 8 of ours
    a.mov(word[rip_("copy", 8)], DOMID)
    a.mov(word[rip_("copy", 10)], 0)
    a.mov(word[rip_("copy", offsetof("gnttab_copy", "len"))], 8)
    a.mov(word[rip_("copy", offsetof("gnttab_copy", "flags"))], C.GNTCOPY_source_gref)
    g.gnttab("copy", C.GNTTABOP_copy, "copy")
    g.status("copy.status", "copy")
    g.report_word("copied", "copydst")
    a.mov(word[rip_("copy", 10)], 4090)                 # source offset + len > a page
    g.gnttab("copy_past_page", C.GNTTABOP_copy, "copy")
    g.status("copy_past_page.status", "copy")
    a.mov(word[rip_("copy", 10)], 0)
    a.mov(word[rip_("copy", offsetof("gnttab_copy", "dest") + 8)], OTHER)
    g.gnttab("copy_to_foreign_frame", C.GNTTABOP_copy, "copy")
    g.status("copy_to_foreign_frame.status", "copy")
    a.mov(word[rip_("copy", offsetof("gnttab_copy", "dest") + 8)], C.DOMID_SELF)
    a.mov(qword[rip_("copy", 0)], 10)                   # granted to another domain
    g.gnttab("copy_others_grant", C.GNTTABOP_copy, "copy")
    g.status("copy_others_grant.status", "copy")
    g.entry_flags("copy_others_grant.flags", 10)
    LEN, FLAGS = (offsetof("gnttab_copy", f) for f in ("len", "flags"))
    DEST = offsetof("gnttab_copy", "dest")
    a.mov(word[rip_("copy", LEN)], 0)                   # nothing to copy: done, unchecked
    g.gnttab("copy_len_0", C.GNTTABOP_copy, "copy")
    g.status("copy_len_0.status", "copy")
    a.mov(word[rip_("copy", LEN)], 8)
    a.mov(qword[rip_("copy", 0)], 8)
    a.mov(word[rip_("copy", DEST + 8)], DOMID)          # our frame, by our number
    g.gnttab("copy_frame_by_own_domid", C.GNTTABOP_copy, "copy")
    g.status("copy_frame_by_own_domid.status", "copy")
    a.mov(word[rip_("copy", DEST + 8)], C.DOMID_SELF)
    g.start_info_field(rax, "pt_base")                  # VIRT_BASE 0: VA = guest-physical
    a.shr(rax, 12)
    a.mov(qword[rip_("copy", DEST)], rax)
    g.gnttab("copy_to_page_table", C.GNTTABOP_copy, "copy")
    g.status("copy_to_page_table.status", "copy")
    a.mov(word[rip_("copy", FLAGS)], 0)                 # source: a frame, beyond RAM
    a.mov(word[rip_("copy", 8)], C.DOMID_SELF)
    a.mov(qword[rip_("copy", 0)], 0x7FFF_FFFF)
    g.gnttab("copy_from_beyond_ram", C.GNTTABOP_copy, "copy")
    g.status("copy_from_beyond_ram.status", "copy")

    # ---- unmap ----
    g.unmap("unmap_bad_handle", 99, "target")
    g.unmap("unmap_wrong_bus_addr", 0, 0, 0x1000)
    g.map("dev_map", 8, C.GNTMAP_device_map, 0)
    a.mov(rax, qword[rip_("map", offsetof("gnttab_map_grant_ref", "dev_bus_addr"))])
    a.lea(rcx, g.ptr("victim"))
    a.sub(rax, rcx)
    g.report("dev_map.bus_minus_victim")               # machine address = guest-physical
    g.unmap("unmap", 0, "target")
    g.entry_flags("unmap.flags", 8)
    g.report_word("victim_after_unmap", "victim")
    g.unmap("unmap_again", 0, "target")

    # ---- versions: busy while entries are in use ----
    g.set("getver", dom=C.DOMID_SELF)
    g.gnttab("get_version", C.GNTTABOP_get_version, "getver")
    g.report_field("get_version.version", "getver", "version")
    g.set("getver", dom=OTHER)
    g.gnttab("get_version_other", C.GNTTABOP_get_version, "getver")
    g.set("ver", version=3)
    g.gnttab("set_version_3", C.GNTTABOP_set_version, "ver")
    g.set("ver", version=2)
    g.gnttab("set_version_busy", C.GNTTABOP_set_version, "ver")   # refs 8 (dev), 9 mapped
    g.unmap("unmap_ro", 1, "rotarget")
    g.unmap("unmap_dev", 2, 0, "victim")
    g.entry_flags("unmap_dev.flags", 8)
    g.set("status_frames", nr_frames=1, dom=C.DOMID_SELF, frame_list="frames")
    g.gnttab("status_frames_v1", C.GNTTABOP_get_status_frames, "status_frames")
    g.status("status_frames_v1.status", "status_frames")
    g.set("ver", version=2)
    g.gnttab("set_version_2", C.GNTTABOP_set_version, "ver")
    g.report_field("set_version_2.version", "ver", "version")
    g.entry_flags("v2_clears_entries", 9)
    g.gnttab("status_frames", C.GNTTABOP_get_status_frames, "status_frames")
    g.status("status_frames.status", "status_frames")
    g.report_word("status_frame", "frames")
    g.set("status_frames", nr_frames=2)
    g.gnttab("status_frames_2", C.GNTTABOP_get_status_frames, "status_frames")
    g.status("status_frames_2.status", "status_frames")
    g.set("ver", version=1)
    g.gnttab("set_version_1", C.GNTTABOP_set_version, "ver")

    # ---- swap, cache_flush, unknown ops ----
    g.grant(8, PERMIT, DOMID, "victim")
    g.set("swap", ref_a=8, ref_b=12, status=0x7777)
    g.gnttab("swap", C.GNTTABOP_swap_grant_ref, "swap")
    g.status("swap.status", "swap")
    g.entry_flags("swap.flags_8", 8)
    g.entry_flags("swap.flags_12", 12)
    g.set("swap", ref_a=8, ref_b=5000)
    g.gnttab("swap_out_of_range", C.GNTTABOP_swap_grant_ref, "swap")
    g.status("swap_out_of_range.status", "swap")
    a.lea(rax, g.ptr("victim"))
    a.mov(qword[rip_("flush", 0)], rax)
    g.set("flush", offset=0, length=4096, op=C.GNTTAB_CACHE_INVAL)
    g.gnttab("cache_flush", C.GNTTABOP_cache_flush, "flush")
    g.set("flush", op=4)
    g.gnttab("cache_flush_bad_op", C.GNTTABOP_cache_flush, "flush")
    g.set("flush", op=C.GNTTAB_CACHE_CLEAN, offset=4000, length=200)
    g.gnttab("cache_flush_past_page", C.GNTTABOP_cache_flush, "flush")
    g.set("flush", op=C.GNTTAB_CACHE_CLEAN | C.GNTTAB_CACHE_SOURCE_GREF, offset=0)
    g.gnttab("cache_flush_gref", C.GNTTABOP_cache_flush, "flush")
    g.gnttab("unknown_op", 13, "flush")
    g.gnttab("continuation_bits", C.GNTTABOP_query_size | (1 << 12), "query")
    return g.finish()


def test_grant_table_op(run_cases):
    run = run_cases(grant_guest(), domid=DOMID, memory_mib=MEMORY_MIB)
    ok, general, bad_domain, bad_gntref, bad_handle, bad_virt, bad_dev, perm, bad_page, \
        bad_copy = (C.GNTST_okay, C.GNTST_general_error, C.GNTST_bad_domain,
                    C.GNTST_bad_gntref, C.GNTST_bad_handle, C.GNTST_bad_virt_addr,
                    C.GNTST_bad_dev_addr, C.GNTST_permission_denied, C.GNTST_bad_page,
                    C.GNTST_bad_copy_arg)
    # size and frames
    assert (run["query"], run["query.status"], run["query.nr_frames"], run["query.max"]) == \
        (0, ok, 1, 64)
    assert run["query_count_2"] == EINVAL
    assert (run["query_other"], run["query_other.status"]) == (0, bad_domain)
    assert run["map_unnamed_frame"] == EPERM
    assert (run["setup_too_many"], run["setup_too_many.status"]) == (0, general)
    assert (run["setup_bad_list"], run["setup_bad_list.status"]) == (0, bad_virt)
    assert run["setup_noncanonical_list"] == EFAULT
    assert (run["setup_other"], run["setup_other.status"]) == (0, bad_domain)
    assert run["setup_count_0"] == EINVAL
    assert (run["setup"], run["setup.status"]) == (0, ok)
    assert (run["frame0"], run["frame1"]) == (RAM_FRAMES, RAM_FRAMES + 1)
    assert run["query_after.nr_frames"] == 2
    assert run["map_table_gt"] == 0 and run["map_table_gt2"] == 0
    # map
    assert (run["map"], run["map.status"], run["map.handle"]) == (0, ok, 0)
    assert run["map.flags"] == PERMIT | READING | WRITING
    assert run["target_reads_victim"] == 0x1234
    assert run["victim_written_through"] == 0x5678
    assert (run["ro_grant_writable"], run["ro_grant_writable.status"]) == (0, general)
    assert run["ro_grant_writable.flags"] == PERMIT | READONLY
    assert (run["ro_map.status"], run["ro_map.handle"]) == (ok, 1)
    assert run["ro_map.flags"] == PERMIT | READONLY | READING
    for case, status in (("other_domains_grant", general), ("bad_frame", bad_page),
                         ("invalid_entry", general), ("sub_page_entry", general),
                         ("ref_out_of_range", bad_gntref), ("no_map_flags", bad_gntref),
                         ("unknown_domain", bad_domain), ("domid_self", bad_domain),
                         ("no_l1", general), ("pte_misaligned", general)):
        assert (run[case], run[f"{case}.status"]) == (0, status), case
    assert run["bad_frame.flags"] == PERMIT
    assert run["copydst_untouched"] == 0
    # copy
    assert (run["copy"], run["copy.status"], run["copied"]) == (0, ok, 0x5678)
    assert run["copy_past_page.status"] == bad_copy
    assert run["copy_to_foreign_frame.status"] == perm
    assert run["copy_others_grant.status"] == general
    assert run["copy_others_grant.flags"] == PERMIT
    assert run["copy_len_0.status"] == ok
    assert run["copy_frame_by_own_domid.status"] == perm     # frames: DOMID_SELF only
    assert run["copy_to_page_table.status"] == general
    assert run["copy_from_beyond_ram.status"] == bad_page
    # unmap
    assert (run["unmap_bad_handle"], run["unmap_bad_handle.status"]) == (0, bad_handle)
    assert run["unmap_wrong_bus_addr.status"] == ok     # handle 0 has no device mapping
    assert (run["dev_map.status"], run["dev_map.handle"]) == (ok, 2)
    assert run["dev_map.bus_minus_victim"] == 0
    assert (run["unmap"], run["unmap.status"]) == (0, ok)
    assert run["unmap.flags"] == PERMIT | READING | WRITING     # the device mapping holds it
    assert run["victim_after_unmap"] == 0x5678
    assert run["unmap_again.status"] == bad_handle
    # versions
    assert (run["get_version"], run["get_version.version"]) == (0, 1)
    assert run["get_version_other"] == -C.XEN_ESRCH
    assert run["set_version_3"] == EINVAL
    assert run["set_version_busy"] == EBUSY
    assert run["unmap_ro.status"] == ok and run["unmap_dev.status"] == ok
    assert run["unmap_dev.flags"] == PERMIT
    assert run["status_frames_v1.status"] == general
    assert (run["set_version_2"], run["set_version_2.version"]) == (0, 2)
    assert run["v2_clears_entries"] == 0
    assert (run["status_frames"], run["status_frames.status"]) == (0, ok)
    assert run["status_frame"] == RAM_FRAMES + 64
    assert run["status_frames_2.status"] == general
    assert run["set_version_1"] == 0
    # swap, cache_flush, unknown
    assert (run["swap"], run["swap.status"]) == (0, ok)
    assert (run["swap.flags_8"], run["swap.flags_12"]) == (0, PERMIT)
    assert run["swap_out_of_range.status"] == bad_gntref
    assert run["cache_flush"] == 0
    assert run["cache_flush_bad_op"] == EINVAL
    assert run["cache_flush_past_page"] == EINVAL
    # Xen's first check refuses any op bit but INVAL and CLEAN, SOURCE_GREF included
    # (its -EOPNOTSUPP for SOURCE_GREF comes after and is never reached)
    assert run["cache_flush_gref"] == EINVAL
    assert run["unknown_op"] == ENOSYS
    assert run["continuation_bits"] == EINVAL


# ---- two domains: one grants a page, the other maps it ----

GRANTER, MAPPER = 21, 22


def wait_until(g: GrantGuest, label: str, test) -> None:
    """Yield until test() (which emits a compare) says equal; up to 2^20 tries."""
    a = g.a
    a.mov(qword["tries"], 1 << 20)
    a.label(f"{label}.again")
    g.hypercall("sched_op", C.SCHEDOP_yield, 0)
    a.dec(qword["tries"])
    a.je(f"{label}.out")
    test()
    a.jne(f"{label}.again")
    a.label(f"{label}.out")


def tries_label(g: GrantGuest) -> None:
    g.a.section(".bss")
    g.a.label("tries")
    g.a.reserve(8)
    g.a.section(".text")


def granter_guest():
    """Grant our `victim` page to MAPPER, wait until it is written through the mapping,
    answer, wait until it is unmapped."""
    g = GrantGuest()
    a = g.a
    tries_label(g)
    g.set("setup", dom=C.DOMID_SELF, nr_frames=1, frame_list="frames")
    g.gnttab("setup", C.GNTTABOP_setup_table, "setup")
    a.mov(rax, qword["frames"])
    a.shl(rax, 12)
    a.or_(rax, P | RW | A | D)
    a.mov(rcx, rax)
    g.load_arg(rax, "gt")
    g.hypercall_regs("map_table", "update_va_mapping", rax, rcx, C.UVMF_INVLPG)
    a.mov(qword["victim"], 0xFEED)
    g.grant(8, PERMIT, MAPPER, "victim")
    # the mapper writes 0xBEEF through its mapping and keeps it until we answer 0xACED
    wait_until(g, "written", lambda: a.cmp(qword["victim"], 0xBEEF))
    g.report_word("victim_seen", "victim")
    g.entry_flags("flags_while_mapped", 8)
    a.mov(qword["victim"], 0xACED)
    wait_until(g, "unmapped", lambda: a.cmp(word[rip_("gt", 8 * 8)], PERMIT))
    g.entry_flags("flags_after_unmap", 8)
    return g.finish()


def mapper_guest():
    """Map GRANTER's ref 8 (retrying until it is granted), read and write it, wait for
    the granter's answer in it, map it again read-only, unmap."""
    g = GrantGuest()
    a = g.a
    tries_label(g)
    g.set("map", host_addr="target", flags=C.GNTMAP_host_map | C.GNTMAP_device_map, ref=8,
          dom=GRANTER)
    wait_until(g, "granted", lambda: (
        g.hypercall(GNTTABOP, C.GNTTABOP_map_grant_ref, "map", 1),
        a.cmp(word[rip_("map", offsetof("gnttab_map_grant_ref", "status"))], 0)))
    g.status("map.status", "map")
    g.report_field("map.bus", "map", "dev_bus_addr")
    a.mov(rax, qword["target"])
    g.report("read_through_map")
    a.mov(qword["target"], 0xBEEF)
    wait_until(g, "answered", lambda: a.cmp(qword["target"], 0xACED))
    g.map("map_again_readonly", 8, C.GNTMAP_host_map | C.GNTMAP_readonly, "rotarget",
          dom=GRANTER)
    a.mov(rax, qword["rotarget"])
    g.report("read_second_map")
    g.unmap("unmap_second", 1, "rotarget")
    g.unmap("unmap_wrong_bus", 0, 0, 0x1000)
    # host and device at once, at the bus address the map gave
    g.set("unmap", host_addr="target", handle=0, status=0x7777)
    a.mov(rax, qword[rip_("map", offsetof("gnttab_map_grant_ref", "dev_bus_addr"))])
    a.mov(qword[rip_("unmap", offsetof("gnttab_unmap_grant_ref", "dev_bus_addr"))], rax)
    g.gnttab("unmap", C.GNTTABOP_unmap_grant_ref, "unmap")
    g.status("unmap.status", "unmap")
    return g.finish()


def test_a_page_granted_to_another_domain_is_mapped_there(engine):
    from guest_kernel.conformance import parse
    from hypervisor.domain import Domain
    granter = Domain(granter_guest(), domid=GRANTER, engine=engine, memory_mib=MEMORY_MIB,
                     console_ring=False, xenstore=False)
    mapper = Domain(mapper_guest(), domid=MAPPER, engine=engine, memory_mib=MEMORY_MIB,
                    console_ring=False, xenstore=False)
    try:
        mapper.start()
        granter.start()
        stops = granter.wait(30), mapper.wait(30)
        assert all(s is not None for s in stops), "a domain hung"
        for s, d in zip(stops, (granter, mapper)):
            assert (s.kind, s.reason) == ("shutdown", 0), d.console_output
        g, _ = parse(granter.console_output.decode())
        m, _ = parse(mapper.console_output.decode())
    finally:
        granter.destroy()
        mapper.destroy()
    assert g["flags_while_mapped"] == PERMIT | READING | WRITING
    assert g["victim_seen"] == 0xBEEF                   # the mapper's store, in our page
    assert g["flags_after_unmap"] == PERMIT
    assert m["map.status"] == C.GNTST_okay
    # the page has a frame of the mapper's window: its machine address there
    assert m["map.bus"] >> 12 == RAM_FRAMES + lib.HV_GNT_WINDOW_BASE
    assert m["read_through_map"] == 0xFEED
    assert (m["map_again_readonly.status"], m["read_second_map"]) == (C.GNTST_okay, 0xACED)
    assert m["unmap_second.status"] == C.GNTST_okay
    assert m["unmap_wrong_bus.status"] == C.GNTST_bad_dev_addr
    assert m["unmap.status"] == C.GNTST_okay


# ---- limits: 128 pins of one kind per entry (Xen's 8-bit counters), the maptrack ----

def limits_guest():
    """Device-map ref 8 read-only until refused, then refs 9, 10, ... (128 each) until the
    maptrack is full. rbx counts the maps made, r12 the ref, r13 the maps of it."""
    from guest_kernel.asm import r12, r12d, r13, rbx
    g = GrantGuest()
    a = g.a
    g.set("setup", dom=C.DOMID_SELF, nr_frames=1, frame_list="frames")
    g.gnttab("setup", C.GNTTABOP_setup_table, "setup")
    a.mov(rax, qword["frames"])
    a.shl(rax, 12)
    a.or_(rax, P | RW | A | D)
    a.mov(rcx, rax)
    g.load_arg(rax, "gt")
    g.hypercall_regs("map_table", "update_va_mapping", rax, rcx, C.UVMF_INVLPG)
    for ref in range(8, 8 + 2 + lib.HV_GNT_MAX_MAPTRACK // 128):
        g.grant(ref, PERMIT, DOMID, "victim")
    g.set("map", host_addr=0, flags=C.GNTMAP_device_map | C.GNTMAP_readonly, dom=DOMID)

    def map_until_refused(label: str, next_ref_every: int | None) -> None:
        a.label(f"{label}.loop")
        a.mov(dword[rip_("map", offsetof("gnttab_map_grant_ref", "ref"))], r12d)
        g.hypercall(GNTTABOP, C.GNTTABOP_map_grant_ref, "map", 1)
        a.cmp(word[rip_("map", offsetof("gnttab_map_grant_ref", "status"))], 0)
        a.jne(f"{label}.done")
        a.inc(rbx)
        a.cmp(rbx, 10_000)                  # a bound, whatever happens
        a.je(f"{label}.done")
        if next_ref_every:
            a.inc(r13)
            a.cmp(r13, next_ref_every)
            a.jne(f"{label}.loop")
            a.xor(r13, r13)
            a.inc(r12)
        a.jmp(f"{label}.loop")
        a.label(f"{label}.done")

    a.xor(rbx, rbx)
    a.mov(r12, 8)
    map_until_refused("one_ref", None)
    a.mov(rax, rbx)
    g.report("pins_of_one_ref")
    g.status("pin_overflow.status", "map")
    g.entry_flags("pin_overflow.flags", 8)
    a.xor(rbx, rbx)
    a.xor(r13, r13)
    a.mov(r12, 9)
    map_until_refused("many_refs", 128)
    a.mov(rax, rbx)
    g.report("more_maps")
    g.status("maptrack_full.status", "map")
    return g.finish()


def test_pin_and_maptrack_limits(run_cases):
    run = run_cases(limits_guest(), domid=DOMID, memory_mib=MEMORY_MIB)
    assert run["pins_of_one_ref"] == 128
    assert run["pin_overflow.status"] == C.GNTST_general_error
    assert run["pin_overflow.flags"] == PERMIT | READING
    assert run["more_maps"] == lib.HV_GNT_MAX_MAPTRACK - 128
    assert run["maptrack_full.status"] == C.GNTST_no_space


# ---- the granter goes away while its page is mapped ----

def wait_for_host(g: GrantGuest, checkpoint: str) -> None:
    """Print `checkpoint <name>` and spin on CONSOLEIO_read until the host sends a byte."""
    a = g.a
    a.section(".bss")
    a.label(f"{checkpoint}.in")
    a.reserve(8)
    a.section(".text")
    g.print(f"checkpoint {checkpoint}\n")
    a.label(f"{checkpoint}.wait")
    g.hypercall("console_io", C.CONSOLEIO_read, 1, f"{checkpoint}.in")
    a.test(rax, rax)
    a.je(f"{checkpoint}.wait")


def orphan_mapper_guest():
    """Map GRANTER's ref 8; after the host destroyed GRANTER, use the page, then unmap."""
    g = GrantGuest()
    a = g.a
    tries_label(g)
    g.set("map", host_addr="target", flags=C.GNTMAP_host_map, ref=8, dom=GRANTER)
    wait_until(g, "granted", lambda: (
        g.hypercall(GNTTABOP, C.GNTTABOP_map_grant_ref, "map", 1),
        a.cmp(word[rip_("map", offsetof("gnttab_map_grant_ref", "status"))], 0)))
    g.status("map.status", "map")
    wait_for_host(g, "mapped")
    g.report_word("read_after_granter_died", "target")
    a.mov(qword["target"], 0xBEEF)
    g.report_word("write_after_granter_died", "target")
    g.unmap("unmap", 0, "target")
    g.set("map", ref=8, dom=GRANTER)
    g.gnttab("map_after_granter_died", C.GNTTABOP_map_grant_ref, "map")
    g.status("map_after_granter_died.status", "map")
    return g.finish()


def test_a_mapped_page_outlives_its_granter(engine):
    from guest_kernel.conformance import parse
    from hypervisor.domain import Domain
    from helpers import wait_for
    granter = Domain(granter_guest(), domid=GRANTER, engine=engine, memory_mib=MEMORY_MIB,
                     console_ring=False, xenstore=False)
    mapper = Domain(orphan_mapper_guest(), domid=MAPPER, engine=engine, memory_mib=MEMORY_MIB,
                    console_ring=False, xenstore=False)
    try:
        mapper.start()
        granter.start()
        assert wait_for(lambda: b"checkpoint mapped\n" in mapper.console_output, 20), \
            mapper.console_output
    finally:
        granter.destroy()
    try:
        assert mapper.send_input(b"x") == 1
        stop = mapper.wait(30)
        assert stop is not None and (stop.kind, stop.reason) == ("shutdown", 0), stop
        m, _ = parse(mapper.console_output.decode())
    finally:
        mapper.destroy()
    assert m["map.status"] == C.GNTST_okay
    assert m["read_after_granter_died"] == 0xFEED          # the page is still there
    assert m["write_after_granter_died"] == 0xBEEF
    assert m["unmap.status"] == C.GNTST_okay
    assert m["map_after_granter_died.status"] == C.GNTST_bad_domain
