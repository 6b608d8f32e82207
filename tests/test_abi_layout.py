"""The ABI as Python derives it from abi/xen_abi.h equals what the C compiler computes,
and both equal Xen's public x86-64 ABI (shared/XEN-ABI-FACTS.md)."""
import subprocess

import pytest

import abi
from abi import C


@pytest.fixture(scope="module")
def compiled_layout(tmp_path_factory):
    """{struct: (size, {field: offset})} as gcc lays the header out."""
    lines = ['#include <stdio.h>', '#include <stddef.h>', f'#include "{abi.HEADER}"', "int main(void) {"]
    for s in abi.struct_names():
        lines.append(f'printf("%s size %zu\\n", "{s}", sizeof(struct {s}));')
        for field, _, _ in abi.struct_fields(s):
            lines.append(f'printf("%s.%s %zu\\n", "{s}", "{field}", offsetof(struct {s}, {field}));')
    lines.append("return 0; }")
    d = tmp_path_factory.mktemp("abi")
    (d / "layout.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-Wall", "-o", d / "layout", d / "layout.c"], check=True)
    out = subprocess.run([d / "layout"], check=True, capture_output=True, text=True).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


def test_python_layout_equals_c_compiler(compiled_layout):
    assert abi.struct_names(), "the header declares no structs?"
    for s in abi.struct_names():
        assert int(compiled_layout[f"{s} size"]) == abi.sizeof(s), s
        for field, offset, _ in abi.struct_fields(s):
            assert int(compiled_layout[f"{s}.{field}"]) == offset, f"{s}.{field}"


def test_compiled_extension_sees_the_same_layout():
    from hypervisor._hv import ffi as ext_ffi, lib
    for s in abi.struct_names():
        assert ext_ffi.sizeof(f"struct {s}") == abi.sizeof(s)
    assert lib.__HYPERVISOR_console_io == C.__HYPERVISOR_console_io


# Xen's public x86-64 ABI, from shared/XEN-ABI-FACTS.md: (struct, size, {field: offset}).
XEN_LAYOUTS = [
    ("start_info", 1168, dict(magic=0, nr_pages=32, shared_info=40, flags=48, store_mfn=56,
                              store_evtchn=64, console_mfn=72, console_evtchn=80, pt_base=88,
                              nr_pt_frames=96, mfn_list=104, mod_start=112, mod_len=120,
                              cmd_line=128, first_p2m_pfn=1152, nr_p2m_frames=1160)),
    ("xen_compile_info", 144, dict(compiler=0, compile_by=64, compile_domain=80, compile_date=112)),
    ("xen_platform_parameters", 8, dict(virt_start=0)),
    ("xen_feature_info", 8, dict(submap_idx=0, submap=4)),
    ("sched_shutdown", 4, dict(reason=0)),
    ("sched_poll", 24, dict(ports=0, nr_ports=8, timeout=16)),
    ("sched_remote_shutdown", 8, dict(domain_id=0, reason=4)),
    ("evtchn_alloc_unbound", 8, dict(dom=0, remote_dom=2, port=4)),
    ("evtchn_bind_interdomain", 12, dict(remote_dom=0, remote_port=4, local_port=8)),
    ("evtchn_bind_virq", 12, dict(virq=0, vcpu=4, port=8)),
    ("evtchn_bind_pirq", 12, dict(pirq=0, flags=4, port=8)),
    ("evtchn_bind_ipi", 8, dict(vcpu=0, port=4)),
    # the PV CPU model (XEN-ABI-FACTS §19-§21)
    ("trap_info", 16, dict(vector=0, flags=1, cs=2, address=8)),
    ("callback_register", 16, dict(type=0, flags=2, address=8)),
    ("callback_unregister", 4, dict(type=0)),
    ("physdev_set_iopl", 4, dict(iopl=0)),
    ("physdev_set_iobitmap", 16, dict(bitmap=0, nr_ports=8)),
    ("iret_context", 72, dict(rax=0, r11=8, rcx=16, flags=24, rip=32, cs=40, rflags=48,
                              rsp=56, ss=64)),
    ("evtchn_close", 4, dict(port=0)),
    ("evtchn_send", 4, dict(port=0)),
    ("evtchn_unmask", 4, dict(port=0)),
    ("evtchn_status", 24, dict(dom=0, port=4, status=8, vcpu=12, u_dom=16, u_port=20)),
    ("evtchn_bind_vcpu", 8, dict(port=0, vcpu=4)),
    ("evtchn_reset", 2, dict(dom=0)),
    ("vcpu_time_info", 32, dict(version=0, tsc_timestamp=8, system_time=16, tsc_to_system_mul=24,
                                tsc_shift=28, flags=29)),
    ("arch_vcpu_info", 16, dict(cr2=0, pad=8)),
    ("vcpu_info", 64, dict(evtchn_upcall_pending=0, evtchn_upcall_mask=1, evtchn_pending_sel=8,
                           arch=16, time=32)),
    ("arch_shared_info", 48, dict(max_pfn=0, pfn_to_mfn_frame_list_list=8, nmi_reason=16,
                                  p2m_cr3=24, p2m_vaddr=32, p2m_generation=40)),
    ("shared_info", 3136, dict(vcpu_info=0, evtchn_pending=2048, evtchn_mask=2560, wc_version=3072,
                               wc_sec=3076, wc_nsec=3080, wc_sec_hi=3084, arch=3088)),
    ("xen_hvm_param", 16, dict(domid=0, index=4, value=8)),
    ("xen_hvm_evtchn_upcall_vector", 8, dict(vcpu=0, vector=4)),
    ("vcpu_set_periodic_timer", 8, dict(period_ns=0)),
    ("vcpu_set_singleshot_timer", 16, dict(timeout_abs_ns=0, flags=8)),
    ("vcpu_register_vcpu_info", 16, dict(mfn=0, offset=8, rsvd=12)),
    ("xen_user_regs", 200, dict(r15=0, rbx=40, r11=48, rax=80, rcx=88, rdx=96, rsi=104,
                                rdi=112, rip=128, cs=136, saved_upcall_mask=140, rflags=144,
                                rsp=152, ss=160, es=168, ds=176, fs=184, gs=192)),
    ("vcpu_guest_context", 5168, dict(fpu_ctxt=0, flags=512, user_regs=520, trap_ctxt=720,
                                      ldt_base=4816, ldt_ents=4824, gdt_frames=4832,
                                      gdt_ents=4960, kernel_ss=4968, kernel_sp=4976,
                                      ctrlreg=4984, debugreg=5048, event_callback_eip=5112,
                                      failsafe_callback_eip=5120, syscall_callback_eip=5128,
                                      vm_assist=5136, fs_base=5144, gs_base_kernel=5152,
                                      gs_base_user=5160)),
    ("vcpu_runstate_info", 48, dict(state=0, state_entry_time=8, time=16)),
    ("vcpu_register_runstate_memory_area", 8, dict(addr=0)),
    ("xen_memory_reservation", 32, dict(extent_start=0, nr_extents=8, extent_order=16,
                                        mem_flags=20, domid=24)),
    ("xen_memory_map", 16, dict(nr_entries=0, buffer=8)),
    ("e820_entry", 20, dict(addr_lo=0, size_lo=8, type=16)),
    ("xen_add_to_physmap", 24, dict(domid=0, size=2, space=4, idx=8, gpfn=16)),
    ("xen_machphys_mapping", 24, dict(v_start=0, v_end=8, max_mfn=16)),   # 3 xen_ulong_t
    ("mmu_update", 16, dict(ptr=0, val=8)),
    # public/grant_table.h (XEN-ABI-FACTS §12, §29)
    ("grant_entry_v1", 8, dict(flags=0, domid=2, frame=4)),
    ("grant_entry_v2", 16, dict(flags=0, domid=2, frame=8)),
    ("gnttab_map_grant_ref", 32, dict(host_addr=0, flags=8, ref=12, dom=16, status=18,
                                      handle=20, dev_bus_addr=24)),
    ("gnttab_unmap_grant_ref", 24, dict(host_addr=0, dev_bus_addr=8, handle=16, status=20)),
    ("gnttab_setup_table", 24, dict(dom=0, nr_frames=4, status=8, frame_list=16)),
    ("gnttab_dump_table", 4, dict(dom=0, status=2)),
    ("gnttab_copy_ptr", 16, dict(u=0, domid=8, offset=10)),
    ("gnttab_copy", 40, dict(source=0, dest=16, len=32, flags=34, status=36)),
    ("gnttab_query_size", 16, dict(dom=0, nr_frames=4, max_nr_frames=8, status=12)),
    ("gnttab_unmap_and_replace", 24, dict(host_addr=0, new_addr=8, handle=16, status=20)),
    ("gnttab_set_version", 4, dict(version=0)),
    ("gnttab_get_status_frames", 16, dict(nr_frames=0, dom=4, status=6, frame_list=8)),
    ("gnttab_get_version", 8, dict(dom=0, version=4)),
    ("gnttab_swap_grant_ref", 12, dict(ref_a=0, ref_b=4, status=8)),
    ("gnttab_cache_flush", 16, dict(a=0, offset=8, length=10, op=12)),
    ("mmuext_op", 24, dict(cmd=0, arg1=8, arg2=16)),
    ("multicall_entry", 64, dict(op=0, result=8, args=16)),
    ("hvm_start_info", 56, dict(magic=0, version=4, flags=8, nr_modules=12, modlist_paddr=16,
                                cmdline_paddr=24, rsdp_paddr=32, memmap_paddr=40,
                                memmap_entries=48, reserved=52)),
    ("hvm_modlist_entry", 32, dict(paddr=0, size=8, cmdline_paddr=16, reserved=24)),
    ("hvm_memmap_table_entry", 24, dict(addr=0, size=8, type=16, reserved=20)),
    ("xencons_interface", 3092, {"in": 0, "out": 1024, "in_cons": 3072, "in_prod": 3076,
                                     "out_cons": 3080, "out_prod": 3084, "connection": 3088}),
    ("xsd_sockmsg", 16, dict(type=0, req_id=4, tx_id=8, len=12)),
    ("xenstore_domain_interface", 2080, dict(req=0, rsp=1024, req_cons=2048, req_prod=2052,
                                             rsp_cons=2056, rsp_prod=2060, server_features=2064,
                                             connection=2068, error=2072, evtchn_port=2076)),
    # io/blkif.h, io/ring.h (XEN-ABI-FACTS.md §29)
    ("blkif_sring_header", 64, dict(req_prod=0, req_event=4, rsp_prod=8, rsp_event=12)),
    ("blkif_request_segment", 8, dict(gref=0, first_sect=4, last_sect=5)),
    ("blkif_request", 112, dict(operation=0, nr_segments=1, handle=2, id=8, sector_number=16,
                                seg=24)),
    ("blkif_request_discard", 32, dict(operation=0, flag=1, handle=2, id=8, sector_number=16,
                                       nr_sectors=24)),
    ("blkif_request_indirect", 64, dict(operation=0, indirect_op=1, nr_segments=2, id=8,
                                        sector_number=16, handle=24, indirect_grefs=28)),
    ("blkif_response", 16, dict(id=0, operation=8, status=10)),
    # io/netif.h
    ("netif_tx_request", 12, dict(gref=0, offset=4, flags=6, id=8, size=10)),
    ("netif_tx_response", 4, dict(id=0, status=2)),
    ("netif_extra_info", 8, dict(type=0, flags=1, u=2)),
    ("netif_rx_request", 8, dict(id=0, gref=4)),
    ("netif_rx_response", 8, dict(id=0, offset=2, flags=4, status=6)),
]


@pytest.mark.parametrize("struct,size,fields", XEN_LAYOUTS, ids=[x[0] for x in XEN_LAYOUTS])
def test_layout_matches_xen(struct, size, fields):
    assert abi.sizeof(struct) == size
    for field, offset in fields.items():
        assert abi.offsetof(struct, field) == offset, field


def test_every_header_struct_is_checked_against_xen():
    assert {s for s, _, _ in XEN_LAYOUTS} == set(abi.struct_names())


XEN_NUMBERS = dict(
    __HYPERVISOR_set_trap_table=0, __HYPERVISOR_mmu_update=1, __HYPERVISOR_memory_op=12,
    __HYPERVISOR_multicall=13, __HYPERVISOR_set_timer_op=15, __HYPERVISOR_xen_version=17,
    __HYPERVISOR_console_io=18, __HYPERVISOR_grant_table_op=20, __HYPERVISOR_vcpu_op=24,
    __HYPERVISOR_mmuext_op=26, __HYPERVISOR_sched_op=29, __HYPERVISOR_event_channel_op=32,
    __HYPERVISOR_hvm_op=34, __HYPERVISOR_hypfs_op=42,
    XEN_EPERM=1, XEN_EFAULT=14, XEN_EINVAL=22, XEN_ENOSYS=38, XEN_ETIME=62, XEN_ENOSPC=28,
    CONSOLEIO_write=0, CONSOLEIO_read=1, XENVER_version=0, XENVER_guest_handle=8,
    XENVER_build_id=10, SCHEDOP_yield=0, SCHEDOP_shutdown=2, SCHEDOP_shutdown_code=5,
    SHUTDOWN_poweroff=0, SHUTDOWN_crash=3, SHUTDOWN_soft_reset=5,
    XEN_ELFNOTE_ENTRY=1, XEN_ELFNOTE_HYPERCALL_PAGE=2, XEN_ELFNOTE_VIRT_BASE=3,
    XEN_ELFNOTE_GUEST_OS=6, XEN_ELFNOTE_PHYS32_ENTRY=18, DOMID_SELF=0x7FF0,
    XEN_HVM_START_MAGIC_VALUE=0x336EC578, XEN_HVM_MEMMAP_TYPE_RAM=1,
    XEN_HVM_MEMMAP_TYPE_RESERVED=2,
    XENCONS_IN_SIZE=1024, XENCONS_OUT_SIZE=2048, XENCONS_CONNECTED=0, XENCONS_DISCONNECTED=1,
    XS_CONTROL=0, XS_DIRECTORY=1, XS_READ=2, XS_GET_PERMS=3, XS_WATCH=4, XS_UNWATCH=5,
    XS_TRANSACTION_START=6, XS_TRANSACTION_END=7, XS_INTRODUCE=8, XS_RELEASE=9,
    XS_GET_DOMAIN_PATH=10, XS_WRITE=11, XS_MKDIR=12, XS_RM=13, XS_SET_PERMS=14,
    XS_WATCH_EVENT=15, XS_ERROR=16, XS_IS_DOMAIN_INTRODUCED=17, XS_RESUME=18,
    XS_SET_TARGET=19, XS_RESET_WATCHES=21, XS_DIRECTORY_PART=22,
    XENSTORE_PAYLOAD_MAX=4096, XENSTORE_ABS_PATH_MAX=3072, XENSTORE_REL_PATH_MAX=2048,
    XENSTORE_RING_SIZE=1024, XENSTORE_SERVER_FEATURE_RECONNECTION=1,
    XENSTORE_SERVER_FEATURE_ERROR=2, XENSTORE_CONNECTED=0, XENSTORE_RECONNECT=1,
    XENSTORE_ERROR_NONE=0, XENSTORE_ERROR_COMM=1, XENSTORE_ERROR_RINGIDX=2,
    XENSTORE_ERROR_PROTO=3,
    NETTXF_csum_blank=1, NETTXF_data_validated=2, NETTXF_more_data=4, NETTXF_extra_info=8,
    NETRXF_data_validated=1, NETRXF_csum_blank=2, NETRXF_more_data=4, NETRXF_extra_info=8,
    NETIF_RSP_DROPPED=-2, NETIF_RSP_ERROR=-1, NETIF_RSP_OKAY=0, NETIF_RSP_NULL=1,
    XEN_NETIF_EXTRA_FLAG_MORE=1,
)


def test_numbers_match_xen():
    for name, value in XEN_NUMBERS.items():
        assert getattr(C, name) == value, name


def test_hypercall_numbers_are_dense_and_named():
    assert sorted(abi.HYPERCALL_NAMES) == [n for n in range(43) if n != 11]
    assert abi.HYPERCALL_NAMES[18] == "console_io"


def test_the_extension_holds_exactly_what_the_header_says():
    """abi reads numbers and layouts from hypervisor._hv, not from a parse of the header:
    a parse of the header now (cffi's own cdef, as abi once did at every start) must
    agree with it on every constant and every struct field."""
    import re

    import cffi

    parsed = cffi.FFI()
    parsed.cdef(abi.cdef_source())
    names = re.findall(r"^\s*#define\s+(\w+)\s", abi.cdef_source(), re.M)
    header_lib = parsed.dlopen(None)
    assert abi.CONSTANTS == {name: getattr(header_lib, name) for name in names}
    for s in abi.struct_names():
        t = parsed.typeof(f"struct {s}")
        assert [(n, f.offset, parsed.sizeof(f.type)) for n, f in t.fields] == abi.struct_fields(s)
        assert parsed.sizeof(t) == abi.sizeof(s)


def test_an_extension_built_from_another_header_is_refused(tmp_path, monkeypatch):
    changed = tmp_path / "xen_abi.h"
    changed.write_bytes(abi.HEADER.read_bytes().replace(b"XEN_EFAULT", b"XEN_EFAULT_X", 1))
    monkeypatch.setattr(abi, "HEADER", changed)
    with pytest.raises(ImportError, match="changed since hypervisor._hv was built from it"):
        abi._check_build()
