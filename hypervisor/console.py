"""`python -m hypervisor.console`: an xl-style shell on one hypervisor running many domains.

    python -m hypervisor.console                       # interactive (history, tab completion)
    python -m hypervisor.console -c "create a.cfg; create b.cfg; list"   # for scripts

Commands are named as in xl where xl has them (create, list, console, pause, unpause,
destroy, top, trace, info, dmesg, help, quit; xenstore as the xenstore-* tools). An
error is one line and the shell goes on; quitting destroys every domain still there.
"""
from __future__ import annotations

import argparse
import cmd
import glob
import os
import platform
import queue
import select
import shlex
import signal
import sys
import termios
import textwrap
import time
import tty
from importlib import metadata

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from abi import C

from . import config, engines, xenstore
from ._hv import lib
from .errors import TraplessError
from .toolstack import (DomainRecord, Toolstack, ToolstackError, describe_call, describe_result,
                        rates)

PROMPT = "trapless> "
DETACH_KEY = 0x1D                   # Ctrl-]
REPLAY_LINES = 20                   # console lines shown again when attaching
TOP_INTERVAL = 1.0                  # seconds between `top` refreshes
TRACE_DEFAULT = 20
SCRIPT_WIDTH = 132                  # columns of tables printed to a pipe or a file
HISTORY_ENV = "TRAPLESS_HISTORY"    # the history file; empty: no history file

# name -> (usage, what it does); the order is the order of `help`
COMMANDS = {
    "create": ("create IMAGE|CONFIG [key=value ...]",
               "build a domain from a PV kernel image or an xl-style config file and start it; "
               "key=value words override the file (name, kernel, memory, maxmem, cmdline, "
               "extra, engine, vcpus, maxvcpus, type, on_poweroff, on_reboot, on_crash)"),
    "list": ("list", "the domains: id, name, state, memory, vCPU time, engine"),
    "console": ("console DOM", "attach to the domain's console: its output streams live and "
                "what you type goes to CONSOLEIO_read; Ctrl-] detaches"),
    "pause": ("pause DOM", "stop running the domain's vCPU until unpause"),
    "unpause": ("unpause DOM", "let a paused domain run again"),
    "destroy": ("destroy DOM", "stop the domain at once and free everything it had"),
    "top": ("top", "a live table of the domains (CPU%, exits/s, pending events, memory, "
            "hypercalls/s by name), refreshed every second; q leaves"),
    "trace": ("trace DOM [N]", f"the domain's last N hypercalls (default {TRACE_DEFAULT}, at "
              f"most {lib.HV_TRACE_ENTRIES}) with names, arguments and results"),
    "xenstore": ("xenstore ls [PATH] | read PATH | write PATH VALUE | rm PATH",
                 "the store the domains share, as dom0 sees it (xenstore-ls, -read, -write, "
                 "-rm): ls prints the tree below PATH (default /) as name = \"value\", rm "
                 "removes a node and everything below it"),
    "info": ("info", "engines, host, the Xen ABI version, this process"),
    "dmesg": ("dmesg", "the hypervisor's log: domains created, stopped, restarted, destroyed"),
    "sleep": ("sleep SECONDS", "wait (for scripts run with -c)"),
    "help": ("help [CMD]", "the commands, or one command in detail"),
    "quit": ("quit", "destroy every domain and leave (also Ctrl-D)"),
}


class UsageError(TraplessError):
    """A command typed with the wrong arguments."""


def split_commands(text: str) -> list[str]:
    """`create a.cfg; list` -> ["create a.cfg", "list"] (a ; inside quotes is text)."""
    commands, current, quote = [], [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in ";\n":
            commands.append("".join(current))
            current = []
            continue
        current.append(ch)
    commands.append("".join(current))
    return [c.strip() for c in commands if c.strip()]


# ---- the terminal ---------------------------------------------------------------------

def _raw(fd: int) -> None:
    """Raw input (every key as typed, no echo, no signals) but output still turns \\n
    into \\r\\n, so the guest's lines land at the left margin."""
    mode = termios.tcgetattr(fd)
    mode[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON)
    mode[2] = (mode[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    mode[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
    mode[6][termios.VMIN] = 1
    mode[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSAFLUSH, mode)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


# ---- the shell ------------------------------------------------------------------------

class Shell(cmd.Cmd):
    """One command per line. run() catches every error a person can cause."""

    prompt = PROMPT
    identchars = cmd.Cmd.identchars + "-"

    def __init__(self, toolstack: Toolstack, out: Console | None = None,
                 err: Console | None = None):
        super().__init__()
        self.ts = toolstack
        # Output to a pipe or file is not squeezed into rich's default 80 columns.
        width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else SCRIPT_WIDTH
        self.out = out or Console(highlight=False, emoji=False, width=width)
        self.err = err or Console(stderr=True, highlight=False, emoji=False, width=width)
        self.failed = False             # some command failed (the -c exit status)
        self.done = False               # quit was asked for

    # ---- running commands ----
    def run(self, line: str) -> bool:
        """Run one command line; False once the shell should end."""
        try:
            self.onecmd(line)
        except TraplessError as e:
            self.error(str(e))
        except KeyboardInterrupt:
            self.error("interrupted")
        return not self.done

    def error(self, message: str) -> None:
        self.failed = True
        self.err.print(f"error: {message}", markup=False, soft_wrap=True)

    def say(self, text: str) -> None:
        self.out.print(text, markup=False, soft_wrap=True)

    def emptyline(self) -> None:
        pass                            # not cmd's default of repeating the last command

    def default(self, line: str) -> None:
        if line == "EOF":               # Ctrl-D at the prompt
            self.done = True
            return
        raise UsageError(f"unknown command {line.split()[0]!r} (try help)")

    def _args(self, arg: str, command: str, least: int, most: int) -> list[str]:
        try:
            words = shlex.split(arg)
        except ValueError as e:
            raise UsageError(f"{command}: {e}") from None
        if not least <= len(words) <= most:
            raise UsageError(f"usage: {COMMANDS[command][0]}")
        return words

    def _domain(self, arg: str, command: str) -> DomainRecord:
        return self.ts.find(self._args(arg, command, 1, 1)[0])

    # ---- the commands ----
    def do_create(self, arg: str) -> None:
        words = self._args(arg, "create", 1, 64)
        if "=" in words[0] and not os.path.exists(words[0]):
            cfg = config.from_words(words)          # `create kernel=k.elf name=a`
        else:
            cfg = config.load(words[0], words[1:])
        rec = self.ts.create(cfg)
        self.say(f"created domain {rec.domid} ({rec.name})")

    def do_list(self, arg: str) -> None:
        self._args(arg, "list", 0, 0)
        table = Table(box=box.SIMPLE, pad_edge=False)
        for title, justify in (("ID", "right"), ("Name", "left"), ("State", "left"),
                               ("Mem (MiB)", "right"), ("VCPUs", "right"),
                               ("Time (s)", "right"), ("Engine", "left")):
            table.add_column(title, justify=justify)
        for row in self.ts.list():
            table.add_row(str(row.domid), row.name, row.state, str(row.memory_mib),
                          str(row.vcpus), f"{row.cpu_ns / 1e9:.3f}", row.engine)
        self.out.print(table)

    def do_pause(self, arg: str) -> None:
        rec = self._domain(arg, "pause")
        self.ts.pause(rec)
        self.say(f"domain {rec.domid} ({rec.name}) paused")

    def do_unpause(self, arg: str) -> None:
        rec = self._domain(arg, "unpause")
        self.ts.unpause(rec)
        self.say(f"domain {rec.domid} ({rec.name}) unpaused")

    def do_destroy(self, arg: str) -> None:
        rec = self._domain(arg, "destroy")
        domid = rec.domid
        self.ts.destroy(rec)
        self.say(f"domain {domid} ({rec.name}) destroyed")

    def do_console(self, arg: str) -> None:
        self.attach(self._domain(arg, "console"))

    def do_top(self, arg: str) -> None:
        self._args(arg, "top", 0, 0)
        self.top()

    def do_trace(self, arg: str) -> None:
        words = self._args(arg, "trace", 1, 2)
        rec = self.ts.find(words[0])
        last = TRACE_DEFAULT
        if len(words) == 2:
            if not words[1].isdigit() or not 1 <= int(words[1]) <= lib.HV_TRACE_ENTRIES:
                raise UsageError(f"trace: N = {words[1]!r}: must be a number from 1 to "
                                 f"{lib.HV_TRACE_ENTRIES}")
            last = int(words[1])
        entries = self.ts.trace(rec, last)
        table = Table(box=box.SIMPLE, pad_edge=False,
                      title=f"domain {rec.domid} ({rec.name}): last {len(entries)} hypercalls")
        for title, justify in (("#", "right"), ("+ms", "right"), ("hypercall", "left"),
                               ("result", "right")):
            table.add_column(title, justify=justify)
        t0 = entries[0].time_ns if entries else 0
        for e in entries:
            table.add_row(str(e.seq), f"{(e.time_ns - t0) / 1e6:.3f}", describe_call(e),
                          describe_result(e.ret))
        self.out.print(table)

    def do_xenstore(self, arg: str) -> None:
        words = self._args(arg, "xenstore", 1, 3)
        verb, rest = words[0], words[1:]
        wanted = {"ls": (0, 1), "read": (1, 1), "write": (2, 2), "rm": (1, 1)}
        if verb not in wanted or not wanted[verb][0] <= len(rest) <= wanted[verb][1]:
            raise UsageError(f"usage: {COMMANDS['xenstore'][0]}")
        path = rest[0] if rest else "/"
        try:
            if verb == "ls":
                self._xenstore_ls(path, 0)
            elif verb == "read":
                self.say(_printable(xenstore.read(path)))
            elif verb == "write":
                xenstore.write(path, rest[1])
            else:
                xenstore.rm(path)
        except xenstore.XenstoreError as e:
            raise ToolstackError(f"xenstore {verb} {path}: {e.error}") from None

    def _xenstore_ls(self, path: str, depth: int) -> None:
        for name in xenstore.directory(path):
            child = f"{path.rstrip('/')}/{name}"
            self.say(f"{'  ' * depth}{name} = \"{_printable(xenstore.read(child))}\"")
            self._xenstore_ls(child, depth + 1)

    def do_info(self, arg: str) -> None:
        self._args(arg, "info", 0, 0)
        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        try:
            version = metadata.version("trapless")
        except metadata.PackageNotFoundError:
            version = "(not installed)"
        table.add_row("trapless", f"{version} on Python {platform.python_version()}")
        uname = platform.uname()
        table.add_row("host", f"{uname.node}: {uname.system} {uname.release} {uname.machine}, "
                      f"{_cpu_model()}, {os.cpu_count()} CPUs")
        for name in engines.ENGINES:
            why = engines.why_unavailable(name)
            table.add_row(f"engine {name}", "available" if why is None else f"unavailable: {why}")
        try:
            xen = f"Xen {self.ts.hypervisor_version()} x86-64 PV (what xen_version tells a guest)"
        except TraplessError as e:
            xen = f"Xen x86-64 PV, version unknown: {e}"
        implemented = sum(1 for nr in range(C.TRAPLESS_NR_HYPERCALLS)
                          if lib.hv_hypercall_implemented(nr))
        table.add_row("ABI", xen)
        table.add_row("hypercalls", f"{implemented} of {C.TRAPLESS_NR_HYPERCALLS} implemented "
                      "(the rest answer -ENOSYS)")
        table.add_row("domains", str(len(self.ts.records())))
        table.add_row("process", f"pid {os.getpid()}, threads {len(os.listdir('/proc/self/task'))}, "
                      f"open fds {len(os.listdir('/proc/self/fd'))}")
        self.out.print(table)

    def do_dmesg(self, arg: str) -> None:
        self._args(arg, "dmesg", 0, 0)
        for line in self.ts.dmesg():
            self.say(line)

    def do_sleep(self, arg: str) -> None:
        words = self._args(arg, "sleep", 1, 1)
        try:
            seconds = float(words[0])
        except ValueError:
            seconds = -1
        if not 0 <= seconds <= 3600:
            raise UsageError(f"sleep: {words[0]!r}: must be a number of seconds up to 3600")
        time.sleep(seconds)

    def do_help(self, arg: str) -> None:
        words = self._args(arg, "help", 0, 1)
        if words:
            if words[0] not in COMMANDS:
                raise UsageError(f"help: no command {words[0]!r} (try help)")
            usage, what = COMMANDS[words[0]]
            self.say(usage)
            self.say(textwrap.fill(what, max(self.out.width - 4, 40), initial_indent="    ",
                                   subsequent_indent="    "))
            return
        width = max(self.out.width - 4, 40)
        for usage, what in COMMANDS.values():
            self.say(usage)
            self.say(textwrap.fill(what, width, initial_indent="    ", subsequent_indent="    "))
        self.say("DOM is a domain id or name. Tab completes commands, domain names and files.")

    def do_quit(self, arg: str) -> None:
        self._args(arg, "quit", 0, 0)
        self.done = True

    # ---- attach ----
    def attach(self, rec: DomainRecord) -> None:
        """Stream the domain's console and send it what is typed, until Ctrl-], or until
        the domain goes away. A restarted domain stays attached."""
        fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
        if not os.isatty(fd_in):
            raise UsageError("console: needs a terminal (stdin is not one)")
        state = self.ts.state(rec)
        if state in ("shutdown", "crashed"):
            self.say(rec.console_text.rstrip("\n"))
            raise ToolstackError(f"domain {rec.name} is {state}: nothing to attach to")
        chunks: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

        def listen(chunk: bytes) -> None:       # the domain's console reader thread
            chunks.put(chunk)
            try:
                os.write(wake_w, b"!")
            except BlockingIOError:
                pass                            # a wake-up is pending anyway

        def flush() -> None:
            while True:
                try:
                    _write_all(fd_out, chunks.get_nowait())
                except queue.Empty:
                    return

        self.say(f"Connected to domain {rec.domid} ({rec.name}). Ctrl-] detaches.")
        sys.stdout.flush()
        saved = termios.tcgetattr(fd_in)
        kept = rec.subscribe(listen)
        ending = ""
        try:
            _raw(fd_in)
            _write_all(fd_out, b"\n".join(kept.split(b"\n")[-REPLAY_LINES:]))
            while not ending:
                ready, _, _ = select.select([fd_in, wake_r], [], [], 0.2)
                if wake_r in ready:
                    while True:
                        try:
                            if not os.read(wake_r, 4096):
                                break
                        except BlockingIOError:
                            break
                flush()
                if fd_in in ready:
                    keys = os.read(fd_in, 1024)
                    if not keys:
                        ending = "end of input"
                    elif DETACH_KEY in keys:
                        keys, ending = keys[:keys.index(DETACH_KEY)], "detached"
                    self._type(rec, keys)
                if not ending and (rec.gone or self.ts.state(rec) in ("shutdown", "crashed")):
                    # a stopped domain's state shows only once its console stream ended,
                    # so its last output has been delivered by now
                    ending = f"domain {rec.name} is {self.ts.state(rec)}"
        finally:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
            rec.unsubscribe(listen)
            flush()
            os.close(wake_r)
            os.close(wake_w)
        self.say(f"\n[{ending}: console of domain {rec.domid} ({rec.name}) closed]")

    def _type(self, rec: DomainRecord, keys: bytes) -> None:
        """Queue keys for the guest; wait a little if its input ring is full."""
        deadline = time.monotonic() + 2
        while keys:
            try:
                n = self.ts.send_input(rec, keys)
            except ToolstackError:
                return                          # restarting or gone: the keys are lost
            keys = keys[n:]
            if keys:
                if time.monotonic() > deadline:
                    return                      # the guest reads nothing: drop the rest
                time.sleep(0.01)

    # ---- top ----
    def top(self) -> None:
        fd_in = sys.stdin.fileno()
        before = self.ts.sample()
        if not (os.isatty(fd_in) and self.out.is_terminal):
            time.sleep(TOP_INTERVAL)            # a script gets one sample, as `xentop -b`
            self.out.print(top_table(rates(before, self.ts.sample())))
            return
        saved = termios.tcgetattr(fd_in)
        try:
            tty.setcbreak(fd_in)
            with Live(top_table(None), console=self.out, auto_refresh=False) as live:
                while True:
                    deadline = time.monotonic() + TOP_INTERVAL
                    while (left := deadline - time.monotonic()) > 0:
                        if select.select([fd_in], [], [], left)[0]:
                            if os.read(fd_in, 1) in (b"q", b"Q", b"\x1b"):
                                return
                    after = self.ts.sample()
                    live.update(top_table(rates(before, after)), refresh=True)
                    before = after
        except KeyboardInterrupt:
            pass                                # Ctrl-C leaves top as q does
        finally:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)

    # ---- completion ----
    def _complete_domain(self, text, line, begidx, endidx):
        if len(line[:begidx].split()) != 1:
            return []
        return [n + " " for r in self.ts.records() for n in (r.name, str(r.domid))
                if n.startswith(text)]

    complete_console = complete_pause = complete_unpause = _complete_domain
    complete_destroy = complete_trace = _complete_domain

    def complete_create(self, text, line, begidx, endidx):
        files = [p + ("/" if os.path.isdir(p) else " ") for p in glob.glob(text + "*")]
        keys = [f"{k}=" for k in config.KEYS if f"{k}=".startswith(text)]
        return files + (keys if len(line[:begidx].split()) > 1 or "=" in text else [])

    def complete_help(self, text, line, begidx, endidx):
        return [c for c in COMMANDS if c.startswith(text)]

    def completenames(self, text, *ignored):
        return [c + " " for c in COMMANDS if c.startswith(text)]


def _printable(value: bytes) -> str:
    """A node's value as text, with what is not printable ASCII escaped."""
    return "".join(chr(b) if 32 <= b < 127 and b != 0x5C else f"\\x{b:02x}" for b in value)


def top_table(rows) -> Table:
    """The `top` table; rows None while the first interval is measured."""
    table = Table(box=box.SIMPLE, pad_edge=False,
                  title=f"trapless top: every {TOP_INTERVAL:g} s, q leaves", title_justify="left")
    for title, justify in (("ID", "right"), ("Name", "left"), ("State", "left"),
                           ("CPU%", "right"), ("Exits/s", "right"), ("Pending", "right"),
                           ("Mem", "right")):
        table.add_column(title, justify=justify, no_wrap=True)
    table.add_column("Hypercalls/s: all, by name", ratio=1, overflow="fold")
    for r in rows or []:
        by_name = sorted(r.hypercalls_per_s.items(), key=lambda kv: -kv[1])[:4]
        calls = " ".join(f"{name}={rate:.0f}" for name, rate in by_name)
        table.add_row(str(r.domid), r.name, r.state, f"{r.cpu_pct:.1f}", f"{r.exits_per_s:.0f}",
                      str(r.pending), str(r.memory_mib),
                      f"{r.total_hypercalls_per_s:.0f}" + (f": {calls}" if calls else ""))
    if rows is None:
        table.caption = "measuring ..."
    return table


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---- the program ------------------------------------------------------------------------

def _interactive(shell: Shell) -> None:
    """Prompt, read, run, with readline's history and completion."""
    import readline

    history = os.environ.get(HISTORY_ENV, os.path.expanduser("~/.trapless_history"))
    readline.set_completer(shell.complete)
    readline.set_completer_delims(" \t\n;")
    readline.parse_and_bind("tab: complete")
    if history:
        try:
            readline.read_history_file(history)
        except OSError:
            pass
        readline.set_history_length(1000)
    shell.say("trapless console: help lists the commands, quit leaves (domains are destroyed)")
    try:
        while not shell.done:
            try:
                line = input(PROMPT)
            except EOFError:
                shell.say("")
                break
            except KeyboardInterrupt:
                shell.say("^C")
                continue
            shell.run(line)
    finally:
        if history:
            try:
                readline.write_history_file(history)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hypervisor.console",
        description="trapless console: run and watch many domains, as xl does")
    parser.add_argument("-c", dest="commands", metavar="COMMANDS",
                        help='commands separated by ";", run without prompting, then quit '
                             "(exit status 1 if any failed)")
    args = parser.parse_args(argv)

    def leave(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through shutdown() below
    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)

    try:
        toolstack = Toolstack()
    except TraplessError as e:
        print(f"trapless: {e}", file=sys.stderr)
        return 2
    interactive = args.commands is None and sys.stdin.isatty()
    if interactive and toolstack.fallback_note:   # e.g. no /dev/kvm; scripts find it in dmesg
        print(f"trapless: {toolstack.fallback_note}", file=sys.stderr)
    shell = Shell(toolstack)
    # Bytes that are not UTF-8 (a file name, a cmdline) reach the commands' own checks as
    # surrogates, as they do from argv, and are shown escaped, instead of stopping the
    # shell with a traceback.
    sys.stdin.reconfigure(errors="surrogateescape")
    sys.stdout.reconfigure(errors="backslashreplace")
    try:
        if args.commands is not None:
            for line in split_commands(args.commands):
                if not shell.run(line):
                    break
        elif sys.stdin.isatty():
            _interactive(shell)
        else:
            for line in sys.stdin:      # commands piped in, one per line
                if not shell.run(line.strip()):
                    break
    finally:
        toolstack.shutdown()
    scripted = args.commands is not None or not sys.stdin.isatty()
    return 1 if scripted and shell.failed else 0


if __name__ == "__main__":
    sys.exit(main())
