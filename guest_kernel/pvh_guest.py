"""A PVH guest: an image with only a PHYS32_ENTRY note, entered the way Xen enters one
(32-bit flat protected mode, paging off, ebx = hvm_start_info).

In 32-bit code it finds Xen through the CPUID leaves, asks for the hypercall page by
writing the MSR they name, and makes one console_io call with the 32-bit convention
(ebx, ecx, edx). It then switches itself to long mode on page tables of its own (an
identity map of the first GiB with 2 MiB pages, in its own data), and in 64-bit code
prints what hvm_start_info says (command line, memory map), what CPUID says, the Xen
version through the page and, in the vmcall flavour, makes hypercalls with vmcall and
vmmcall directly, as Linux does; then it powers off.

The assembler speaks 64-bit code; the short 32-bit entry is written as bytes here,
each instruction with its mnemonic (tests/test_pvh.py checks them with objdump).
"""
from __future__ import annotations

import struct

from abi import C, offsetof

from .asm import byte, dword, ptr, qword, rip
from .asm import al, eax, ebx, ecx, edi, edx, esi, r12, r13, r14, rax, rbx, rcx, rdi, rdx, rsi
from .elf import build_elf
from .pvlib import (UPCALL_VECTOR, emit_block_until, emit_events, emit_events_on, emit_pvclock,
                    emit_traps, set_port_handler)
from .runtime import PVProgram

BANNER = "trapless PVH guest: entered in 32-bit protected mode, now in long mode\n"
MSG32 = "hello from 32-bit protected mode, through the hypercall page\n"
MSG_VMCALL = "hello through vmcall\n"
GDT64 = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)     # null, 64-bit code 0x08, data 0x10
XEN_CPUID_BASE = 0x40000000
XS_REQ = offsetof("xenstore_domain_interface", "req")
XS_RSP = offsetof("xenstore_domain_interface", "rsp")
XS_REQ_PROD = offsetof("xenstore_domain_interface", "req_prod")
XS_RSP_CONS = offsetof("xenstore_domain_interface", "rsp_cons")
XS_RSP_PROD = offsetof("xenstore_domain_interface", "rsp_prod")


def _entry32(a) -> None:
    """The 32-bit entry: Xen, the hypercall page, one 32-bit hypercall, long mode."""
    a.label("_start32")
    a.db(0x89, 0x1D); a.dd("si32")                  # mov [si32], ebx
    a.db(0xBC); a.dd("stack_top")                   # mov esp, stack_top
    a.db(0xB8); a.dd(XEN_CPUID_BASE)                # mov eax, 0x40000000
    a.db(0x0F, 0xA2)                                # cpuid
    a.db(0x81, 0xFB); a.dd(0x566E6558)              # cmp ebx, "XenV"
    a.db(0x75, 0x02)                                # jne +2 (to the ud2)
    a.db(0xEB, 0x02)                                # jmp +2 (over it)
    a.db(0x0F, 0x0B)                                # ud2: no Xen here
    a.db(0xB8); a.dd(XEN_CPUID_BASE + 2)            # mov eax, 0x40000002
    a.db(0x0F, 0xA2)                                # cpuid: ebx = the MSR
    a.db(0x89, 0xD9)                                # mov ecx, ebx
    a.db(0xB8); a.dd("hypercall_page")              # mov eax, hypercall_page
    a.db(0x31, 0xD2)                                # xor edx, edx
    a.db(0x0F, 0x30)                                # wrmsr: Xen fills the page
    a.db(0x31, 0xDB)                                # xor ebx, ebx (CONSOLEIO_write)
    a.db(0xB9); a.dd(len(MSG32))                    # mov ecx, length
    a.db(0xBA); a.dd("msg32")                       # mov edx, msg32
    a.db(0xBE); a.dd("hypercall_console_io")        # mov esi, the console_io stub
    a.db(0xFF, 0xD6)                                # call esi
    a.db(0xA3); a.dd("rc32")                        # mov [rc32], eax
    a.db(0x0F, 0x20, 0xE0)                          # mov eax, cr4
    a.db(0x83, 0xC8, 0x20)                          # or eax, 0x20 (PAE)
    a.db(0x0F, 0x22, 0xE0)                          # mov cr4, eax
    a.db(0xB8); a.dd("pml4")                        # mov eax, pml4
    a.db(0x0F, 0x22, 0xD8)                          # mov cr3, eax
    a.db(0xB9); a.dd(0xC0000080)                    # mov ecx, EFER
    a.db(0x0F, 0x32)                                # rdmsr
    a.db(0x0D); a.dd(0x100)                         # or eax, LME
    a.db(0x0F, 0x30)                                # wrmsr
    a.db(0x0F, 0x20, 0xC0)                          # mov eax, cr0
    a.db(0x0D); a.dd(0x80000000)                    # or eax, PG
    a.db(0x0F, 0x22, 0xC0)                          # mov cr0, eax: long mode
    a.db(0x0F, 0x01, 0x15); a.dd("gdt_desc")        # lgdt [gdt_desc]
    a.db(0xEA); a.dd("start64"); a.dw(0x08)         # jmp far 0x08:start64


def emit_start64(a, data_selector: int | None = None) -> None:
    """The 64-bit landing of _entry32's far jump: load the data segments with
    data_selector (if given: the far jump loads only CS), then the runtime's _start."""
    a.label("start64")
    if data_selector is not None:
        a.mov(eax, data_selector)
        a.db(0x8E, 0xD8)                            # mov ds, eax
        a.db(0x8E, 0xC0)                            # mov es, eax
        a.db(0x8E, 0xD0)                            # mov ss, eax
    a.jmp("_start")


def emit_entry32_data(a) -> None:
    """What _entry32 stores (hvm_start_info's address, its 32-bit hypercall's result)
    and the message that hypercall prints; in .data."""
    a.label("si32")
    a.dd(0)
    a.label("rc32")
    a.dd(0)
    a.label("msg32")
    a.ascii(MSG32)


def emit_first_gib_tables(a, user: bool, supervisor_page: int | None = None) -> None:
    """pml4, pdpt, pd: the first GiB identity-mapped with 2 MiB pages, user-accessible
    if user (but for the one at supervisor_page), page-aligned."""
    upper = 0x7 if user else 0x3
    a.align(4096)
    a.label("pml4")
    a.dq(a.ref("pdpt") + upper)
    a.dq(*([0] * 511))
    a.label("pdpt")
    a.dq(a.ref("pd") + upper)
    a.dq(*([0] * 511))
    a.label("pd")
    a.dq(*[(i << 21) | (0x87 if user and i << 21 != supervisor_page else 0x83)
           for i in range(512)])


XS_REQUEST = struct.pack("<IIII", C.XS_READ, 7, 0, 6) + b"domid\0"    # req_id 7, relative
XS_REPLY_MAX = 64
XS_RING = C.XENSTORE_RING_SIZE


def _xenstore_read(p) -> None:
    """Find xenstore as a PVH domU does (HVM_PARAM_STORE_PFN and _EVTCHN), send one read
    of its own "domid" on the ring, wait for the reply (polling, yielding) and print it."""
    a = p.a
    a.mov(dword[rip + "hvmparam" + 4], C.HVM_PARAM_STORE_EVTCHN)
    p.hypercall("hvm_op", C.HVMOP_get_param, "hvmparam")
    a.mov(rax, qword[rip + "hvmparam" + 8])
    a.mov(dword["xs_port"], eax)
    a.mov(dword[rip + "hvmparam" + 4], C.HVM_PARAM_STORE_PFN)
    p.hypercall("hvm_op", C.HVMOP_get_param, "hvmparam")
    a.mov(r12, qword[rip + "hvmparam" + 8])
    a.shl(r12, 12)                      # identity-mapped: the frame's address is its own
    a.mov(edx, dword[r12 + XS_REQ_PROD])
    a.lea(rsi, ptr["xs_req"])
    a.mov(ebx, len(XS_REQUEST))
    a.label("xs_req.loop")              # the request fits: the ring is fresh and empty
    a.mov(ecx, edx)
    a.and_(ecx, XS_RING - 1)
    a.mov(al, byte[rsi])
    a.mov(byte[r12 + rcx + XS_REQ], al)
    a.inc(rsi)
    a.inc(edx)
    a.dec(ebx)
    a.jne("xs_req.loop")
    a.mov(dword[r12 + XS_REQ_PROD], edx)    # x86 keeps stores in order: data, then index
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "xs_port")
    a.lea(rdi, ptr["xs_rsp"])
    a.mov(ebx, 16)
    a.call("xs_take")                   # the header
    a.mov(ebx, dword[rip + "xs_rsp" + 12])
    a.cmp(ebx, XS_REPLY_MAX)
    a.jbe("xs_rsp.fits")
    a.mov(ebx, XS_REPLY_MAX)
    a.label("xs_rsp.fits")
    a.mov(r13, rbx)
    a.lea(rdi, ptr[rip + "xs_rsp" + 16])
    a.call("xs_take")                   # the payload
    p.print("xenstore through its ring: read domid -> type ")
    a.mov(edi, dword["xs_rsp"])
    a.call("print_dec")
    p.print(", req_id ")
    a.mov(edi, dword[rip + "xs_rsp" + 4])
    a.call("print_dec")
    p.print(", \"")
    a.lea(rdi, ptr[rip + "xs_rsp" + 16])
    a.mov(rsi, r13)
    a.call("print")
    p.print("\"\n")


def _emit_xs_take(p) -> None:
    """xs_take(rdi = where, ebx = bytes): take them from the store's rsp ring as they
    come, yielding while it is empty. r12 = the ring page."""
    a = p.a
    a.label("xs_take")
    a.test(ebx, ebx)
    a.je("xs_take.done")
    a.mov(edx, dword[r12 + XS_RSP_CONS])
    a.cmp(edx, dword[r12 + XS_RSP_PROD])
    a.jne("xs_take.byte")
    a.push(rdi)
    p.hypercall("sched_op", C.SCHEDOP_yield, 0)
    a.pop(rdi)
    a.jmp("xs_take")
    a.label("xs_take.byte")
    a.mov(ecx, edx)
    a.and_(ecx, XS_RING - 1)
    a.mov(al, byte[r12 + rcx + XS_RSP])
    a.mov(byte[rdi], al)
    a.inc(rdi)
    a.inc(edx)
    a.mov(dword[r12 + XS_RSP_CONS], edx)
    a.dec(ebx)
    a.jmp("xs_take")
    a.label("xs_take.done")
    a.ret()


def build_pvh_guest(vmcall: bool = True, guest_os: str = "trapless-pvh",
                    extra=None) -> bytes:
    """The guest's ELF64 image (PHYS32_ENTRY and GUEST_OS notes only). vmcall=False
    leaves out the direct vmcall/vmmcall calls (for hosts that cannot intercept them);
    extra(program), if given, emits more 64-bit code to run before powering off."""
    # A ring-0 kernel with its own IDT, and no PV start_info: console_io prints
    p = PVProgram(guest_os=guest_os, xen_pv=False, console_ring=False)
    a = p.a

    # main (64-bit), called from the runtime's _start
    p.print(BANNER)
    p.print("console_io from 32-bit code returned ")
    a.movsxd(rdi, dword["rc32"])
    a.call("print_sdec")
    p.print("\n")

    a.mov(ebx, dword["si32"])                       # hvm_start_info, zero-extended
    p.print("hvm_start_info at ")
    a.mov(rdi, rbx)
    a.call("print_hex")
    p.print(": magic ")
    a.mov(edi, dword[rbx])
    a.call("print_hex")
    p.print(", version ")
    a.mov(edi, dword[rbx + 4])
    a.call("print_dec")
    p.print(", modules ")
    a.mov(edi, dword[rbx + 12])
    a.call("print_dec")
    a.cmp(dword[rbx + 12], 0)
    a.je("modules.none")
    p.print("\nmodule 0: ")
    a.mov(r12, qword[rbx + 16])                     # modlist_paddr
    a.mov(rdi, qword[r12])
    a.call("print_hex")
    p.print(", ")
    a.mov(rdi, qword[r12 + 8])
    a.call("print_dec")
    p.print(" bytes, first byte ")
    a.mov(rax, qword[r12])
    a.movzx(edi, byte[rax])
    a.call("print_hex")
    a.label("modules.none")
    p.print("\ncommand line: ")
    a.mov(rdi, qword[rbx + 24])
    a.call("print_cstr")
    p.print("\nmemory map: ")
    a.mov(r12, qword[rbx + 40])
    a.mov(r14, 0)
    a.mov(edi, dword[rbx + 48])
    a.call("print_dec")
    p.print(" entries\n")
    a.label("memmap.loop")
    a.mov(eax, dword[rbx + 48])
    a.cmp(r14, rax)
    a.jae("memmap.done")
    p.print("  ")
    a.mov(rdi, qword[r12])
    a.call("print_hex")
    p.print("-")
    a.mov(rdi, qword[r12])
    a.add(rdi, qword[r12 + 8])
    a.call("print_hex")
    p.print(" type ")
    a.mov(edi, dword[r12 + 16])
    a.call("print_dec")
    p.print("\n")
    a.add(r12, 24)
    a.inc(r14)
    a.jmp("memmap.loop")
    a.label("memmap.done")

    # CPUID: the signature, the last leaf, the vCPU and domain ids
    a.mov(eax, XEN_CPUID_BASE)
    a.cpuid()
    a.mov(dword["sig"], ebx)
    a.mov(r12, rax)
    a.lea(rdi, ptr["sig"])
    a.mov(dword[rdi + 4], ecx)
    a.mov(dword[rdi + 8], edx)
    p.print("cpuid 0x40000000: ")
    a.lea(rdi, ptr["sig"])
    a.mov(esi, 12)
    a.call("print")
    p.print(", last leaf ")
    a.mov(rdi, r12)
    a.call("print_hex")
    a.mov(eax, XEN_CPUID_BASE + 4)
    a.xor(ecx, ecx)
    a.cpuid()
    a.mov(r12, rbx)
    a.mov(r13, rcx)
    p.print("\ncpuid 0x40000004: vcpu id ")
    a.mov(rdi, r12)
    a.call("print_dec")
    p.print(", domid ")
    a.mov(rdi, r13)
    a.call("print_dec")

    # the Xen version through the page
    p.hypercall("xen_version", C.XENVER_version, 0)
    a.mov(r12, rax)
    p.print("\nxen_version through the hypercall page: ")
    a.mov(rdi, r12)
    a.shr(rdi, 16)
    a.call("print_dec")
    p.print(".")
    a.mov(rdi, r12)
    a.and_(edi, 0xFFFF)
    a.call("print_dec")
    p.print("\n")
    a.mov(dword["features"], 0)
    p.hypercall("xen_version", C.XENVER_get_features, "features")
    a.mov(r12, rax)
    p.print("xen_version(get_features): ")
    a.mov(rdi, r12)
    a.call("print_sdec")
    p.print(", submap 0 ")
    a.mov(edi, dword[rip + "features" + 4])
    a.call("print_hex")
    p.print("\n")

    # the HVM parameters a PVH domU reads: its console ring, xenstore (none yet: 0)
    for name, index in (("console_pfn", C.HVM_PARAM_CONSOLE_PFN),
                        ("console_evtchn", C.HVM_PARAM_CONSOLE_EVTCHN),
                        ("store_pfn", C.HVM_PARAM_STORE_PFN),
                        ("store_evtchn", C.HVM_PARAM_STORE_EVTCHN), ("out_of_range", 39)):
        a.mov(dword[rip + "hvmparam" + 4], index)
        p.hypercall("hvm_op", C.HVMOP_get_param, "hvmparam")
        a.mov(r12, rax)
        p.print(f"hvm_op get_param {name}: ")
        a.mov(rdi, r12)
        a.call("print_sdec")
        p.print(", value ")
        a.mov(rdi, qword[rip + "hvmparam" + 8])
        a.call("print_hex")
        p.print("\n")
    _xenstore_read(p)
    a.mov(dword[rip + "hvmparam" + 4], C.HVM_PARAM_CONSOLE_PFN)
    p.hypercall("hvm_op", C.HVMOP_set_param, "hvmparam")
    a.mov(r12, rax)
    p.print("hvm_op set_param console_pfn: ")
    a.mov(rdi, r12)
    a.call("print_sdec")
    p.print("\n")

    if vmcall:
        # Linux's way: vmcall (Intel) or vmmcall (AMD) inline, no page
        a.mov(eax, C.__HYPERVISOR_xen_version)
        a.mov(edi, C.XENVER_extraversion)
        a.lea(rsi, ptr["scratch"])
        a.vmcall()
        a.mov(r12, rax)
        p.print("xen_version(extraversion) through vmcall: ")
        a.mov(rdi, r12)
        a.call("print_sdec")
        p.print(" ")
        a.lea(rdi, ptr["scratch"])
        a.call("print_cstr")
        p.print("\n")
        a.mov(eax, C.__HYPERVISOR_console_io)
        a.mov(edi, C.CONSOLEIO_write)
        a.mov(esi, len(MSG_VMCALL))
        a.lea(rdx, ptr["msg_vmcall"])
        a.vmcall()
        a.mov(eax, C.__HYPERVISOR_xen_version)
        a.mov(edi, C.XENVER_version)
        a.vmmcall()
        a.mov(r12, rax)
        p.print("xen_version through vmmcall: ")
        a.mov(rdi, r12)
        a.call("print_hex")
        a.mov(eax, 99)
        a.vmcall()
        a.mov(r12, rax)
        p.print("\nhypercall 99 through vmcall: ")
        a.mov(rdi, r12)
        a.call("print_sdec")
        p.print("\n")

    # events as a PVH domU takes them: shared_info placed, upcalls on the callback
    # vector through its own IDT, VIRQ_TIMER from a one-shot timer 1 ms ahead
    a.call("idt_init")
    a.call("events_init")
    a.mov(r12, rax)
    p.print("events_init: ")
    a.mov(rdi, r12)
    a.call("print_sdec")
    a.mov(edi, C.VIRQ_TIMER)
    a.call("bind_virq")
    a.mov(r12, rax)
    set_port_handler(p, r12, "on_timer")
    p.print(f", upcalls on vector {UPCALL_VECTOR:#x}, VIRQ_TIMER on port ")
    a.mov(rdi, r12)
    a.call("print_dec")
    p.print("\n")
    a.sti()
    a.call("pvclock_read")
    a.add(rax, 1_000_000)
    a.mov(qword["sshot"], rax)
    p.hypercall("vcpu_op", C.VCPUOP_set_singleshot_timer, 0, "sshot")
    a.mov(r12, rax)
    def fired():
        a.cmp(qword["timer_fired"], 0)
        a.jne("timer.done")
    emit_block_until(p, fired, "timer.done")
    a.label("timer.done")
    emit_events_on(p)
    a.call("pvclock_read")
    a.sub(rax, qword["sshot"])
    a.mov(r13, rax)
    p.print("set_singleshot_timer: ")
    a.mov(rdi, r12)
    a.call("print_sdec")
    p.print(", VIRQ_TIMER upcalls: ")
    a.mov(rdi, qword["timer_fired"])
    a.call("print_dec")
    p.print(", not early: ")
    a.test(r13, r13)
    a.jns("timer.late")
    p.print("no\n")
    a.jmp("timer.report_done")
    a.label("timer.late")
    p.print("yes\n")
    a.label("timer.report_done")

    if extra:
        extra(p)
    p.print("powering off\n")
    a.xor(eax, eax)
    a.ret()

    _emit_xs_take(p)

    a.label("on_timer")
    a.inc(qword["timer_fired"])
    a.ret()

    emit_start64(a)

    a.section(".data")
    emit_entry32_data(a)
    a.label("sig")
    a.dd(0, 0, 0)
    a.label("features")                 # struct xen_feature_info: submap_idx, submap
    a.dd(0, 0)
    a.align(8)
    a.label("sshot")                    # struct vcpu_set_singleshot_timer
    a.dq(0)
    a.dd(0, 0)
    a.label("timer_fired")
    a.dq(0)
    a.label("hvmparam")                 # struct xen_hvm_param: domid, index, value
    a.dw(C.DOMID_SELF, 0)
    a.dd(0)
    a.dq(0)
    a.label("xs_port")                  # EVTCHNOP_send's argument: the store's port
    a.dd(0)
    a.label("xs_req")
    a.db(XS_REQUEST)
    a.label("xs_rsp")
    a.db(bytes(16 + XS_REPLY_MAX))
    a.label("msg_vmcall")
    a.ascii(MSG_VMCALL)
    a.align(8)
    a.label("gdt")
    a.dq(*GDT64)
    a.label("gdt_desc")
    a.dw(len(GDT64) * 8 - 1)
    a.dd("gdt")
    emit_first_gib_tables(a, user=False)      # the guest's own page tables

    emit_traps(p, "trapless PVH guest")
    emit_events(p)
    emit_pvclock(p)

    a.section(".text32", "rx")
    _entry32(a)

    img = p.image()
    notes = [(C.XEN_ELFNOTE_GUEST_OS, guest_os),
             (C.XEN_ELFNOTE_PHYS32_ENTRY, img.symbols["_start32"])]
    return build_elf(img.sections, img.symbols, img.symbols["_start32"], notes)
