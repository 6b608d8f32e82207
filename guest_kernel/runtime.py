"""The PV guest runtime: what every trapless PV guest is made of.

`PVProgram` opens an Assembler with Xen's layout conventions and emits the pieces
every guest shares: the entry stub (own stack, start_info saved), the hypercall page
(stub N labelled `hypercall_<name>`), hypercall wrappers, console printing of
strings and numbers, and shutdown. Kernels, conformance cases and benchmarks add
their own code and call `image()` to get an ELF image.

Register conventions of the helpers: arguments in rdi, rsi; they preserve every
register but rax, rcx, rdx, rsi, rdi, r8-r11 (the System V caller-saved set), so
guest code keeps its state in rbx, rbp, r12-r15.
"""
from __future__ import annotations

from abi import C, HYPERCALL_NAMES, offsetof

from .asm import (Assembler, byte, cl, dl, dword, eax, ecx, edi, edx, esi, ptr, qword, r8, r9,
                  r10, rax, rcx, rdi, rdx, rsi, rsp)
from .elf import build_elf

LOAD_ADDRESS = 0x100000          # where trapless PV kernels are linked (VIRT_BASE 0)
STACK_SIZE = 16384
ARG_REGS = (rdi, rsi, rdx, r10, r8)  # Xen's x86-64 hypercall argument registers
OUT = offsetof("xencons_interface", "out")
OUT_CONS = offsetof("xencons_interface", "out_cons")
OUT_PROD = offsetof("xencons_interface", "out_prod")


class PVProgram:
    """An Assembler plus the PV runtime. Emit code after `entry`, then call image()."""

    def __init__(self, guest_os: str = "trapless-pv", base: int = LOAD_ADDRESS,
                 xen_pv: bool = True, console_ring: bool = True):
        """xen_pv: a kernel for Xen's PV CPU model (ring 3, trap table, callbacks), as
        every Xen PV guest is; False: it declares that it needs a ring-0 kernel
        (supervisor_mode_kernel) and gets trapless's ring-0 PV model.
        console_ring: print through the console ring start_info names, if there is one;
        False: through console_io only (a guest with no PV start_info, e.g. PVH)."""
        self.guest_os = guest_os
        self.xen_pv = xen_pv
        self.console_ring = console_ring
        self.a = a = Assembler(base=base)
        self._strings: dict[str, str] = {}
        a.section(".text")
        a.label("_start")
        # Xen hands us start_info in rsi and a bootstrap stack; keep start_info, use our stack.
        a.mov(qword["start_info_ptr"], rsi)
        a.lea(rsp, ptr["stack_top"])
        a.call("main")
        # main returned: power off with its return value as the reason.
        a.mov(rdi, rax)
        a.call("shutdown")
        a.label("hang")
        a.jmp("hang")
        self._emit_helpers()
        a.section(".data")
        a.label("start_info_ptr")
        a.dq(0)
        a.label("shutdown_arg")
        a.dd(0)
        a.section(".bss")
        a.align(16)
        a.label("stack_bottom")
        a.reserve(STACK_SIZE)
        a.label("stack_top")
        a.label("scratch")          # a page of scratch space for hypercall buffers
        a.reserve(4096)
        a.section(".text")
        a.label("main")

    # ---- emitting hypercalls -------------------------------------------------
    def load_arg(self, reg, value) -> None:
        """reg <- value: an int, a register, or a label name (its address)."""
        a = self.a
        if isinstance(value, str):
            a.lea(reg, ptr[value])
        elif isinstance(value, int):
            if value == 0:
                a.xor(reg, reg)
            else:
                a.mov(reg, value)
        elif value is not reg:
            a.mov(reg, value)

    def hypercall(self, name: str, *args) -> None:
        """Emit a call of hypercall `name` (e.g. "console_io") with up to five arguments."""
        if len(args) > len(ARG_REGS):
            raise ValueError(f"hypercall {name}: at most {len(ARG_REGS)} arguments")
        for reg, value in zip(ARG_REGS, args):
            self.load_arg(reg, value)
        self.a.call(f"hypercall_{name}")

    def hypercall_nr(self, nr: int, *args) -> None:
        """Call stub `nr` of the hypercall page, named or not (for -ENOSYS checks)."""
        for reg, value in zip(ARG_REGS, args):
            self.load_arg(reg, value)
        self.a.call(f"hypercall_{HYPERCALL_NAMES.get(nr, f'nr{nr}')}")

    def string(self, text: str) -> str:
        """The label of a NUL-terminated copy of text in .rodata."""
        if text not in self._strings:
            label = f"str_{len(self._strings)}"
            self._strings[text] = label
        return self._strings[text]

    def print(self, text: str) -> None:
        self.load_arg(rdi, self.string(text))
        self.a.call("print_cstr")

    # ---- the shared helpers --------------------------------------------------
    def _emit_helpers(self) -> None:
        a = self.a
        # print_cstr(rdi = NUL-terminated string): measure it, then fall into print
        a.label("print_cstr")
        a.mov(rsi, rdi)
        a.label("print_cstr.len")
        a.cmp(byte[rsi], 0)
        a.je("print_cstr.go")
        a.inc(rsi)
        a.jmp("print_cstr.len")
        a.label("print_cstr.go")
        a.sub(rsi, rdi)
        self._emit_print()
        emit_number_printers(a)
        self._emit_shutdown()

    # The two routines that reach the platform; a native kernel overrides them.
    def _emit_print(self) -> None:
        """print(rdi = buffer, rsi = length): through the PV console ring that
        start_info.console.domU names, as a Xen domU's hvc console writes; a domain
        without one (frame 0, as for dom0) writes with CONSOLEIO_write, Xen's own
        debug console. The ring's frame is also its address: trapless's kernels are
        linked with VIRT_BASE 0, so virtual = pseudo-physical = machine."""
        a = self.a
        a.label("print")
        if not self.console_ring:
            a.mov(rdx, rdi)
            a.mov(edi, C.CONSOLEIO_write)
            a.jmp("hypercall_console_io")
            return
        a.mov(rax, qword["start_info_ptr"])
        a.mov(r8, qword[rax + offsetof("start_info", "console_mfn")])
        a.test(r8, r8)
        a.jne("print.ring")
        a.mov(rdx, rdi)
        a.mov(edi, C.CONSOLEIO_write)
        a.call("hypercall_console_io")
        a.ret()
        # r8 = the ring, r9 = end of the text; produce into out, notifying the backend
        # (trapless, as xenconsoled) whenever the ring is full and once at the end
        a.label("print.ring")
        a.shl(r8, 12)
        a.mov(eax, dword[rax + offsetof("start_info", "console_evtchn")])
        a.mov(dword["console_send_port"], eax)
        a.lea(r9, qword[rdi + rsi])
        a.label("print.ring.next")
        a.cmp(rdi, r9)
        a.jae("print.ring.send")
        a.mov(eax, dword[r8 + OUT_PROD])
        a.mov(edx, eax)
        a.sub(edx, dword[r8 + OUT_CONS])
        a.cmp(edx, C.XENCONS_OUT_SIZE)
        a.jb("print.ring.room")
        a.call("print.ring.notify")         # full: the backend drains it, then go on
        a.jmp("print.ring.next")
        a.label("print.ring.room")
        a.mov(edx, eax)
        a.and_(edx, C.XENCONS_OUT_SIZE - 1)
        a.mov(cl, byte[rdi])
        a.mov(byte[r8 + rdx + OUT], cl)
        a.inc(eax)
        a.mov(dword[r8 + OUT_PROD], eax)    # x86 keeps stores in order: data, then index
        a.inc(rdi)
        a.jmp("print.ring.next")
        a.label("print.ring.send")
        a.call("print.ring.notify")
        a.ret()
        a.label("print.ring.notify")        # EVTCHNOP_send; keeps rdi, r8, r9
        a.push(rdi)
        a.push(r8)
        a.push(r9)
        a.mov(edi, C.EVTCHNOP_send)
        a.lea(rsi, ptr["console_send_port"])
        a.call("hypercall_event_channel_op")
        a.pop(r9)
        a.pop(r8)
        a.pop(rdi)
        a.ret()
        a.section(".data")
        a.align(4)
        a.label("console_send_port")        # struct evtchn_send
        a.dd(0)
        a.section(".text")

    def _emit_shutdown(self) -> None:
        """shutdown(rdi = reason): SCHEDOP_shutdown, never returns."""
        a = self.a
        a.label("shutdown")
        a.mov(dword["shutdown_arg"], edi)
        a.mov(edi, C.SCHEDOP_shutdown)
        a.lea(rsi, ptr["shutdown_arg"])
        a.call("hypercall_sched_op")
        a.label("shutdown.hang")
        a.jmp("shutdown.hang")

    # ---- output --------------------------------------------------------------
    def _emit_data(self) -> None:
        """The string table and the number printers' constants and buffer."""
        a = self.a
        a.section(".rodata")
        a.label("hexdigits")
        a.ascii("0123456789abcdef")
        a.label("minus")
        a.ascii("-")
        for text, label in self._strings.items():
            a.label(label)
            a.asciz(text)
        a.section(".data")
        a.label("numbuf")
        a.reserve(24)
        a.label("numbuf_end")
        a.db(0)                         # format_dec/format_hex leave a C string

    def image(self):
        """Finish the program; returns (sections, symbols, entry, notes) for build_elf."""
        a = self.a
        self._emit_data()
        # The hypercall page: one page, stub N at N*32, filled in by the domain builder.
        a.section(".text")
        a.align(4096)
        a.label("hypercall_page")
        for n in range(C.TRAPLESS_HYPERCALL_PAGE_STUBS):
            a.label(f"hypercall_{HYPERCALL_NAMES.get(n, f'nr{n}')}")
            a.reserve(C.TRAPLESS_HYPERCALL_STUB_SIZE)
        return a.assemble()

    def elf(self) -> bytes:
        img = self.image()
        notes = [
            (C.XEN_ELFNOTE_GUEST_OS, self.guest_os),
            (C.XEN_ELFNOTE_XEN_VERSION, "xen-3.0"),
            (C.XEN_ELFNOTE_LOADER, "generic"),
            (C.XEN_ELFNOTE_ENTRY, img.symbols["_start"]),
            (C.XEN_ELFNOTE_VIRT_BASE, 0),
            (C.XEN_ELFNOTE_PADDR_OFFSET, 0),
        ]
        if "hypercall_page" in img.symbols:             # not in a native kernel's image
            notes.append((C.XEN_ELFNOTE_HYPERCALL_PAGE, img.symbols["hypercall_page"]))
        if not self.xen_pv:
            # Xen's libelf syntax: '!' = required. trapless runs such a kernel in ring 0.
            notes.append((C.XEN_ELFNOTE_FEATURES, "!supervisor_mode_kernel"))
        return build_elf(img.sections, img.symbols, img.symbols["_start"], notes)


def emit_number_printers(a: Assembler) -> None:
    """print_dec, print_sdec, print_hex (rdi = value), all ending in the platform's
    print(rdi = buffer, rsi = length); format_dec and format_hex (rdi = value) -> rsi =
    the digits, a NUL-terminated string ending at numbuf_end (for guests that keep the
    text instead of printing it). Uses numbuf, hexdigits and minus (_emit_data)."""
    # format_dec(rdi = unsigned value)
    a.label("format_dec")
    a.mov(rax, rdi)
    a.lea(rsi, ptr["numbuf_end"])
    a.mov(rcx, 10)
    a.label("format_dec.loop")
    a.xor(edx, edx)
    a.div(rcx)
    a.add(dl, ord("0"))
    a.dec(rsi)
    a.mov(byte[rsi], dl)
    a.test(rax, rax)
    a.jne("format_dec.loop")
    a.ret()

    # format_hex(rdi = value): 0x-prefixed, no leading zeros
    a.label("format_hex")
    a.mov(rax, rdi)
    a.lea(rsi, ptr["numbuf_end"])
    a.lea(r8, ptr["hexdigits"])
    a.label("format_hex.loop")
    a.mov(rcx, rax)
    a.and_(ecx, 15)
    a.mov(cl, byte[r8 + rcx])
    a.dec(rsi)
    a.mov(byte[rsi], cl)
    a.shr(rax, 4)
    a.jne("format_hex.loop")
    a.dec(rsi)
    a.mov(byte[rsi], ord("x"))
    a.dec(rsi)
    a.mov(byte[rsi], ord("0"))
    a.ret()

    # print_sdec(rdi = signed value)
    a.label("print_sdec")
    a.test(rdi, rdi)
    a.jns("print_dec")
    a.push(rdi)
    a.lea(rdi, ptr["minus"])
    a.mov(esi, 1)
    a.call("print")
    a.pop(rdi)
    a.neg(rdi)
    # print_dec(rdi = unsigned value)
    a.label("print_dec")
    a.call("format_dec")
    a.jmp("print_num.out")
    # print_hex(rdi = value)
    a.label("print_hex")
    a.call("format_hex")
    # print the digits between rsi and numbuf_end
    a.label("print_num.out")
    a.mov(rdi, rsi)
    a.lea(rsi, ptr["numbuf_end"])
    a.sub(rsi, rdi)
    a.jmp("print")
