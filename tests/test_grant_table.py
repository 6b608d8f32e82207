"""The grant API trapless's own backends use (cext/grant_table.h): a frontend domain
grants a page in its grant table; the backend acquires it (Xen's checks, GTF_reading /
GTF_writing set in the entry while in use), reads and writes it through a host pointer,
and releases it. The granted page outlives its domain while a backend holds it."""
import pytest

from abi import C, ffi
from guest_kernel.xen_pv import XenPVGuest
from hypervisor._hv import lib

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
