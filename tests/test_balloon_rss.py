"""The balloon really gives memory back: a guest writes 32 MiB, unmaps it and hands it back
with decrease_reservation, and the host process holds that much less; populated again,
the frames read as zero and cost memory only once written.

The guest stops at checkpoints (it waits for a byte on its console) so the host can look
at the residency of guest RAM (mincore) and the process's VmRSS at each stage.
"""
import re
import time

from abi import C

from conformance.mm_guest import PAGE, PTE_P, PTE_RW, MMGuest, audit, resident_pages
from guest_kernel.conformance import parse

MIB = 32
PAGES = MIB * 256
TABLES = MIB // 2                   # one L1 table maps 2 MiB
BASE = 0x80_0000                    # guest-physical = guest-virtual start of the 32 MiB
SLOT = BASE >> 21                   # its first L2 slot
MEMORY_MIB = 64
N = (MEMORY_MIB << 20) // PAGE
CHECKPOINTS = ("touched", "released", "read", "rewritten")


def balloon_guest() -> bytes:
    g = MMGuest("balloon_rss")
    prw = PTE_P | PTE_RW

    def link(case: str, on: bool) -> None:
        # L2[SLOT + t] = spare(t): spare tables are consecutive frames going down.
        g.fill_reqs(TABLES, MMGuest.var("mm_l2", SLOT * 8), MMGuest.spare(0, prw) if on else 0,
                    ptr_step=8, val_step=-PAGE if on else 0)
        g.mmu_batch(case, TABLES)

    def current(case: str) -> None:
        g.call(case, "memory_op", C.XENMEM_current_reservation, "mm_domid")

    for t in range(TABLES):     # written while unused, checked when linked
        g.fill_reqs(512, MMGuest.spare(t), (BASE + (t << 21)) | prw)
        g.mmu_batch(f"fill{t}", 512)
    link("link", True)
    g.touch_pages(BASE, PAGES, 1)
    current("cur.touched")
    g.wait_for_host("touched")

    link("unlink", False)
    g.mmuext("flush", C.MMUEXT_TLB_FLUSH_LOCAL)
    g.set_extents([(BASE >> 12) + 512 * t for t in range(TABLES)])
    g.reservation("decrease", C.XENMEM_decrease_reservation, TABLES, order=9)
    current("cur.released")
    g.wait_for_host("released")

    g.reservation("populate", C.XENMEM_populate_physmap, TABLES, order=9)
    current("cur.populated")
    link("relink", True)
    # Reading a page that was never written is slow on some hosts (each read of the
    # shared zero page may fault): every page's first word, and a few whole pages.
    g.check_pages("nonzero_pages", BASE, PAGES, None, words=1)
    g.check_pages("nonzero_whole_pages", BASE, 8, None)
    g.wait_for_host("read")
    g.touch_pages(BASE, PAGES, 1)
    g.check_pages("rewritten_wrong", BASE, PAGES, 1)
    g.wait_for_host("rewritten")
    return g.finish()


def vm_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def wait_for_line(dom, line: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while line not in dom.console_output.decode(errors="replace"):
        assert dom.stop_info is None, f"guest stopped: {dom.stop_info}\n{dom.console_output.decode()}"
        assert time.monotonic() < deadline, f"no {line!r}:\n{dom.console_output.decode()}"
        time.sleep(0.005)


def test_balloon_returns_memory_to_the_host(engine):
    from hypervisor.domain import Domain

    dom = Domain(balloon_guest(), memory_mib=MEMORY_MIB, engine=engine)
    try:
        dom.start()
        resident, rss = {}, {}
        for name in CHECKPOINTS:
            wait_for_line(dom, f"checkpoint {name}\n")
            resident[name] = resident_pages(dom)
            rss[name] = vm_rss_kib()
            assert dom.send_input(b"x") == 1
        stop = dom.wait(30)
        assert (stop.kind, stop.reason) == ("shutdown", 0), stop
        results, _ = parse(dom.console_output.decode())

        assert all(results[f"fill{t}"] == 0 for t in range(TABLES))
        assert results["link"] == 0 and results["unlink"] == 0 and results["relink"] == 0
        assert results["decrease"] == TABLES and results["populate"] == TABLES
        assert results["cur.touched"] == N
        assert results["cur.released"] == N - PAGES
        assert results["cur.populated"] == N
        assert results["nonzero_pages"] == 0            # populated again: all zero
        assert results["nonzero_whole_pages"] == 0
        assert results["rewritten_wrong"] == 0

        # Every page given back left the host; rewriting brings them back.
        slack = 64
        assert resident["touched"] - resident["released"] >= PAGES - slack, resident
        assert resident["rewritten"] - resident["released"] >= PAGES - slack, resident
        assert rss["touched"] - rss["released"] >= MIB * 1024 * 3 // 4, rss
        assert rss["rewritten"] - rss["released"] >= MIB * 1024 * 3 // 4, rss
        assert audit(dom) == ""
    finally:
        dom.destroy()
