"""`python -m hypervisor`: run a domain, or measure the hypercall path.

Exit status of `run` (also in README.md):
  0 poweroff · 2 bad usage, bad image or no usable engine · 3 reboot · 4 suspend ·
  5 crash · 6 watchdog · 7 soft_reset · 8 guest fault (triple fault, unhandled exit) ·
  9 timed out (--timeout) · 130 stopped by SIGINT (Ctrl-C) · 143 stopped by SIGTERM
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from pathlib import Path

from abi import C

from .engines import ENGINES
from .errors import TraplessError

EXIT_USAGE = 2
EXIT_FAULT = 8
EXIT_TIMEOUT = 9
EXIT_BY_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}   # 128 + the signal, as shells say
EXIT_BY_SHUTDOWN = {
    C.SHUTDOWN_poweroff: 0, C.SHUTDOWN_reboot: 3, C.SHUTDOWN_suspend: 4,
    C.SHUTDOWN_crash: 5, C.SHUTDOWN_watchdog: 6, C.SHUTDOWN_soft_reset: 7,
}
STATUS_HELP = ("exit status: 0 poweroff, 2 usage/image/engine error, 3 reboot, 4 suspend, "
               "5 crash, 6 watchdog, 7 soft_reset, 8 guest fault, 9 timed out, "
               "130 SIGINT, 143 SIGTERM")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before there was a guest to stop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse's own errors are usage errors: one line, status 2.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def stats_table(domain):
    """The exit and hypercall counters of `run --stats`, as a rich Table."""
    from rich.table import Table     # here, not at the top: rich's import is a large part
                                     # of a cold start, and only --stats needs it

    counters = domain.counters()
    table = Table(title=f"{domain.name}: exits and hypercalls ({domain.engine})")
    table.add_column("counter")
    table.add_column("count", justify="right")
    for reason, n in counters.exits.items():
        if n:
            table.add_row(f"exit: {reason}", str(n))
    table.add_row("exits in total", str(counters.total_exits), style="bold")
    for name, n in sorted(counters.hypercalls.items()):
        errors = counters.hypercall_errors.get(name, 0)
        table.add_row(f"hypercall: {name}", f"{n}" + (f" ({errors} failed)" if errors else ""))
    if counters.unknown_port_io:
        table.add_row("unclaimed port I/O", str(counters.unknown_port_io))
    devices = domain.device_stats()
    for name, value in (devices or {}).items():
        if name == "port_io":
            for device, n in zip(("uart", "pit", "pic", "rtc", "exit"), value):
                if n:
                    table.add_row(f"device: {device} port accesses", str(n))
        elif value and not name.startswith("pte_last") and name != "exit_value":
            table.add_row(f"device: {name.replace('_', ' ')}", str(value))
    if counters.upcalls:
        table.add_row("upcalls injected", str(counters.upcalls))
    if counters.blocks:
        table.add_row("sleeps (block, poll, hlt)", str(counters.blocks))
    return table


def say_engine_fallback(args, domain=None) -> None:
    """No engine asked for and the best one is missing: one line saying which runs instead
    (printed once a domain is about to run, so an error stays the only line). A PVH
    domain says why kvm cannot run it here (e.g. its vmcall/vmmcall)."""
    if domain is not None and getattr(domain, "engine_note", None):
        print(f"trapless: {domain.engine_note}", file=sys.stderr)
    elif getattr(args, "engine", "") is None:
        from .engines import fallback_note
        note = fallback_note()
        if note:
            print(f"trapless: {note}", file=sys.stderr)


def cmd_run(args) -> int:
    from .domain import Domain

    if args.image is None and args.native:
        from guest_kernel.native_kernel import build_native_kernel
        image = build_native_kernel()
    elif args.image is None:
        from guest_kernel.pv_kernel import build_pv_kernel
        image = build_pv_kernel()
    else:
        image = args.image

    stdout_open = True

    def to_stdout(chunk: bytes) -> None:
        nonlocal stdout_open
        if not stdout_open:
            return
        try:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # The reader went away (`... | head`): the guest runs on, its output is dropped,
            # and stdout points at /dev/null so the final flush at exit is quiet too.
            stdout_open = False
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    # SIGINT and SIGTERM stop the guest; the domain is then torn down as after any stop.
    signalled: list[int] = []
    running: list = []

    def on_signal(signum, frame):
        if not signalled:
            signalled.append(signum)
        if not running:
            raise Interrupted(signum)       # still building: unwinding frees what exists
        try:
            running[0].stop()
        except TraplessError:
            pass                            # already on its way down

    ramdisk = None
    if args.ramdisk is not None:
        from .errors import ImageError
        try:
            with open(args.ramdisk, "rb") as f:
                ramdisk = f.read()
        except OSError as e:
            raise ImageError(f"{args.ramdisk}: cannot read the ramdisk ({e.strerror})") from None

    previous = {s: signal.signal(s, on_signal) for s in EXIT_BY_SIGNAL}
    try:
        # the output streams to stdout and nothing of it is kept (console_keep=0)
        with Domain(image, memory_mib=args.memory, cmdline=args.cmdline, engine=args.engine,
                    on_console=to_stdout, native=args.native, console_keep=0,
                    guest_type=args.type, ramdisk=ramdisk, disks=args.disk,
                    vcpus=args.vcpus) as dom:
            say_engine_fallback(args, dom)
            running.append(dom)
            stop = dom.run(timeout=args.timeout)
            if args.stats:
                from rich.console import Console
                Console().print(stats_table(dom))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    err = sys.stderr
    if signalled:
        name = signal.Signals(signalled[0]).name
        print(f"trapless: {dom.name} stopped by {name} (rip={stop.rip:#x})", file=err)
        return EXIT_BY_SIGNAL[signalled[0]]
    if stop.kind == "shutdown":
        status = EXIT_BY_SHUTDOWN.get(stop.reason, EXIT_FAULT)
        if status:
            why = f" ({stop.message})" if stop.message not in ("", "shutdown") else ""
            print(f"trapless: {dom.name} shut down: {stop.shutdown_name}{why}", file=err)
        return status
    if stop.kind == "stopped":
        print(f"trapless: {dom.name} {stop.message} (rip={stop.rip:#x})", file=err)
        return EXIT_TIMEOUT
    print(f"trapless: {dom.name} guest fault: {stop.message} at rip={stop.rip:#x}", file=err)
    return EXIT_FAULT


def cmd_bench(args) -> int:
    from .bench import main as bench_main
    say_engine_fallback(args)
    return bench_main(args)


def cmd_compare(args) -> int:
    from .compare import main as compare_main
    return compare_main(args)


def cmd_conformance(args) -> int:
    from .conformance import main as conformance_main
    return conformance_main(args)


def seconds(text: str) -> float:
    """--timeout: a finite number of seconds above 0 (inf, nan and -1 are mistakes, and
    the thread waits of run() take nothing above threading.TIMEOUT_MAX)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= threading.TIMEOUT_MAX):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of seconds "
                                         f"above 0 (at most {threading.TIMEOUT_MAX:.0f})")
    return value


def count(text: str) -> int:
    """A whole number above 0 (iterations, samples, fuzz calls)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number above 0")
    return value


def domain_count(text: str) -> int:
    """--domains, --ticking: 0 (skip) up to the domids a process can give guests."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 32750:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number from 0 to 32,750")
    return value


def seed(text: str) -> int:
    """--seed: a number, decimal or 0x hex, as the conformance report prints it."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number (decimal or 0x...)") from None


def cmdline(text: str) -> str:
    """--cmdline: what the guest can be given (UTF-8, below Xen's MAX_GUEST_CMDLINE)."""
    from .builder import cmdline_problem
    why = cmdline_problem(text)
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def vcpus(text: str) -> int:
    """--vcpus: how many vCPUs, as a config file's `vcpus =` is checked."""
    from .domain import MAX_VCPUS
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number") from None
    if not 1 <= n <= MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"{n}: must be between 1 and {MAX_VCPUS}")
    return n


def disk(spec: str):
    """--disk: one disk in xl's syntax (a relative target is relative to the current
    directory), checked as a config file's `disk = [...]` entry is."""
    from .config import parse_disk
    try:
        return parse_disk(spec, Path.cwd())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{spec!r}: {e}") from None


def output_file(path: str) -> str:
    """--json PATH: checked before the minutes of measuring, not when writing at the end."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r}: is a directory")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{path!r}: no such directory {folder}")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path!r}: cannot write in {folder}")
    return path


def workload(name: str) -> str:
    """--workload's check: the workloads are imported only when the option is used, as
    building every parser must not cost `run` the import of every compare guest."""
    from guest_kernel.compare_workloads import WORKLOADS
    if name not in WORKLOADS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from "
                                         f"{', '.join(map(repr, WORKLOADS))})")
    return name


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m hypervisor", description="trapless: a paravirtualized hypervisor "
                "with a Xen-style hypercall ABI", epilog=STATUS_HELP)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run one domain", epilog=STATUS_HELP)
    run.add_argument("image", nargs="?", help="kernel ELF image, PV or PVH (default: the "
                     "built-in PV kernel)")
    run.add_argument("--memory", type=int, default=64, metavar="MIB", help="guest memory (default 64)")
    run.add_argument("--engine", choices=list(ENGINES), help="engine (default: best available)")
    run.add_argument("--vcpus", type=vcpus, default=1, metavar="N",
                     help="vCPUs the domain has (default 1): vCPU 0 boots, the others wait "
                          "down for the guest's VCPUOP_initialise")
    run.add_argument("--cmdline", default="", type=cmdline, metavar="TEXT",
                     help="guest command line (UTF-8, at most 1023 bytes)")
    run.add_argument("--stats", action="store_true", help="print exit and hypercall counters")
    run.add_argument("--native", action="store_true",
                     help="a native (unmodified) kernel: give it the emulated PC devices "
                          "(default image: the built-in native kernel)")
    run.add_argument("--timeout", type=seconds, metavar="SECONDS",
                     help="stop the guest after this long (exit status 9)")
    run.add_argument("--type", choices=["pv", "pvh"],
                     help="boot the image as a PV or a PVH guest (default: an image with only "
                          "a PHYS32_ENTRY note is PVH, any other PV)")
    run.add_argument("--ramdisk", metavar="PATH",
                     help="an initramfs (PVH: hvm_start_info module 0; PV: start_info.mod_start)")
    run.add_argument("--disk", type=disk, action="append", metavar="SPEC",
                     help="a virtual block device, in xl's disk syntax (as a config file's "
                          "disk = [...]), e.g. 'format=raw, vdev=xvda, access=rw, "
                          "target=disk.img'; may be given more than once")
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="hypercall vs bare exit, event latency, batching, both engines")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--iterations", type=count, default=100_000,
                       help="hypercalls and bare exits per round (default 100,000)")
    bench.add_argument("--samples", type=count, default=500,
                       help="timers and upcalls to time (default 500)")
    bench.add_argument("--engine", choices=list(ENGINES))
    bench.add_argument("--rounds", type=count,
                       help="alternating rounds of the PV CPU model's rows, median reported "
                            "(default 9)")
    bench.add_argument("--pv-paths", action="store_true",
                       help="only the PV CPU model's rows (bare exit, hypercall, bounces)")
    bench.add_argument("--domains", type=domain_count, default=1000, metavar="N",
                       help="blocked domains to create at once for the scale figures "
                            "(default 1,000; 0 skips them)")
    bench.add_argument("--ticking", type=domain_count, default=100, metavar="N",
                       help="PV kernels ticking at 100 Hz on bt for 10 s (default 100; 0 skips)")
    bench.set_defaults(func=cmd_bench)

    conf = sub.add_parser("conformance", help="run the hypercall ABI conformance suite, with a report")
    conf.add_argument("--json", metavar="PATH", type=output_file,
                      help="write one JSON record per checked case")
    conf.add_argument("--fuzz-calls", type=count, default=100_000, metavar="N",
                      help="random hypercalls the fuzz case makes per engine (default 100,000)")
    conf.add_argument("--seed", type=seed, metavar="SEED",
                      help="replay the fuzz case with this seed")
    conf.set_defaults(func=cmd_conformance)

    compare = sub.add_parser("compare", help="every workload as a PV and a native guest: "
                             "exits, wall time, native/pv ratios")
    compare.add_argument("--json", metavar="PATH", type=output_file,
                         help="write one JSON record per run")
    compare.add_argument("--engine", choices=list(ENGINES), help="only this engine "
                         "(default: every engine this host can run)")
    compare.add_argument("--workload", action="append", type=workload,
                         help="only this workload (repeatable; default: all)")
    compare.add_argument("--quick", action="store_true",
                         help="small versions of the workloads (seconds, not a minute)")
    compare.set_defaults(func=cmd_compare)

    from .xtf import add_parser as add_xtf_parser
    add_xtf_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as e:
        print(f"trapless: interrupted by {e} before the guest ran", file=sys.stderr)
        return EXIT_BY_SIGNAL[e.signum]
    except TraplessError as e:
        print(f"trapless: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("trapless: interrupted by SIGINT", file=sys.stderr)
        return EXIT_BY_SIGNAL[signal.SIGINT]
