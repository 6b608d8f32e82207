"""console_io (18): CONSOLEIO_write and CONSOLEIO_read, good and bad arguments."""
from abi import C

from guest_kernel.asm import rbx
from guest_kernel.conformance import (MAPPED_END, NON_CANONICAL, NULL, UNMAPPED,
                                      ConformanceGuest)

EFAULT, ENOSYS = -C.XEN_EFAULT, -C.XEN_ENOSYS
WRITE, READ = C.CONSOLEIO_write, C.CONSOLEIO_read


def write_guest() -> bytes:
    g = ConformanceGuest("console_write")
    msg = g.string("hello, console\n")
    g.call("write_ok", "console_io", WRITE, 15, msg)
    g.call("write_zero", "console_io", WRITE, 0, NULL)
    g.call("write_null", "console_io", WRITE, 4, NULL)
    g.call("write_noncanonical", "console_io", WRITE, 4, NON_CANONICAL)
    g.call("write_unmapped", "console_io", WRITE, 4, UNMAPPED)
    g.call("write_straddles_end", "console_io", WRITE, 16, MAPPED_END - 8)
    g.call("write_filtered", "console_io", WRITE, 7, g.string("a\x01b\x7f\tc\n"))
    g.call("bad_cmd", "console_io", 7, 4, msg)
    return g.finish()


def test_console_write(run_cases):
    run = run_cases(write_guest())
    assert run.domain.layout.region_end == MAPPED_END
    assert run["write_ok"] == 0
    assert "hello, console\n" in run.console
    assert run["write_zero"] == 0
    for case in ("write_null", "write_noncanonical", "write_unmapped", "write_straddles_end"):
        assert run[case] == EFAULT, case
    # Xen keeps printable characters, newline and tab for an unprivileged domain.
    assert run["write_filtered"] == 0
    assert "ab\tc\n" in run.console
    assert run["bad_cmd"] == ENOSYS


def read_guest() -> bytes:
    g = ConformanceGuest("console_read")
    g.fill("scratch", 16, 0xAA)
    g.call("read_into_null", "console_io", READ, 8, NULL)
    g.start_info_field(rbx, "pt_base")          # a page table: the hypervisor's, never written
    g.call("read_into_page_table", "console_io", READ, 8, rbx)
    g.call("read_straddles_end", "console_io", READ, 16, MAPPED_END - 8)
    g.call("read_5", "console_io", READ, 5, "scratch")
    g.dump("read_5", "scratch", 8)
    g.call("read_rest", "console_io", READ, 64, "scratch")
    g.dump("read_rest", "scratch", 8)
    g.call("read_empty", "console_io", READ, 64, "scratch")
    return g.finish()


def test_console_read(run_cases):
    run = run_cases(read_guest(), console_input=b"hello world")
    # A read with a bad buffer fails and loses none of the input.
    assert run["read_into_null"] == EFAULT
    assert run["read_into_page_table"] == EFAULT
    assert run["read_straddles_end"] == EFAULT
    assert run["read_5"] == 5
    assert run.dumps["read_5"] == b"hello" + b"\xaa" * 3
    assert run["read_rest"] == 6
    assert run.dumps["read_rest"] == b" world\xaa\xaa"
    assert run["read_empty"] == 0
