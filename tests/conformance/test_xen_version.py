"""xen_version (17): every sub-op, good and bad arguments."""
import struct

from abi import C

from guest_kernel.asm import rbx
from guest_kernel.conformance import MAPPED_END, NON_CANONICAL, NULL, ConformanceGuest

EFAULT, EINVAL, EPERM, ENOSYS = (-C.XEN_EFAULT, -C.XEN_EINVAL, -C.XEN_EPERM, -C.XEN_ENOSYS)
BUFFER_SUBOPS = {  # sub-op: bytes it writes
    "extraversion": C.XEN_EXTRAVERSION_LEN,
    "compile_info": 144,
    "capabilities": C.XEN_CAPABILITIES_INFO_LEN,
    "changeset": C.XEN_CHANGESET_INFO_LEN,
    "platform_parameters": 8,
    "guest_handle": 16,
}


def version_guest() -> bytes:
    g = ConformanceGuest("xen_version")
    g.call("version", "xen_version", C.XENVER_version, 0)
    g.call("pagesize", "xen_version", C.XENVER_pagesize, 0)
    for name, size in BUFFER_SUBOPS.items():
        cmd = getattr(C, f"XENVER_{name}")
        g.fill("scratch", size, 0)
        g.call(name, "xen_version", cmd, "scratch")
        g.dump(name, "scratch", min(size, 64))
        g.call(f"{name}_null", "xen_version", cmd, NULL)
        g.call(f"{name}_noncanonical", "xen_version", cmd, NON_CANONICAL)
        g.start_info_field(rbx, "pt_base")
        g.call(f"{name}_page_table", "xen_version", cmd, rbx)
    # A buffer that runs off the mapped region: the call fails and writes nothing at all.
    g.fill(MAPPED_END - 8, 8, 0x5A)
    g.call("extraversion_straddles_end", "xen_version", C.XENVER_extraversion, MAPPED_END - 8)
    g.dump("extraversion_straddles_end", MAPPED_END - 8, 8)
    # get_features: submap_idx in, submap out
    g.fill("scratch", 8, 0)
    g.call("get_features", "xen_version", C.XENVER_get_features, "scratch")
    g.dump("get_features", "scratch", 8)
    g.call("get_features_bad_index", "xen_version", C.XENVER_get_features, "scratch_idx1")
    g.call("get_features_null", "xen_version", C.XENVER_get_features, NULL)
    g.call("commandline", "xen_version", C.XENVER_commandline, "scratch")
    g.call("build_id", "xen_version", C.XENVER_build_id, "scratch")
    g.call("unknown_cmd", "xen_version", 99, "scratch")
    g.call("negative_cmd", "xen_version", -1, "scratch")
    g.a.section(".data")
    g.a.label("scratch_idx1")
    g.a.dd(1, 0)
    g.a.section(".text")
    return g.finish()


def test_xen_version(run_cases):
    run = run_cases(version_guest())
    assert run["version"] == (4 << 16) | 19
    assert run["pagesize"] == 4096
    for name in BUFFER_SUBOPS:
        assert run[name] == 0, name
        for bad in ("null", "noncanonical", "page_table"):
            assert run[f"{name}_{bad}"] == EFAULT, f"{name}_{bad}"
    assert run.dumps["extraversion"] == b".0-trapless".ljust(16, b"\0")
    assert run.dumps["compile_info"].startswith(b"gcc ")
    assert run.dumps["capabilities"] == b"xen-3.0-x86_64".ljust(64, b"\0")
    assert run.dumps["changeset"].rstrip(b"\0").startswith(b"trapless")
    assert struct.unpack("<Q", run.dumps["platform_parameters"])[0] == 0xFFFF800000000000
    assert run.dumps["guest_handle"] == run.domain.uuid.bytes
    assert run["extraversion_straddles_end"] == EFAULT
    assert run.dumps["extraversion_straddles_end"] == b"\x5a" * 8
    assert run["get_features"] == 0
    idx, submap = struct.unpack("<II", run.dumps["get_features"])
    assert idx == 0
    # a kernel under Xen's PV model: Xen's three PV bits, preserve-A/D, highmem assist
    # and grant-map avail bits (a ring-0 kernel is told supervisor_mode_kernel and
    # hvm_callback_vector instead)
    assert submap == (1 << C.XENFEAT_mmu_pt_update_preserve_ad | 1 << C.XENFEAT_highmem_assist |
                      1 << C.XENFEAT_gnttab_map_avail_bits)
    assert run["get_features_bad_index"] == EINVAL
    assert run["get_features_null"] == EFAULT
    assert run["commandline"] == EPERM and run["build_id"] == EPERM
    assert run["unknown_cmd"] == ENOSYS and run["negative_cmd"] == ENOSYS
