"""A block frontend for trapless's own PV kernel: a Xen virtual disk, used as a domU uses it.

The guest finds its disk in xenstore (the first entry of device/vbd, its backend's
directory in the `backend` key), sets up its grant table (setup_table, GT_FRAMES frames
mapped with update_va_mapping), grants the backend its ring (as many pages as the
backend's max-ring-page-order allows, up to 16: ring-page-order and ring-refN) and its
data pages, allocates an event channel for dom0, masks it, and publishes ring-ref(s),
event-channel and protocol, then goes to Initialised and waits for the backend to be
Connected (the XenbusState handshake of io/blkif.h). It reads the whole disk a page at
a time and prints an FNV-1a 64 checksum of it, reads sectors 0-15 in one indirect
request; unless the disk is read-only (the backend's `mode`) it writes sector 1,
flushes the disk cache and reads the sector back, writes sector 2 with a barrier,
discards sectors 16-23 and reads them back (zeros); a read-only disk is asked anyway
and must refuse. Then it sends requests a backend must refuse (beyond the disk, a page
it did not grant, too many segments, a sector past the page, an unknown operation) and
prints each status, and last moves its producer index a thousand ahead, which must stop
the backend serving the ring. Then it closes the device and powers off.

Requests are pushed as io/ring.h says (an event only if the backend's req_event asks
for one); the frontend waits for responses asleep in SCHEDOP_poll on its masked port,
having set rsp_event (blk_wait). Its bench mode keeps BENCH_SLOTS requests in flight.

    blkfront_guest() -> ELF image; the console says
    blkfront: device 51712, backend /local/domain/0/backend/vbd/1/51712
    blkfront: connected, 2048 sectors, mode w, ring of 16 pages
    blkfront: read 2048 sectors, fnv1a64 0x...
    blkfront: write sector 1: 0, flush: 0, read back: 0, what it wrote
"""
from __future__ import annotations


from abi import C, offsetof, sizeof

from .asm import (al, byte, cl, dl, dword, eax, ebx, ecx, edi, edx, esi, ptr, qword, r12, r13,
                  r14, r15, rax, rbx, rcx, rdi, rdx, rip, rsi, rsp, word)
from .pvlib import EVTCHN_MASK, EVTCHN_PENDING, crash_unless, emit_pvclock
from .runtime import PVProgram

GT_FRAMES = 4                           # grant table frames: 2048 v1 entries
DATA_REF = 9                            # grant refs (0 and 1 are Xen's reserved ones)
UNGRANTED_REF = 10                      # an entry it never fills
DATA2_REF, INDIRECT_REF = 11, 12
RING_ORDER_MAX = 4                      # the largest ring it asks for: 16 pages, as Linux
RING_REF = 16                           # the ring's pages: refs 16 to 31
BAD_AHEAD = 1000                        # a req_prod this far ahead breaks the ring
BENCH_REF, BENCH_SEGS = 32, 32          # the bench's pages: 128 KiB a request, as
WRITER_STAMP = 0x7772697465720000        # "writer": what it stamps, plus the sector
BENCH_SLOTS = 32                        # requests in flight at once, each with an
                                        # indirect page of its own naming the same
                                        # BENCH_SEGS data pages; Linux's blkfront sends
                                        # 128 KiB (32 indirect segments)
BENCH_INDIRECT_REF = BENCH_REF + BENCH_SEGS     # slot k's indirect page: this + k
SAVED = (rbx, r12, r13, r14, r15)       # callee-saved registers it uses
RING_ENTRIES0 = 32                      # of a 1-page ring: (4096 - 64) / 112 rounded down
                                        # to a power of two (io/ring.h); 2^order pages
                                        # hold 2^order times as many
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
WRITE_SECTOR = 1
BARRIER_SECTOR, DISCARD_SECTOR = 2, 16      # a barrier write; a discarded page
PATTERN = b"trapless blkfront wrote sector 1 "          # repeated over the sector
P, RW, U, A, D = 0x1, 0x2, 0x4, 0x20, 0x40

XS_REQ = offsetof("xenstore_domain_interface", "req")
XS_RSP = offsetof("xenstore_domain_interface", "rsp")
XS_REQ_CONS = offsetof("xenstore_domain_interface", "req_cons")
XS_REQ_PROD = offsetof("xenstore_domain_interface", "req_prod")
XS_RSP_CONS = offsetof("xenstore_domain_interface", "rsp_cons")
XS_RSP_PROD = offsetof("xenstore_domain_interface", "rsp_prod")
XS_RING = C.XENSTORE_RING_SIZE
REPLY_MAX = 512                         # the longest reply it keeps
REQ_SIZE = sizeof("blkif_request")
RING_HEADER = C.BLKIF_RING_HEADER


def sector_pattern() -> bytes:
    """What the guest writes into sector 1."""
    return (PATTERN * (512 // len(PATTERN) + 1))[:512]


def fnv1a64(data: bytes) -> int:
    """The checksum the guest prints, computed on the host."""
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFF_FFFF_FFFF_FFFF
    return h


def _emit_xenstore(p: PVProgram) -> None:
    """The xenstore client; r12 = the ring page.

    xs_cmd(edi = type, rsi = payload, edx = length) -> eax = the reply's type; its
    payload NUL-terminated in xs_reply. mkpath(rdi = dir, rsi = key) -> rsi = xs_path
    = "dir/key", rdx = its length with the NUL. xs_read(rdi = dir, rsi = key) and
    xs_write(rdi = dir, rsi = key, rdx = value cstr) do both."""
    a = p.a
    a.label("xs_cmd")
    a.push(rbx)
    a.mov(dword["xs_hdr"], edi)
    a.mov(dword[rip + "xs_hdr" + 12], edx)
    a.push(rsi)
    a.push(rdx)
    a.lea(rsi, ptr["xs_hdr"])
    a.mov(edx, 16)
    a.call("xs_put")
    a.pop(rdx)
    a.pop(rsi)
    a.call("xs_put")
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "xs_port")
    a.lea(rdi, ptr["xs_hdr"])
    a.mov(ebx, 16)
    a.call("xs_get")
    a.mov(ebx, dword[rip + "xs_hdr" + 12])
    a.cmp(ebx, REPLY_MAX)
    crash_unless_jbe(p, "blkfront: a xenstore reply longer than it keeps: ")
    a.push(rbx)
    a.lea(rdi, ptr["xs_reply"])
    a.call("xs_get")
    a.pop(rbx)
    a.lea(rdi, ptr["xs_reply"])
    a.mov(byte[rdi + rbx], 0)
    a.mov(eax, dword["xs_hdr"])
    a.pop(rbx)
    a.ret()

    # xs_put(rsi = bytes, rdx = length): into req, as it has room
    a.label("xs_put")
    a.test(rdx, rdx)
    a.je("xs_put.done")
    a.mov(edi, dword[r12 + XS_REQ_PROD])
    a.mov(eax, edi)
    a.sub(eax, dword[r12 + XS_REQ_CONS])
    a.cmp(eax, XS_RING)
    a.jb("xs_put.room")
    a.push(rsi)
    a.push(rdx)
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "xs_port")
    p.hypercall("sched_op", C.SCHEDOP_yield, 0)
    a.pop(rdx)
    a.pop(rsi)
    a.jmp("xs_put")
    a.label("xs_put.room")
    a.mov(ecx, edi)
    a.and_(ecx, XS_RING - 1)
    a.mov(al, byte[rsi])
    a.mov(byte[r12 + rcx + XS_REQ], al)
    a.inc(edi)
    a.mov(dword[r12 + XS_REQ_PROD], edi)    # x86 keeps stores in order: data, then index
    a.inc(rsi)
    a.dec(rdx)
    a.jmp("xs_put")
    a.label("xs_put.done")
    a.ret()

    # xs_get(rdi = where, ebx = bytes): from rsp as they come, yielding while it is empty
    a.label("xs_get")
    a.test(ebx, ebx)
    a.je("xs_get.done")
    a.mov(edx, dword[r12 + XS_RSP_CONS])
    a.cmp(edx, dword[r12 + XS_RSP_PROD])
    a.jne("xs_get.byte")
    a.push(rdi)
    p.hypercall("sched_op", C.SCHEDOP_yield, 0)
    a.pop(rdi)
    a.jmp("xs_get")
    a.label("xs_get.byte")
    a.mov(ecx, edx)
    a.and_(ecx, XS_RING - 1)
    a.mov(al, byte[r12 + rcx + XS_RSP])
    a.mov(byte[rdi], al)
    a.inc(rdi)
    a.inc(edx)
    a.mov(dword[r12 + XS_RSP_CONS], edx)
    a.dec(ebx)
    a.jmp("xs_get")
    a.label("xs_get.done")
    a.ret()

    a.label("mkpath")
    a.lea(rcx, ptr["xs_path"])
    a.label("mkpath.dir")
    a.mov(al, byte[rdi])
    a.test(al, al)
    a.je("mkpath.sep")
    a.mov(byte[rcx], al)
    a.inc(rdi)
    a.inc(rcx)
    a.jmp("mkpath.dir")
    a.label("mkpath.sep")
    a.mov(byte[rcx], ord("/"))
    a.inc(rcx)
    a.label("mkpath.key")
    a.mov(al, byte[rsi])
    a.mov(byte[rcx], al)
    a.inc(rcx)
    a.inc(rsi)
    a.test(al, al)
    a.jne("mkpath.key")
    a.lea(rsi, ptr["xs_path"])
    a.mov(rdx, rcx)
    a.sub(rdx, rsi)
    a.ret()

    a.label("xs_read")
    a.call("mkpath")
    a.mov(edi, C.XS_READ)
    a.jmp("xs_cmd")

    a.label("xs_write")                 # the value follows the path's NUL, without one
    a.mov(qword["xs_value"], rdx)
    a.call("mkpath")
    a.mov(rdi, qword["xs_value"])
    a.lea(rcx, ptr["xs_path"])
    a.add(rcx, rdx)
    a.label("xs_write.value")
    a.mov(al, byte[rdi])
    a.test(al, al)
    a.je("xs_write.go")
    a.mov(byte[rcx], al)
    a.inc(rcx)
    a.inc(rdi)
    a.inc(rdx)
    a.jmp("xs_write.value")
    a.label("xs_write.go")
    a.mov(edi, C.XS_WRITE)
    a.call("xs_cmd")
    a.cmp(eax, C.XS_WRITE)
    crash_unless_je(p, "blkfront: a xenstore write failed: ")
    a.ret()


_labels = iter(range(1 << 30))


def crash_unless_je(p: PVProgram, message: str) -> None:
    """After a cmp: unless equal, print message and crash the domain."""
    ok = f"blkfront.ok{next(_labels)}"
    p.a.je(ok)
    _crash(p, message, ok)


def crash_unless_jbe(p: PVProgram, message: str) -> None:
    ok = f"blkfront.ok{next(_labels)}"
    p.a.jbe(ok)
    _crash(p, message, ok)


def _crash(p: PVProgram, message: str, ok: str) -> None:
    a = p.a
    p.print(message)
    a.lea(rdi, ptr["xs_reply"])
    a.call("print_cstr")
    p.print("\n")
    a.mov(edi, C.SHUTDOWN_crash)
    a.call("shutdown")
    a.label(ok)


def _emit_numbers(p: PVProgram) -> None:
    """utoa(rax = value, rdi = buffer): its decimal digits, NUL-terminated.
    atou(rsi = cstr) -> rax: a decimal number."""
    a = p.a
    a.label("utoa")
    a.mov(rcx, rdi)
    a.mov(esi, 10)
    a.label("utoa.digit")               # backwards, then turned around
    a.xor(edx, edx)
    a.div(rsi)
    a.add(edx, ord("0"))
    a.mov(byte[rcx], dl)
    a.inc(rcx)
    a.test(rax, rax)
    a.jne("utoa.digit")
    a.mov(byte[rcx], 0)
    a.dec(rcx)
    a.label("utoa.reverse")
    a.cmp(rdi, rcx)
    a.jae("utoa.done")
    a.mov(al, byte[rdi])
    a.mov(dl, byte[rcx])
    a.mov(byte[rdi], dl)
    a.mov(byte[rcx], al)
    a.inc(rdi)
    a.dec(rcx)
    a.jmp("utoa.reverse")
    a.label("utoa.done")
    a.ret()

    a.label("atou")
    a.xor(eax, eax)
    a.label("atou.digit")
    a.movzx(ecx, byte[rsi])
    a.sub(ecx, ord("0"))
    a.cmp(ecx, 9)
    a.ja("atou.done")
    a.imul(rax, rax, 10)
    a.add(rax, rcx)
    a.inc(rsi)
    a.jmp("atou.digit")
    a.label("atou.done")
    a.ret()


def _emit_blk_request(p: PVProgram) -> None:
    """blk_request(edi = operation, esi = segments (0 or 1), rdx = sector,
    ecx = last sector of the data page) -> rax = the response's status. The one segment
    is the data page (grant DATA_REF) from its first sector. Waits for the response."""
    a = p.a
    a.label("blk_request")
    a.push(rbx)
    a.mov(eax, dword["blk_req_prod"])
    a.and_(eax, dword["blk_mask"])
    a.imul(eax, eax, REQ_SIZE)
    a.lea(rbx, ptr[rip + "blk_ring" + RING_HEADER])
    a.add(rbx, rax)
    a.shl(esi, 8)
    a.or_(esi, edi)
    a.mov(dword[rbx], esi)              # operation, nr_segments, handle 0
    a.mov(dword[rbx + 4], 0)
    a.mov(eax, dword["blk_req_prod"])
    a.mov(qword[rbx + 8], rax)          # id
    a.mov(qword[rbx + 16], rdx)         # sector_number
    a.mov(eax, dword["blk_gref"])
    a.mov(dword[rbx + 24], eax)         # seg[0].gref
    a.shl(ecx, 8)
    a.mov(dword[rbx + 28], ecx)         # first_sect 0, last_sect
    a.jmp("blk_submit")

    # blk_discard(rsi = sector, rdx = sectors) -> rax = the status of a BLKIF_OP_DISCARD
    a.label("blk_discard")
    a.push(rbx)
    a.mov(eax, dword["blk_req_prod"])
    a.and_(eax, dword["blk_mask"])
    a.imul(eax, eax, REQ_SIZE)
    a.lea(rbx, ptr[rip + "blk_ring" + RING_HEADER])
    a.add(rbx, rax)
    a.mov(dword[rbx], C.BLKIF_OP_DISCARD)   # operation, flag 0 (not secure), handle 0
    a.mov(dword[rbx + 4], 0)
    a.mov(eax, dword["blk_req_prod"])
    a.mov(qword[rbx + 8], rax)          # id
    a.mov(qword[rbx + 16], rsi)         # sector_number
    a.mov(qword[rbx + 24], rdx)         # nr_sectors
    a.jmp("blk_submit")

    # blk_slot_request(edi = BLKIF_OP_READ or _WRITE, rsi = sector, ecx = slot): one
    # indirect request of the BENCH_SEGS data pages, through the slot's indirect page
    # -> rax = its status
    a.label("blk_slot_request")
    a.mov(edx, ecx)
    a.add(edx, BENCH_INDIRECT_REF)
    a.push(rbx)
    a.mov(eax, dword["blk_req_prod"])
    a.and_(eax, dword["blk_mask"])
    a.imul(eax, eax, REQ_SIZE)
    a.lea(rbx, ptr[rip + "blk_ring" + RING_HEADER])
    a.add(rbx, rax)
    a.shl(edi, 8)
    a.or_(edi, (BENCH_SEGS << 16) | C.BLKIF_OP_INDIRECT)
    a.mov(dword[rbx], edi)              # operation, indirect_op, nr_segments
    a.mov(dword[rbx + 4], 0)
    a.mov(eax, dword["blk_req_prod"])
    a.mov(qword[rbx + 8], rax)          # id
    a.mov(qword[rbx + 16], rsi)         # sector_number
    a.mov(dword[rbx + 24], 0)           # handle
    a.mov(dword[rbx + 28], edx)         # indirect_grefs[0]: the slot's indirect page
    a.jmp("blk_submit")

    # blk_indirect(edi = BLKIF_OP_READ or _WRITE, rsi = sector, edx = segments): one
    # BLKIF_OP_INDIRECT request whose segments the page `indirect` (grant INDIRECT_REF)
    # holds -> rax = its status
    a.label("blk_indirect")
    a.push(rbx)
    a.mov(eax, dword["blk_req_prod"])
    a.and_(eax, dword["blk_mask"])
    a.imul(eax, eax, REQ_SIZE)
    a.lea(rbx, ptr[rip + "blk_ring" + RING_HEADER])
    a.add(rbx, rax)
    a.shl(edx, 16)
    a.shl(edi, 8)
    a.or_(edx, edi)
    a.or_(edx, C.BLKIF_OP_INDIRECT)
    a.mov(dword[rbx], edx)              # operation, indirect_op, nr_segments
    a.mov(dword[rbx + 4], 0)
    a.mov(eax, dword["blk_req_prod"])
    a.mov(qword[rbx + 8], rax)          # id
    a.mov(qword[rbx + 16], rsi)         # sector_number
    a.mov(dword[rbx + 24], 0)           # handle
    a.mov(dword[rbx + 28], INDIRECT_REF)    # indirect_grefs[0]

    # blk_submit (rbx pushed, the request written at req_prod): publish, wait, answer
    a.label("blk_submit")
    a.inc(dword["blk_req_prod"])
    a.call("blk_push")
    a.mov(edi, 1)
    a.call("blk_wait")
    a.label("blk_request.done")
    a.mov(eax, dword["blk_rsp_cons"])
    a.and_(eax, dword["blk_mask"])
    a.imul(eax, eax, REQ_SIZE)
    a.lea(rbx, ptr[rip + "blk_ring" + RING_HEADER])
    a.movzx(ecx, byte[rbx + rax + 8])   # operation
    a.mov(dword["blk_rsp_op"], ecx)
    a.movsx(rax, word[rbx + rax + 10])  # status
    a.inc(dword["blk_rsp_cons"])
    a.pop(rbx)
    a.ret()

    # blk_push: publish req_prod = blk_req_prod (the requests are written: x86 keeps
    # stores in order) and notify the backend only if it asked to hear of one of the
    # new requests (io/ring.h's RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, req_event)
    a.label("blk_push")
    a.mov(edx, dword["blk_ring"])       # the old req_prod
    a.mov(eax, dword["blk_req_prod"])
    a.mov(dword["blk_ring"], eax)
    a.lock()                            # a full barrier: the backend's req_event after it
    a.or_(dword[rsp], 0)
    a.mov(ecx, eax)
    a.sub(ecx, dword[rip + "blk_ring" + 4])     # new - req_event
    a.sub(eax, edx)                             # new - old
    a.cmp(ecx, eax)
    a.jae("blk_push.quiet")
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "blk_port")
    a.label("blk_push.quiet")
    a.ret()

    # blk_wait(edi = n >= 1): until the backend has a response past blk_rsp_cons, sleep
    # on the port (masked: no upcall): clear its pending bit, set rsp_event to ask for an
    # event at the n-th response from here (io/ring.h lets a consumer put it where it
    # likes: a frontend with many requests in flight wakes once for several), look
    # again, then SCHEDOP_poll, which returns once the port is pending
    a.label("blk_wait")
    a.mov(dword["blk_wait_n"], edi)     # the hypercall takes rdi
    a.label("blk_wait.look")
    a.mov(eax, dword[rip + "blk_ring" + 8])     # rsp_prod
    a.cmp(eax, dword["blk_rsp_cons"])
    a.jne("blk_wait.done")
    a.mov(rsi, qword["blk_shinfo"])
    a.mov(eax, dword["blk_port"])
    a.mov(ecx, eax)
    a.and_(ecx, 63)
    a.mov(rdx, -2)
    a.rol(rdx, cl)                      # every bit but the port's
    a.shr(eax, 6)
    a.lock()
    a.and_(qword[rsi + rax * 8 + EVTCHN_PENDING], rdx)
    a.mov(eax, dword["blk_rsp_cons"])
    a.add(eax, dword["blk_wait_n"])
    a.mov(dword[rip + "blk_ring" + 12], eax)    # rsp_event
    a.lock()                            # a full barrier: rsp_prod read after it
    a.or_(dword[rsp], 0)
    a.mov(eax, dword[rip + "blk_ring" + 8])
    a.cmp(eax, dword["blk_rsp_cons"])
    a.jne("blk_wait.done")
    p.hypercall("sched_op", C.SCHEDOP_poll, "blk_poll")
    a.jmp("blk_wait.look")
    a.label("blk_wait.done")
    a.ret()


def blkfront_guest(xen_pv: bool = True, bench: bool = False, writer: bool = False) -> bytes:
    """A kernel that runs only the frontend, then powers off; xen_pv: in Xen's PV CPU
    model (its kernel in ring 3), else a ring-0 kernel. bench: instead of its checks,
    read the whole disk, then write it, in 128 KiB indirect requests, and flush; it
    prints "bench: read|write done in N ns" (its PV clock) after each part.
    writer: instead of its checks, write the disk from its start, 128 KiB a request, one
    at a time, every sector's first 8 bytes WRITER_STAMP + its number, and print
    "writer: acknowledged N\n" (the sectors before N are written) after each response."""
    p = PVProgram(guest_os="trapless-blkfront", xen_pv=xen_pv)
    p.a.jmp("blkfront_main")
    emit_blkfront(p, bench, writer)
    if bench:
        emit_pvclock(p, shared_info_at="blk_shinfo")
    return p.elf()


def emit_blkfront_check(p: PVProgram) -> None:
    """Emit, in main: with the word `blkfront` on the command line, run the frontend and
    power off after it (the PV kernel's hook)."""
    a = p.a
    p.load_arg(rdi, p.string("blkfront"))
    a.call("cmdline_has_word")
    a.test(rax, rax)
    a.je("blkfront.skip")
    a.call("blkfront_main")
    a.mov(eax, C.SHUTDOWN_poweroff)
    a.ret()
    a.label("blkfront.skip")


def emit_blkfront(p: PVProgram, bench: bool = False, writer: bool = False) -> None:
    """blkfront_main() -> rax = 0: the frontend, and everything it needs."""
    a = p.a
    a.label("blkfront_main")
    for reg in SAVED:
        a.push(reg)
    # xenstore: the ring start_info names (VIRT_BASE 0: a frame's address is its own)
    a.mov(rax, qword["start_info_ptr"])
    a.mov(r12, qword[rax + offsetof("start_info", "store_mfn")])
    a.shl(r12, 12)
    a.mov(ecx, dword[rax + offsetof("start_info", "store_evtchn")])
    a.mov(dword["xs_port"], ecx)

    # the disk: the first device/vbd entry, and its backend's directory
    emit_find_device(p, "blkfront", "vbd", "disk")
    p.print("\n")

    emit_map_grant_table(p, "blkfront", GT_FRAMES)
    pages = [(DATA_REF, "data", 0), (DATA2_REF, "data2", 0), (INDIRECT_REF, "indirect", 0)]
    pages += [(RING_REF + i, "blk_ring", i * 4096) for i in range(1 << RING_ORDER_MAX)]
    for ref, page, offset in pages:
        grant_page(p, ref, page, offset)
    if bench or writer:                 # bench_pages, frame after frame, from BENCH_REF
        a.lea(rdi, ptr[rip + "gt" + BENCH_REF * 8])
        a.lea(rax, ptr["bench_pages"])
        a.shr(rax, 12)
        a.mov(ecx, BENCH_SEGS + BENCH_SLOTS)
        a.label("bench.grant")
        a.mov(dword[rdi + 4], eax)
        a.mov(word[rdi + 2], 0)
        a.mov(word[rdi], C.GTF_permit_access)
        a.add(rdi, 8)
        a.inc(eax)
        a.dec(ecx)
        a.jne("bench.grant")
    a.mov(dword[rip + "blk_ring" + 4], 1)               # req_event
    a.mov(dword[rip + "blk_ring" + 12], 1)              # rsp_event

    # an event channel for the backend in dom0
    p.hypercall("event_channel_op", C.EVTCHNOP_alloc_unbound, "unbound")
    crash_unless(p, "je", "blkfront: alloc_unbound: ")
    a.mov(eax, dword[rip + "unbound" + offsetof("evtchn_alloc_unbound", "port")])
    a.mov(dword["blk_port"], eax)
    # shared_info, for the port's pending bit: the frame start_info names (Xen's PV
    # model; a frame's address is its own), else placed on a page of ours
    a.mov(rax, qword["start_info_ptr"])
    a.mov(rax, qword[rax + offsetof("start_info", "shared_info")])
    a.test(rax, rax)
    a.jne("shinfo.known")
    a.lea(rax, ptr["blk_shinfo_page"])
    a.shr(rax, 12)
    a.mov(qword[rip + "blk_xatp" + offsetof("xen_add_to_physmap", "gpfn")], rax)
    p.hypercall("memory_op", C.XENMEM_add_to_physmap, "blk_xatp")
    crash_unless(p, "je", "blkfront: placing shared_info: ")
    a.lea(rax, ptr["blk_shinfo_page"])
    a.label("shinfo.known")
    a.mov(qword["blk_shinfo"], rax)
    # masked: the frontend sleeps in SCHEDOP_poll on it and takes no upcall for it
    a.mov(eax, dword["blk_port"])
    a.mov(ecx, eax)
    a.and_(ecx, 63)
    a.mov(edx, 1)
    a.shl(rdx, cl)
    a.shr(eax, 6)
    a.mov(rsi, qword["blk_shinfo"])
    a.lock()
    a.or_(qword[rsi + rax * 8 + EVTCHN_MASK], rdx)

    # publish the ring (as many pages as the backend takes, up to 2^RING_ORDER_MAX),
    # then Initialised; wait for the backend to be Connected
    a.lea(rdi, ptr["back"])
    a.lea(rsi, ptr[p.string("max-ring-page-order")])
    a.call("xs_read")
    a.lea(rsi, ptr["xs_reply"])
    a.call("atou")                      # absent: "ENOENT" reads as 0
    a.cmp(eax, RING_ORDER_MAX)
    a.jbe("ring.order")
    a.mov(eax, RING_ORDER_MAX)
    a.label("ring.order")
    a.test(eax, eax)
    a.je("ring.one_page")
    a.mov(ecx, eax)
    a.mov(edx, RING_ENTRIES0)
    a.shl(edx, cl)
    a.dec(edx)
    a.mov(dword["blk_mask"], edx)
    a.mov(edx, 1)
    a.shl(edx, cl)
    a.mov(dword["ring_pages"], edx)
    a.lea(rdi, ptr["number"])
    a.call("utoa")
    a.lea(rdi, ptr["front"])
    a.lea(rsi, ptr[p.string("ring-page-order")])
    a.lea(rdx, ptr["number"])
    a.call("xs_write")
    for i in range(1 << RING_ORDER_MAX):
        a.cmp(dword["ring_pages"], i)
        a.jbe("ring.published")
        xs_write_const(p, f"ring-ref{i}", str(RING_REF + i))
    a.jmp("ring.published")
    a.label("ring.one_page")
    xs_write_const(p, "ring-ref", str(RING_REF))
    a.label("ring.published")
    xs_write_const(p, "protocol", "x86_64-abi")
    a.mov(eax, dword["blk_port"])
    a.lea(rdi, ptr["number"])
    a.call("utoa")
    a.lea(rdi, ptr["front"])
    a.lea(rsi, ptr[p.string("event-channel")])
    a.lea(rdx, ptr["number"])
    a.call("xs_write")
    a.lea(rdi, ptr["front"])
    a.lea(rsi, ptr[p.string("state")])
    a.lea(rdx, ptr[p.string(str(C.XenbusStateInitialised))])
    a.call("xs_write")
    emit_wait_connected(p, "blkfront", "the ring")
    a.lea(rdi, ptr["front"])
    a.lea(rsi, ptr[p.string("state")])
    a.lea(rdx, ptr[p.string(str(C.XenbusStateConnected))])
    a.call("xs_write")
    a.lea(rdi, ptr["back"])
    a.lea(rsi, ptr[p.string("sectors")])
    a.call("xs_read")
    a.lea(rsi, ptr["xs_reply"])
    a.call("atou")
    a.mov(r13, rax)                     # the disk's sectors
    a.mov(qword["disk_sectors"], rax)
    a.lea(rdi, ptr["back"])
    a.lea(rsi, ptr[p.string("mode")])
    a.call("xs_read")
    a.movzx(eax, byte["xs_reply"])
    a.mov(r15, rax)                     # 'r' or 'w'
    p.print("blkfront: connected, ")
    a.mov(rdi, r13)
    a.call("print_dec")
    p.print(" sectors, mode ")
    a.lea(rdi, ptr["xs_reply"])
    a.call("print_cstr")
    p.print(", ring of ")
    a.mov(edi, dword["ring_pages"])
    a.call("print_dec")
    p.print(" pages\n")

    if bench or writer:
        _emit_slot_pages(p)
    if bench:
        _emit_bench(p)
        a.jmp("blkfront.close")
    if writer:
        _emit_writer(p)
        a.jmp("blkfront.close")

    # read it all, a page (8 sectors) at a time, hashing as it comes
    a.mov(r14, 0)                       # the next sector
    a.mov(rbx, FNV_OFFSET)
    a.label("read_loop")
    a.cmp(r14, r13)
    a.jae("read_done")
    a.mov(rcx, r13)
    a.sub(rcx, r14)
    a.cmp(rcx, 8)
    a.jbe("read_count")
    a.mov(ecx, 8)
    a.label("read_count")
    a.push(rcx)
    a.dec(ecx)                          # the last sector of the page it fills
    a.mov(edi, C.BLKIF_OP_READ)
    a.mov(esi, 1)
    a.mov(rdx, r14)
    a.call("blk_request")
    a.pop(rcx)
    crash_unless(p, "je", "blkfront: read failed, status ")
    a.add(r14, rcx)
    a.shl(ecx, 9)                       # bytes
    a.lea(rsi, ptr["data"])
    a.mov(rdi, FNV_PRIME)
    a.label("hash")
    a.movzx(eax, byte[rsi])
    a.xor(rbx, rax)
    a.imul(rbx, rdi)
    a.inc(rsi)
    a.dec(ecx)
    a.jne("hash")
    a.jmp("read_loop")
    a.label("read_done")
    p.print("blkfront: read ")
    a.mov(rdi, r13)
    a.call("print_dec")
    p.print(" sectors, fnv1a64 ")
    a.mov(rdi, rbx)
    a.call("print_hex")
    p.print("\n")

    # sectors 0-15 again in one indirect request, if the backend takes them
    a.lea(rdi, ptr["back"])
    a.lea(rsi, ptr[p.string("feature-max-indirect-segments")])
    a.call("xs_read")
    a.lea(rsi, ptr["xs_reply"])
    a.call("atou")
    a.cmp(eax, 2)
    a.jb("indirect.skip")
    for i, ref in enumerate((DATA_REF, DATA2_REF)):    # into data and data2
        a.mov(dword[rip + "indirect" + 8 * i], ref)
        a.mov(dword[rip + "indirect" + 8 * i + 4], 7 << 8)     # first_sect 0, last_sect 7
    a.mov(edi, C.BLKIF_OP_READ)
    a.xor(esi, esi)
    a.mov(edx, 2)
    a.call("blk_indirect")
    a.mov(rbx, rax)
    p.print("blkfront: indirect read of sectors 0-15: ")
    a.mov(rdi, rbx)
    a.call("print_sdec")
    # the response names the indirect_op (READ), as Xen's blkback answers and Linux's
    # blkfront insists, not BLKIF_OP_INDIRECT
    p.print(", operation ")
    a.mov(edi, dword["blk_rsp_op"])
    a.call("print_sdec")
    a.mov(rbx, FNV_OFFSET)
    a.lea(rsi, ptr["data"])
    a.mov(rdi, FNV_PRIME)
    a.mov(ecx, 2 * 4096)                # data and data2, one after the other
    a.label("hash2")
    a.movzx(eax, byte[rsi])
    a.xor(rbx, rax)
    a.imul(rbx, rdi)
    a.inc(rsi)
    a.dec(ecx)
    a.jne("hash2")
    p.print(", fnv1a64 ")
    a.mov(rdi, rbx)
    a.call("print_hex")
    p.print("\n")
    a.label("indirect.skip")

    # write sector 1 (asked even of a read-only disk, which must refuse), flush, read back
    a.lea(rdi, ptr["data"])
    a.lea(rsi, ptr["pattern"])
    a.mov(ecx, 512)
    a.label("fill")
    a.mov(al, byte[rsi])
    a.mov(byte[rdi], al)
    a.inc(rdi)
    a.inc(rsi)
    a.dec(ecx)
    a.jne("fill")
    a.mov(edi, C.BLKIF_OP_WRITE)
    a.mov(esi, 1)
    a.mov(edx, WRITE_SECTOR)
    a.xor(ecx, ecx)
    a.call("blk_request")
    a.mov(rbx, rax)
    a.mov(edi, C.BLKIF_OP_FLUSH_DISKCACHE)
    a.xor(esi, esi)
    a.xor(edx, edx)
    a.xor(ecx, ecx)
    a.call("blk_request")
    a.mov(r14, rax)
    a.lea(rdi, ptr["data"])             # forget what it wrote, then read the sector
    a.mov(ecx, 512)
    a.label("wipe")
    a.mov(byte[rdi], 0)
    a.inc(rdi)
    a.dec(ecx)
    a.jne("wipe")
    a.mov(edi, C.BLKIF_OP_READ)
    a.mov(esi, 1)
    a.mov(edx, WRITE_SECTOR)
    a.xor(ecx, ecx)
    a.call("blk_request")
    a.mov(r13, rax)
    p.print("blkfront: write sector 1: ")
    a.mov(rdi, rbx)
    a.call("print_sdec")
    p.print(", flush: ")
    a.mov(rdi, r14)
    a.call("print_sdec")
    p.print(", read back: ")
    a.mov(rdi, r13)
    a.call("print_sdec")
    a.lea(rdi, ptr["data"])
    a.lea(rsi, ptr["pattern"])
    a.mov(ecx, 512)
    a.label("compare")
    a.mov(al, byte[rdi])
    a.cmp(al, byte[rsi])
    a.jne("compare.differs")
    a.inc(rdi)
    a.inc(rsi)
    a.dec(ecx)
    a.jne("compare")
    p.print(", what it wrote\n")
    a.jmp("compare.done")
    a.label("compare.differs")
    p.print(", not what it wrote\n")
    a.label("compare.done")

    # a write barrier (sector 2, the pattern again), then sectors 16-23 discarded and
    # read back: a read-only disk refuses both (it offers no discard)
    a.lea(rdi, ptr["data"])
    a.lea(rsi, ptr["pattern"])
    a.mov(ecx, 512)
    a.label("fill2")
    a.mov(al, byte[rsi])
    a.mov(byte[rdi], al)
    a.inc(rdi)
    a.inc(rsi)
    a.dec(ecx)
    a.jne("fill2")
    a.mov(edi, C.BLKIF_OP_WRITE_BARRIER)
    a.mov(esi, 1)
    a.mov(edx, BARRIER_SECTOR)
    a.xor(ecx, ecx)
    a.call("blk_request")
    a.mov(rbx, rax)
    a.mov(esi, DISCARD_SECTOR)
    a.mov(edx, 8)
    a.call("blk_discard")
    a.mov(r14, rax)
    a.mov(edi, C.BLKIF_OP_READ)
    a.mov(esi, 1)
    a.mov(edx, DISCARD_SECTOR)
    a.mov(ecx, 7)
    a.call("blk_request")
    a.mov(r13, rax)
    p.print(f"blkfront: barrier write sector {BARRIER_SECTOR}: ")
    a.mov(rdi, rbx)
    a.call("print_sdec")
    p.print(f", discard sectors {DISCARD_SECTOR}-{DISCARD_SECTOR + 7}: ")
    a.mov(rdi, r14)
    a.call("print_sdec")
    p.print(", read back: ")
    a.mov(rdi, r13)
    a.call("print_sdec")
    a.lea(rsi, ptr["data"])
    a.mov(ecx, 4096 // 8)
    a.label("zeros")
    a.cmp(qword[rsi], 0)
    a.jne("zeros.not")
    a.add(rsi, 8)
    a.dec(ecx)
    a.jne("zeros")
    p.print(", zeros\n")
    a.jmp("zeros.done")
    a.label("zeros.not")
    p.print(", not zeros\n")
    a.label("zeros.done")

    # requests a backend must refuse, each answered and nothing else changed
    refusals = (("beyond the disk", C.BLKIF_OP_READ, 1, "r13", 0, DATA_REF),
                ("a page it did not grant", C.BLKIF_OP_READ, 1, 0, 0, UNGRANTED_REF),
                ("12 segments", C.BLKIF_OP_READ, 12, 0, 0, DATA_REF),
                ("last_sect 8", C.BLKIF_OP_READ, 1, 0, 8, DATA_REF),
                ("operation 4", 4, 0, 0, 0, DATA_REF))
    a.mov(r13, qword["disk_sectors"])     # the disk's size again (r13 held a status)
    p.print("blkfront: refused:")
    for i, (what, op, segs, sector, last, gref) in enumerate(refusals):
        a.mov(dword["blk_gref"], gref)
        a.mov(edi, op)
        a.mov(esi, segs)
        if sector == "r13":
            a.mov(rdx, r13)
        else:
            a.mov(edx, sector)
        a.mov(ecx, last)
        a.call("blk_request")
        a.mov(rbx, rax)
        p.print(f"{',' if i else ''} {what} ")
        a.mov(rdi, rbx)
        a.call("print_sdec")
    p.print("\n")

    # a producer index no frontend produces: the backend stops serving the ring
    a.mov(eax, dword["blk_req_prod"])
    a.add(eax, BAD_AHEAD)
    a.mov(dword["blk_ring"], eax)
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "blk_port")
    emit_wait_backend_closing(p, "broken")
    p.print(f"blkfront: req_prod {BAD_AHEAD} ahead: backend state {C.XenbusStateClosing}\n")

    # close the device, as a frontend does before it goes
    a.label("blkfront.close")
    a.lea(rdi, ptr["front"])
    a.lea(rsi, ptr[p.string("state")])
    a.lea(rdx, ptr[p.string(str(C.XenbusStateClosed))])
    a.call("xs_write")
    p.print("blkfront: closed\n")
    for reg in reversed(SAVED):
        a.pop(reg)
    a.xor(eax, eax)
    a.ret()

    _emit_xenstore(p)
    _emit_numbers(p)
    _emit_blk_request(p)

    a.section(".data")
    a.align(8)
    a.label("setup")                    # struct gnttab_setup_table
    a.dw(C.DOMID_SELF, 0)
    a.dd(GT_FRAMES)
    a.dw(0, 0, 0, 0)
    a.dq(a.ref("frames"))
    a.label("frames")
    a.dq(*[0] * GT_FRAMES)
    a.label("unbound")                  # struct evtchn_alloc_unbound: for dom0
    a.dw(C.DOMID_SELF, 0)
    a.dd(0)
    a.label("xs_port")                  # EVTCHNOP_send's arguments
    a.dd(0)
    a.label("blk_port")
    a.dd(0)
    a.align(8)
    a.label("blk_poll")                 # struct sched_poll: blk_port, no timeout
    a.dq(a.ref("blk_port"))
    a.dd(1, 0)
    a.dq(0)
    a.label("blk_shinfo")               # where shared_info is
    a.dq(0)
    a.label("blk_xatp")                 # struct xen_add_to_physmap
    a.dw(C.DOMID_SELF, 0)
    a.dd(C.XENMAPSPACE_shared_info)
    a.dq(0, 0)
    a.label("blk_mask")                 # ring entries - 1
    a.dd(RING_ENTRIES0 - 1)
    a.label("ring_pages")
    a.dd(1)
    a.label("blk_gref")                 # the segment's grant: DATA_REF but to test refusals
    a.dd(DATA_REF)
    a.label("blk_req_prod")
    a.dd(0)
    a.label("blk_rsp_cons")
    a.dd(0)
    a.label("blk_wait_n")               # blk_wait's n
    a.dd(0)
    a.label("blk_rsp_op")               # the operation the last response named
    a.dd(0)
    a.align(8)
    a.label("disk_sectors")
    a.dq(0)
    a.label("xs_value")
    a.dq(0)
    a.label("xs_hdr")
    a.dd(0, 0, 0, 0)
    a.label("pattern")
    a.db(sector_pattern())
    a.section(".bss")
    a.align(4096)
    a.label("gt")                       # the grant table's frames are mapped here
    a.reserve(GT_FRAMES * 4096)
    a.label("blk_ring")                 # its pages, one after the other
    a.reserve(4096 << RING_ORDER_MAX)
    a.label("data")
    a.reserve(4096)
    a.label("data2")
    a.reserve(4096)
    a.label("indirect")
    a.reserve(4096)
    a.label("blk_shinfo_page")
    a.reserve(4096)
    if bench or writer:
        a.label("bench_pages")            # the data pages, then each slot's indirect page
        a.reserve((BENCH_SEGS + BENCH_SLOTS) * 4096)
    a.label("xs_reply")
    a.reserve(REPLY_MAX + 1)
    a.label("xs_path")
    a.reserve(2 * REPLY_MAX + 64)
    a.label("front")
    a.reserve(REPLY_MAX + 16)
    a.label("back")
    a.reserve(REPLY_MAX + 1)
    a.label("number")
    a.reserve(24)
    a.section(".text")


def _emit_slot_pages(p: PVProgram) -> None:
    """Each slot's indirect page names the BENCH_SEGS data pages, sectors 0-7 of each.
    Every request in flight reads into (or writes from) the same 128 KiB, as the host's
    side of the bench reads into one buffer (bench_blk.py): with a buffer per slot, 4
    MiB in all, the backend's copies missed the CPU's caches where the host's did not:
    in 30 runs per engine, alternating, the 256 MiB read took 51.8 ms (bt) and 43.4 ms
    (kvm) in the median with a buffer per slot, 35.8 and 35.2 ms with the one."""
    a = p.a
    a.lea(rdi, ptr[rip + "bench_pages" + BENCH_SEGS * 4096])     # slot 0's indirect page
    a.mov(ecx, BENCH_SLOTS)
    a.label("bench.slot")
    a.mov(eax, BENCH_REF)
    a.xor(edx, edx)
    a.label("bench.segment")
    a.mov(dword[rdi + rdx * 8], eax)    # gref
    a.mov(dword[rdi + rdx * 8 + 4], 7 << 8)     # sectors 0-7
    a.inc(eax)
    a.inc(edx)
    a.cmp(edx, BENCH_SEGS)
    a.jb("bench.segment")
    a.add(rdi, 4096)
    a.dec(ecx)
    a.jne("bench.slot")


def _emit_writer(p: PVProgram) -> None:
    """The disk (r13 sectors) written from its start with the data pages, a request at a
    time, each sector stamped; a line after each response (blkfront_guest's writer)."""
    a = p.a
    a.xor(r14, r14)                     # the next sector
    a.label("writer.next")
    a.cmp(r14, r13)
    a.jae("writer.done")
    a.lea(rdi, ptr[rip + "bench_pages"])            # the data pages
    a.mov(rax, WRITER_STAMP)
    a.add(rax, r14)
    a.mov(ecx, BENCH_SEGS * 8)
    a.label("writer.stamp")
    a.mov(qword[rdi], rax)
    a.add(rdi, 512)
    a.inc(rax)
    a.dec(ecx)
    a.jne("writer.stamp")
    a.mov(edi, C.BLKIF_OP_WRITE)
    a.mov(rsi, r14)
    a.xor(ecx, ecx)
    a.call("blk_slot_request")
    crash_unless(p, "je", "writer: a write failed, status ")
    a.add(r14, BENCH_SEGS * 8)
    p.print("writer: acknowledged ")
    a.mov(rdi, r14)
    a.call("print_dec")
    p.print("\n")
    a.jmp("writer.next")
    a.label("writer.done")
    p.print("writer: done\n")


def _emit_bench(p: PVProgram) -> None:
    """The whole disk (r13 sectors, a multiple of BENCH_SEGS pages) read, then written,
    in indirect requests of BENCH_SEGS pages, BENCH_SLOTS of them in flight, then one
    flush. A request's id is its slot; a slot is free again when its response comes."""
    a = p.a
    assert BENCH_SLOTS <= RING_ENTRIES0 and BENCH_INDIRECT_REF + BENCH_SLOTS <= GT_FRAMES * 512
    for op, what in ((C.BLKIF_OP_READ, "read"), (C.BLKIF_OP_WRITE, "write")):
        p.print(f"bench: {what}\n")
        a.call("pvclock_read")          # timed by the guest's own clock, not by when
        a.mov(qword["bench_t0"], rax)   # the host happens to see its console lines
        a.xor(r14, r14)                 # the next sector to ask for
        a.xor(r15, r15)                 # requests in flight
        a.mov(dword["bench_free"], (1 << BENCH_SLOTS) - 1)
        a.label(f"bench.{what}.fill")   # as many requests as there are free slots
        a.cmp(r14, r13)
        a.jae(f"bench.{what}.push")
        a.mov(eax, dword["bench_free"])
        a.bsf(ecx, eax)
        a.je(f"bench.{what}.push")
        a.mov(edx, 1)
        a.shl(edx, cl)
        a.not_(edx)
        a.and_(dword["bench_free"], edx)
        a.mov(eax, dword["blk_req_prod"])
        a.and_(eax, dword["blk_mask"])
        a.imul(eax, eax, REQ_SIZE)
        a.lea(rbx, ptr[rip + "blk_ring" + RING_HEADER])
        a.add(rbx, rax)
        a.mov(dword[rbx], (BENCH_SEGS << 16) | (op << 8) | C.BLKIF_OP_INDIRECT)
        a.mov(dword[rbx + 4], 0)
        a.mov(qword[rbx + 8], rcx)      # id: the slot
        a.mov(qword[rbx + 16], r14)     # sector_number
        a.mov(dword[rbx + 24], 0)       # handle
        a.add(ecx, BENCH_INDIRECT_REF)
        a.mov(dword[rbx + 28], ecx)     # indirect_grefs[0]: the slot's indirect page
        a.inc(dword["blk_req_prod"])
        a.inc(r15)
        a.add(r14, BENCH_SEGS * 8)
        a.jmp(f"bench.{what}.fill")
        a.label(f"bench.{what}.push")
        a.call("blk_push")
        a.label(f"bench.{what}.take")   # every response there is
        a.mov(eax, dword["blk_rsp_cons"])
        a.cmp(eax, dword[rip + "blk_ring" + 8])
        a.je(f"bench.{what}.taken")
        a.and_(eax, dword["blk_mask"])
        a.imul(eax, eax, REQ_SIZE)
        a.lea(rbx, ptr[rip + "blk_ring" + RING_HEADER])
        a.add(rbx, rax)
        a.movsx(rax, word[rbx + 10])    # status
        a.test(rax, rax)
        crash_unless(p, "je", f"bench: {what} failed, status ")
        a.mov(rcx, qword[rbx])          # id
        a.mov(edx, 1)
        a.shl(edx, cl)
        a.or_(dword["bench_free"], edx)
        a.dec(r15)
        a.inc(dword["blk_rsp_cons"])
        a.jmp(f"bench.{what}.take")
        a.label(f"bench.{what}.taken")
        a.cmp(r14, r13)                 # more to ask for, and a slot free: ask
        a.jae(f"bench.{what}.draining")
        a.cmp(dword["bench_free"], 0)
        a.jne(f"bench.{what}.fill")
        a.label(f"bench.{what}.draining")
        a.test(r15, r15)
        a.je(f"bench.{what}.done")
        # woken when three quarters of those in flight are done (n - n/4 >= 1): a
        # wake costs a scheduling round and, on kvm, exits, on cores the backend
        # shares. Against waking at half, in interleaved runs it sent ~173 events
        # instead of ~250 for the 4,097 requests and read and wrote faster on both
        # engines; at seven eighths the 4 left in flight ran dry before the guest
        # refilled and the backend slept and woke ~60-90 times a run on kvm
        a.mov(rdi, r15)
        a.mov(rax, r15)
        a.shr(eax, 2)
        a.sub(edi, eax)
        a.call("blk_wait")
        a.jmp(f"bench.{what}.take")
        a.label(f"bench.{what}.done")
        if op == C.BLKIF_OP_WRITE:
            a.mov(edi, C.BLKIF_OP_FLUSH_DISKCACHE)
            a.xor(esi, esi)
            a.xor(edx, edx)
            a.xor(ecx, ecx)
            a.call("blk_request")
            crash_unless(p, "je", "bench: flush failed, status ")
        a.call("pvclock_read")
        a.sub(rax, qword["bench_t0"])
        a.mov(qword["bench_t0"], rax)
        p.print(f"bench: {what} done in ")
        a.mov(rdi, qword["bench_t0"])
        a.call("print_dec")
        p.print(" ns\n")
    a.section(".data")
    a.align(8)
    a.label("bench_t0")                 # PV-clock time a part began, then its length
    a.dq(0)
    a.label("bench_free")               # a bit per free slot
    a.dd(0)
    a.section(".text")





def emit_wait_backend_closing(p: PVProgram, label: str) -> None:
    """(inline) Wait, yielding, until the backend (`back`) says Closing: how a frontend
    sees that the backend gave up on a ring it broke. label names the loop."""
    a = p.a
    a.label(f"{label}.wait")
    a.lea(rdi, ptr["back"])
    a.lea(rsi, ptr[p.string("state")])
    a.call("xs_read")
    a.lea(rsi, ptr["xs_reply"])
    a.call("atou")
    a.cmp(eax, C.XenbusStateClosing)
    a.je(f"{label}.seen")
    p.hypercall("sched_op", C.SCHEDOP_yield, 0)
    a.jmp(f"{label}.wait")
    a.label(f"{label}.seen")

def emit_wait_connected(p: PVProgram, who: str, what: str) -> None:
    """(inline) Wait, yielding, until the backend (`back`) is Connected; a backend that
    goes to Closing or beyond crashes the domain with "<who>: the backend refused <what>"."""
    a = p.a
    a.label(f"{who}.wait_connected")
    a.lea(rdi, ptr["back"])
    a.lea(rsi, ptr[p.string("state")])
    a.call("xs_read")
    a.lea(rsi, ptr["xs_reply"])
    a.call("atou")
    a.cmp(eax, C.XenbusStateConnected)
    a.je(f"{who}.connected")
    a.cmp(eax, C.XenbusStateClosing)
    crash_unless_jb(p, f"{who}: the backend refused {what}, state ")
    p.hypercall("sched_op", C.SCHEDOP_yield, 0)
    a.jmp(f"{who}.wait_connected")
    a.label(f"{who}.connected")

def emit_find_device(p: PVProgram, who: str, kind: str, noun: str) -> None:
    """(inline) The first device/<kind> entry in xenstore: its directory into `front`,
    its backend's into `back`, and "<who>: device N, backend PATH" printed (no newline);
    without one the domain crashes with a line that starts with who."""
    a = p.a
    a.mov(edi, C.XS_DIRECTORY)
    a.lea(rsi, ptr[p.string(f"device/{kind}")])
    a.mov(edx, len(f"device/{kind}") + 1)
    a.call("xs_cmd")
    a.cmp(eax, C.XS_DIRECTORY)
    crash_unless_je(p, f"{who}: no device/{kind} in xenstore: ")
    a.cmp(byte["xs_reply"], 0)
    crash_unless_jne(p, f"{who}: no {noun} in device/{kind}")
    copy_cstr(p, "front", f"device/{kind}/", "xs_reply")
    p.print(f"{who}: device ")
    a.lea(rdi, ptr["xs_reply"])
    a.call("print_cstr")
    a.lea(rdi, ptr["front"])
    a.lea(rsi, ptr[p.string("backend")])
    a.call("xs_read")
    a.cmp(eax, C.XS_READ)
    crash_unless_je(p, f"{who}: no backend key: ")
    copy_cstr(p, "back", "", "xs_reply")
    p.print(", backend ")
    a.lea(rdi, ptr["back"])
    a.call("print_cstr")

def emit_map_grant_table(p: PVProgram, who: str, nr_frames: int = 1) -> None:
    """(inline) The grant table: nr_frames frames (setup_table, as the `setup` struct
    asks), mapped at `gt` over pages of our own; a failure crashes the domain with a
    line that starts with who."""
    a = p.a
    p.hypercall("grant_table_op", C.GNTTABOP_setup_table, "setup", 1)
    a.movsx(rax, word[rip + "setup" + offsetof("gnttab_setup_table", "status")])
    crash_unless(p, "je", f"{who}: setup_table: ")
    for i in range(nr_frames):
        a.mov(rsi, qword[rip + "frames" + 8 * i])
        a.shl(rsi, 12)
        a.or_(rsi, P | RW | U | A | D)    # U: a Xen-model kernel runs in ring 3
        a.lea(rdi, ptr[rip + "gt" + 4096 * i])
        p.hypercall("update_va_mapping", rdi, rsi, C.UVMF_INVLPG)
        crash_unless(p, "je", f"{who}: mapping the grant table: ")


def grant_page(p: PVProgram, ref: int, page: str, offset: int = 0) -> None:
    """(inline) Grant entry ref (in the table mapped at `gt`): dom0 may use the page at
    label page + offset; the frame and domid first, then the flags."""
    a = p.a
    at = ref * 8                        # struct grant_entry_v1: flags, domid, frame
    a.lea(rax, ptr[rip + page + offset])
    a.shr(rax, 12)
    a.mov(dword[rip + "gt" + at + 4], eax)
    a.mov(word[rip + "gt" + at + 2], 0)
    a.mov(word[rip + "gt" + at], C.GTF_permit_access)


def xs_write_const(p: PVProgram, key: str, value: str) -> None:
    """front/key = value."""
    a = p.a
    a.lea(rdi, ptr["front"])
    a.lea(rsi, ptr[p.string(key)])
    a.lea(rdx, ptr[p.string(value)])
    a.call("xs_write")


def crash_unless_jne(p: PVProgram, message: str) -> None:
    ok = f"blkfront.ok{next(_labels)}"
    p.a.jne(ok)
    _crash(p, message, ok)


def crash_unless_jb(p: PVProgram, message: str) -> None:
    ok = f"blkfront.ok{next(_labels)}"
    p.a.jb(ok)
    _crash(p, message, ok)


def copy_cstr(p: PVProgram, dst: str, prefix: str, src: str) -> None:
    """dst = prefix + the string at src (NUL-terminated)."""
    a = p.a
    a.lea(rdi, ptr[dst])
    for ch in prefix.encode():
        a.mov(byte[rdi], ch)
        a.inc(rdi)
    a.lea(rsi, ptr[src])
    loop = f"copy_cstr.{next(_labels)}"
    a.label(loop)
    a.mov(al, byte[rsi])
    a.mov(byte[rdi], al)
    a.inc(rdi)
    a.inc(rsi)
    a.test(al, al)
    a.jne(loop)
