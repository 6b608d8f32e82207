"""The PV kernel's interactive mode: a person types lines into its PV console ring and the
kernel answers there; between lines it sleeps (the console port wakes it), it does not
spin."""
import time

import pytest

from abi import C
from guest_kernel.pv_kernel import build_pv_kernel
from hypervisor.domain import Domain

from helpers import wait_for


@pytest.fixture(scope="module")
def image() -> bytes:
    return build_pv_kernel()



def type_line(dom: Domain, line: bytes) -> str:
    """Type line + Enter and return what the kernel printed in answer, up to its next prompt."""
    start = len(dom.console_output)
    assert dom.send_input(line + b"\r") == len(line) + 1
    assert wait_for(lambda: dom.console_output[start:].endswith(b"pv> ")), \
        dom.console_output[start:]
    return dom.console_output[start:].decode()


def test_the_kernel_answers_each_command(engine, image):
    with Domain(image, memory_mib=16, cmdline="console=hvc0 interactive", engine=engine) as dom:
        dom.start()
        assert wait_for(lambda: dom.console_output.endswith(b"pv> "))
        assert dom.console_output.decode() == (
            "trapless PV kernel: Xen 4.19.0-trapless\n"
            "command line: console=hvc0 interactive\n"
            "interactive mode: type help for the commands\n"
            "pv> ")
        assert type_line(dom, b"echo hello, guest") == "echo hello, guest\nhello, guest\npv> "
        assert type_line(dom, b"mem") == (
            "mem\nmem: current 4096 pages (16 MiB), maximum 4096 pages (16 MiB)\npv> ")
        assert type_line(dom, b"  help") == (
            "  help\ncommands: echo TEXT, ticks, mem, shutdown [poweroff|reboot|crash], help\n"
            "pv> ")
        assert type_line(dom, b"reboot now") == (
            "reboot now\nunknown command: reboot now (try help)\npv> ")
        assert type_line(dom, b"shutdown later") == (
            "shutdown later\nshutdown: unknown reason later (poweroff, reboot or crash)\npv> ")
        assert type_line(dom, b"") == "\npv> "
        first = int(type_line(dom, b"ticks").split("ticks: ")[1].split("\n")[0])
        time.sleep(0.2)
        second = int(type_line(dom, b"ticks").split("ticks: ")[1].split("\n")[0])
        assert 5 <= second - first <= 40          # 100 Hz: about 20 in 0.2 s
        dom.send_input(b"shutdown crash\r")
        stop = dom.wait(10)
        assert (stop.kind, stop.reason) == ("shutdown", C.SHUTDOWN_crash)
        assert dom.console_output.endswith(b"pv> shutdown crash\nshutting down: crash\n")
        # a Xen domU's console: the ring both ways, console_io not once
        assert dom.counters().hypercalls.get("console_io", 0) == 0


def test_editing_keys_crlf_and_early_input(engine, image):
    with Domain(image, memory_mib=16, cmdline="interactive", engine=engine) as dom:
        # typed before the kernel listens: waits in the ring, nothing is lost
        dom.send_input(b"echo early\r\n")
        dom.start()
        assert wait_for(lambda: b"early\npv> " in dom.console_output)
        out = type_line(dom, b"echo abX\x7fc\x01")   # DEL rubs out X; other control keys are ignored
        assert out == "echo abX\npv> echo abc\nabc\npv> "     # the line redrawn, then c
        dom.send_input(b"shutdown\r")
        stop = dom.wait(10)
        assert (stop.kind, stop.reason) == ("shutdown", C.SHUTDOWN_poweroff)
        assert dom.console_output.endswith(b"early\npv> echo abX\npv> echo abc\nabc\n"
                                           b"pv> shutdown\nshutting down: poweroff\n")


def test_idle_interactive_kernel_blocks_instead_of_spinning(engine, image):
    with Domain(image, memory_mib=16, cmdline="interactive", engine=engine) as dom:
        dom.start()
        assert wait_for(lambda: dom.console_output.endswith(b"pv> "))
        c0, cpu0, t0 = dom.counters(), dom.cpu_ns, time.monotonic()
        time.sleep(0.5)
        c1, cpu1, wall = dom.counters(), dom.cpu_ns, time.monotonic() - t0
        blocks = c1.blocks - c0.blocks
        # one SCHEDOP_block per 100 Hz tick and no console reads without an event
        assert 0.5 * 100 * wall <= blocks <= 1.5 * 100 * wall
        assert c1.hypercalls.get("console_io", 0) == c0.hypercalls.get("console_io", 0)
        assert (cpu1 - cpu0) / 1e9 < 0.3 * wall
        assert dom.vcpu_state == "blocked" or wait_for(lambda: dom.vcpu_state == "blocked")
