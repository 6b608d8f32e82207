"""The Python view of trapless's hypercall ABI, derived from abi/xen_abi.h.

Every number and layout comes from the C header: the C extension `hypervisor._hv` is
compiled from it (cext/build_cext.py hands the header's cdef part to cffi), so its `ffi`
knows every struct as the C compiler lays it out and its `lib` every #define. Python
reads them there rather than parsing the header with pycparser at every start, which
cost most of a cold start. The names are still found in the header itself, and the
build stores a checksum of the header in the extension: an extension built from another
version of the header is refused, never trusted. `C` holds the integer constants
(C.__HYPERVISOR_console_io, C.XEN_EFAULT, ...), `ffi` the struct layouts
(ffi.sizeof / ffi.offsetof).
"""
from __future__ import annotations

import re
import zlib
from pathlib import Path

from hypervisor._hv import ffi, lib

HEADER = Path(__file__).with_name("xen_abi.h")


def cdef_source(path: Path = HEADER) -> str:
    """The part of the header between the cdef markers: what cffi parses."""
    text = path.read_text()
    m = re.search(r"/\* cdef-begin \*/(.*)/\* cdef-end \*/", text, re.S)
    if not m:
        raise RuntimeError(f"{path}: cdef markers missing")
    return m.group(1)


def _check_build() -> None:
    # getattr: an extension from before the checksum existed is stale as well
    if getattr(lib, "TRAPLESS_ABI_CHECKSUM", None) != zlib.crc32(HEADER.read_bytes()):
        raise ImportError(f"{HEADER} changed since hypervisor._hv was built from it: "
                          f"rebuild it (make setup)")


_check_build()
# Integer #defines: their names from the header, their values as the C compiler saw them.
CONSTANTS: dict[str, int] = {name: getattr(lib, name) for name in
                             re.findall(r"^\s*#define\s+(\w+)\s", cdef_source(), re.M)}


class _Constants:
    """Attribute access to the header's constants: C.XEN_EFAULT."""

    def __getattr__(self, name: str) -> int:
        try:
            return CONSTANTS[name]
        except KeyError:
            raise AttributeError(f"abi/xen_abi.h defines no {name}") from None

    def prefixed(self, prefix: str) -> dict[str, int]:
        """{suffix: value} of every constant starting with prefix."""
        return {k[len(prefix):]: v for k, v in CONSTANTS.items() if k.startswith(prefix)}


C = _Constants()

# Derived name tables (number -> name), for tracing and reports.
HYPERCALL_NAMES: dict[int, str] = {v: k for k, v in C.prefixed("__HYPERVISOR_").items()}
ERRNO_NAMES: dict[int, str] = {v: k[4:] for k, v in CONSTANTS.items()
                              if re.fullmatch(r"XEN_E[A-Z0-9]+", k)}
SHUTDOWN_NAMES: dict[int, str] = {v: k for k, v in C.prefixed("SHUTDOWN_").items()}


def offsetof(struct: str, field: str) -> int:
    return ffi.offsetof(f"struct {struct}", field)


def sizeof(struct: str) -> int:
    return ffi.sizeof(f"struct {struct}")


def struct_fields(struct: str) -> list[tuple[str, int, int]]:
    """[(field, offset, size)] of a header struct, in declaration order."""
    t = ffi.typeof(f"struct {struct}")
    return [(name, f.offset, ffi.sizeof(f.type)) for name, f in t.fields]


def struct_names() -> list[str]:
    return re.findall(r"^struct\s+(\w+)\s*\{", cdef_source(), re.M)
