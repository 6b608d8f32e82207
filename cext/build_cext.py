"""cffi build script for trapless's C extension, `hypervisor._hv` (out-of-line API mode).

The cdef is the ABI header plus the extension's API header, read from the files the
C code includes, so Python and C see one definition of every number and struct.
"""
import re
import zlib
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = ["guest_mem.c", "hypercall.c", "console.c", "version.c", "sched.c", "domain.c", "kvm.c", "kvm_emul.c",
           "memory.c", "mm.c", "multicall.c", "events.c", "timers.c",
           "devices.c", "dev_uart.c", "dev_pit.c", "dev_pic.c", "dev_rtc.c",
           "dev_exit.c", "dev_ptw.c", "dev_lapic.c", "vcpu.c",
           "bt.c", "bt_cpu.c", "bt_decode.c", "bt_uc.c", "bt_platform.c", "pvh.c",
           "pv_region.c", "pv_traps.c", "pv_emul.c", "pv_desc.c", "pv_ctrl.c", "pv_debug.c", "bt_pv.c",
           "bt_debug.c", "bt_twin.c", "vcpu_op.c"]
SOURCES += ["console_ring.c", "xenstore.c", "backend.c", "blkback.c", "netback.c"]  # backends
SOURCES += ["xen_cpuid.c"]
SOURCES += ["grant_table.c"]


def cdef_part(path: Path) -> str:
    m = re.search(r"/\* cdef-begin \*/(.*)/\* cdef-end \*/", path.read_text(), re.S)
    if not m:
        raise SystemExit(f"{path}: cdef markers missing")
    return m.group(1)


HEADER = ROOT / "abi" / "xen_abi.h"
# abi/__init__.py reads constants and layouts from this module instead of parsing the
# header; the header's CRC-32, which abi/__init__.py compares with the file's, lets it
# refuse a module built from another version of the header.
CHECKSUM = zlib.crc32(HEADER.read_bytes())

ffibuilder = FFI()
ffibuilder.cdef(cdef_part(HEADER) + cdef_part(HERE / "hv_api.h") + cdef_part(HERE / "grant_table.h")
                + "#define TRAPLESS_ABI_CHECKSUM ...\n")
ffibuilder.set_source(
    "hypervisor._hv",
    f'#include "hv.h"\n#define TRAPLESS_ABI_CHECKSUM {CHECKSUM}u\n',
    sources=[str((HERE / s).relative_to(ROOT)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(ROOT)), "abi"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    libraries=["pthread", "dl"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose=True)
