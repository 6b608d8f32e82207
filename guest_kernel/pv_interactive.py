"""The PV kernel's interactive mode: a line-oriented shell on the domain's console.

With `interactive` on its command line the kernel skips the tick demo and instead:
binds VIRQ_TIMER (a 100 Hz tick it only counts, so the toolstack's `top` sees it
live), takes keyboard input from the in ring of its PV console (the backend notifies
the console port when input arrives, as xenconsoled does), prints a prompt, and answers
lines:

  echo TEXT                          prints TEXT
  ticks                              "ticks: N", timer ticks since the loop started
  mem                                current and maximum reservation (memory_op)
  shutdown [poweroff|reboot|crash]   shuts the domain down with that reason
  help                               lists the commands

Keys are echoed as they arrive (the person's terminal is raw while attached); on
backspace the kernel redraws the edited line on a new line.

Between lines the kernel sleeps in SCHEDOP_block, and reads the ring only after its
port said something happened (so a tick costs one block, not a read too). It masks
upcalls before it looks at that flag: input that arrives between the look and the
block leaves the upcall pending, the block returns at once and the upcall is taken;
no wake-up is lost and no CPU is burnt polling. A domain without a console ring (as
dom0) reads with CONSOLEIO_read instead, woken by VIRQ_CONSOLE.
"""
from __future__ import annotations

from abi import C, offsetof

from .asm import (byte, dil, dword, eax, ecx, edi, edx, ptr, qword, r8, r12, r13, r14, rax, rbx,
                  rcx, rdi, rdx, rip, rsi)
from .pvlib import UPCALL_MASK, crash_unless, emit_events_on, set_port_handler
from .runtime import PVProgram

PROMPT = "pv> "
LINE_MAX = 120                  # characters kept of one input line
READ_CHUNK = 64                 # bytes taken from the console at a time
IN = offsetof("xencons_interface", "in")
IN_CONS = offsetof("xencons_interface", "in_cons")
IN_PROD = offsetof("xencons_interface", "in_prod")
TICK_NS = 10_000_000            # 100 Hz
HELP = "commands: echo TEXT, ticks, mem, shutdown [poweroff|reboot|crash], help\n"
SHUTDOWN_WORDS = (("poweroff", C.SHUTDOWN_poweroff), ("reboot", C.SHUTDOWN_reboot),
                  ("crash", C.SHUTDOWN_crash))


def emit_interactive_check(p: PVProgram) -> None:
    """Emit, in main: if the command line has the word `interactive`, enter the shell
    (it never returns; the domain ends with the shutdown a person asks for)."""
    a = p.a
    p.load_arg(rdi, p.string("interactive"))
    a.call("cmdline_has_word")
    a.test(rax, rax)
    a.jne("ia_main")


def emit_interactive(p: PVProgram) -> None:
    """The shell's routines. Needs pvlib's emit_traps and emit_events in the program."""
    _emit_word_helpers(p)
    _emit_main(p)
    _emit_keys(p)
    _emit_commands(p)
    a = p.a
    a.section(".data")
    a.align(8)
    a.label("ia_line_len")
    a.dq(0)
    a.label("ia_ticks")
    a.dq(0)
    a.label("ia_tick_period")
    a.dq(TICK_NS)
    a.label("ia_domid_self")            # memory_op's reservation queries take a domid_t
    a.dw(C.DOMID_SELF)
    a.label("ia_last_cr")               # the key before was a CR: an LF now ends no line
    a.db(0)
    a.label("ia_echo")
    a.db(0)
    a.label("ia_input_ready")           # set by the console's event; 1 at first for input typed early
    a.db(1)
    a.align(4)
    a.label("ia_console_port")          # struct evtchn_send / evtchn_unmask: the ring's port
    a.dd(0)
    a.section(".bss")
    a.label("ia_line")
    a.reserve(LINE_MAX + 1)
    a.label("ia_inbuf")
    a.reserve(READ_CHUNK)
    a.section(".text")


def _emit_word_helpers(p: PVProgram) -> None:
    a = p.a
    # cmdline_has_word(rdi = word) -> rax = 1 if the command line holds it as a whole word
    a.label("cmdline_has_word")
    a.mov(rsi, qword["start_info_ptr"])
    a.add(rsi, offsetof("start_info", "cmd_line"))
    a.label("cmdline_has_word.scan")    # rsi is at the start of a word
    a.xor(ecx, ecx)
    a.label("cmdline_has_word.cmp")
    a.movzx(eax, byte[rdi + rcx])
    a.test(eax, eax)
    a.je("cmdline_has_word.end")
    a.movzx(edx, byte[rsi + rcx])
    a.cmp(eax, edx)
    a.jne("cmdline_has_word.next")
    a.inc(rcx)
    a.jmp("cmdline_has_word.cmp")
    a.label("cmdline_has_word.end")     # the word matched: it must end here too
    a.movzx(edx, byte[rsi + rcx])
    a.test(edx, edx)
    a.je("cmdline_has_word.yes")
    a.cmp(edx, ord(" "))
    a.je("cmdline_has_word.yes")
    a.label("cmdline_has_word.next")    # skip past the next space
    a.movzx(eax, byte[rsi])
    a.test(eax, eax)
    a.je("cmdline_has_word.no")
    a.inc(rsi)
    a.cmp(eax, ord(" "))
    a.jne("cmdline_has_word.next")
    a.jmp("cmdline_has_word.scan")
    a.label("cmdline_has_word.yes")
    a.mov(eax, 1)
    a.ret()
    a.label("cmdline_has_word.no")
    a.xor(eax, eax)
    a.ret()

    # ia_word(rdi = text, rsi = word) -> rax = text after the word and its spaces, or 0
    # if text does not start with word followed by a space or the end
    a.label("ia_word")
    a.xor(ecx, ecx)
    a.label("ia_word.cmp")
    a.movzx(eax, byte[rsi + rcx])
    a.test(eax, eax)
    a.je("ia_word.end")
    a.movzx(edx, byte[rdi + rcx])
    a.cmp(eax, edx)
    a.jne("ia_word.no")
    a.inc(rcx)
    a.jmp("ia_word.cmp")
    a.label("ia_word.end")
    a.lea(rax, qword[rdi + rcx])
    a.movzx(edx, byte[rax])
    a.test(edx, edx)
    a.je("ia_word.out")
    a.cmp(edx, ord(" "))
    a.jne("ia_word.no")
    a.label("ia_word.skip")
    a.cmp(byte[rax], ord(" "))
    a.jne("ia_word.out")
    a.inc(rax)
    a.jmp("ia_word.skip")
    a.label("ia_word.out")
    a.ret()
    a.label("ia_word.no")
    a.xor(eax, eax)
    a.ret()


def _emit_main(p: PVProgram) -> None:
    a = p.a
    a.label("ia_main")
    a.call("traps_init")
    crash_unless(p, "je", "interactive: traps_init failed: ")
    a.call("events_init")
    crash_unless(p, "jns", "interactive: events_init failed: ")
    a.mov(edi, C.VIRQ_TIMER)
    a.call("bind_virq")
    crash_unless(p, "jns", "interactive: bind_virq VIRQ_TIMER failed: ")
    a.mov(r12, rax)
    set_port_handler(p, r12, "ia_tick")
    # input: the console ring's port (unmasked: events_init masked it for print), or,
    # without a ring, VIRQ_CONSOLE
    a.mov(rax, qword["start_info_ptr"])
    a.cmp(qword[rax + offsetof("start_info", "console_mfn")], 0)
    a.je("ia_main.virq_console")
    a.mov(eax, dword[rax + offsetof("start_info", "console_evtchn")])
    a.mov(dword["ia_console_port"], eax)
    a.mov(r12, rax)
    set_port_handler(p, r12, "ia_input")
    p.hypercall("event_channel_op", C.EVTCHNOP_unmask, "ia_console_port")
    crash_unless(p, "je", "interactive: unmask of the console port failed: ")
    a.jmp("ia_main.input_done")
    a.label("ia_main.virq_console")
    a.mov(edi, C.VIRQ_CONSOLE)
    a.call("bind_virq")
    crash_unless(p, "jns", "interactive: bind_virq VIRQ_CONSOLE failed: ")
    a.mov(r12, rax)
    set_port_handler(p, r12, "ia_input")
    a.label("ia_main.input_done")
    emit_events_on(p)
    p.hypercall("vcpu_op", C.VCPUOP_set_periodic_timer, 0, "ia_tick_period")
    crash_unless(p, "jns", "interactive: set_periodic_timer failed: ")
    p.print("interactive mode: type help for the commands\n")
    p.print(PROMPT)
    a.label("ia_main.wait")
    a.mov(byte[rip + "shared_info" + UPCALL_MASK], 1)
    a.cmp(byte["ia_input_ready"], 0)
    a.je("ia_main.block")
    a.mov(byte["ia_input_ready"], 0)
    a.label("ia_main.read")             # read until the queue is empty
    a.call("ia_read")
    a.test(rax, rax)
    a.jle("ia_main.wait")
    a.mov(r13, rax)
    a.xor(r14, r14)
    a.label("ia_main.key")
    a.lea(rax, ptr["ia_inbuf"])
    a.movzx(edi, byte[rax + r14])
    a.call("ia_key")
    a.inc(r14)
    a.cmp(r14, r13)
    a.jb("ia_main.key")
    a.jmp("ia_main.read")
    a.label("ia_main.block")            # clears the upcall mask and sleeps until an event
    p.hypercall("sched_op", C.SCHEDOP_block, 0)
    a.jmp("ia_main.wait")

    # ia_read -> rax = bytes of input now in ia_inbuf: from the console ring's in ring
    # (then the backend is told there is room), or CONSOLEIO_read without a ring
    a.label("ia_read")
    a.mov(rax, qword["start_info_ptr"])
    a.mov(r8, qword[rax + offsetof("start_info", "console_mfn")])
    a.test(r8, r8)
    a.jne("ia_read.ring")
    p.hypercall("console_io", C.CONSOLEIO_read, READ_CHUNK, "ia_inbuf")
    a.ret()
    a.label("ia_read.ring")
    a.shl(r8, 12)                       # VIRT_BASE 0: the frame is the address
    a.mov(ecx, dword[r8 + IN_CONS])
    a.mov(edx, dword[r8 + IN_PROD])
    a.sub(edx, ecx)                     # bytes waiting
    a.cmp(edx, C.XENCONS_IN_SIZE)
    a.ja("ia_read.none")                # indexes no backend writes: take nothing
    a.cmp(edx, READ_CHUNK)
    a.jbe("ia_read.count")
    a.mov(edx, READ_CHUNK)
    a.label("ia_read.count")
    a.xor(eax, eax)
    a.lea(rsi, ptr["ia_inbuf"])
    a.label("ia_read.copy")
    a.cmp(eax, edx)
    a.jae("ia_read.copied")
    a.mov(edi, ecx)
    a.add(edi, eax)
    a.and_(edi, C.XENCONS_IN_SIZE - 1)
    a.movzx(edi, byte[r8 + rdi + IN])
    a.mov(byte[rsi + rax], dil)
    a.inc(eax)
    a.jmp("ia_read.copy")
    a.label("ia_read.copied")
    a.add(ecx, edx)
    a.mov(dword[r8 + IN_CONS], ecx)     # after the bytes were read
    a.test(edx, edx)
    a.je("ia_read.none")
    a.push(rdx)
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "ia_console_port")
    a.pop(rax)
    a.ret()
    a.label("ia_read.none")
    a.xor(eax, eax)
    a.ret()

    # ia_tick(rdi = port): the 100 Hz tick only counts
    a.label("ia_tick")
    a.inc(qword["ia_ticks"])
    a.ret()

    # ia_input(rdi = port): the console's port (input, or room for output) or VIRQ_CONSOLE
    a.label("ia_input")
    a.mov(byte["ia_input_ready"], 1)
    a.ret()


def _emit_keys(p: PVProgram) -> None:
    a = p.a
    # ia_key(rdi = byte typed)
    a.label("ia_key")
    a.cmp(edi, ord("\r"))
    a.je("ia_key.cr")
    a.cmp(edi, ord("\n"))
    a.je("ia_key.lf")
    a.mov(byte["ia_last_cr"], 0)
    a.cmp(edi, 0x7F)                    # DEL, what most terminals send for backspace
    a.je("ia_key.backspace")
    a.cmp(edi, 0x08)
    a.je("ia_key.backspace")
    a.cmp(edi, 0x20)
    a.jb("ia_key.ignore")               # other control keys mean nothing here
    a.cmp(edi, 0x7E)
    a.ja("ia_key.ignore")
    a.mov(rax, qword["ia_line_len"])
    a.cmp(rax, LINE_MAX)
    a.jae("ia_key.ignore")              # the line is full: drop the key
    a.lea(rcx, ptr["ia_line"])
    a.mov(byte[rcx + rax], dil)
    a.inc(qword["ia_line_len"])
    a.mov(byte["ia_echo"], dil)
    p.load_arg(rdi, "ia_echo")
    p.load_arg(rsi, 1)
    a.call("print")
    a.label("ia_key.ignore")
    a.ret()
    a.label("ia_key.lf")                # CR LF is one Enter
    a.cmp(byte["ia_last_cr"], 0)
    a.mov(byte["ia_last_cr"], 0)
    a.jne("ia_key.ignore")
    a.jmp("ia_key.enter")
    a.label("ia_key.cr")
    a.mov(byte["ia_last_cr"], 1)
    a.label("ia_key.enter")
    p.print("\n")
    a.call("ia_run_line")
    a.mov(qword["ia_line_len"], 0)
    p.print(PROMPT)
    a.ret()
    a.label("ia_key.backspace")
    a.cmp(qword["ia_line_len"], 0)
    a.je("ia_key.ignore")
    a.dec(qword["ia_line_len"])
    p.print("\n" + PROMPT)
    p.load_arg(rdi, "ia_line")
    a.mov(rsi, qword["ia_line_len"])
    a.jmp("print")


def _emit_commands(p: PVProgram) -> None:
    a = p.a
    commands = (("echo", "ia_echo_cmd"), ("ticks", "ia_ticks_cmd"), ("mem", "ia_mem_cmd"),
                ("shutdown", "ia_shutdown_cmd"), ("help", "ia_help_cmd"))
    # ia_run_line: run the line in ia_line[0:ia_line_len]
    a.label("ia_run_line")
    a.push(rbx)
    a.lea(rbx, ptr["ia_line"])
    a.mov(rax, qword["ia_line_len"])
    a.mov(byte[rbx + rax], 0)
    a.label("ia_run_line.spaces")
    a.cmp(byte[rbx], ord(" "))
    a.jne("ia_run_line.word")
    a.inc(rbx)
    a.jmp("ia_run_line.spaces")
    a.label("ia_run_line.word")
    a.cmp(byte[rbx], 0)
    a.je("ia_run_line.out")             # an empty line: just a new prompt
    for word, routine in commands:
        a.mov(rdi, rbx)
        p.load_arg(rsi, p.string(word))
        a.call("ia_word")
        a.test(rax, rax)
        a.je(f"ia_run_line.not_{word}")
        a.mov(rdi, rax)
        a.call(routine)
        a.jmp("ia_run_line.out")
        a.label(f"ia_run_line.not_{word}")
    p.print("unknown command: ")
    a.mov(rdi, rbx)
    a.call("print_cstr")
    p.print(" (try help)\n")
    a.label("ia_run_line.out")
    a.pop(rbx)
    a.ret()

    # ia_echo_cmd(rdi = the rest of the line)
    a.label("ia_echo_cmd")
    a.call("print_cstr")
    p.print("\n")
    a.ret()

    a.label("ia_ticks_cmd")
    p.print("ticks: ")
    a.mov(rdi, qword["ia_ticks"])
    a.call("print_dec")
    p.print("\n")
    a.ret()

    # mem: "mem: current N pages (M MiB), maximum N pages (M MiB)"
    a.label("ia_mem_cmd")
    a.push(rbx)
    a.push(r12)
    p.hypercall("memory_op", C.XENMEM_current_reservation, "ia_domid_self")
    a.mov(rbx, rax)
    p.hypercall("memory_op", C.XENMEM_maximum_reservation, "ia_domid_self")
    a.mov(r12, rax)
    p.print("mem: current ")
    a.mov(rdi, rbx)
    a.call("ia_print_pages")
    p.print(", maximum ")
    a.mov(rdi, r12)
    a.call("ia_print_pages")
    p.print("\n")
    a.pop(r12)
    a.pop(rbx)
    a.ret()
    # ia_print_pages(rdi = pages or -errno): "N pages (M MiB)", or the errno
    a.label("ia_print_pages")
    a.test(rdi, rdi)
    a.js("print_sdec")
    a.push(rbx)
    a.mov(rbx, rdi)
    a.call("print_dec")
    p.print(" pages (")
    a.mov(rdi, rbx)
    a.shr(rdi, 20 - 12)
    a.call("print_dec")
    p.print(" MiB)")
    a.pop(rbx)
    a.ret()

    # shutdown [poweroff|reboot|crash] (rdi = the rest of the line)
    a.label("ia_shutdown_cmd")
    a.push(rbx)
    a.mov(rbx, rdi)
    a.cmp(byte[rbx], 0)
    a.je("ia_shutdown_cmd.poweroff")
    for word, reason in SHUTDOWN_WORDS:
        a.mov(rdi, rbx)
        p.load_arg(rsi, p.string(word))
        a.call("ia_word")
        a.test(rax, rax)
        a.je(f"ia_shutdown_cmd.not_{word}")
        a.cmp(byte[rax], 0)
        a.jne(f"ia_shutdown_cmd.not_{word}")
        a.label(f"ia_shutdown_cmd.{word}")
        p.print(f"shutting down: {word}\n")
        a.mov(edi, reason)
        a.call("shutdown")
        a.label(f"ia_shutdown_cmd.not_{word}")
    p.print("shutdown: unknown reason ")
    a.mov(rdi, rbx)
    a.call("print_cstr")
    p.print(" (poweroff, reboot or crash)\n")
    a.pop(rbx)
    a.ret()

    a.label("ia_help_cmd")
    p.print(HELP)
    a.ret()
